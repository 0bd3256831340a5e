"""``AsyncProvisioner``: the ``Provisioner`` API for asyncio backends (FastAPI, aiohttp, Django async).

Non-blocking end to end: the job store on ``redis.asyncio`` and the task message published with an
awaited LPUSH (``producer.apublish``), so no call holds a thread. Validation, job building and the
submission steps are ``producer.submit``'s, shared with the sync client::

    async with AsyncProvisioner() as vmq:
        job = await vmq.create_vm(spec, ssh_key, script, idempotency_key="order-7")
        job = await vmq.wait(job.id, timeout_s=600)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from celery import Celery

from producer import control, diagnose
from producer.apublish import AsyncPublisher
from producer.submit import (
    JobTimeout,
    arun,
    build_create,
    build_destroy,
    build_get,
    found,
    list_query,
    os_user,
    submit,
    task_message,
)
from vmqueue import keys
from vmqueue.ajobstore import AsyncJobStore
from vmqueue.celery_config import make_celery
from vmqueue.connection import check_redis_async, connect_async
from vmqueue.events import Cursor, Event, afollow, alatest_id
from vmqueue.jobindex import JobPage, JobQuery
from vmqueue.models import Job, VMSpec
from vmqueue.readiness import ReadyVia, ReadyWhen
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import SSHPublicKey


class AsyncProvisioner:
    """Same operations, arguments, validation and errors as ``Provisioner``; every method is a coroutine.

    Errors: pydantic's ``ValidationError`` (bad input, nothing enqueued), ``IdempotencyConflict``,
    ``JobNotFound``, ``JobTimeout``; ``redis.ConnectionError``/``TimeoutError`` once the reconnect
    budget (about a minute) is spent. Use one instance per event loop; ``aclose`` (or ``async with``)
    closes its connections.
    """

    def __init__(self, settings: Settings | None = None, celery_app: Celery | None = None):
        self.settings = settings or get_settings()
        self.celery = celery_app or make_celery(self.settings, main="vmqueue.producer")
        self.redis = connect_async(self.settings)
        self.store = AsyncJobStore(self.redis, self.settings)
        self.publisher = AsyncPublisher(self.celery, self.redis)
        self._redis_checked_at = float("-inf")

    async def __aenter__(self) -> AsyncProvisioner:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def create_vm(
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

        ``ready_when`` (running, ssh, cloud_init) and the other ``ready_*`` options: see
        ``producer.submit.build_create``."""
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
        return await self._submit(job, script)

    async def destroy_vm(
        self, provider: str, instance_id: str, *, idempotency_key: str | None = None, callback_url: str | None = None
    ) -> Job:
        job = build_destroy(
            self.settings, provider, instance_id, idempotency_key=idempotency_key, callback_url=callback_url
        )
        return await self._submit(job)

    async def get_vm(self, provider: str, instance_id: str, *, callback_url: str | None = None) -> Job:
        return await self._submit(build_get(self.settings, provider, instance_id, callback_url=callback_url))

    async def get_job(self, job_id: str) -> Job:
        """``Provisioner.get_job``: by id or unique id prefix."""
        job = await self.store.get(job_id)
        if job is None and diagnose.is_prefix(job_id):
            job = await self.store.get(await self.resolve_job_id(job_id))
        return found(job, job_id, self.settings)

    async def resolve_job_id(self, prefix: str) -> str:
        """``Provisioner.resolve_job_id``."""
        if not diagnose.is_prefix(prefix):
            return prefix
        matches = [k async for k in self.redis.scan_iter(match=diagnose.prefix_match(prefix), count=1000)]
        return diagnose.pick(prefix, matches)

    async def ensure_redis(self) -> None:
        """``Provisioner.ensure_redis``, awaited (never blocks the event loop)."""
        now = time.monotonic()
        if now - self._redis_checked_at >= diagnose.REDIS_CHECK_EVERY_S:
            await check_redis_async(self.settings)
            self._redis_checked_at = now

    async def notice(self, job: Job) -> str | None:
        """``Provisioner.notice``."""
        if diagnose.needs_worker_check(job) and not await self.redis.exists(keys.served_key(job.provider)):
            return diagnose.no_worker_notice(job)
        return None

    async def cancel(self, job_id: str, *, by: str | None = None, reason: str = "") -> Job:
        """``Provisioner.cancel``."""
        try:
            return await arun(control.cancel(job_id, by or os_user(), reason), self.store, self._publish)
        except KeyError:
            raise found(None, job_id, self.settings) from None

    async def extend(
        self, job_id: str, *, ttl_s: float | None = None, expires_at: datetime | None = None, by: str | None = None
    ) -> Job:
        """``Provisioner.extend``."""
        expires = control.required_expiry(ttl_s, expires_at)
        try:
            return await arun(control.extend(job_id, expires, by or os_user()), self.store, self._publish)
        except KeyError:
            raise found(None, job_id, self.settings) from None

    async def list_jobs(
        self, query: JobQuery | dict[str, Any] | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """``Provisioner.list_jobs``."""
        return await self.store.list(list_query(query), limit, cursor)

    async def list_vms(
        self, query: JobQuery | dict[str, Any] | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """``Provisioner.list_vms``."""
        return await self.store.list(list_query(query, vms=True), limit, cursor)

    async def wait(
        self,
        job_id: str,
        timeout_s: float = 900.0,
        poll_s: float = 5.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Until the job is finished (cleanup of a failed create included); ``JobTimeout`` after.

        Woken by the job's events (``events``), not by polling; ``poll_s`` is how long one read of
        the event stream waits before the record is looked at anyway.
        """
        job = await self.get_job(job_id)
        job_id = job.id  # a prefix is resolved once
        try:
            async with asyncio.timeout(timeout_s):
                if on_update:
                    on_update(job)
                cursor = Cursor([job_id])
                async for _ in afollow(self.redis, cursor, self.store.get, block_ms=int(poll_s * 1000)):
                    job = await self.get_job(job_id)
                    if on_update:
                        on_update(job)
                    if job.finished:
                        return job
                return await self.get_job(job_id)  # ended without its final event (expired)
        except TimeoutError:
            raise JobTimeout(job, timeout_s) from None

    async def events(self, job_ids: list[str] | None = None, after: str | None = None) -> AsyncIterator[Event]:
        """(event id, ``JobChange``) of the given jobs as they change, each until it is finished, from
        the first event the streams hold or after the id ``after``; without ``job_ids`` every job's,
        from now on, for ever. ``ValueError`` for an ``after`` that is not a stream id."""
        if after is None:
            after = "0" if job_ids else await alatest_id(self.redis)
        async for event in afollow(self.redis, Cursor(job_ids, after), self.store.get):
            yield event

    async def _submit(self, job: Job, startup_script: str | None = None) -> Job:
        return await arun(submit(job, startup_script), self.store, self._publish)

    async def _publish(self, job: Job) -> None:
        task, queue, argsrepr = task_message(job)
        await self.publisher.send_task(task, [job.id], queue, argsrepr, task_id=job.id)
