"""The orphan sweep, producer side: ask a provider's worker for a sweep and read its report."""

from __future__ import annotations

import time

import redis
from celery import Celery

from vmqueue import keys
from vmqueue.sweep import SweepReport, SweepRequest


class SweepTimeout(TimeoutError):
    pass


def request_sweep(celery: Celery, request: SweepRequest) -> None:
    celery.send_task(
        keys.TASK_SWEEP,
        args=[request.model_dump(mode="json")],
        queue=keys.queue_name(request.provider),
        argsrepr=f"(sweep {request.provider} dry_run={request.dry_run})",
    )


def wait_report(client: redis.Redis, sweep_id: str, timeout_s: float, poll_s: float = 0.25) -> SweepReport:
    deadline = time.monotonic() + timeout_s
    while (raw := client.get(keys.sweep_report_key(sweep_id))) is None:
        if time.monotonic() > deadline:
            raise SweepTimeout(f"no sweep report after {timeout_s:.0f}s: is a worker serving this provider's queue?")
        time.sleep(poll_s)
    return SweepReport.model_validate_json(raw)
