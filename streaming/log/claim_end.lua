-- End a stream whose generating process died, atomically: only if it is still running,
-- nobody holds its generation lease, and (when an end event is given) that event's id is
-- the next one. Marks the stream as ended, asks any generator that wakes up to stop (the
-- cancel flag), and shortens every key's life to the replay TTL.
--
-- KEYS[1] events (Redis Stream)   KEYS[2] meta hash   KEYS[3] lease
-- KEYS[4] cancel flag             KEYS[5] reader flag
-- ARGV[1] status to record        ARGV[2] replay ttl ms
-- ARGV[3] event id ("" = append nothing: the log already ends with a terminal event)
-- ARGV[4] event name              ARGV[5] event data
-- Returns 1 if this call ended the stream, 0 if it was not for this call to end.

if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if ARGV[3] ~= '' then
  local id = tonumber(ARGV[3])
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local last = 0
  if #top > 0 then last = tonumber(string.match(top[1][1], '%-(%d+)$')) end
  if last ~= id - 1 then return 0 end
  redis.call('XADD', KEYS[1], '0-' .. id, 'n', ARGV[4], 'd', ARGV[5])
end
redis.call('HSET', KEYS[2], 'status', ARGV[1])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[5])
return 1
