"""The job lifecycle, as named steps the tasks call: submit, poll, finish, clean up.

Knows no provider (it calls the ``Provider`` protocol) and no Celery (a step returns ``Next`` and
the task turns that into a countdown retry, which holds no worker slot while it waits). Every step
is safe to run twice: the job store's compare-and-set, a per-job lease and the adapters'
idempotency make a redelivered or duplicated message harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmqueue.jobstore import InvalidTransition, JobStore
from vmqueue.models import JobKind, JobState
from vmqueue.settings import Settings
from workers.backoff import exponential_backoff, full_jitter_backoff
from workers.calls import SharedRateLimit
from workers.lifecycle.cancel import CancelSteps
from workers.lifecycle.common import EARLY_TOLERANCE_S, Next, Steps, log
from workers.lifecycle.create import CreateSteps
from workers.lifecycle.destroy import DestroySteps
from workers.lifecycle.failure import FailureSteps
from workers.lifecycle.get import GetSteps
from workers.lifecycle.ready import ReadySteps
from workers.lifecycle.tick import TickSteps
from workers.providers.base import Provider
from workers.watchlist import WatchList


class JobRunner(CreateSteps, TickSteps, ReadySteps, DestroySteps, GetSteps, FailureSteps, CancelSteps, Steps):
    """Runs one step of a job per call (``run``) or one tick of a provider (``tick``).

    The steps live in one mixin per phase (create, tick, destroy, get, failure); this class holds
    the shared state and the entry point that takes the job's lease around every step.
    """

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        providers: Callable[[str], Provider],
        limit: SharedRateLimit,
        start_ticker: Callable[[str, str], None] | None = None,
        start_job: Callable[[str, float], None] | None = None,
    ):
        self.store = store
        self.start_ticker = start_ticker
        self.start_job = start_job
        self.watch = WatchList(store.redis, self.tick_s)
        self.settings = settings
        self.providers = providers
        self.limit = limit
        self.poll_delay = exponential_backoff(settings.poll_initial_s, settings.poll_max_s, settings.poll_factor)
        self.retry_delay = full_jitter_backoff(settings.retry_base_s, settings.retry_max_s)

    def run(self, job_id: str, kind: JobKind) -> Next | None:
        """One step of a job; ``None`` when the job needs no further step from this chain."""
        token, job, due = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if token is None:  # another delivery of this job is acting now; look again later
            return Next(min(self.settings.poll_initial_s, 5.0))
        outcome = None
        try:
            if job is None:
                log.warning("job=%s dropped: no such job in the store (expired or never enqueued)", job_id)
                return None
            if job.kind != kind:
                log.warning("job=%s dropped: a %s message for a %s job", job_id, kind, job.kind)
                return None
            if job.state == JobState.cancelled and job.cancel is not None and job.cancel.reported_at is None:
                job = self._report_cancel(job)
            # A cancel's message (producer/control.py) is never early: it is the reason to act now.
            if due and time.time() < due - EARLY_TOLERANCE_S and not job.cancel_pending:
                log.info(
                    "job=%s provider=%s duplicate message dropped; the job's own chain goes on", job.id, job.provider
                )
                return None
            outcome = getattr(self, f"_{kind}")(job)
            return outcome
        except InvalidTransition as exc:
            log.info("job=%s: %s; another delivery finished this step", job_id, exc)
            return None
        finally:
            self.store.release(job_id, token, outcome.countdown_s if outcome else None)
