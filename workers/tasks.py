"""The Celery tasks: small, each runs one lifecycle step and reschedules itself while it waits.

Arguments are only the job id: the spec, key and startup script are read from the job store, so
no secret is ever in a message, a retry, Flower or the worker's log.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cache

import redis
from celery import Task
from celery.signals import worker_ready

from vmqueue import jobindex, keys
from vmqueue.connection import connect
from vmqueue.jobstore import JobStore
from vmqueue.models import JobError, JobKind, JobState
from workers import jobevents
from workers.app import app, settings
from workers.calls import ProviderCalls, SharedRateLimit
from workers.expiry import Expiry
from workers.lifecycle import JobRunner
from workers.providers.registry import get_provider

log = logging.getLogger("vmqueue.worker")

# A Redis outage during a step: try the step again later rather than lose the job.
BROKER_RETRY_S = 5.0


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


def _start_ticker(provider: str, token: str) -> None:
    tick.apply_async(args=[provider, token], queue=keys.queue_name(provider), argsrepr=f"({provider})")


def _start_job(job_id: str, countdown_s: float) -> None:
    job = runner().store.get(job_id)
    if job is not None:
        create.apply_async(
            args=[job_id],
            countdown=countdown_s,
            queue=keys.queue_name(job.provider),
            task_id=job.id,  # the job's one task id: Flower keeps one row per job
            argsrepr=_argsrepr(job),
        )


@worker_ready.connect
def _supervise_ticks(sender, **_: object) -> None:
    """A thread per worker process that restarts a provider's tick chain if it died (its lease ran
    out while VMs are still watched), so watched jobs never wait on a dead chain for long, and
    destroys the VMs whose expiry passed (workers/expiry.py)."""
    providers = [q.name.removeprefix(keys.QUEUE_PREFIX) for q in sender.task_consumer.queues]
    period_s = max(1.0, 2 * min((runner().tick_s(p) for p in providers), default=1.0))

    def supervise() -> None:
        while True:
            time.sleep(period_s)
            try:
                runner().revive_ticks(providers)
                expiry().run(providers)
            except Exception as exc:  # noqa: BLE001 - a supervisor must outlive a Redis outage
                log.debug("tick supervisor: %s", exc)

    threading.Thread(target=supervise, name="vmq-tick-supervisor", daemon=True).start()


@worker_ready.connect
def _scan_readiness(sender, **_: object) -> None:
    """One SSH readiness scanner per worker process (workers/readyscan.py): its own thread and event loop."""
    from workers.readyscan import ReadyScanner

    ReadyScanner(runner(), settings).start()


def _step(task: Task, job_id: object, kind: JobKind) -> None:
    if not isinstance(job_id, str) or not job_id:
        log.error("%s message rejected: the argument must be a job id string, got %r", task.name, job_id)
        return
    try:
        outcome = runner().run(job_id, kind)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("job=%s Redis unavailable (%s); retrying the step in %ss", job_id, exc, BROKER_RETRY_S)
        raise task.retry(countdown=BROKER_RETRY_S, max_retries=None) from exc
    except Exception as exc:
        # A bug must not make a job vanish silently: record it on the job, then let Celery log it.
        _fail_internal(job_id, exc)
        raise
    if outcome is not None and outcome.message:
        # The retry keeps the job's readable arguments: Flower's row (and its search) would else turn
        # to "('<id>',)" at the first poll, losing the VM's name.
        argsrepr = getattr(task.request, "argsrepr", None)
        raise task.retry(countdown=outcome.countdown_s, max_retries=None, argsrepr=argsrepr)
    # No success of the task's own: Flower's row for the job ends as the job ends (workers/jobevents.py).
    jobevents.step_ended(job_id, runner().store)


def _fail_internal(job_id: str, exc: Exception) -> None:
    store = runner().store
    error = JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
    try:
        job = store.get(job_id)
        if job is not None and not job.final:
            store.transition(job_id, JobState.failed, f"failed: {error.message}", error=error)
    except Exception:  # noqa: BLE001 - already failing; the original error is what matters
        log.exception("job=%s could not record the internal error", job_id)


@app.task(bind=True, name=keys.TASK_CREATE, max_retries=None)
def create(self: Task, job_id: str) -> None:
    """Create a VM: submit once (idempotently), then poll until running, the deadline or an error."""
    _step(self, job_id, JobKind.create)


@app.task(bind=True, name=keys.TASK_DESTROY, max_retries=None)
def destroy(self: Task, job_id: str) -> None:
    """Destroy a VM: send the delete, then poll until the provider reports it gone."""
    _step(self, job_id, JobKind.destroy)


@app.task(bind=True, name=keys.TASK_GET, max_retries=None)
def get(self: Task, job_id: str) -> None:
    """Read a VM once into the job."""
    _step(self, job_id, JobKind.get)


@app.task(bind=True, name=keys.TASK_TICK, max_retries=None)
def tick(self: Task, provider: str, token: str) -> None:
    """Read every VM of a provider that jobs wait for, in one call, and settle the jobs whose VM settled."""
    try:
        outcome = runner().tick(provider, token)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
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


def _resend(job) -> None:
    """A stalled job's task again, as the producer sent it (workers/rescue.py says why it is safe)."""
    task = {JobKind.create: create, JobKind.destroy: destroy, JobKind.get: get}[job.kind]
    task.apply_async(args=[job.id], queue=keys.queue_name(job.provider), task_id=job.id, argsrepr=_argsrepr(job))


def _argsrepr(job) -> str:
    return keys.task_argsrepr(job.kind, job.provider, job.id, job.spec.name if job.spec else None)
