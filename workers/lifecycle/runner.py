"""The job lifecycle, as named steps the tasks call: submit, poll, finish, clean up.

Knows no provider (it calls the ``Provider`` protocol) and no Celery (a step returns ``Next`` and
the task turns that into a countdown retry, which holds no worker slot while it waits). Every step
is safe to run twice: the job store's compare-and-set, a per-job lease and the adapters'
idempotency make a redelivered or duplicated message harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from vmqueue.jobstore import InvalidTransition, JobStore, LeaseLost
from vmqueue.models import Job, JobKind, JobState
from vmqueue.settings import Settings, max_countdown_s
from workers.backoff import equal_jitter_backoff, exponential_backoff
from workers.calls import SharedRateLimit
from workers.lifecycle.cancel import CancelSteps
from workers.lifecycle.common import Next, Steps, log
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
        start_job: Callable[[str, float, int], None] | None = None,
    ):
        self.store = store
        self.start_ticker = start_ticker
        self.start_job = start_job
        self.watch = WatchList(store.redis, self.tick_s)
        self.settings = settings
        self.providers = providers
        self.limit = limit
        self.poll_delay = exponential_backoff(settings.poll_initial_s, settings.poll_max_s, settings.poll_factor)
        self.retry_delay = equal_jitter_backoff(settings.retry_base_s, settings.retry_max_s)

    def run(self, job_id: str, kind: JobKind, seq: int = 0) -> Next | None:
        """One step of a job; ``None`` when the job needs no further step from this chain.

        ``seq`` is the sequence number the message carries (0: the producer's first message, or one
        sent before messages carried one). A step runs only for the message its job's last step
        scheduled (the seq noted with the lease); any other is a duplicate and is dropped. No clock
        is compared, so no skew between workers can make a step's only message look early.
        Every write of the step is fenced by its lease (``JobStore.fenced``): a step that outlived
        its lease changes nothing, and its outcome is dropped.
        """
        token, job, due = self.store.acquire_and_get(
            job_id, self.settings.step_lease_s, with_script=kind == JobKind.create
        )
        if token is None:  # another delivery of this job is acting now; look again later
            return Next(min(self.settings.poll_initial_s, 5.0), seq=seq)
        expected = due.seq if due is not None and due.seq is not None else 0
        outcome = None
        try:
            with self.store.fenced(job_id, token, self.settings.step_lease_s):
                outcome = self._step(job_id, kind, job, seq, expected)
        except LeaseLost as exc:
            log.warning("%s; this step's outcome is dropped", exc)
            return None
        except InvalidTransition as exc:
            log.info("job=%s: %s; another delivery finished this step", job_id, exc)
            outcome = None
        finally:
            if outcome is None:
                self.store.release(job_id, token)
        if outcome is None:
            return None
        if outcome.message:
            outcome = replace(outcome, countdown_s=min(outcome.countdown_s, max_countdown_s(self.settings)))
        outcome = replace(outcome, seq=expected + 1)
        if not self.store.release(job_id, token, outcome.countdown_s, seq=outcome.seq):
            log.warning("job=%s: the step outlived its lease; its next message is not sent", job_id)
            return None
        return outcome

    def _step(self, job_id: str, kind: JobKind, job: Job | None, seq: int, expected: int) -> Next | None:
        if job is None:
            log.warning("job=%s dropped: no such job in the store (expired or never enqueued)", job_id)
            return None
        if job.kind != kind:
            log.warning("job=%s dropped: a %s message for a %s job", job_id, kind, job.kind)
            return None
        if job.state == JobState.cancelled and job.cancel is not None and job.cancel.reported_at is None:
            job = self._report_cancel(job)
        # A cancel's message (producer/control.py) is never a duplicate: it is the reason to act now.
        if seq != expected and not job.cancel_pending:
            log.info(
                "job=%s provider=%s duplicate message (step %d, the job expects %d) dropped",
                job.id, job.provider, seq, expected,
            )  # fmt: skip
            return None
        return getattr(self, f"_{kind}")(job)
