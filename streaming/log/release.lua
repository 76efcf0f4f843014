-- Give a generation's lease up at once, only for its owner, so that another process can
-- take the stream over without waiting for the lease to run out.
--
-- KEYS[1] lease   KEYS[2] meta hash
-- ARGV[1] the caller's epoch

if redis.call('HGET', KEYS[2], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
