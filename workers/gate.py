"""A few pool threads at a time run vmqueue's own step code; any number wait on providers.

A worker's thread pool is sized for provider calls that take seconds (64 threads, most of them
waiting on an HTTP answer). vmqueue's own part of a step is the opposite: a millisecond of Python
between Redis round trips of a tenth of that. When a backlog lets every thread run such code at
once, each round trip hands the GIL to another of 64 runnable threads, and the handovers (futex
wakes, context switches) cost more than the work: one create step measured 1.1 ms of CPU on one
thread and 2.6 ms each with 64 threads at once, the difference almost all system time (1,000 steps
of the simulated cloud, no Celery). Steps therefore take a slot of this gate for their own code and
give it back while they wait on a provider (``ProviderCalls``: its calls, retries and budget waits),
so waits still overlap in any number while the GIL passes between a few threads.

The gate is per process and knows no Celery: a thread that never took it (the tick, the sweeper,
tests calling steps directly) passes ``released`` untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StepGate:
    """``slots`` threads at most between ``held`` and ``released`` (``slots`` None: no limit)."""

    def __init__(self, slots: int | None = None) -> None:
        self._slots: threading.BoundedSemaphore | None = None
        self._holding = threading.local()
        self.configure(slots)

    def configure(self, slots: int | None) -> None:
        """Set the number of slots (None or 0: no gate); before any thread takes one."""
        self._slots = threading.BoundedSemaphore(slots) if slots else None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Run the block in a slot (re-entrant: a thread already in one keeps it)."""
        if self._slots is None or getattr(self._holding, "on", False):
            yield
            return
        with self._slots:
            self._holding.on = True
            try:
                yield
            finally:
                self._holding.on = False

    @contextmanager
    def released(self) -> Iterator[None]:
        """Give this thread's slot up for the block (a wait on something else), then take one again."""
        if self._slots is None or not getattr(self._holding, "on", False):
            yield
            return
        self._holding.on = False
        self._slots.release()
        try:
            yield
        finally:
            self._slots.acquire()
            self._holding.on = True


# The worker process's gate: workers/tasks.py sizes it from ``VMQ_STEP_SLOTS`` when it builds the runner.
GATE = StepGate()
