-- Rotate a refresh token atomically; revoke its family when a rotated token comes back.
-- KEYS[1] family hash (sub, plan, scopes, revoked); KEYS[2] the presented token's hash
-- record; KEYS[3] the successor's record. ARGV[1] grace ms for concurrent refreshes.
-- Returns {status[, sub, plan, scopes, family ttl ms]}: ok, unknown, revoked, reused,
-- conflict.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {'unknown'} end
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return {'revoked'} end
if status == 'rotated' then
  local at = tonumber(redis.call('HGET', KEYS[2], 'rotated_at'))
  if now - at <= tonumber(ARGV[1]) then return {'conflict'} end
  redis.call('HSET', KEYS[1], 'revoked', '1')
  return {'reused'}
end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('HSET', KEYS[2], 'status', 'rotated', 'rotated_at', now)
redis.call('HSET', KEYS[3], 'status', 'active')
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
local g = redis.call('HMGET', KEYS[1], 'sub', 'plan', 'scopes')
return {'ok', g[1], g[2], g[3] or '', ttl}
