-- Record how a stream ended, only for its owner: mark the status, drop the lease and
-- the reader flag, and shorten every key's life to the replay TTL.
--
-- KEYS[1] meta hash   KEYS[2] events   KEYS[3] cancel flag   KEYS[4] lease
-- KEYS[5] reader flag
-- ARGV[1] status   ARGV[2] replay ttl ms   ARGV[3] the caller's epoch
-- Returns 1, or the error FENCED.

if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[3] then
  return redis.error_reply('FENCED the stream was taken over')
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5])
return 1
