"""Every provider's API budget, shared by all workers through Redis and charged per HTTP request.

The adapters' SDK transports call a ``Meter`` (workers/providers/metering.py) before each request and
after each answer; the ``Budget`` behind it takes one token from every bucket of the provider's profile
(workers/budget_profiles.py) the request belongs to, and corrects its buckets from the remaining
budget the provider reports in headers, so all workers pace before the provider says 429.

- Token buckets (EC2, Hetzner, ARM) live in one Redis hash each and are charged by one Lua script
  for all of a request's buckets at once. A request goes when its bucket holds a token plus a
  cushion of ``TOKEN_MARGIN_S`` of refill; one that finds a bucket short reserves its token anyway
  (the bucket goes into debt) and sleeps until it is due, so waiting requests go out in order at
  the refill rate instead of polling. A wait longer than ``MAX_THROTTLE_WAIT_S`` takes
  nothing and raises ``RateLimitedError`` (``provider_code="vmq_throttle"``): the task retries later.
- Windows (DigitalOcean's minute and hour, GCP's per-minute quotas) are the ``limits`` library's
  moving windows, each held ``WINDOW_MARGIN_S`` longer than the provider holds it (see
  ``BucketStore``); the simulated cloud counts them as published, moving or fixed.
- Header observations correct a token bucket down to what the provider says is left, or, for a
  budget the profile does not model (DigitalOcean's hour as the API counts it, Azure Compute's own
  policies), block requests of its class once nothing is left until it refills.

Overrides: ``VMQ_BUDGET='{"aws.run_instances": "10@4/s", "digitalocean.minute": "200/minute"}'``
(provider.bucket -> ``<capacity>@<refill>/s`` or a ``limits`` window). ``VMQ_RATE_LIMIT`` (one
``limits`` string per provider) adds one window every request of that provider counts against.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import redis

from vmqueue import keys
from vmqueue.settings import SETTLING_TICK_S, TICK_BOUNDS_S, TICK_SHARE_OF_LIMIT, Settings
from workers.budget_buckets import BucketStore
from workers.budget_profiles import SETTLING_SURPLUS_SPEND_S, SURPLUS_SPEND_S, Profile
from workers.providers.errors import OWN_THROTTLE, RateLimitedError

log = logging.getLogger("vmqueue.worker")

# Waiting for a budget longer than this is better done as a task retry than in a worker thread.
MAX_THROTTLE_WAIT_S = 10.0
# A token goes out only when its bucket also holds this much refill beyond it: the provider counts
# each request a latency after us, and latencies vary, so its bucket may have seen our earlier
# requests later than we did (EC2 RunInstances' 429s at 2 a second). A cushion of the burst (0.5 of
# RunInstances' 5), never of the rate; waiters reserve their tokens from the bucket's schedule.
TOKEN_MARGIN_S = 0.25
# A request that waited for a window tries again this much after the window's reset.
PACING_MARGIN_S = 0.05
# The share of each bucket's rate the tick's reads may spend while no create waits for its slot.
IDLE_READ_SHARE = 0.5
# The batched reads yield to creates booked into a window they share (``read_yield_s``) until this long
# after the last create's slot: a create's countdown arrives a little after its slot, and a read charged
# before it took its place (a create pushed a whole window back).
READ_YIELD_GRACE_S = 3.0
# Windows hold a slot this much longer than the provider does (whole seconds: ``limits`` windows count
# in seconds): a slot is reused only once the provider's count of the request that held it, a varying
# latency after ours, has surely expired too (DigitalOcean's 429s at each minute's turn). Costs one
# second per window: 250 a minute become 250 per 61 s.
WINDOW_MARGIN_S = 1


class Budget(BucketStore):
    """The shared budgets of every provider a process calls; requests wait here for their tokens."""

    def __init__(
        self, settings: Settings, client: redis.Redis | None = None, *, max_wait_s: float = MAX_THROTTLE_WAIT_S
    ):
        super().__init__(
            settings,
            client,
            prefix=keys.BUDGET_PREFIX,
            max_wait_s=max_wait_s,
            window_margin_s=WINDOW_MARGIN_S,
            token_margin_s=TOKEN_MARGIN_S,
        )
        self._tick_cache: dict[tuple[str, str | None], tuple[float, int, dict[tuple[str, str], float], float]] = {}

    def acquire(
        self, provider: str, method: str = "GET", target: str = "", scope: str = "", *, profile: Profile | None = None
    ) -> float:
        """Charge one request, sleeping until it is within budget; returns the seconds slept.

        Raises ``RateLimitedError`` (``provider_code="vmq_throttle"``, ``retry_after_s`` set) when the
        wait would pass ``max_wait_s``: nothing is charged then.
        """
        profile = profile or self.profile(provider)
        slept = 0.0
        while True:
            charged, wait, _ = self.take(provider, profile, method, target, scope, self.max_wait_s - slept)
            if charged or slept + wait > self.max_wait_s:
                if not charged:
                    raise RateLimitedError(
                        f"{provider} API budget spent: {method} {target} would wait {wait:.1f}s",
                        provider_code=OWN_THROTTLE,
                        retry_after_s=self._retry_after_s(provider, profile, method, target, wait),
                    )
                if wait > 0:  # a reservation: the token is ours once its time has come
                    time.sleep(wait)
                self.note_other(provider, profile, method, target)
                return slept + wait
            time.sleep(wait + PACING_MARGIN_S)  # a window: try again when it has room
            slept += wait

    def _retry_after_s(self, provider: str, profile: Profile, method: str, target: str, wait: float) -> float:
        """When a refused request should come back: a create (as the profile names its requests)
        books a new slot at the end of the create schedule, so that retries do not pile onto the
        slots of the creates scheduled meanwhile (creates that came late in a bunch, e.g. from a
        starved worker, went into debt, were refused and came back on top of the schedule, again and
        again); any other request after ``wait``."""
        if (method, target) not in profile.create_requests():
            return wait
        return max(wait, self.create_slot(provider, profile, f"retry:{uuid.uuid4().hex}"))

    def tick_interval_s(
        self, provider: str, base: str | None = None, watched: int = 1, settling: bool = False
    ) -> float:
        """Seconds between a provider's batched status reads of the VMs it watches.

        ``VMQ_BATCH_POLL_S`` when set (taken as is: tests and benchmarks tick fast on fakes). Otherwise
        the interval at which a read of the provider's watch list (``watched`` VMs if more) spends
        ``TICK_SHARE_OF_LIMIT`` of each bucket of ``base``'s profile (with this deployment's
        overrides) it is charged to, plus what the bucket holds above half its burst (see
        ``Profile.read_interval_s``), and at least ``TICK_BOUNDS_S[0]``. While VMs settle
        (``settling``: the last tick saw some run) the surplus goes ten times as fast and the interval
        may be as short as ``SETTLING_TICK_S``. E.g. DigitalOcean's hour
        window spent past half gives a read of up to 200 droplets every 7.2 s, leaving the rest to
        creates and deletes; Hetzner's full 3,600 bucket a read of 1,000 servers about every second.
        While no create waits for its slot in the provider's schedule the reads may spend
        ``IDLE_READ_SHARE`` instead of the tenth (OCI's 10 a second, shared by creates and reads:
        once the creates are out, the settling VMs' reads wait for no tick that leaves the bucket
        idle). Levels and the schedule are read from Redis at most once a second per provider.
        """
        if self.settings.batch_poll_s is not None:
            return self.settings.batch_poll_s
        now = time.monotonic()
        profile = self.profile(provider, base)
        cached = self._tick_cache.get((provider, base))
        if cached is None or now - cached[0] > 1.0:
            watched_now = int(self.redis.hlen(keys.watch_key(provider)) or 0)
            levels = self.levels(provider, profile, profile.read_requests(1))
            share = TICK_SHARE_OF_LIMIT if self.creates_waiting(provider, profile) else IDLE_READ_SHARE
            cached = self._tick_cache[(provider, base)] = (now, watched_now, levels, share)
        spend_s = SETTLING_SURPLUS_SPEND_S if settling else SURPLUS_SPEND_S
        read_s = profile.read_interval_s(max(watched, cached[1]), cached[3], cached[2], spend_s)
        return max(SETTLING_TICK_S if settling else TICK_BOUNDS_S[0], read_s)

    def read_yield_s(self, provider: str, base: str | None = None) -> float:
        """Seconds the provider's batched status read should wait (0.0: read now).

        Only for window buckets that the read and a create are both charged to and no longer than
        ``read_yield_max_s`` (DigitalOcean's minute, not its hour: ``yielding_windows``): creates take
        whole windows (``create_delay``), so a read in a window the creates fill pushes a create, and
        its VM, a window back. 1,000 DigitalOcean creates fill four minutes exactly; reads among them
        made a fifth (bench/budget.py: 276 s for a 240 s floor). So while creates are booked into later
        windows the reads wait for them, at most ``read_yield_max_s`` (setting) from the first read
        that waited, then one read goes and a new wait may start; and a read that such a window has no
        room for waits for its reset instead of being refused. The cost: the VMs of a create backlog
        longer than a window are seen running when the backlog is out (or after ``read_yield_max_s``),
        not as each boots; the worker logs each wait as it starts.
        """
        max_s = self.settings.read_yield_max_s
        profile = self.profile(provider, base)
        windows = self.yielding_windows(profile)
        if not windows:
            return 0.0
        now = time.time()
        since_key = f"{self.prefix}{provider}:read-yield-since"
        last_slot = self.last_create_slot(provider) + READ_YIELD_GRACE_S
        if last_slot > now:
            if self.redis.set(since_key, repr(now), nx=True, ex=int(max_s) + 60):
                log.info(
                    "provider=%s status reads wait up to %.0fs for the creates booked into %s windows they share:"
                    " VMs that boot meanwhile are reported running after it (VMQ_READ_YIELD_MAX_S)",
                    provider,
                    min(last_slot - now, max_s),
                    "/".join(windows),
                )
            since = float(self.redis.get(since_key) or now)
            if now - since < max_s:
                return min(last_slot, since + max_s) - now
        _, target = profile.calls["get_many"][0]
        full = [self.window_stats(provider, profile, name, target) for name in windows]
        wait = max((reset - now + PACING_MARGIN_S for left, reset in full if left < 1), default=0.0)
        if wait > 0 and last_slot > now:  # past the cap: the wait's start stays until the read goes
            self.redis.expire(since_key, math.ceil(wait) + 60)
        else:
            self.redis.delete(since_key)
        return wait

    def meter(self, provider: str, base: str | None = None) -> BudgetMeter:
        return BudgetMeter(self, provider, self.profile(provider, base))

    def metered(self, providers: Callable[[str], Any]) -> Callable[[str], Any]:
        """Wrap a provider registry so every adapter it returns charges this budget per request."""

        def get(name: str) -> Any:
            provider = providers(name)
            if getattr(provider, "meter_owner", None) is not self:
                provider.meter = self.meter(name, getattr(provider, "budget_profile", None))
                provider.meter_owner = self
            return provider

        return get


class BudgetMeter:
    """The ``Meter`` an adapter's transport calls (see workers/providers/metering.py)."""

    def __init__(self, budget: Budget, provider: str, profile: Profile):
        self.budget = budget
        self.provider = provider
        self.profile = profile

    def before(self, method: str, target: str, scope: str = "") -> None:
        self.budget.acquire(self.provider, method, target, scope, profile=self.profile)

    def after(self, method: str, target: str, status: int, headers: Mapping[str, str], scope: str = "") -> None:
        self.budget.observe(self.provider, self.profile, method, target, headers, scope)
