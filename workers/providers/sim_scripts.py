"""The simulated cloud's Redis scripts (workers/providers/sim.py): each does a call's Redis work in
one round trip, because the sim runs inside the worker and every round trip is the worker's CPU.

Their Lua is built from two functions:

- ``count(k, a)``: the counters of one API call. KEYS[k..k+3]: the requests hash, the calls hash,
  the calls-per-second hash, the log list; ARGV[a..]: the call's kind, its epoch second, its log
  entry, the log's length, then n and the n "<method> <target>" requests to count. Returns the
  index of the first ARGV after them.
- ``create(k, a)``: create-or-return-existing by ClientToken. KEYS[k..k+2]: the token's key, the id
  counter, the set of live ids; ARGV[a..]: "1" if capacity refuses a new VM, "1" if tokens are
  honoured, the VM key prefix, then the record's fields and values. Returns
  [1 created / 0 known token / -1 no capacity, id]. The token is looked up before capacity, as real
  providers answer a known token with its VM.
- ``charge(k, a)`` (workers/budget_buckets.py ``CHARGE_FN``): the simulated API's own budget for the
  call's one request, with ``BucketStore.charge_args``' KEYS and ARGV; a request it refuses is counted
  as a 429 (REFUSED) and the call is not made.
"""

from __future__ import annotations

from workers.budget_buckets import CHARGE_FN

_COUNT = """
local function count(k, a)
  local n = tonumber(ARGV[a + 4])
  for i = a + 5, a + 4 + n do redis.call('hincrby', KEYS[k], ARGV[i], 1) end
  redis.call('hincrby', KEYS[k + 1], ARGV[a], 1)
  redis.call('hincrby', KEYS[k + 2], ARGV[a + 1], 1)
  redis.call('lpush', KEYS[k + 3], ARGV[a + 2])
  redis.call('ltrim', KEYS[k + 3], 0, tonumber(ARGV[a + 3]) - 1)
  return a + 5 + n
end
"""

_CREATE_FN = """
local function create(k, a)
  if ARGV[a + 1] == '1' then
    local existing = redis.call('get', KEYS[k])
    if existing then return {0, existing} end
  end
  if ARGV[a] == '1' then return {-1, ''} end
  local id = 'sim-' .. redis.call('incr', KEYS[k + 1])
  redis.call('set', KEYS[k], id)
  redis.call('hset', ARGV[a + 2] .. id, 'instance_id', id, unpack(ARGV, a + 3))
  redis.call('sadd', KEYS[k + 2], id)
  return {1, id}
end
"""

# The create once the call's counters and config are done (the slow path: see CALL_CREATE).
CREATE = _CREATE_FN + "return create(1, 1)"

# A refused request: the simulated API's answer is a 429 (counted in the requests hash, KEYS[2]), the
# call is not made. Returns {-2, the charge's wait, its window flags}.
_REFUSE = """
local function refuse(charged)
  redis.call('hincrby', KEYS[2], '429', 1)
  return {-2, charged[2], charged[4]}
end
"""

# A whole create call in one round trip, when the caller guessed the config right: the simulated API's
# budget (``charge``: KEYS from 9, ARGV from 1), the counters (KEYS[2..5], ARGV after the charge's),
# then the config hash KEYS[1] compared with the m fields and values the caller built the record from
# (ARGV after the counters: m, then them), then the create (KEYS[6..8], ARGV after those). Returns
# [the create's outcome, the tokens the charge left, the id]. Another config: [2, tokens left, its flat
# HGETALL] and no create (the caller goes on with that config; the call is counted). Refused: REFUSE's.
CALL_CREATE = (
    _COUNT
    + _CREATE_FN
    + CHARGE_FN
    + _REFUSE
    + """
local charged, c = charge(9, 1)
if charged[1] == 0 then return refuse(charged) end
local a = count(2, c)
local m = tonumber(ARGV[a])
local config = redis.call('hgetall', KEYS[1])
if #config ~= m then return {2, charged[3], config} end
for i = 1, m do
  if config[i] ~= ARGV[a + i] then return {2, charged[3], config} end
end
local made = create(6, a + m + 1)
return {made[1], charged[3], made[2]}
"""
)

# A page of the batched read: the simulated API's budget (``charge``: KEYS from 6, ARGV from 1), the
# counters (KEYS[2..5], ARGV after the charge's), then [1, the tokens the charge left, the config hash
# KEYS[1] as a flat HGETALL, then a row per id]. ARGV after the counters: the VM key prefix, a flag per
# id ("1": the whole row, "0": its first two fields), f and the f fields of a row, then the ids. A row
# is HMGET's answer (nil for a field the record lacks; all nil if there is no record). Refused:
# REFUSE's.
PAGE = (
    _COUNT
    + CHARGE_FN
    + _REFUSE
    + """
local charged, c = charge(6, 1)
if charged[1] == 0 then return refuse(charged) end
local a = count(2, c)
local prefix, flags, f = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
local full = {unpack(ARGV, a + 3, a + 2 + f)}
local brief = {full[1], full[2]}
local out = {1, charged[3], redis.call('hgetall', KEYS[1])}
for i = a + 3 + f, #ARGV do
  local fields = string.byte(flags, i - a - 2 - f) == 49 and full or brief
  out[#out + 1] = redis.call('hmget', prefix .. ARGV[i], unpack(fields))
end
return out
"""
)
