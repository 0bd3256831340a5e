"""The Celery tasks: small, each runs one lifecycle step and reschedules itself while it waits.

Arguments are only the job id: the spec, key and startup script are read from the job store, so
no secret is ever in a message, a retry, Flower or the worker's log.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cache

from celery import Task
from celery.signals import worker_ready

from vmqueue import jobindex, keys
from vmqueue.connection import REDIS_UNAVAILABLE, connect
from vmqueue.jobstore import JobStore
from vmqueue.models import JobError, JobKind, JobState
from workers import jobevents
from workers.app import app, settings
from workers.calls import ProviderCalls, SharedRateLimit
from workers.expiry import Expiry
from workers.gate import GATE
from workers.lifecycle import JobRunner
from workers.lifecycle.common import Next
from workers.logctx import bind_job, bind_provider
from workers.providers.registry import get_provider
from workers.readyscan import ReadyScanner  # with the tasks, before consuming: see _scan_readiness

log = logging.getLogger("vmqueue.worker")

# A Redis outage during a step: try the step again later rather than lose the job.
BROKER_RETRY_S = 5.0

GATE.configure(settings.step_slots)  # before any task runs: slots are never swapped under a holder


@cache
def runner() -> JobRunner:
    store = JobStore(connect(settings), settings)
    budget = SharedRateLimit(settings, store.redis)
    # Every adapter the runner gets charges the shared budget per HTTP request, from its SDK transport.
    providers = budget.metered(get_provider)
    return JobRunner(store, settings, providers, budget, start_ticker=_start_ticker, start_job=_start_job)


@cache
def expiry() -> Expiry:
    """The expiry check the tick supervisor runs (workers/expiry.py says why there)."""
    return Expiry(runner().store, settings, _resend)


class Ticker:
    """The tick of every provider this worker serves, on a timer thread of the worker's own.

    Tick messages waited in the provider's queue behind every job message, so a backlog longer than
    the tick lease starved the batched reads and the deadlines they enforce (a VM up for a minute
    still ``provisioning``). The tick runs here instead, outside the pool and the queue: the process
    holding a provider's tick lease (``WatchList.claim_ticker``) reads that provider every tick
    interval whatever the queue holds; if it dies, its lease runs out and another worker's thread
    claims it.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}  # provider -> the tick lease this process holds
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def adopt(self, provider: str, token: str) -> None:
        """This process claimed ``provider``'s tick lease (a job found no live tick): tick it from now."""
        with self._lock:
            self.tokens[provider] = token
        self._wake.set()

    def run(self, providers: list[str]) -> None:
        next_at: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for provider in providers:
                if now < next_at.get(provider, 0.0):
                    continue
                next_at[provider] = now + runner().tick_s(provider)
                try:
                    outcome = self._tick(provider, providers)
                except Exception as exc:  # noqa: BLE001 - the timer must outlive a Redis outage or a bug
                    log.warning("provider=%s tick failed: %s: %s", provider, type(exc).__name__, exc)
                    continue
                if outcome is not None:  # the tick's own interval: sooner while VMs settle
                    next_at[provider] = now + outcome.countdown_s
            wait = min(next_at.values(), default=now + 1.0) - time.monotonic()
            self._wake.wait(max(wait, 0.05))
            self._wake.clear()

    def _tick(self, provider: str, providers: list[str]) -> Next | None:
        bind_provider(provider)  # its log lines name the provider, and each job's line its job
        token = self.tokens.get(provider)
        if token is None:
            if not runner().watch.providers_waiting([provider]):
                return None
            token = runner().watch.claim_ticker(provider)
            if token is None:
                return None  # another worker ticks this provider
            log.info("provider=%s VMs are watched and no tick runs; this worker ticks them", provider)
            self.adopt(provider, token)
        outcome = runner().tick(provider, token)
        if outcome is None:  # nothing watched any more, or the lease went elsewhere
            with self._lock:
                if self.tokens.get(provider) == token:
                    del self.tokens[provider]
        return outcome


TICKER = Ticker()


def _start_ticker(provider: str, token: str) -> None:
    TICKER.adopt(provider, token)


def _start_job(job_id: str, countdown_s: float, seq: int) -> None:
    job = runner().store.get(job_id)
    if job is not None:
        create.apply_async(
            args=[job_id],
            kwargs={"seq": seq},
            countdown=countdown_s,
            queue=keys.queue_name(job.provider),
            task_id=job.id,  # the job's one task id: Flower keeps one row per job
            argsrepr=_argsrepr(job),
        )


