-- Admit one request against all of a principal's limits, all or nothing.
-- The arithmetic mirrors ratelimit/windows.py (see its docstring for why it is strict).
--
-- KEYS[1]      sorted set of concurrency leases (member = lease id, score = expiry ms)
-- KEYS[2]      the reservation's marker: committing sets it to "0" (pending settlement),
--              so settle.lua can tell its own reservation from counts a restarted,
--              emptied Redis rebuilt from later requests
-- KEYS[3..n+2] one hash per window limit (field = bucket index, value = weight)
-- ARGV[1]      clock override in ms (0 = Redis TIME; only tests pass a clock)
-- ARGV[2]      lease id ("" = take no lease)
-- ARGV[3]      lease ttl ms
-- ARGV[4]      concurrency limit (-1 = none)
-- ARGV[5]      1 = commit, 0 = only report
-- ARGV[6]      marker ttl ms (as long as any window may count the weight)
-- then per window: limit, window ms, bucket ms, weight
-- Returns {allowed, now, leases in use, then per window: used, retry, reset}
-- with retry -1 when the request can never fit that limit.

local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local lease_id, lease_ttl = ARGV[2], tonumber(ARGV[3])
local climit, commit = tonumber(ARGV[4]), ARGV[5] == '1'

local allowed = true
local in_use = 0
if climit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  in_use = redis.call('ZCARD', KEYS[1])
  if commit and in_use >= climit then allowed = false end
end

local n = #KEYS - 2
local out = {}
local his = {}
for i = 1, n do
  local a = 6 + (i - 1) * 4
  local limit, window, b, w = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local lo, hi = math.floor((now - window) / b), math.floor(now / b)
  his[i] = hi
  local raw = redis.call('HGETALL', KEYS[i + 2])
  local keys, counts, stale = {}, {}, {}
  for j = 1, #raw, 2 do
    local k = tonumber(raw[j])
    if k < lo then
      stale[#stale + 1] = raw[j]
    else
      -- later than now counts too: the clock may have stepped back
      counts[k] = tonumber(raw[j + 1])
      keys[#keys + 1] = k
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[i + 2], unpack(stale)) end
  table.sort(keys)
  local used = 0
  for _, k in ipairs(keys) do used = used + counts[k] end
  local reset = 0
  for _, k in ipairs(keys) do
    if counts[k] > 0 then reset = math.max(0, (k + 1) * b + window - now); break end
  end
  local retry = 0
  if used + w > limit then
    allowed = false
    if w > limit then
      retry = -1
    else
      local freed = 0
      for _, k in ipairs(keys) do
        freed = freed + counts[k]
        if used - freed + w <= limit then retry = math.max(1, (k + 1) * b + window - now); break end
      end
    end
  end
  out[#out + 1] = used
  out[#out + 1] = retry
  out[#out + 1] = reset
end

if allowed and commit then
  for i = 1, n do
    local a = 6 + (i - 1) * 4
    local window, b, w = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    if w > 0 then
      redis.call('HINCRBY', KEYS[i + 2], his[i], w)
    end
    redis.call('PEXPIRE', KEYS[i + 2], window + 2 * b)
  end
  redis.call('SET', KEYS[2], '0', 'PX', ARGV[6])
  if climit >= 0 and lease_id ~= '' then
    redis.call('ZADD', KEYS[1], now + lease_ttl, lease_id)
    redis.call('PEXPIRE', KEYS[1], lease_ttl * 2)
  end
end

local head = {allowed and 1 or 0, now, in_use}
for _, v in ipairs(out) do head[#head + 1] = v end
return head
