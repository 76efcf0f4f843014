-- Settle a reservation exactly once: give back (or charge) the difference between what
-- was reserved and what was used, in the bucket it was reserved in, and release its lease.
--
-- KEYS[1]      the reservation's "settled" marker
-- KEYS[2]      the sorted set of concurrency leases
-- KEYS[3..]    one hash per window limit
-- ARGV[1]      marker ttl ms; ARGV[2] lease id ("" = none)
-- then per window: bucket, refund (negative = charge)
-- Returns 1, or 0 if it was settled before (and then changes nothing).

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 2
  local bucket, refund = ARGV[a], tonumber(ARGV[a + 1])
  if refund ~= 0 and redis.call('HEXISTS', KEYS[i], bucket) == 1 then
    redis.call('HINCRBY', KEYS[i], bucket, -refund)
  end
end
return 1
