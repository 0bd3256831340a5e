"""``Provisioner``: the producer API a web backend or a script calls. Imports no cloud SDK.

Every call validates its input completely, records the job, enqueues one message holding only the
job id on the provider's own queue, and returns the ``Job`` at once; ``wait`` follows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from celery import Celery

from producer import control, diagnose
from producer.bulk import build_all, enqueue_all
from producer.submit import (
    IdempotencyConflict,
    JobNotFound,
    JobTimeout,
    build_create,
    build_destroy,
    build_get,
    found,
    list_query,
    os_user,
    request_hash,
    run,
    submit,
    task_message,
)
from vmqueue import keys
from vmqueue.celery_config import make_celery
from vmqueue.connection import check_redis, connect
from vmqueue.events import Cursor, Event, follow, latest_id
from vmqueue.jobindex import JobPage, JobQuery
from vmqueue.jobstore import JobStore
from vmqueue.models import Job, VMSpec
from vmqueue.readiness import ReadyVia, ReadyWhen
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import SSHPublicKey

__all__ = ["IdempotencyConflict", "JobNotFound", "JobTimeout", "Provisioner", "request_hash"]


class Provisioner:
    """The blocking client; ``producer.aclient.AsyncProvisioner`` is the same API for asyncio."""

    def __init__(self, settings: Settings | None = None, celery_app: Celery | None = None):
        self.settings = settings or get_settings()
        self.celery = celery_app or make_celery(self.settings, main="vmqueue.producer")
        self.store = JobStore(connect(self.settings), self.settings)
        self._redis_checked_at = float("-inf")

    def create_vm(
        self,
        spec: VMSpec | dict[str, Any],
        ssh_key: str | SSHPublicKey,
        startup_script: str | None = None,
        *,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
        destroy_on_failure: bool | None = None,
        ttl_s: float | None = None,
        expires_at: datetime | None = None,
        callback_url: str | None = None,
        ready_when: ReadyWhen | str = ReadyWhen.running,
        ready_deadline_s: float | None = None,
        ready_via: ReadyVia | str = ReadyVia.public,
        ssh_port: int | None = None,
    ) -> Job:
        """Validate and enqueue a create; raises pydantic's ``ValidationError`` naming the bad field.

        ``ttl_s`` (seconds from now) or ``expires_at`` (aware datetime): the VM is destroyed by an
        ordinary destroy job once that time passes (``extend`` moves it); ValueError if both, or past.
        ``ready_when`` (running, ssh, cloud_init) and the other ``ready_*`` options: see
        ``producer.submit.build_create``.
        """
        job, script = build_create(
            self.settings,
            spec,
            ssh_key,
            startup_script,
            idempotency_key=idempotency_key,
            deadline_s=deadline_s,
            destroy_on_failure=destroy_on_failure,
            ttl_s=ttl_s,
            expires_at=expires_at,
            callback_url=callback_url,
            ready_when=ready_when,
            ready_deadline_s=ready_deadline_s,
            ready_via=ready_via,
            ssh_port=ssh_port,
        )
        return self._submit(job, script)

    def create_vms(self, creates: Iterable[Mapping[str, Any]]) -> list[Job]:
        """Validate and enqueue many creates; each a mapping of ``create_vm``'s arguments (``spec``,
        ``ssh_key``, ``startup_script``, ``idempotency_key``, ...). Returns the jobs in order.

        Every create is validated before anything is stored (the first bad one raises as ``create_vm``
        would, with a note naming its index); the jobs are stored in one Redis MULTI/EXEC and their
        messages published in one batch (producer/bulk.py), far fewer round trips than ``create_vm``
        each. Idempotency keys behave as in ``create_vm``.
        """
        built = build_all(self.settings, creates)
        return enqueue_all(self.store, self.celery, self.settings, built, self._publish)

    def destroy_vm(
        self, provider: str, instance_id: str, *, idempotency_key: str | None = None, callback_url: str | None = None
    ) -> Job:
        job = build_destroy(
            self.settings, provider, instance_id, idempotency_key=idempotency_key, callback_url=callback_url
        )
        return self._submit(job)

    def get_vm(self, provider: str, instance_id: str, *, callback_url: str | None = None) -> Job:
        return self._submit(build_get(self.settings, provider, instance_id, callback_url=callback_url))

    def get_job(self, job_id: str) -> Job:
        """The job with this id, or this unique id prefix (the CLI's table shows 8 characters).

        Raises ``JobNotFound`` (``diagnose.AmbiguousJobId`` when several jobs start with the prefix).
        """
        job = self.store.get(job_id)
        if job is None and diagnose.is_prefix(job_id):
            job = self.store.get(self.resolve_job_id(job_id))
        return found(job, job_id, self.settings)

    def resolve_job_id(self, prefix: str) -> str:
        """The one job id starting with ``prefix``; a key scan, for people typing ids (not hot paths)."""
        if not diagnose.is_prefix(prefix):
            return prefix
        return diagnose.pick(prefix, self.store.redis.scan_iter(match=diagnose.prefix_match(prefix), count=1000))

    def ensure_redis(self) -> None:
        """``RedisUnavailable`` (one line naming the URL) within seconds when Redis does not answer;
        asked at most once per ``diagnose.REDIS_CHECK_EVERY_S``, so a caller may ask before every request."""
        now = time.monotonic()
        if now - self._redis_checked_at >= diagnose.REDIS_CHECK_EVERY_S:
            check_redis(self.settings)
            self._redis_checked_at = now

    def notice(self, job: Job) -> str | None:
        """What a person following ``job`` should know that its state does not say, or ``None``: today,
        that it has been queued for a while and no live worker serves its queue (workers/presence.py)."""
        if diagnose.needs_worker_check(job) and not self.store.redis.exists(keys.served_key(job.provider)):
            return diagnose.no_worker_notice(job)
        return None

    def cancel(self, job_id: str, *, by: str | None = None, reason: str = "") -> Job:
        """Take a job back (producer/control.py): ``cancelled`` at once if it was queued, else once its
        worker acted (``wait`` follows it). Idempotent: a second cancel returns the job as it is.

        ``by`` goes into the job's history (default: this process's OS user). Raises ``JobNotFound``,
        or ``control.CancelRefused`` for a finished job or a destroy whose delete was sent.
        """
        try:
            return run(control.cancel(job_id, by or os_user(), reason), self.store, self._publish)
        except KeyError:
            raise found(None, job_id, self.settings) from None

    def extend(
        self, job_id: str, *, ttl_s: float | None = None, expires_at: datetime | None = None, by: str | None = None
    ) -> Job:
        """Move the expiry of a create's VM to ``ttl_s`` seconds from now or to ``expires_at``.

        Raises ValueError for a bad time, ``JobNotFound``, or ``control.ExtendRefused`` when the VM
        already expired, is gone, or the job is no create.
        """
        expires = control.required_expiry(ttl_s, expires_at)
        try:
            return run(control.extend(job_id, expires, by or os_user()), self.store, self._publish)
        except KeyError:
            raise found(None, job_id, self.settings) from None

    def list_jobs(
        self, query: JobQuery | dict[str, Any] | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """The newest jobs matching ``query`` (``JobQuery``: kind, provider, state, name, labels, fleet,
        vms, since, until), at most ``limit`` (1..1000); ``JobPage.next_cursor`` asks for the next,
        older page. Served by the job index, no key scans. ValidationError/ValueError on a bad filter."""
        return self.store.list(list_query(query), limit, cursor)

    def list_vms(
        self, query: JobQuery | dict[str, Any] | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """The VMs vmqueue manages (create jobs whose VM lives, ``Job.vm_lives``), newest first."""
        return self.store.list(list_query(query, vms=True), limit, cursor)

    def wait(
        self,
        job_id: str,
        timeout_s: float = 900.0,
        poll_s: float = 0.5,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Block until the job is finished (cleanup of a failed create included); ``JobTimeout`` after."""
        deadline = time.monotonic() + timeout_s
        job_id = self.get_job(job_id).id  # a prefix is resolved once
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
        # The job's id is its task's id: Flower keeps one row per job (workers/jobevents.py).
        self.celery.send_task(task, args=[job.id], queue=queue, task_id=job.id, argsrepr=argsrepr, kwargsrepr="{}")
