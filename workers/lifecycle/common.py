"""What every step module shares: the ``Next`` a step returns and the runner's attributes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from vmqueue.jobstore import Due, JobStore
from vmqueue.models import Job, JobError, Phase, VMInfo, VMStatus, utcnow
from vmqueue.settings import Settings
from workers.calls import SharedRateLimit
from workers.providers.base import Provider
from workers.providers.errors import ProviderError
from workers.watchlist import WatchList

log = logging.getLogger("vmqueue.worker")

GONE = (VMStatus.terminated,)
DEAD = (VMStatus.error, VMStatus.terminated, VMStatus.terminating)


@dataclass(frozen=True)
class Next:
    """Run the same task again for this job after ``countdown_s``.

    ``message=False``: send nothing; the tick chain carries the job until then (its deadline), and
    ``countdown_s`` only tells when the job's next step is due (for duplicate and stall checks).
    """

    countdown_s: float
    message: bool = True
    seq: int = 0  # the sequence number the next message carries (``JobRunner.run`` fills it in)


class Steps:
    """The state every step mixin reads; ``JobRunner`` sets it and combines the mixins."""

    store: JobStore
    settings: Settings
    providers: Callable[[str], Provider]  # name -> Provider: the lazy registry's get_provider
    limit: SharedRateLimit
    watch: WatchList
    poll_delay: Callable[[int], float]
    retry_delay: Callable[[int], float]  # attempt number -> seconds; its floor grows (equal jitter)
    # Starts the batch-read chain of a provider (provider, lease token); None: every job reads alone.
    start_ticker: Callable[[str, str], None] | None
    # Sends a create job's step again (job id, countdown): a watched job the tick settled into
    # something that needs its own chain (a cleanup, a failover).
    start_job: Callable[[str, float, int], None] | None  # (job id, countdown, the message's sequence number)

    def _hand_back(self, job_id: str, lease: str, due: Due | None, kick: Next | None) -> int | None:
        """Free a job's lease taken outside the job's own chain (the tick, the readiness scanner).

        With ``kick`` (the job needs its own chain again: a cleanup, a failover), note the next step
        number and return it: the message ``start_job`` sends carries it, so no worker compares
        clocks to tell it from a duplicate. None when nothing is to be sent (or the lease was lost).
        """
        if kick is not None:
            seq = (due.seq or 0) + 1 if due is not None else 1
            if self.store.release(job_id, lease, 0.0, seq=seq):
                return seq
        self.store.release(job_id, lease)
        return None


def running_fields(job: Job, vm: VMInfo, count: int) -> dict[str, object]:
    """The fields a provisioning job's transition to ``running`` sets: the VM as read (``count``: the
    API calls that read took), one more poll, when it was seen running."""
    return {"vm": vm, "polls": job.polls + 1, "api_calls": job.api_calls + count, "running_at": utcnow()}


def log_running(job: Job) -> None:
    vm = job.vm
    log.info("job=%s provider=%s instance=%s running ip=%s", job.id, job.provider, job.instance_id, vm.public_ipv4)


def _set(job: Job, **fields: object) -> None:
    for name, value in fields.items():
        setattr(job, name, value)


def _job_error(exc: ProviderError) -> JobError:
    return JobError(code=exc.code, message=exc.message, retryable=exc.retryable, provider_code=exc.provider_code)


def phase_deadline(job: Job, phase: Phase, settings: Settings) -> datetime:
    """When ``phase`` of ``job`` must be over: the job's deadline (counted from enqueue), except the
    cleanup of a failed create, which gets ``VMQ_CLEANUP_DEADLINE_S`` from the failure."""
    if phase == Phase.cleanup:
        started = job.phases.cleanup.started_at or job.updated_at
        return started + timedelta(seconds=settings.cleanup_deadline_s)
    return job.deadline_at