@worker_ready.connect
def _start_worker_threads(sender, **_: object) -> None:
    """Per worker process: the tick thread (``Ticker``) and a supervisor that destroys the VMs whose
    expiry passed (workers/expiry.py), for the providers whose queues this worker consumes."""
    providers = [keys.provider_of_queue(q.name) for q in sender.task_consumer.queues]
    threading.Thread(target=TICKER.run, args=(providers,), name="vmq-ticker", daemon=True).start()
    period_s = max(1.0, 2 * min((runner().tick_s(p) for p in providers), default=1.0))

    def supervise() -> None:
        while True:
            time.sleep(period_s)
            try:
                expiry().run(providers)
            except Exception as exc:  # noqa: BLE001 - a supervisor must outlive a Redis outage
                log.debug("expiry supervisor: %s", exc)

    threading.Thread(target=supervise, name="vmq-expiry-supervisor", daemon=True).start()


@worker_ready.connect
def _scan_readiness(sender, **_: object) -> None:
    """One SSH readiness scanner per worker process (workers/readyscan.py): its own thread and event loop.

    Its module (asyncssh, cryptography's x509) is imported with the tasks, before the worker consumes:
    imported here, once the worker was ready, it took a tenth of the GIL from a backlog's first creates."""
    ReadyScanner(runner(), settings).start()


def _step(task: Task, job_id: object, kind: JobKind, seq: object) -> None:
    if not isinstance(job_id, str) or not job_id:
        log.error("%s message rejected: the argument must be a job id string, got %r", task.name, job_id)
        return
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        log.error("%s message rejected: seq must be a step number >= 0, got %r", task.name, seq)
        return
    try:
        with GATE.held():  # vmqueue's own code: a few threads at a time (workers/gate.py)
            outcome = runner().run(job_id, kind, seq)
    except REDIS_UNAVAILABLE as exc:
        # Redis away or changing hands (READONLY after a failover included): the step runs again later
        # with the same sequence number; nothing of the job is lost or failed.
        log.warning("job=%s Redis unavailable (%s); retrying the step in %ss", job_id, exc, BROKER_RETRY_S)
        argsrepr = getattr(task.request, "argsrepr", None)
        raise task.retry(countdown=BROKER_RETRY_S, max_retries=None, argsrepr=argsrepr, kwargs={"seq": seq}) from exc
    except Exception as exc:
        # A bug must not make a job vanish silently: record it on the job, then let Celery log it.
        _fail_internal(job_id, exc)
        raise
    if outcome is not None and outcome.message:
        # The retry keeps the job's readable arguments: Flower's row (and its search) would else turn
        # to "('<id>',)" at the first poll, losing the VM's name. The next message carries the step
        # number the job now expects; a copy of this one is a duplicate.
        argsrepr = getattr(task.request, "argsrepr", None)
        raise task.retry(
            countdown=outcome.countdown_s, max_retries=None, argsrepr=argsrepr, kwargs={"seq": outcome.seq}
        )
    # No success of the task's own: Flower's row for the job ends as the job ends (workers/jobevents.py).
    jobevents.step_ended(job_id, runner().store, carried=outcome is not None)


def _fail_internal(job_id: str, exc: Exception) -> None:
    store = runner().store
    error = JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
    try:
        job = store.get(job_id)
        if job is not None and not job.final:
            store.transition(job_id, JobState.failed, f"failed: {error.message}", error=error)
    except Exception:  # noqa: BLE001 - already failing; the original error is what matters
        log.exception("job=%s could not record the internal error", job_id)


@app.task(bind=True, name=keys.TASK_CREATE, max_retries=None, Request=jobevents.JobRequest)
def create(self: Task, job_id: str, seq: int = 0) -> None:
    """Create a VM: submit once (idempotently), then poll until running, the deadline or an error."""
    _step(self, job_id, JobKind.create, seq)


@app.task(bind=True, name=keys.TASK_CREATE_MANY, max_retries=None)
def create_many(self: Task, job_ids: list[str]) -> None:
    """The first step of many create jobs ``create_vms`` enqueued together (producer/bulk.py), in turn.

    A job whose step wants a message later (a countdown for its budget slot, a poll) gets its own
    message from then on, with the step number it expects; a redelivered copy of this message is
    dropped job by job as duplicates. A Redis outage sends this message again for the jobs it has
    not run yet; a bug in one job's step fails that job and the others go on.
    """
    if not isinstance(job_ids, list) or not all(isinstance(j, str) and j for j in job_ids):
        log.error("%s message rejected: the argument must be a list of job ids, got %r", self.name, job_ids)
        return
    provider = keys.provider_of_queue((self.request.delivery_info or {}).get("routing_key") or "")
    jobevents.received(job_ids, provider, self.request.id)
    for index, job_id in enumerate(job_ids):
        bind_job(job_id)
        try:
            with GATE.held():
                outcome = runner().run(job_id, JobKind.create, 0)
        except REDIS_UNAVAILABLE as exc:
            _retry_rest(self, job_ids, index, exc)
        except Exception as exc:  # noqa: BLE001 - one job's bug must not strand the others
            _fail_internal(job_id, exc)
            log.exception("job=%s create step failed", job_id)
            continue
        try:
            if outcome is not None and outcome.message:
                _start_job(job_id, outcome.countdown_s, outcome.seq)
            else:
                jobevents.step_ended(job_id, runner().store, carried=outcome is not None)
        except REDIS_UNAVAILABLE as exc:  # this job's step is done; its next message, if lost, the rescue sends
            _retry_rest(self, job_ids, index + 1, exc)


