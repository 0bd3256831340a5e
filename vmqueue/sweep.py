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
# A pass destroys at most this share of the VMs it lists (rounded up), so a wrong belief about
# ownership (a lost store, a bug) costs a few VMs per pass, not the fleet. 1.0 lifts the limit.
DEFAULT_MAX_DESTROY_SHARE = 0.2


class SweepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")
    provider: ProviderName
    dry_run: bool = False
    delay_s: float = Field(DEFAULT_DELAY_S, ge=0, description="an orphan is destroyed this long after it was reported")
    max_destroy_share: float = Field(
        DEFAULT_MAX_DESTROY_SHARE, ge=0, le=1, description="share of the listed VMs one pass may destroy (rounded up)"
    )
    epoch: str | None = Field(
        None,
        max_length=64,
        description="the store epoch the previous pass of this periodic sweeper saw; a different one now "
        "means the store lost its records in between, and the pass destroys nothing",
    )


class StoreEpoch(BaseModel):
    """The job store's continuity marker (``vmq:epoch``, no TTL), written once by the first pass that
    finds none. A record that is gone proves nothing about a VM created before ``born_at``."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    born_at: datetime = Field(default_factory=utcnow)
    # Redis' INFO evicted_keys when the epoch began: more since means keys were evicted (maxmemory).
    evicted_keys: int = 0
    why: str = "no epoch marker yet"  # why this epoch began


class OwnedResource(BaseModel):
    """A resource other than a VM that an adapter creates with a VM and that can outlive it (an Azure
    NIC, public IP or disk; an EC2 volume), listed by its ownership labels for the sweeper."""

    provider: str
    kind: str = Field(description="the adapter's name for its type, e.g. nic, public_ip, disk, volume")
    resource_id: str = Field(description="the provider's id, as delete_extra takes it back")
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    attached_to: str | None = Field(None, description="what uses it now (a VM, a NIC); None: nothing")
    created_at: datetime | None = None


class Action(StrEnum):
    reported = "reported"  # first seen as an orphan now; remembered, destroyed on a later pass
    waiting = "waiting"  # seen before, but less than delay_s ago
    destroyed = "destroyed"  # still an orphan after delay_s: the delete was sent
    destroy_failed = "destroy_failed"  # the delete failed; the next pass tries again
    kept = "kept"  # due, but a guard forbids destroying it (``Orphan.kept_because`` says which)
    held = "held"  # due, but this pass reached its destroy limit; a later pass takes it
    would_report = "would_report"  # dry run
    would_destroy = "would_destroy"  # dry run


class Orphan(BaseModel):
    instance_id: str  # a VM's instance id, or an extra resource's id (``kind`` says which)
    kind: str = "vm"
    name: str | None = None
    status: str
    job_id: str | None = None
    reason: str  # why no live job owns it
    action: Action
    kept_because: str | None = None  # with action "kept": why the sweeper will not destroy it
    first_seen: datetime | None = None


class SweepReport(BaseModel):
    id: str
    provider: str
    dry_run: bool
    delay_s: float
    listed: int = 0  # VMs carrying managed-by=vmqueue
    extras_listed: int = 0  # other resources carrying it (OwnedResource), attached or not
    owned: int = 0  # of those, owned by a live job (or being deleted, or kept on purpose)
    orphans: list[Orphan] = Field(default_factory=list)
    rescued: list[str] = Field(default_factory=list)  # stalled jobs whose task was sent again (dry run: would be)
    epoch: StoreEpoch | None = None  # the store's epoch this pass saw (or began)
    refused: str | None = None  # why this pass destroyed nothing at all (the store lost records)
    destroy_limit: int | None = None  # the most this pass could destroy (max_destroy_share x everything listed)
    # queued records whose message was never published (the enqueue failed): failed, not sent
    never_enqueued: list[str] = Field(default_factory=list)
    error: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)
