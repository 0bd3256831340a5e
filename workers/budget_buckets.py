"""The Redis side of API budgets: token buckets, ``limits`` windows, header corrections, create slots.

Shared by the workers' ``Budget`` (workers/budget.py: a client that waits for its budget) and the
simulated cloud (workers/providers/sim.py: a provider that refuses with 429 once a budget is spent),
so both count the same way. Imports nothing of the adapters.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis
from limits import RateLimitItem, RateLimitItemPerSecond, parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from vmqueue import keys
from vmqueue.connection import limits_storage_uri
from vmqueue.settings import TICK_SHARE_OF_LIMIT, Settings
from workers.budget_profiles import PROFILES, Bucket, Observation, Profile, parse_bucket

# Charge every token bucket of a request at once, or none: ``take_tokens(k, n, o, c, now, max_wait,
# margin, cushion)``. KEYS[k..]: n token buckets, then o observation hashes; ARGV[c..]: capacity and
# refill per bucket; the window margin and the token margin in s. A request needs a token plus the
# token margin's refill, at most half the rest of the burst (a cushion: the provider's bucket runs a
# varying latency behind ours); a short bucket goes into debt when the wait is within max wait.
# Returns {charged 1/0, wait s, tokens left in the emptiest bucket} (numbers as strings: Redis
# truncates Lua numbers to integers).
_TOKENS_FN = """
local function take_tokens(k, n, o, c, now, max_wait, margin, cushion)
  local wait, least = 0, math.huge
  local tokens = {}
  for i = 1, n do
    local cap, rate = tonumber(ARGV[c + 2 * i - 2]), tonumber(ARGV[c + 2 * i - 1])
    local s = redis.call('hmget', KEYS[k + i - 1], 't', 'at')
    local t = tonumber(s[1])
    if t == nil then t = cap else t = math.min(cap, t + (now - tonumber(s[2])) * rate) end
    tokens[i] = t
    local need = 1 + math.max(0, math.min(rate * cushion, (cap - 1) / 2))
    if t < need then wait = math.max(wait, (need - t) / rate) end
  end
  local observed = {}
  for i = k + n, k + n + o - 1 do
    local fields = redis.call('hgetall', KEYS[i])
    for j = 1, #fields, 2 do
      local r, reset = string.match(fields[j + 1], '^(%S+) (%S+)$')
      r, reset = tonumber(r), tonumber(reset)
      if r < 1 and now < reset + margin then wait = math.max(wait, reset + margin - now) end
      observed[#observed + 1] = {KEYS[i], fields[j], r, reset}
    end
  end
  if wait > max_wait then return {0, tostring(wait), '0'} end
  for i = 1, n do
    local cap, rate = tonumber(ARGV[c + 2 * i - 2]), tonumber(ARGV[c + 2 * i - 1])
    redis.call('hset', KEYS[k + i - 1], 't', tostring(tokens[i] - 1), 'at', tostring(now))
    redis.call('expire', KEYS[k + i - 1], math.ceil(cap / rate) + 60)
    least = math.min(least, tokens[i] - 1)
  end
  for _, ob in ipairs(observed) do
    redis.call('hset', ob[1], ob[2], tostring(ob[3] - 1) .. ' ' .. tostring(ob[4]))
  end
  if least == math.huge then least = 0 end
  return {1, tostring(wait), tostring(least)}
end
"""

# A client's charge (``take``). KEYS: n token buckets, then observation hashes. ARGV: now, max wait, n,
# the window margin, the token margin (s), then capacity and refill per bucket.
_TAKE = (
    _TOKENS_FN
    + """
local n = tonumber(ARGV[3])
return take_tokens(1, n, #KEYS - n, 6, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# A provider's charge of one request, as ``take`` counts it with no margins and no wait (the simulated
# cloud refuses at once), for a script that does a call's work in the same round trip
# (workers/providers/sim_scripts.py): ``charge(k, a)``, with ``BucketStore.charge_args``' KEYS from k
# and ARGV from a: now, w windows, t token buckets, o observation hashes, then kind ("f" fixed, "m"
# moving), amount and expiry per window, capacity and refill per token bucket. Windows are the
# ``limits`` strategies' own keys, counted as they count them (a fixed window's count goes on past its
# amount; several windows are tested before any is hit). Returns {charged 1/0, the token buckets'
# wait, tokens left, a "1" per window that refused, else "0"} and the ARGV index after its own.
CHARGE_FN = (
    _TOKENS_FN
    + """
local function charge(k, a)
  local now, w, t, o = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local nxt = a + 4 + 3 * w + 2 * t
  local flags, refused = {}, false
  local function window(i, hit)
    local key, kind = KEYS[k + i - 1], ARGV[a + 1 + 3 * i]
    local amount, expiry = tonumber(ARGV[a + 2 + 3 * i]), tonumber(ARGV[a + 3 + 3 * i])
    if kind == 'f' then
      if not hit then return tonumber(redis.call('get', key) or '0') < amount end
      local current = redis.call('incrby', key, 1)
      if current == 1 then redis.call('expire', key, expiry) end
      return current <= amount
    end
    if amount < 1 then return false end
    local entry = redis.call('lindex', key, amount - 1)
    if entry and tonumber(entry) >= now - expiry then return false end
    if hit then
      redis.call('lpush', key, now)
      redis.call('ltrim', key, 0, amount - 1)
      redis.call('expire', key, expiry)
    end
    return true
  end
  for i = 1, w do flags[i] = '0' end
  if w > 1 then
    for i = 1, w do
      if not window(i, false) then flags[i], refused = '1', true end
    end
  end
  if not refused then
    for i = 1, w do
      if not window(i, true) then flags[i], refused = '1', true end
    end
  end
  if refused then return {0, '0', '0', table.concat(flags)}, nxt end
  local taken = take_tokens(k + w, t, o, a + 4 + 3 * w, now, 0, 0, 0)
  taken[4] = table.concat(flags)
  return taken, nxt
end
"""
)

# A header says ``remaining`` is left of a token bucket: never more than our own model holds.
_SYNC = """
local now, cap, rate, remaining = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local s = redis.call('hmget', KEYS[1], 't', 'at')
local t = tonumber(s[1])
if t == nil then t = cap else t = math.min(cap, t + (now - tonumber(s[2])) * rate) end
redis.call('hset', KEYS[1], 't', tostring(math.min(t, remaining)), 'at', tostring(now))
redis.call('expire', KEYS[1], math.ceil(cap / rate) + 60)
return 1
"""

# One virtual schedule of creates per provider (GCRA): a slot per job, at most ``burst`` at once and
# then one every 1/rate s. KEYS: the provider's schedule, the job's slot. ARGV: now, interval, tau.
_SLOT = """
local now, interval, tau = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local mine = redis.call('get', KEYS[2])
if mine then return tostring(tonumber(mine) - now) end
local tat = math.max(tonumber(redis.call('get', KEYS[1]) or '0'), now)
local slot = math.max(now, tat - tau)
local ttl = math.ceil(tat + interval - now) + 3600
redis.call('set', KEYS[1], tostring(tat + interval), 'EX', ttl)
redis.call('set', KEYS[2], tostring(slot), 'EX', ttl)
return tostring(slot - now)
"""

# The same schedule for creates metered by windows: at most ``allowance`` slots in any ``period`` of
# each window, taken in order, a burst at a time (a window allows its whole amount at once, and a
# create-bound profile finishes sooner that way than evenly spread). KEYS: one sorted set of slots per
# window, the last booking's time, the latest busy slot, the job's slot. ARGV: now, the earliest slot
# (the token schedule's), then allowance, period and 1 if the batched read shares it (else 0) per
# window. Other requests charged to these windows are in the sets too (``note_other``), so creates
# booked after them leave their room. Returns the slot's delay.
# The latest busy slot is what the reads yield to (``Budget.read_yield_s``): the latest create slot that
# leaves a window the read shares at least half full. Half, not full: a bulk enqueue books a window's
# creates over a second or so, and a read let in before the last of them was booked pushed one a window
# back; creates that leave a window mostly free, a few a minute or paced by a token bucket, leave a read
# its room. And the first booking after a window's length without any starts a burst: it holds the
# reads for the grace too (the tick's first read came half a second into 1,000 bookings, before half
# of the first minute's). Times are written and read with 17 digits (Lua's ``tostring`` keeps 14: an
# entry written by Python fell back inside a bound read through it, and the loop never ended), and a
# window's entry frees its slot a millisecond early, so each move goes forward by at least that much;
# a bound on the moves keeps Redis answering whatever the input.
_WINDOW_SLOT = """
local function num(x) return string.format('%.17g', x) end
local mine = redis.call('get', KEYS[#KEYS])
local now = tonumber(ARGV[1])
if mine then return num(tonumber(mine) - now) end
local t = math.max(now, tonumber(ARGV[2]))
local n = #KEYS - 3
for i = 1, n do
  local period = tonumber(ARGV[1 + 3 * i])
  redis.call('zremrangebyscore', KEYS[i], '-inf', '(' .. num(now - period))
  local last = redis.call('zrange', KEYS[i], -1, -1, 'WITHSCORES')
  if last[2] then t = math.max(t, tonumber(last[2])) end
end
local moved, moves, counts = true, 0, {}
while moved do
  moved = false
  for i = 1, n do
    local allowance, period = tonumber(ARGV[3 * i]), tonumber(ARGV[1 + 3 * i])
    local low, high = '(' .. num(t - period + STEP), num(t)
    local count = redis.call('zcount', KEYS[i], low, high)  -- not the entries: an hour holds thousands
    counts[i] = count
    if count >= allowance then
      local oldest = redis.call('zrangebyscore', KEYS[i], low, high, 'WITHSCORES', 'LIMIT', count - allowance, 1)
      t = tonumber(oldest[2]) + period
      moved, moves = true, moves + 1
      if moves > 100000 then return redis.error_reply('create window schedule: no slot after 100000 moves') end
    end
  end
end
local ttl, fills, shared_period = 0, false, 0
for i = 1, n do
  local period = tonumber(ARGV[1 + 3 * i])
  redis.call('zadd', KEYS[i], num(t), KEYS[#KEYS])
  redis.call('expire', KEYS[i], math.ceil(t - now + period) + 60)
  ttl = math.max(ttl, math.ceil(t - now + period) + 3600)
  if ARGV[2 + 3 * i] == '1' then
    shared_period = math.max(shared_period, period)
    if 2 * (counts[i] + 1) >= tonumber(ARGV[3 * i]) then fills = true end
  end
end
redis.call('set', KEYS[#KEYS], num(t), 'EX', ttl)
-- The first booking after a window's length without one starts a burst: its slot holds the reads too,
-- for the grace, until the burst's bookings say whether they fill the window.
local previous = tonumber(redis.call('get', KEYS[#KEYS - 2]) or '0')
if shared_period > 0 then
  if now - previous > shared_period then fills = true end
  redis.call('set', KEYS[#KEYS - 2], num(now), 'EX', math.ceil(shared_period) + 60)
end
local latest = tonumber(redis.call('get', KEYS[#KEYS - 1]) or '0')
if fills and t >= latest then redis.call('set', KEYS[#KEYS - 1], num(t), 'EX', ttl) end
return num(t - now)
""".replace("STEP", "0.001")

# ``note_other``: a request that is no create, in the create schedule's windows. KEYS: one sorted set per
# window. ARGV: now, the entry's name, then the period per window. A set lives a window and a minute past
# the request, or longer when it was already to live longer (creates booked further ahead: 1,000
# DigitalOcean creates reach 183 s; a set that went with them let the creates booked next take their room).
_NOTE_OTHER = """
for i = 1, #KEYS do
  local period = tonumber(ARGV[2 + i])
  redis.call('zremrangebyscore', KEYS[i], '-inf', '(' .. string.format('%.17g', tonumber(ARGV[1]) - period))
  redis.call('zadd', KEYS[i], ARGV[1], ARGV[2])
  if redis.call('ttl', KEYS[i]) < period + 60 then redis.call('expire', KEYS[i], period + 60) end
end
return 1
"""


# Requests whose plan a store keeps (``BucketStore._plan``): a real adapter's targets name resources.
PLAN_CACHE = 4096


@dataclass(frozen=True)
class _Plan:
    """What one request of a profile counts in: its windows (limiter, item, identity), its token
    buckets' keys and (capacity, refill) ARGV, and the observation hashes it heeds."""

    profile: Profile
    windows: list[tuple[Any, RateLimitItem, str]]
    token_keys: list[str]
    token_args: list[str]
    observed: list[str]


class BucketStore:
    """Budgets in Redis under ``prefix``; thread-safe (Redis does the counting).

    ``max_wait_s``: how much debt a token bucket may take on for one request (0: refuse at once, as a
    cloud does). ``overrides``: apply ``VMQ_BUDGET`` and ``VMQ_RATE_LIMIT`` (a client's choice; the
    simulated cloud enforces the published profile). ``window_margin_s``: a client's pacing margin
    for windows (0: the provider's own count). With a margin, every window (fixed or moving, ``N per
    T``) is counted as a moving window of N per T + margin: the provider counts each request a
    latency after us, and that latency varies, so a slot freed in our window is reused only once the
    provider's has surely freed it too; a moving window is also never caught by a fixed window's
    boundary, wherever the provider puts it. An observed window (a header's reset) also holds the
    margin past its reset, which headers give in whole seconds. ``token_margin_s``: the same for token
    buckets: a request goes only when its bucket holds a token plus ``token_margin_s`` of refill,
    so the provider's bucket, whose count of our earlier requests may lag ours by up to that much
    more than this one's, still has the token (a cushion of the burst; the rate is unchanged).
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis | None = None,
        *,
        prefix: str = keys.BUDGET_PREFIX,
        max_wait_s: float = 0.0,
        overrides: bool = True,
        window_margin_s: int = 0,
        token_margin_s: float = 0.0,
    ):
        from vmqueue.connection import connect

        self.settings = settings
        self.redis = client or connect(settings)
        self.prefix = prefix
        self.max_wait_s = max_wait_s
        self._overrides = overrides
        self.window_margin_s = window_margin_s
        self.token_margin_s = token_margin_s
        self._take = self.redis.register_script(_TAKE)
        self._sync = self.redis.register_script(_SYNC)
        self._slot = self.redis.register_script(_SLOT)
        self._window_slot = self.redis.register_script(_WINDOW_SLOT)
        self._note_other = self.redis.register_script(_NOTE_OTHER)
        uri, options = limits_storage_uri(settings)  # the same Redis, TLS or sentinels included
        storage = storage_from_string(uri, key_prefix=f"{keys.RATE_LIMIT_PREFIX}:{prefix}", **options)
        self._moving = MovingWindowRateLimiter(storage)
        self._fixed = FixedWindowRateLimiter(storage)
        self._profiles: dict[tuple[str, str], Profile] = {}
        self._paces: dict[int, tuple[Profile, tuple[float, float] | None, dict[str, tuple[int, int]]]] = {}
        self._plans: dict[tuple[str, int, str, str, str], _Plan] = {}
        self._windows: dict[Bucket, tuple[FixedWindowRateLimiter | MovingWindowRateLimiter, RateLimitItem]] = {}

    # -- the model ----------------------------------------------------------------------------
    def profile(self, provider: str, base: str | None = None) -> Profile:
        """``base``'s published profile (default: the provider's own) with this deployment's overrides.

        Raises ``ValueError`` for an override that names no bucket of the profile or does not parse.
        """
        cache_key = (provider, base or provider)
        if cache_key not in self._profiles:
            profile = PROFILES[base or provider]
            buckets: dict[str, Bucket] = dict(profile.buckets)
            if self._overrides:
                for name, text in self.settings.budget.items():
                    owner, _, bucket = name.partition(".")
                    if owner != provider:
                        continue
                    if bucket not in buckets:
                        known = ", ".join(f"{provider}.{b}" for b in buckets)
                        raise ValueError(f"VMQ_BUDGET names no bucket {name!r}; known: {known}")
                    buckets[bucket] = parse_bucket(text, buckets[bucket])
                if extra := self.settings.rate_limit.get(provider):
                    parse(extra)  # a bad VMQ_RATE_LIMIT fails here, not at the first request
                    buckets["total"] = Bucket(window=extra, source="VMQ_RATE_LIMIT")
            classify = profile.classify
            if "total" in buckets:
                classify = _with_total(profile.classify)
            self._profiles[cache_key] = replace(profile, buckets=buckets, classify=classify)
        return self._profiles[cache_key]

    def _key(self, provider: str, scope: str, bucket: str, bucket_def: Bucket, target: str) -> str:
        key = f"{self.prefix}{provider}:{scope}:{bucket}"
        return f"{key}:{target}" if bucket_def.per_action else key

    # -- spending -------------------------------------------------------------------------------
    def take(
        self, provider: str, profile: Profile, method: str, target: str, scope: str = "", max_wait_s: float = 0.0
    ) -> tuple[bool, float, float]:
        """One try: (charged, seconds to wait before sending, tokens left in the emptiest token bucket).

        Charged with a wait: the token is reserved (its bucket in debt) and due after the wait, which is
        at most ``max_wait_s``. Not charged: the wait until it could be. Windows have no reservations:
        a request is counted in its windows only when all of them have room.
        """
        plan = self._plan(provider, profile, method, target, scope)
        now = time.time()
        windows = plan.windows
        window_wait = 0.0
        # Several windows are tested first, so that a request one refuses is counted in none; a single
        # window's hit is that test already (one round trip, not two: GCP meters each request so).
        for limiter, item, identity in windows if len(windows) > 1 else ():
            if not limiter.test(item, identity):
                window_wait = max(window_wait, limiter.get_window_stats(item, identity).reset_time - now, 0.01)
        for limiter, item, identity in windows if not window_wait else ():
            if not limiter.hit(item, identity):  # full, or another worker took the last slot meanwhile
                window_wait = max(window_wait, limiter.get_window_stats(item, identity).reset_time - now, 0.01)
        if window_wait:
            return False, window_wait, 0.0
        if not plan.token_keys and not plan.observed:
            return True, 0.0, 0.0  # no bucket to charge and no provider's word to heed (only headers write one)
        args: list[Any] = [repr(now), repr(max_wait_s), len(plan.token_keys), self.window_margin_s]
        charged, wait, least = self._take(
            keys=[*plan.token_keys, *plan.observed], args=[*args, repr(self.token_margin_s), *plan.token_args]
        )
        return bool(int(charged)), float(wait), float(least)

    def _plan(self, provider: str, profile: Profile, method: str, target: str, scope: str) -> _Plan:
        """What a request of ``profile`` counts in (``take``, ``charge_args``): made once per request."""
        cache_key = (provider, id(profile), method, target, scope)
        plan = self._plans.get(cache_key)
        if plan is not None and plan.profile is profile:
            return plan
        names = profile.classify(method, target)
        windows = []
        for name in names:
            bucket = profile.buckets[name]
            if bucket.kind == "window":
                windows.append((*self._window(bucket), self._key(provider, scope, name, bucket, target)))
        tokens = [(n, profile.buckets[n]) for n in names if profile.buckets[n].kind == "token"]
        observed = []
        if tokens or profile.headers is not None:
            observed = [f"{self.prefix}{provider}:{scope}:seen:{n}" for n in names]
            if profile.headers is not None:
                observed.append(f"{self.prefix}{provider}:{scope}:seen-class:{profile.request_class(method, target)}")
        token_args: list[str] = []
        for _, bucket in tokens:
            token_args += [repr(bucket.capacity), repr(bucket.refill_per_s)]
        if len(self._plans) >= PLAN_CACHE:  # targets may name resources (/servers/123): start over
            self._plans.clear()
        plan = self._plans[cache_key] = _Plan(
            profile, windows, [self._key(provider, scope, n, b, target) for n, b in tokens], token_args, observed
        )
        return plan

    def charge_args(
        self, provider: str, profile: Profile, method: str, target: str, scope: str = ""
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``CHARGE_FN``'s ``charge`` for one request: what ``take`` would count, in the
        round trip of a script that embeds it. Only for a store without margins (a provider's own count)."""
        if self.window_margin_s or self.token_margin_s:
            raise ValueError("charge counts as the provider does: a store without margins only")
        plan = self._plan(provider, profile, method, target, scope)
        window_keys, window_args = [], []
        for limiter, item, identity in plan.windows:
            window_keys.append(limiter.storage.prefixed_key(item.key_for(identity)))
            window_args += ["f" if limiter is self._fixed else "m", item.amount, item.get_expiry()]
        keys_ = [*window_keys, *plan.token_keys, *plan.observed]
        counts = [len(plan.windows), len(plan.token_keys), len(plan.observed)]
        return keys_, [repr(time.time()), *counts, *window_args, *plan.token_args]

    def charged(
        self, provider: str, profile: Profile, method: str, target: str, reply: list[Any], scope: str = ""
    ) -> tuple[bool, float, float]:
        """``take``'s answer from ``charge``'s ``reply``: a window that refused waits until its reset."""
        charged, wait, least, flags = reply
        if int(charged):
            return True, float(wait), float(least)
        window_wait = 0.0
        if "1" in str(flags):
            now = time.time()
            windows = self._plan(provider, profile, method, target, scope).windows
            for (limiter, item, identity), flag in zip(windows, str(flags), strict=True):
                if flag == "1":
                    window_wait = max(window_wait, limiter.get_window_stats(item, identity).reset_time - now, 0.01)
        return False, max(window_wait, float(wait)), 0.0

    def window_stats(
        self, provider: str, profile: Profile, bucket: str, target: str, scope: str = ""
    ) -> tuple[int, float]:
        """(requests left, epoch s of the next reset) of a window bucket."""
        spec = profile.buckets[bucket]
        limiter, item = self._window(spec)
        stats = limiter.get_window_stats(item, self._key(provider, scope, bucket, spec, target))
        return stats.remaining, stats.reset_time

    def levels(
        self, provider: str, profile: Profile, buckets: Mapping[tuple[str, str], object], scope: str = ""
    ) -> dict[tuple[str, str], float]:
        """What each of ``buckets`` ((name, target if per action) keys) holds now: a token bucket's
        tokens, or what is left of a window."""
        now = time.time()
        found: dict[tuple[str, str], float] = {}
        for name, target in buckets:
            bucket = profile.buckets[name]
            key = self._key(provider, scope, name, bucket, target)
            if bucket.kind == "window":
                limiter, item = self._window(bucket)
                found[(name, target)] = float(limiter.get_window_stats(item, key).remaining)
                continue
            tokens, at = self.redis.hmget(key, "t", "at")
            if tokens is None or at is None:
                found[(name, target)] = bucket.capacity
            else:
                found[(name, target)] = min(bucket.capacity, float(tokens) + (now - float(at)) * bucket.refill_per_s)
        return found

    def _window(self, bucket: Bucket) -> tuple[FixedWindowRateLimiter | MovingWindowRateLimiter, RateLimitItem]:
        """The limiter and item a window bucket is counted with (see ``window_margin_s``)."""
        found = self._windows.get(bucket)
        if found is None:  # parsed once per bucket: every metered request asks
            item = parse(bucket.window or "")
            if not self.window_margin_s:
                found = (self._fixed if bucket.fixed else self._moving), item
            else:
                found = self._moving, RateLimitItemPerSecond(item.amount, item.get_expiry() + self.window_margin_s)
            self._windows[bucket] = found
        return found

    def observe(
        self, provider: str, profile: Profile, method: str, target: str, headers: Mapping[str, str], scope: str = ""
    ) -> list[Observation]:
        """Correct the budget from an answer's headers (see the profile's ``headers``)."""
        if profile.headers is None:
            return []
        found = profile.headers(method, target, headers)
        now = time.time()
        for seen in found:
            bucket = profile.buckets.get(seen.bucket)
            if bucket is not None and bucket.kind == "token":
                key = self._key(provider, scope, seen.bucket, bucket, target)
                args = [repr(now), repr(bucket.capacity), repr(bucket.refill_per_s), repr(seen.remaining)]
                self._sync(keys=[key], args=args)
                continue
            if bucket is not None:  # a window the provider counts itself: blocks once empty, until its reset
                key, field = f"{self.prefix}{provider}:{scope}:seen:{seen.bucket}", "_"
                reset_at = seen.reset_at or now + parse(bucket.window).get_expiry()
            else:  # a policy of the provider's own, for one class of requests
                key = f"{self.prefix}{provider}:{scope}:seen-class:{seen.applies_to}"
                field, reset_at = seen.bucket, now + (seen.window_s or 60.0)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, field, f"{seen.remaining!r} {reset_at!r}")
            pipe.expire(key, int(max(reset_at - now, 1)) + 60)
            pipe.execute()
        return found

    # -- pacing creates -------------------------------------------------------------------------
    def create_delay(self, provider: str, job_id: str, base: str | None = None) -> float:
        """Seconds until this job's create fits the provider's budget (0: now); the same slot on every call.

        Creates of a provider take slots of one schedule at the rate the create's token buckets refill
        and within the amount of each window per its length (plus ``window_margin_s``), less the share
        the tick's reads take where they meter the same buckets, so a thousand creates wait as
        countdowns, in order, instead of a thousand threads waiting on a bucket. DigitalOcean's 250 a
        minute: 225 creates at once, the next 225 61 s later, and so on.
        """
        return self.create_slot(provider, self.profile(provider, base), job_id)

    def creates_waiting(self, provider: str, profile: Profile) -> bool:
        """Whether a create of ``provider`` taking a slot now would have to wait for it."""
        tokens, windows = self._create_pace(profile)
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{self.prefix}{provider}:schedule")
        for name in windows:
            pipe.zrange(f"{self.prefix}{provider}:wschedule:{name}", -1, -1, withscores=True)
        tat, *lasts = pipe.execute()
        if tokens is not None and tat is not None and float(tat) - tokens[1] > now:
            return True
        return any(last and last[0][1] > now for last in lasts)

    def shared_windows(self, profile: Profile) -> list[str]:
        """The window buckets that both the batched read and a create are charged to."""
        return sorted(_read_buckets(profile) & set(self._create_pace(profile)[1]))

    def yielding_windows(self, profile: Profile) -> list[str]:
        """The shared windows the creates take whole while the reads yield to them: those no longer than
        ``read_yield_max_s`` (DigitalOcean's minute). A longer one (its hour) keeps a tenth for the others:
        a wait for it would outlast the yield, and a destroy could wait out its deadline."""
        max_s = self.settings.read_yield_max_s
        windows = self._create_pace(profile)[1]
        return [n for n in self.shared_windows(profile) if 0 < windows[n][1] <= max_s]

    def last_create_slot(self, provider: str) -> float:
        """Epoch s of the latest create slot booked that left a window the batched read shares at least half
        full (0.0: none lately)."""
        return float(self.redis.get(f"{self.prefix}{provider}:wlast") or 0.0)

    def note_other(self, provider: str, profile: Profile, method: str, target: str) -> None:
        """Count a request that is no create in the create schedule's windows it is charged to, so that
        creates booked after it leave its room (a worker's start-up list, then 250 creates booked into
        DigitalOcean's first minute, pushed the 250th a whole minute back)."""
        windows = self._create_pace(profile)[1]
        if not windows:  # creates meter no window (AWS, Hetzner, the sim's own): nothing to note, no work
            return
        names = [n for n in profile.classify(method, target) if n in windows]
        # The creates leave a tenth of the windows no read yields in to the others: not counted twice.
        keeps_share = set(self.shared_windows(profile)) - set(self.yielding_windows(profile))
        names = [n for n in names if n not in keeps_share]
        if not names or (method, target) in profile.create_requests():
            return
        self._note_other(
            keys=[f"{self.prefix}{provider}:wschedule:{name}" for name in names],
            args=[repr(time.time()), f"other:{uuid.uuid4().hex}", *(windows[name][1] for name in names)],
        )

    def create_slot(self, provider: str, profile: Profile, slot_id: str) -> float:
        """``create_delay`` for ``profile``: the delay of the slot ``slot_id`` holds (booked at the
        schedule's end on its first call)."""
        tokens, windows = self._create_pace(profile)
        now = time.time()
        earliest = now
        if tokens is not None:
            interval, tau = tokens
            earliest = now + float(
                self._slot(
                    keys=[f"{self.prefix}{provider}:schedule", f"{self.prefix}{provider}:slot:{slot_id}"],
                    args=[repr(now), repr(interval), repr(tau)],
                )
            )
        if not windows:
            return max(0.0, earliest - now)
        args: list[Any] = [repr(now), repr(earliest)]
        shared = self.yielding_windows(profile)
        for name, (allowance, period) in windows.items():
            args += [allowance, period, 1 if name in shared else 0]
        keys_ = [f"{self.prefix}{provider}:wschedule:{name}" for name in windows]
        prev_key, last_key = f"{self.prefix}{provider}:wprev", f"{self.prefix}{provider}:wlast"
        slot_key = f"{self.prefix}{provider}:wslot:{slot_id}"
        delay = self._window_slot(keys=[*keys_, prev_key, last_key, slot_key], args=args)
        return max(0.0, float(delay))

    def _create_pace(self, profile: Profile) -> tuple[tuple[float, float] | None, dict[str, tuple[int, int]]]:
        """The create schedule's (interval, tau) for its token buckets (None: none meters creates) and
        (allowance, period) per window, both less the reads' share where reads meter the same bucket.
        Kept per profile object (``profile`` keeps one per provider and base)."""
        cached = self._paces.get(id(profile))
        if cached is None or cached[0] is not profile:
            cached = self._paces[id(profile)] = (profile, *self._pace_of(profile))
        return cached[1], cached[2]

    def _pace_of(self, profile: Profile) -> tuple[tuple[float, float] | None, dict[str, tuple[int, int]]]:
        reads = _read_buckets(profile)
        per_bucket: dict[str, int] = {}
        for method, target in profile.create_requests():
            for name in profile.classify(method, target):
                per_bucket[name] = per_bucket.get(name, 0) + 1
        token = {n: k for n, k in per_bucket.items() if profile.buckets[n].kind == "token"}
        pace = None
        if token:
            rate = min(profile.buckets[n].rate_per_s() / k for n, k in token.items())
            burst = max(1.0, min(profile.buckets[n].burst() / k for n, k in token.items()))
            if reads & set(token):
                rate *= 1 - TICK_SHARE_OF_LIMIT
            pace = (1.0 / rate, (burst - 1) / rate)
        windows = {}
        for name, k in sorted(per_bucket.items()):
            if profile.buckets[name].kind == "window":
                item = parse(profile.buckets[name].window or "")
                # A read in a window the creates fill would push a create a whole window back: the
                # reads yield instead (``Budget.read_yield_s``), in windows no longer than that wait
                # may last (``yielding_windows``); the creates leave a tenth of the others to them.
                period = item.get_expiry() + self.window_margin_s
                yields = 0 < period <= self.settings.read_yield_max_s
                share = TICK_SHARE_OF_LIMIT if name in reads and not yields else 0.0
                allowance = max(1, math.floor(item.amount * (1 - share) / k))
                windows[name] = (allowance, period)
        return pace, windows


def _read_buckets(profile: Profile) -> set[str]:
    """The buckets the batched read is charged to."""
    return {n for m, t in profile.calls.get("get_many", ()) for n in profile.classify(m, t)}


def _with_total(classify: Callable[[str, str], tuple[str, ...]]) -> Callable[[str, str], tuple[str, ...]]:
    return lambda method, target: (*classify(method, target), "total")
