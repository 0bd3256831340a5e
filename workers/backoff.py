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