def _retry_rest(task: Task, job_ids: list[str], start: int, exc: Exception) -> None:
    """Send ``vmq.create_many`` again for the jobs from ``start`` on (Redis away): raises ``Retry``;
    returns when none is left (the last job's step was done)."""
    log.warning("Redis unavailable (%s); the %d creates left in this message retry in %ss", exc,
                len(job_ids) - start, BROKER_RETRY_S)  # fmt: skip
    if start < len(job_ids):
        raise task.retry(args=[job_ids[start:]], countdown=BROKER_RETRY_S, max_retries=None) from exc


@app.task(bind=True, name=keys.TASK_DESTROY, max_retries=None, Request=jobevents.JobRequest)
def destroy(self: Task, job_id: str, seq: int = 0) -> None:
    """Destroy a VM: send the delete, then poll until the provider reports it gone."""
    _step(self, job_id, JobKind.destroy, seq)


@app.task(bind=True, name=keys.TASK_GET, max_retries=None, Request=jobevents.JobRequest)
def get(self: Task, job_id: str, seq: int = 0) -> None:
    """Read a VM once into the job."""
    _step(self, job_id, JobKind.get, seq)


@app.task(bind=True, name=keys.TASK_TICK, max_retries=None)
def tick(self: Task, provider: str, token: str) -> None:
    """A tick sent as a message by an earlier version; ticks now run on each worker's ``Ticker`` thread.

    Runs only while its token still holds the provider's tick lease, so it ends within one lease.
    """
    try:
        outcome = runner().tick(provider, token)
    except REDIS_UNAVAILABLE as exc:
        log.warning("provider=%s tick: Redis unavailable (%s); the next job poll restarts the tick", provider, exc)
        return
    if outcome is not None:
        raise self.retry(countdown=outcome.countdown_s, max_retries=None)


@app.task(name=keys.TASK_SWEEP)
def sweep(request: object) -> None:
    """One orphan-sweep pass over the provider's VMs; the report goes to Redis (see workers/sweeper.py)."""
    from pydantic import ValidationError

    from vmqueue.sweep import SweepRequest
    from workers.rescue import stalled_after_s
    from workers.sweeper import Sweeper

    try:
        parsed = SweepRequest.model_validate(request)
    except ValidationError as exc:
        log.error("vmq.sweep message rejected: %s", str(exc).replace("\n", "; "))
        return
    run = runner()
    calls = ProviderCalls(parsed.provider, run.limit, settings)
    sweeper = Sweeper(run.store, run.providers(parsed.provider), calls, _resend, stalled_after_s(settings))
    report = sweeper.run(parsed)
    if not parsed.dry_run:  # the job index's entries of records that expired (vmqueue/jobindex.py)
        if forgotten := jobindex.trim(run.store.redis, time.time() - settings.job_ttl_s):
            log.info("job index: the entries of %d expired records forgotten", forgotten)
    mode = "dry run" if parsed.dry_run else "pass"
    log.info(
        "provider=%s sweep %s (%s): %d listed, %d owned, %d orphans, %d stalled jobs",
        parsed.provider, parsed.id, mode, report.listed, report.owned, len(report.orphans), len(report.rescued),
    )  # fmt: skip


def _resend(job, seq: int = 0) -> None:
    """A stalled job's task again, with the step number the job expects (workers/rescue.py says why it is safe)."""
    task = {JobKind.create: create, JobKind.destroy: destroy, JobKind.get: get}[job.kind]
    task.apply_async(
        args=[job.id],
        kwargs={"seq": seq},
        queue=keys.queue_name(job.provider),
        task_id=job.id,
        argsrepr=_argsrepr(job),
    )


def _argsrepr(job) -> str:
    return keys.task_argsrepr(job.kind, job.provider, job.id, job.spec.name if job.spec else None)
