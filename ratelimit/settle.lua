-- Settle a reservation exactly once: give back (or charge) the difference between what
-- was reserved and what was used, in the bucket it was reserved in, and release its lease.
-- A refund only takes back what its own reservation added:
--   marker "0"  pending: refund, but never below zero (after an eviction a bucket may
--               hold less than the reservation put in); charges add in full
--   marker "1"  settled before: change nothing
--   no marker   the reservation is no longer known (Redis restarted empty, or it
--               expired): any counts in its buckets belong to later requests, so give
--               back and charge nothing; still release the lease
--
-- KEYS[1]      the reservation's marker
-- KEYS[2]      the sorted set of concurrency leases
-- KEYS[3..]    one hash per window limit
-- ARGV[1]      settled marker ttl ms; ARGV[2] lease id ("" = none)
-- then per window: bucket, refund (negative = charge)
-- Returns 1, or 0 if it was settled before (and then changes nothing).

local state = redis.call('GET', KEYS[1])
if state == '1' then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
if state ~= '0' then return 1 end
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 2
  local bucket, refund = ARGV[a], tonumber(ARGV[a + 1])
  local held = refund ~= 0 and redis.call('HGET', KEYS[i], bucket)
  if held then
    local delta = -refund
    if refund > 0 then delta = -math.min(refund, math.max(tonumber(held), 0)) end
    if delta ~= 0 then redis.call('HINCRBY', KEYS[i], bucket, delta) end
  end
end
return 1
