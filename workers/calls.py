"""How a task calls an adapter: quick retries (layer 1); the adapter's transport charges the shared budget.

Layer 1 (here, tenacity) retries transient errors and short rate limits a few times within one
task step; what still fails goes back to the task, which retries the job later (layer 2,
``lifecycle``). SDK-internal retries are off in every adapter, so the layers never multiply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from vmqueue.settings import Settings
from workers import metrics
from workers.backoff import full_jitter_backoff
from workers.budget import Budget
from workers.gate import GATE
from workers.providers.errors import ProviderError

T = TypeVar("T")

# The shared API budget (per provider, per bucket, per HTTP request): workers/budget.py. Adapters charge
# it from their SDK transport, so a step's adapter call is metered request by request, pages included.
SharedRateLimit = Budget


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
        # The provider's answer, retries and budget waits are waits: the step's gate slot goes meanwhile.
        with GATE.released():
            for attempt in retrying:
                with attempt:
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
