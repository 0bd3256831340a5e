"""``Provisioner``: the producer API a web backend or a script calls. Imports no cloud SDK.

Every call validates its input completely, records the job, enqueues one message holding only the
job id on the provider's own queue, and returns the ``Job`` at once; ``wait`` follows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery

from producer.submit import (
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    build_create,
    build_destroy,
    build_get,
    found,
    request_hash,
    run,
    submit,
    task_message,
)
from vmqueue.celery_config import make_celery
from vmqueue.connection import connect
from vmqueue.events import Cursor, Event, follow, latest_id
from vmqueue.jobstore import JobStore
from vmqueue.models import Job, VMSpec
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import SSHPublicKey

__all__ = ["IdempotencyConflict", "JobNotFound", "JobTimeout", "Provisioner", "request_hash"]


class Provisioner:
    """The blocking client; ``producer.aclient.AsyncProvisioner`` is the same API for asyncio."""

    def __init__(self, settings: Settings | None = None, celery_app: Celery | None = None):
        self.settings = settings or get_settings()
        self.celery = celery_app or make_celery(self.settings, main="vmqueue.producer")
        self.store = JobStore(connect(self.settings), self.settings)

    def create_vm(
        self,
        spec: VMSpec | dict[str, Any],
        ssh_key: str | SSHPublicKey,
        startup_script: str | None = None,
        *,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
        destroy_on_failure: bool | None = None,
    ) -> Job:
        """Validate and enqueue a create; raises pydantic's ``ValidationError`` naming the bad field."""
        job, script = build_create(
            self.settings,
            spec,
            ssh_key,
            startup_script,
            idempotency_key=idempotency_key,
            deadline_s=deadline_s,
            destroy_on_failure=destroy_on_failure,
        )
        return self._submit(job, script)

    def destroy_vm(self, provider: str, instance_id: str, *, idempotency_key: str | None = None) -> Job:
        return self._submit(build_destroy(self.settings, provider, instance_id, idempotency_key=idempotency_key))

    def get_vm(self, provider: str, instance_id: str) -> Job:
        return self._submit(build_get(self.settings, provider, instance_id))

    def get_job(self, job_id: str) -> Job:
        return found(self.store.get(job_id), job_id, self.settings)

    def wait(
        self,
        job_id: str,
        timeout_s: float = 900.0,
        poll_s: float = 0.5,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Block until the job is finished (cleanup of a failed create included); ``JobTimeout`` after."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(job, timeout_s)
            time.sleep(poll_s)

    def events(self, job_ids: list[str] | None = None, after: str | None = None) -> Iterator[Event]:
        """(event id, ``JobChange``) of the given jobs as they change, each until it is finished, from
        the first event the streams hold or after the id ``after``; without ``job_ids`` every job's,
        from now on, for ever. ``ValueError`` for an ``after`` that is not a stream id."""
        if after is None:
            after = "0" if job_ids else latest_id(self.store.redis)
        return follow(self.store.redis, Cursor(job_ids, after), self.store.get)

    # -----------------------------------------------------------------------------------------
    def _submit(self, job: Job, startup_script: str | None = None) -> Job:
        return run(submit(job, startup_script), self.store, self._publish)

    def _publish(self, job: Job) -> None:
        task, queue, argsrepr = task_message(job)
        self.celery.send_task(task, args=[job.id], queue=queue, argsrepr=argsrepr, kwargsrepr="{}")
