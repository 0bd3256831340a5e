"""Backoff as a value: a function of the attempt number, built from base, cap and jitter."""

from __future__ import annotations

import random
from collections.abc import Callable

Backoff = Callable[[int], float]


def exponential_backoff(base_s: float, cap_s: float, factor: float = 2.0, jitter: float = 0.2) -> Backoff:
    """``min(cap, base * factor**n)``, spread by +-``jitter`` so a fleet of polls does not tick together."""

    def delay(attempt: int) -> float:
        raw = min(cap_s, base_s * factor ** max(attempt, 0))
        return max(0.0, raw * random.uniform(1 - jitter, 1 + jitter))

    return delay


def full_jitter_backoff(base_s: float, cap_s: float) -> Backoff:
    """AWS-style full jitter, for retries of failed calls: ``uniform(0, min(cap, base * 2**n))``."""

    def delay(attempt: int) -> float:
        return random.uniform(0, min(cap_s, base_s * 2 ** max(attempt, 0)))

    return delay


def equal_jitter_backoff(base_s: float, cap_s: float) -> Backoff:
    """For task-level retries of a failed phase: ``uniform(d/2, d)`` with ``d = min(cap, base * 2**n)``.

    Unlike full jitter its floor grows too, so a provider that fails every call (a Hetzner 423
    ``locked`` on each delete) sees fewer and fewer calls, never a burst of near-zero waits.
    """

    def delay(attempt: int) -> float:
        ceiling = min(cap_s, base_s * 2 ** max(attempt, 0))
        return random.uniform(ceiling / 2, ceiling)

    return delay
