"""The job store for asyncio (``redis.asyncio``): what a producer needs, written the same way.

Records, scripts, events, index entries and idempotency keys are written with ``JobStore``'s own
helpers (``add_arguments``, ``transition_change``, the compare-and-set script and ``JobStore._changed``),
so a record the async client writes is the record the sync client writes, byte for byte in layout,
and the job index (vmqueue/jobindex.py) follows it the same way.
"""

from __future__ import annotations

import redis.asyncio

from vmqueue import jobindex, keys
from vmqueue.jobstore import (
    _ADD,
    _CAS,
    _RELEASE,
    TRANSITION_HOOKS,
    JobStore,
    _log_unreplicated,
    add_arguments,
    cas_arguments,
    queue_create_ended,
    transition_change,
)
from vmqueue.models import Job, JobState, utcnow
from vmqueue.settings import Settings


class AsyncJobStore:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self.ttl_s = settings.job_ttl_s
        self.idempotency_ttl_s = settings.idempotency_ttl_s
        self._cas = client.register_script(_CAS)
        self._add = client.register_script(_ADD)
        self._release = client.register_script(_RELEASE)

    async def add(self, job: Job, startup_script: str | None = None) -> Job:
        add_keys, args = add_arguments(job, startup_script, self.settings)
        await self._add(keys=add_keys, args=args)
        return job

    async def replicated(self, job_id: str) -> None:
        """``JobStore.replicated`` for asyncio."""
        if self.settings.redis_wait_replicas:  # see jobstore.wait_replicated
            async with self.redis.client() as conn:
                await conn.set(keys.REPLICATION_PROBE_KEY, job_id, px=60_000)
                acked = await conn.execute_command(
                    "WAIT", self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms
                )
            _log_unreplicated(job_id, acked, self.settings)

    async def add_claiming(
        self, job: Job, startup_script: str | None = None, idempotency_key: str | None = None
    ) -> str | None:
        """``JobStore.add_claiming``: record and idempotency key in the one add script."""
        if idempotency_key is None:
            await self.add(job, startup_script)
            return None
        add_keys, args = add_arguments(job, startup_script, self.settings, idempotency_key)
        bound = await self._add(keys=add_keys, args=args)
        return None if bound == 1 else bound

    async def mark_enqueued(self, job: Job) -> Job:
        """``JobStore.mark_enqueued``."""
        now = utcnow()
        await self.update(job.id, lambda j: setattr(j, "enqueued_at", now))
        return job.model_copy(update={"enqueued_at": now})

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.get(keys.job_key(job_id))
        return None if raw is None else Job.model_validate_json(raw)

    async def claim_idempotency_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; returns the job id it was already bound to, if any."""
        if await self.redis.set(keys.idempotency_key(key), job_id, nx=True, ex=self.idempotency_ttl_s):
            return None
        return await self.redis.get(keys.idempotency_key(key))

    async def release_idempotency_key(self, key: str, job_id: str) -> bool:
        """``JobStore.release_idempotency_key``: compare-and-delete in one round trip."""
        return bool(await self._release(keys=[keys.idempotency_key(key)], args=[job_id]))

    async def update(self, job_id: str, change) -> Job:
        """``JobStore.update``: compare-and-set against a fresh read, retried on a race."""
        key = keys.job_key(job_id)
        while True:
            raw = await self.redis.get(key)
            if raw is None:
                raise KeyError(job_id)
            job, new_raw, event, ops = JobStore._changed(job_id, raw, change)
            script_keys, args = cas_arguments(job_id, raw, new_raw, event, self.settings, ops)
            if await self._cas(keys=script_keys, args=args):
                return job

    async def transition(self, job_id: str, to: JobState, message: str = "", **fields: object) -> Job:
        job = await self.update(job_id, transition_change(to, message, fields))
        for hook in TRANSITION_HOOKS:
            hook(job)
        return job

    async def create_ended(self, job_id: str, vm_lives: bool) -> None:
        """``JobStore.create_ended``."""
        pipe = self.redis.pipeline(transaction=False)
        queue_create_ended(pipe, job_id, vm_lives, self.ttl_s)
        await pipe.execute()

    async def list(self, query: jobindex.JobQuery, limit: int = 50, cursor: str | None = None) -> jobindex.JobPage:
        """``JobStore.list``: the same query steps, awaited."""
        return await jobindex.aquery(self.redis, query, limit, cursor)
