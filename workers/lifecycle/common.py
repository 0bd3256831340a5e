"""What every step module shares: the ``Next`` a step returns and the runner's attributes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vmqueue.jobstore import JobStore
from vmqueue.models import Job, JobError, VMStatus
from vmqueue.settings import Settings
from workers.calls import SharedRateLimit
from workers.providers.base import Provider
from workers.providers.errors import ProviderError
from workers.watchlist import WatchList

log = logging.getLogger("vmqueue.worker")

# A message may fire this much before the step it was scheduled for is due (clock and ETA slack).
EARLY_TOLERANCE_S = 0.5
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


class Steps:
    """The state every step mixin reads; ``JobRunner`` sets it and combines the mixins."""

    store: JobStore
    settings: Settings
    providers: Callable[[str], Provider]  # name -> Provider: the lazy registry's get_provider
    limit: SharedRateLimit
    watch: WatchList
    poll_delay: Callable[[int], float]
    retry_delay: Callable[[int], float]
    # Starts the batch-read chain of a provider (provider, lease token); None: every job reads alone.
    start_ticker: Callable[[str, str], None] | None
    # Sends a create job's step again (job id, countdown): a watched job the tick settled into
    # something that needs its own chain (a cleanup, a failover).
    start_job: Callable[[str, float], None] | None


def _set(job: Job, **fields: object) -> None:
    for name, value in fields.items():
        setattr(job, name, value)


def _job_error(exc: ProviderError) -> JobError:
    return JobError(code=exc.code, message=exc.message, retryable=exc.retryable, provider_code=exc.provider_code)
