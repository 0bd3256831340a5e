"""How a task calls an adapter: the shared per-provider rate limit, then quick retries (layer 1).

Layer 1 (here, tenacity) retries transient errors and short rate limits a few times within one
task step; what still fails goes back to the task, which retries the job later (layer 2,
``lifecycle``). SDK-internal retries are off in every adapter, so the layers never multiply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from vmqueue import keys
from vmqueue.connection import limits_storage_uri
from vmqueue.settings import Settings, rate_limit_for
from workers import metrics
from workers.backoff import full_jitter_backoff
from workers.providers.errors import ProviderError, RateLimitedError

T = TypeVar("T")

# Waiting for a rate-limit slot longer than this is better done as a task retry than in a thread.
MAX_THROTTLE_WAIT_S = 10.0


class SharedRateLimit:
    """One moving-window limit per provider in Redis, so all workers together stay under it."""

    def __init__(self, settings: Settings):
        uri, options = limits_storage_uri(settings)
        self._limiter = MovingWindowRateLimiter(storage_from_string(uri, key_prefix=keys.RATE_LIMIT_PREFIX, **options))
        self._settings = settings
        self._items = {}

    def acquire(self, provider: str) -> None:
        """Block until a call slot is free; past ``MAX_THROTTLE_WAIT_S`` the task retries instead."""
        item = self._items.get(provider) or self._items.setdefault(
            provider, parse(rate_limit_for(self._settings, provider))
        )
        waited = 0.0
        while not self._limiter.hit(item, provider):
            reset_at = self._limiter.get_window_stats(item, provider).reset_time
            pause = min(max(reset_at - time.time(), 0.01), 1.0)
            if waited + pause > MAX_THROTTLE_WAIT_S:
                raise RateLimitedError(
                    f"shared {provider} API limit {item} reached", provider_code="vmq_throttle", retry_after_s=pause
                )
            time.sleep(pause)
            waited += pause


class ProviderCalls:
    """Calls to one provider's adapter within one task step; ``count`` is what the job is billed."""

    def __init__(self, provider: str, limit: SharedRateLimit, settings: Settings):
        self.provider = provider
        self.limit = limit
        self.count = 0
        self._attempts = settings.call_attempts
        self._wait_max_s = settings.call_wait_max_s
        self._backoff = full_jitter_backoff(0.5, settings.call_wait_max_s)

    def __call__(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            retry=retry_if_exception(self._quick_retry),
            wait=self._wait,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                self.limit.acquire(self.provider)
                self.count += 1
                with metrics.provider_call(self.provider, getattr(fn, "__name__", "call")):
                    return fn(*args, **kwargs)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _quick_retry(self, exc: BaseException) -> bool:
        # A long Retry-After is not slept in a worker thread: the task reschedules itself.
        if not isinstance(exc, ProviderError) or not exc.retryable:
            return False
        return exc.retry_after_s is None or exc.retry_after_s <= self._wait_max_s

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after_s", None) or 0.0
        return max(after, self._backoff(state.attempt_number - 1))
