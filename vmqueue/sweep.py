"""The orphan sweep's contract: the request a producer sends and the report a worker writes back.

The sweep runs on the provider's queue (workers/sweeper.py), because listing and deleting VMs
needs the provider's SDK; the producer side (producer/sweep.py) sends the request and reads the
report through Redis. The request travels as the task's one argument (no secret in it).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from vmqueue.models import utcnow
from vmqueue.options import ProviderName

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
