-- Renew a generation's lease, only for its owner, and read its control flags.
--
-- KEYS[1] lease   KEYS[2] meta hash   KEYS[3] cancel flag   KEYS[4] reader flag
-- ARGV[1] the caller's epoch   ARGV[2] lease ms
-- Returns {owned, cancel requested, reader attached} as 0/1.

if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return {0, 0, 0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('EXISTS', KEYS[3]), redis.call('EXISTS', KEYS[4])}
