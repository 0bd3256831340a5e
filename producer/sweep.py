"""The orphan sweep, producer side: ask a provider's worker for a sweep and read its report.

The sweep itself runs on the provider's queue (workers/sweeper.py), because listing and deleting
VMs needs the provider's SDK, which a producer never imports. The request travels as the task's
one argument (no secret in it); the report comes back through Redis.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from enum import StrEnum

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict, Field

from producer import keys
from producer.models import utcnow
from producer.options import ProviderName

REPORT_TTL_S = 24 * 3600
DEFAULT_DELAY_S = 600.0


class SweepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")
    provider: ProviderName
    dry_run: bool = False
    delay_s: float = Field(DEFAULT_DELAY_S, ge=0, description="an orphan is destroyed this long after it was reported")


class Action(StrEnum):
    reported = "reported"  # first seen as an orphan now; remembered, destroyed on a later pass
    waiting = "waiting"  # seen before, but less than delay_s ago
    destroyed = "destroyed"  # still an orphan after delay_s: the delete was sent
    destroy_failed = "destroy_failed"  # the delete failed; the next pass tries again
    would_report = "would_report"  # dry run
    would_destroy = "would_destroy"  # dry run


class Orphan(BaseModel):
    instance_id: str
    name: str | None = None
    status: str
    job_id: str | None = None
    reason: str  # why no live job owns it
    action: Action
    first_seen: datetime | None = None


class SweepReport(BaseModel):
    id: str
    provider: str
    dry_run: bool
    delay_s: float
    listed: int = 0  # VMs carrying managed-by=vmqueue
    owned: int = 0  # of those, owned by a live job (or being deleted, or kept on purpose)
    orphans: list[Orphan] = Field(default_factory=list)
    rescued: list[str] = Field(default_factory=list)  # stalled jobs whose task was sent again (dry run: would be)
    error: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)


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
