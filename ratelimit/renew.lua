-- Extend the leases of running streams; a lease that already expired is not revived.
-- KEYS[1] the sorted set of leases; ARGV[1] clock override ms (0 = TIME); ARGV[2] ttl ms;
-- ARGV[3..] lease ids.
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', 'GT', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
