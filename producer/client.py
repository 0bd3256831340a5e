"""``Provisioner``: the producer API a web backend or a script calls. Imports no cloud SDK.

Every call validates its input completely, records the job, enqueues one message holding only the
job id on the provider's own queue, and returns the ``Job`` at once; ``wait`` follows it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from vmqueue import keys
from vmqueue.celery_config import make_celery
from vmqueue.connection import connect
from vmqueue.jobstore import JobStore
from vmqueue.models import CreateRequest, InstanceRef, Job, JobError, JobKind, JobState, VMSpec
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import SSHPublicKey

_TASKS = {JobKind.create: keys.TASK_CREATE, JobKind.destroy: keys.TASK_DESTROY, JobKind.get: keys.TASK_GET}


class JobNotFound(LookupError):
    pass


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a different request."""


class JobTimeout(TimeoutError):
    def __init__(self, job: Job, timeout_s: float):
        super().__init__(f"job {job.id} is still {job.state} after {timeout_s:.0f}s")
        self.job = job


class Provisioner:
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
        request = CreateRequest(spec=spec, ssh_key=ssh_key, startup_script=startup_script)
        job = Job(
            kind=JobKind.create,
            provider=request.spec.provider,
            spec=request.spec,
            ssh_key=request.ssh_key.openssh,
            has_startup_script=startup_script is not None,
            deadline_s=deadline_s if deadline_s is not None else self.settings.deadline_s,
            destroy_on_failure=self.settings.destroy_on_failure if destroy_on_failure is None else destroy_on_failure,
            idempotency_key=idempotency_key,
        )
        return self._submit(job, request.startup_script)

    def destroy_vm(self, provider: str, instance_id: str, *, idempotency_key: str | None = None) -> Job:
        ref = InstanceRef(provider=provider, instance_id=instance_id)
        job = Job(
            kind=JobKind.destroy,
            provider=ref.provider,
            instance_id=ref.instance_id,
            deadline_s=self.settings.deadline_s,
            idempotency_key=idempotency_key,
        )
        return self._submit(job)

    def get_vm(self, provider: str, instance_id: str) -> Job:
        ref = InstanceRef(provider=provider, instance_id=instance_id)
        return self._submit(Job(kind=JobKind.get, provider=ref.provider, instance_id=ref.instance_id))

    def get_job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or expired after {self.settings.job_ttl_s}s)")
        return job

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

    # -----------------------------------------------------------------------------------------
    def _submit(self, job: Job, startup_script: str | None = None) -> Job:
        if job.idempotency_key:
            job.request_hash = request_hash(job, startup_script)
            existing = self.store.claim_idempotency_key(job.idempotency_key, job.id)
            if existing:
                return self._existing(existing, job)
        self.store.add(job, startup_script)
        try:
            self.celery.send_task(
                _TASKS[job.kind],
                args=[job.id],
                queue=keys.queue_name(job.provider),
                # What Flower shows for the task: readable, and never a script or key.
                argsrepr=f"({job.kind} {job.provider} job={job.id})",
                kwargsrepr="{}",
            )
        except Exception as exc:
            # Not enqueued: the record says so instead of sitting in "queued" forever.
            error = JobError(code="enqueue_failed", message=f"{type(exc).__name__}: {exc}", retryable=True)
            self.store.transition(job.id, JobState.failed, f"failed: {error.message}", error=error)
            if job.idempotency_key:
                self.store.release_idempotency_key(job.idempotency_key, job.id)
            raise
        return job

    def _existing(self, job_id: str, request: Job) -> Job:
        job = self.get_job(job_id)
        # Compared by fingerprint: the stored spec changes once a worker fixes its parameters.
        if job.request_hash != request.request_hash:
            raise IdempotencyConflict(
                f"idempotency key {request.idempotency_key!r} was used for job {job_id} with another request"
            )
        return job


def request_hash(job: Job, startup_script: str | None) -> str:
    """What makes two requests "the same" for an idempotency key, computed before any worker acts."""
    fields = job.model_dump(mode="json", include={"kind", "provider", "spec", "instance_id", "ssh_key"})
    fields["startup_script"] = startup_script
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
