"""Many creates in one go (``Provisioner.create_vms``): what a fleet or a batch script enqueues.

The same jobs as ``create_vm`` makes one by one, for a fraction of the round trips: every request is
validated before anything is stored, the new jobs go to Redis as the job store's own add script, one
per job, in one MULTI/EXEC (all or none), and their messages leave in one batched publish
(kombu's ``Producer.batch``: one pipeline for the task messages and their task-sent events).
Measured in bench/inflight.py (P1) and bench/enqueue.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

from celery import Celery
from pydantic import ValidationError

from producer.submit import build_create, request_hash, run, submit, task_message
from vmqueue import keys
from vmqueue.jobstore import JobStore, add_arguments
from vmqueue.models import Job, JobError, JobKind, JobState
from vmqueue.settings import Settings

# Messages buffered before kombu flushes its publish pipeline (a task message and its sent event each).
PUBLISH_BATCH = 1000
# Up to this many creates of one provider share a ``vmq.create_many`` message: a worker's Celery
# consumer spent as much CPU taking a message in as the create step itself (bench/inflight.py).
MESSAGE_JOBS = 16
# ... and never fewer messages than this, so that as many pool threads as a worker has (64 by
# default) still take a batch's creates in parallel: a message's creates run one after another.
MESSAGE_SPREAD = 64


def build_all(settings: Settings, creates: Iterable[Mapping[str, Any]]) -> list[tuple[Job, str | None]]:
    """Each create's job and script; the first bad one raises (pydantic's ``ValidationError``, or
    ``ValueError``/``TypeError``) with a note naming its index, before anything is stored."""
    built = []
    for index, create in enumerate(creates):
        try:
            if not isinstance(create, Mapping):
                raise TypeError(f"a create is a mapping of create_vm's arguments, not {type(create).__name__}")
            built.append(build_create(settings, **create))
        except (ValidationError, ValueError, TypeError) as exc:
            exc.add_note(f"in create {index} of the batch; nothing was enqueued")
            raise
    return built


def enqueue_all(
    store: JobStore,
    celery: Celery,
    settings: Settings,
    built: list[tuple[Job, str | None]],
    publish: Callable[[Job], Any],
) -> list[Job]:
    """Store and publish ``built``; returns the jobs in order (for a reused idempotency key, the job it names).

    Idempotency keys are claimed in one pipeline first; a key already bound goes through the single
    create's protocol (the earlier job, ``IdempotencyConflict`` or ``JobNotFound``), and if that raises,
    the keys this call claimed are released and nothing is stored.
    """
    claimed: list[tuple[Job, str | None]] = []
    results: dict[str, Job] = {}
    keyed = [(job, script) for job, script in built if job.idempotency_key]
    if keyed:
        pipe = store.redis.pipeline(transaction=False)
        for job, script in keyed:
            job.request_hash = request_hash(job, script)
            pipe.set(keys.idempotency_key(job.idempotency_key), job.id, nx=True, ex=settings.idempotency_ttl_s)
        won = pipe.execute()
        try:
            for (job, script), mine in zip(keyed, won, strict=True):
                if not mine:  # bound before: the single path returns the earlier job or raises
                    results[job.id] = run(submit(job, script), store, publish)
        except Exception:
            for (job, _), mine in zip(keyed, won, strict=True):
                if mine:
                    store.release_idempotency_key(job.idempotency_key, job.id)
            raise
        claimed = [(job, script) for (job, script), mine in zip(keyed, won, strict=True) if mine]
    new = [(job, script) for job, script in built if not job.idempotency_key] + claimed
    if new:
        pipe = store.redis.pipeline(transaction=True)
        for job, script in new:
            add_keys, args = add_arguments(job, script, settings)
            store._add(keys=add_keys, args=args, client=pipe)  # the job store's one-script add, pipelined
        pipe.execute()
        _publish_all(store, celery, [job for job, _ in new])
        store.replicated(new[-1][0].id)  # one WAIT covers every record and message written before it
        results.update((job.id, job) for job, _ in new)
    return [results[job.id] for job, _ in built]


def messages(jobs: list[Job]) -> list[tuple[str, str, str, list, str]]:
    """The task messages that carry ``jobs``' first steps: (task, queue, task id, args, argsrepr).

    Creates of one provider go ``MESSAGE_JOBS`` at most to a ``vmq.create_many`` message (its own
    task id; Flower still shows a row per job, workers/jobevents.py ``received``), in as many
    messages as keep ``MESSAGE_SPREAD`` of them; a job alone in its message, or not a create, gets
    the job's own message (task id = job id).
    """
    out: list[tuple[str, str, str, list, str]] = []
    creates: dict[str, list[Job]] = {}
    for job in jobs:
        if job.kind == JobKind.create:
            creates.setdefault(job.provider, []).append(job)
        else:
            out.append(_own_message(job))
    for provider, group in creates.items():
        size = max(1, min(MESSAGE_JOBS, len(group) // MESSAGE_SPREAD))
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            if len(chunk) == 1:
                out.append(_own_message(chunk[0]))
                continue
            names = ", ".join(job.spec.name if job.spec else job.id for job in chunk)
            argsrepr = f"(create {provider} {len(chunk)} jobs: {names})"
            ids = [job.id for job in chunk]
            out.append((keys.TASK_CREATE_MANY, keys.queue_name(provider), uuid.uuid4().hex, [ids], argsrepr))
    return out


def _own_message(job: Job) -> tuple[str, str, str, list, str]:
    task, queue, argsrepr = task_message(job)
    return task, queue, job.id, [job.id], argsrepr  # task id = job id, as every message of a job


def _publish_all(store: JobStore, celery: Celery, jobs: list[Job]) -> None:
    try:
        with celery.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)  # kombu >= 5.7; older ones publish one by one
            with batch(max_size=PUBLISH_BATCH) if batch else nullcontext():
                for task, queue, task_id, args, argsrepr in messages(jobs):
                    celery.send_task(
                        task, args=args, queue=queue, task_id=task_id, argsrepr=argsrepr, kwargsrepr="{}",
                        producer=producer,
                    )  # fmt: skip
    except Exception as exc:
        # Not enqueued (a batch is discarded whole on error): the records say so, keys are freed.
        error = JobError(code="enqueue_failed", message=f"{type(exc).__name__}: {exc}", retryable=True)
        for job in jobs:
            store.transition(job.id, JobState.failed, f"failed: {error.message}", error=error)
            if job.idempotency_key:
                store.release_idempotency_key(job.idempotency_key, job.id)
        raise
