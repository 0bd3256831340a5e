"""The job store: one JSON record per job in Redis, changed only by compare-and-set.

The startup script lives beside the record under its own key, so it is never part of a task
message, a log line or anything ``Job`` serializes; it is deleted once the create is over.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer import keys
from producer.celery_config import redis_ssl_options
from producer.models import TRANSITIONS, Job, JobState, utcnow
from producer.settings import Settings

# Deletes the lock only if it still holds our token (a lease that ran out may be someone else's now).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


# Called with the job after every state change this process made; the workers count finished jobs
# for their Prometheus metrics here (workers/metrics.py), the one place every final state passes.
TRANSITION_HOOKS: list[Callable[[Job], None]] = []


class InvalidTransition(RuntimeError):
    """A state change the transition table forbids: another delivery got there first."""


def connect(settings: Settings) -> redis.Redis:
    """A client that rides out a Redis restart: reconnects with backoff instead of failing at once."""
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **(redis_ssl_options(settings) or {}),
    )


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.ttl_s = settings.job_ttl_s
        self.idempotency_ttl_s = settings.idempotency_ttl_s
        self._release = client.register_script(_RELEASE)

    # -- records ---------------------------------------------------------------------------
    def add(self, job: Job, startup_script: str | None = None) -> Job:
        pipe = self.redis.pipeline()
        pipe.set(keys.job_key(job.id), job.model_dump_json(), ex=self.ttl_s)
        if startup_script is not None:
            pipe.set(keys.script_key(job.id), startup_script, ex=self.ttl_s)
        pipe.execute()
        return job

    def claim_idempotency_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; returns the job id it was already bound to, if any."""
        if self.redis.set(keys.idempotency_key(key), job_id, nx=True, ex=self.idempotency_ttl_s):
            return None
        return self.redis.get(keys.idempotency_key(key))

    def release_idempotency_key(self, key: str, job_id: str) -> None:
        if self.redis.get(keys.idempotency_key(key)) == job_id:
            self.redis.delete(keys.idempotency_key(key))

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.get(keys.job_key(job_id))
        return Job.model_validate_json(raw) if raw else None

    def script(self, job_id: str) -> str | None:
        return self.redis.get(keys.script_key(job_id))

    def drop_script(self, job_id: str) -> None:
        self.redis.delete(keys.script_key(job_id))

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply ``change`` to the current record atomically (WATCH/MULTI, retried on a race).

        Raises ``InvalidTransition`` when the change moves the state along an edge the table
        forbids, and ``KeyError`` when the job does not exist.
        """
        key = keys.job_key(job_id)

        def attempt(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(job_id)
            job = Job.model_validate_json(raw)
            before = job.state
            change(job)
            if job.state != before and job.state not in TRANSITIONS[before]:
                raise InvalidTransition(f"job {job_id}: {before} -> {job.state} is not allowed")
            job.updated_at = utcnow()
            pipe.multi()
            pipe.set(key, job.model_dump_json(), keepttl=True)
            return job

        return self.redis.transaction(attempt, key, value_from_callable=True)

    # -- per-job lease: two deliveries of one job never act at once ------------------------
    def acquire(self, job_id: str, lease_s: float) -> str | None:
        token = uuid.uuid4().hex
        if self.redis.set(keys.lock_key(job_id), token, nx=True, px=int(lease_s * 1000)):
            return token
        return None

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[keys.lock_key(job_id)], args=[token])

    def transition(self, job_id: str, to: JobState, message: str = "", **fields: object) -> Job:
        """Move to ``to`` (compare-and-set against the table), set ``fields``, note it in the history."""

        def change(job: Job) -> None:
            before = job.state
            job.state = to
            for name, value in fields.items():
                setattr(job, name, value)
            job.record(message or f"{before} -> {to}")

        job = self.update(job_id, change)
        for hook in TRANSITION_HOOKS:  # after the compare-and-set: each hook sees each change once
            hook(job)
        return job
