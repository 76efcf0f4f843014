-- Become the one process generating a stream: only if it still runs and nobody holds
-- its lease. The fencing epoch goes up by one, and every later write of the new owner
-- carries it (see append.lua), so the previous owner can no longer write.
--
-- KEYS[1] meta hash   KEYS[2] lease
-- ARGV[1] lease ms
-- Returns the new epoch; 0 if the stream ended; -1 if a live owner holds it; -2 if it
-- does not exist (not yet: its creation may still be on the way; or no longer).

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if status ~= 'running' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[1])
return epoch
