"""The worker app plus a bare no-op task: P3's baseline (bench/throughput.py), never in production.

``celery -A bench.noop_app worker -Q vmq.sim`` is the real sim worker -- the same app, the one shared
configuration, pool, concurrency and signal handlers -- that also knows ``bench.noop``. So the
baseline and vmqueue's ``get`` jobs run in the very same process with the very same settings, and
the difference between them is what vmqueue's job handling costs on top of Celery.
"""

from __future__ import annotations

from workers.app import app

NOOP_TASK = "bench.noop"


@app.task(name=NOOP_TASK)
def noop(job_id: str) -> None:
    """Does nothing: what Celery alone costs per message (receive, run, ack, events)."""


__all__ = ["app", "noop", "NOOP_TASK"]
