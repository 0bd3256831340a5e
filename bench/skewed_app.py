"""The worker app with this process's wall clock shifted by ``VMQ_BENCH_CLOCK_SKEW_S`` seconds.

For the chaos suite's clock-skew scenario (bench/chaos.py, R13): ``time.time`` is what vmqueue's
workers and kombu read for due times, leases and ETAs of their own, so shifting it here is what a
host whose clock is ahead (positive) or behind (negative) looks like to them. Never used outside
benchmarks.
"""

from __future__ import annotations

import os
import time

_SKEW_S = float(os.environ.get("VMQ_BENCH_CLOCK_SKEW_S", "0"))
_real_time = time.time
time.time = lambda: _real_time() + _SKEW_S

from workers.app import app  # noqa: E402 - the clock is shifted before anything reads it

__all__ = ["app"]
