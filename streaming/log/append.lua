-- Append events to a stream, only if the caller still owns it: the fencing epoch is
-- checked in the same atomic step as the writes, so a process that was paused or cut
-- off past its lease (and was taken over) cannot write a single event.
--
-- KEYS[1] events (Redis Stream)   KEYS[2] meta hash (field `epoch`)
-- ARGV[1] the caller's epoch      ARGV[2] approximate max length of the stream
-- ARGV[3] ms the events key lives ("0": leave its expiry alone)
-- ARGV[4..] quadruples: event id, name, data, output tokens so far (0: none)
-- Returns the number of events appended, or the error FENCED.

if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then
  return redis.error_reply('FENCED the stream was taken over')
end
local n = 0
for i = 4, #ARGV, 4 do
  if ARGV[i + 3] == '0' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-' .. ARGV[i],
      'n', ARGV[i + 1], 'd', ARGV[i + 2], 'e', ARGV[1])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-' .. ARGV[i],
      'n', ARGV[i + 1], 'd', ARGV[i + 2], 'e', ARGV[1], 't', ARGV[i + 3])
  end
  n = n + 1
end
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return n
