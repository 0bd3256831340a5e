"""The job store: one JSON record per job in Redis, changed only by compare-and-set.

The startup script lives beside the record under its own key, so it is never part of a task
message, a log line or anything ``Job`` serializes; it is deleted once the create is over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis

from vmqueue import jobindex, keys
from vmqueue.events import change_of, describe, queue_event
from vmqueue.models import Job, JobKind, JobState, transition_allowed, utcnow
from vmqueue.settings import Settings

# Compare-and-set in one round trip: writes only if the record is still what this process last saw,
# and with it the change's event (ARGV[3], if any) to both event streams (vmqueue/events.py) and the
# change's job index writes (KEYS[4..], ARGV[7..]: vmqueue/jobindex.py).
_CAS = (
    jobindex.LUA_APPLY
    + """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL')
if ARGV[3] ~= '' then
  redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
  redis.call('xadd', KEYS[3], 'MAXLEN', ARGV[5], '*', 'data', ARGV[3])
  redis.call('expire', KEYS[3], ARGV[6])
end
index(4, ARGV[7], 8)
return 1
"""
)
# A new job in one command: its record (ARGV[1], TTL ARGV[2]), its startup script (KEYS[4], ARGV[6],
# when ARGV[7] is '1'), its readiness token digest (KEYS[5], ARGV[9], if any), its first event to both
# streams, and its index entries (KEYS[6..], ARGV[10..]).
# One script, not a pipeline of a dozen commands: each reply costs the client more than Redis's work
# (bench/enqueue.py), and it is all or nothing like MULTI/EXEC, without its round trips.
_ADD = (
    jobindex.LUA_APPLY
    + """
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[7] == '1' then redis.call('set', KEYS[4], ARGV[6], 'EX', ARGV[2]) end
redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
redis.call('xadd', KEYS[3], 'MAXLEN', ARGV[5], '*', 'data', ARGV[3])
redis.call('expire', KEYS[3], ARGV[2])
if ARGV[9] ~= '' then redis.call('set', KEYS[5], ARGV[9], 'EX', ARGV[2]) end
index(6, ARGV[8], 10)
return 1
"""
)
# How many records a process remembers (as last read or written) for one-round-trip updates.
RAW_CACHE_SIZE = 20_000

# Deletes the key only if it still holds our value: a lease that ran out, or an idempotency key
# released and claimed again since, may be someone else's now.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

log = logging.getLogger("vmqueue.jobstore")

# Called with the job after every state change this process made; the workers count finished jobs
# for their Prometheus metrics here (workers/metrics.py), the one place every final state passes.
TRANSITION_HOOKS: list[Callable[[Job], None]] = []


def add_arguments(job: Job, startup_script: str | None, settings: Settings) -> tuple[list, list]:
    """KEYS and ARGV of ``_ADD`` for a new job, so ``JobStore`` and ``AsyncJobStore`` store one alike."""
    ops = jobindex.changes(jobindex.snapshot(None), job)
    script_keys = [
        keys.job_key(job.id),
        keys.EVENTS_KEY,
        keys.events_key(job.id),
        keys.script_key(job.id),
        keys.ready_token_key(job.id),
    ]
    args = [
        job.model_dump_json(),
        settings.job_ttl_s,
        describe(job, None).model_dump_json(),
        settings.events_maxlen,
        settings.job_events_maxlen,
        startup_script or "",
        "1" if startup_script is not None else "0",
        job.id,
        # ready_when=cloud_init: what the phone-home route checks (vmqueue/readiness.py)
        job._ready_token_digest or "",
    ]
    return [*script_keys, *(k for k, _, _ in ops)], [*args, *(x for _, op, arg in ops for x in (op, arg))]


def cas_arguments(
    job_id: str, seen: str, new_raw: str, event: str, settings: Settings, ops: list[jobindex.Op] | None = None
) -> tuple[list, list]:
    """KEYS and ARGV of the compare-and-set script."""
    ops = ops or []
    script_keys = [keys.job_key(job_id), keys.EVENTS_KEY, keys.events_key(job_id), *(k for k, _, _ in ops)]
    limits = [settings.events_maxlen, settings.job_events_maxlen, settings.job_ttl_s]
    return script_keys, [seen, new_raw, event, *limits, job_id, *(x for _, op, arg in ops for x in (op, arg))]


def queue_create_ended(pipe: Any, job_id: str, vm_lives: bool, ttl_s: int) -> None:
    """Queue on ``pipe`` (blocking or asyncio) what ``create_ended`` writes."""
    pipe.delete(keys.script_key(job_id))
    if vm_lives:
        pipe.persist(keys.job_key(job_id))
    else:
        pipe.expire(keys.job_key(job_id), ttl_s)


def transition_change(to: JobState, message: str, fields: dict[str, object]) -> Callable[[Job], None]:
    """The change ``transition`` applies: the state, the fields, a line in the history."""

    def change(job: Job) -> None:
        before = job.state
        job.state = to
        for name, value in fields.items():
            setattr(job, name, value)
        job.record(message or f"{before} -> {to}")

    return change


def wait_replicated(client: redis.Redis, job_id: str, settings: Settings) -> None:
    """Block until ``settings.redis_wait_replicas`` replicas have every write the master has taken so
    far (Redis WAIT, at most ``redis_wait_timeout_ms``); fewer acknowledgements are logged, not raised.

    WAIT covers the writes of the connection it is sent on, so one tiny write goes first on the same
    connection: replication is one ordered stream, so its acknowledgement covers the job's record,
    written just before on another pooled connection.
    """
    with client.client() as conn:  # one connection for both commands
        conn.set(keys.REPLICATION_PROBE_KEY, job_id, px=60_000)
        acked = conn.execute_command("WAIT", settings.redis_wait_replicas, settings.redis_wait_timeout_ms)
    _log_unreplicated(job_id, acked, settings)


def _log_unreplicated(job_id: str, acked: int, settings: Settings) -> None:
    if acked < settings.redis_wait_replicas:
        log.warning(
            "job=%s recorded on the master, but only %s of %s replicas acknowledged it within %s ms",
            job_id, acked, settings.redis_wait_replicas, settings.redis_wait_timeout_ms,
        )  # fmt: skip


class InvalidTransition(RuntimeError):
    """A state change the transition table forbids: another delivery got there first."""


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self.ttl_s = settings.job_ttl_s
        self.idempotency_ttl_s = settings.idempotency_ttl_s
        self._release = client.register_script(_RELEASE)
        self._cas = client.register_script(_CAS)
        self._add = client.register_script(_ADD)
        self._raw: OrderedDict[str, str] = OrderedDict()
        self._raw_lock = threading.Lock()

    # -- records ---------------------------------------------------------------------------
    def add(self, job: Job, startup_script: str | None = None) -> Job:
        """Write a new job's record, first event and index entries (and its script beside it: both or neither).

        The producer calls ``replicated`` once the job's message is published too.
        """
        add_keys, args = add_arguments(job, startup_script, self.settings)
        self._add(keys=add_keys, args=args)
        return job

    def replicated(self, job_id: str) -> None:
        """With ``VMQ_REDIS_WAIT_REPLICAS`` = n > 0: block until n replicas have every write so far
        (the job's record and its message), see ``wait_replicated``; else nothing."""
        if self.settings.redis_wait_replicas:
            wait_replicated(self.redis, job_id, self.settings)

    def claim_idempotency_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; returns the job id it was already bound to, if any."""
        if self.redis.set(keys.idempotency_key(key), job_id, nx=True, ex=self.idempotency_ttl_s):
            return None
        return self.redis.get(keys.idempotency_key(key))

    def release_idempotency_key(self, key: str, job_id: str) -> bool:
        """Unbind ``key`` if it is still bound to ``job_id``; compare-and-delete in one round trip,
        so a release never deletes the binding another caller made since (True: it was released)."""
        return bool(self._release(keys=[keys.idempotency_key(key)], args=[job_id]))

    def get(self, job_id: str) -> Job | None:
        return self._parse(job_id, self.redis.get(keys.job_key(job_id)))

    def acquire_and_get(self, job_id: str, lease_s: float) -> tuple[str | None, Job | None, float | None]:
        """In one round trip: the job's lease, its record, and when its next step is due (epoch s).

        The record and due time are None when the lease is not ours.
        """
        token = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.lock_key(job_id), token, nx=True, px=int(lease_s * 1000))
        pipe.get(keys.job_key(job_id))
        pipe.get(keys.due_key(job_id))
        acquired, raw, due = pipe.execute()
        if not acquired:
            return None, None, None
        return token, self._parse(job_id, raw), float(due) if due else None

    def script(self, job_id: str) -> str | None:
        return self.redis.get(keys.script_key(job_id))

    def create_ended(self, job_id: str, vm_lives: bool) -> None:
        """A create is over: its startup script goes; if its VM lives on, its record never expires,
        since it is what tells the sweeper that VM is owned; else it expires after the job TTL (a
        running create that was cancelled gets its TTL back). One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        queue_create_ended(pipe, job_id, vm_lives, self.ttl_s)
        pipe.execute()

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply ``change`` to the current record atomically, retried on a race.

        First as one compare-and-set against the record as this process last saw it; if another
        process changed it since, with WATCH/MULTI on a fresh read. Raises ``InvalidTransition``
        when the change moves the state along an edge the table forbids, and ``KeyError`` when
        the job does not exist.
        """
        key = keys.job_key(job_id)
        with self._raw_lock:
            seen = self._raw.get(job_id)
        if seen is not None:
            job, new_raw, event, ops = self._changed(job_id, seen, change)
            script_keys, args = cas_arguments(job_id, seen, new_raw, event, self.settings, ops)
            if self._cas(keys=script_keys, args=args):
                self._remember(job_id, new_raw)
                return job
        written: list[str] = []

        def attempt(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(job_id)
            job, new_raw, event, ops = self._changed(job_id, raw, change)
            pipe.multi()
            pipe.set(key, new_raw, keepttl=True)
            if event:
                queue_event(pipe, job_id, event, self.settings)
            jobindex.apply(pipe, job_id, ops)
            written.append(new_raw)
            return job

        job = self.redis.transaction(attempt, key, value_from_callable=True)
        self._remember(job_id, written[-1])
        return job

    @staticmethod
    def _changed(job_id: str, raw: str, change: Callable[[Job], None]) -> tuple[Job, str, str, list[jobindex.Op]]:
        """The changed job, its record, its event as JSON ("" when neither state, cleanup nor a cancel
        request changed) and the job index writes that go with it."""
        job = Job.model_validate_json(raw)
        before, cleanup_before, cancel_before, indexed = job.state, job.cleanup, job.cancel, jobindex.snapshot(job)
        awaiting = job.awaiting_ready
        change(job)
        if job.state != before and not transition_allowed(before, job.state, awaiting):
            raise InvalidTransition(f"job {job_id}: {before} -> {job.state} is not allowed")
        job.updated_at = utcnow()
        event = change_of(job, before, cleanup_before, cancel_asked=cancel_before is None and job.cancel is not None)
        return job, job.model_dump_json(), event.model_dump_json() if event else "", jobindex.changes(indexed, job)

    def _parse(self, job_id: str, raw: str | None) -> Job | None:
        if raw is None:
            return None
        self._remember(job_id, raw)
        return Job.model_validate_json(raw)

    def _remember(self, job_id: str, raw: str) -> None:
        with self._raw_lock:
            self._raw[job_id] = raw
            self._raw.move_to_end(job_id)
            if len(self._raw) > RAW_CACHE_SIZE:
                self._raw.popitem(last=False)

    # -- per-job lease: two deliveries of one job never act at once ------------------------
    def acquire(self, job_id: str, lease_s: float) -> str | None:
        token = uuid.uuid4().hex
        if self.redis.set(keys.lock_key(job_id), token, nx=True, px=int(lease_s * 1000)):
            return token
        return None

    def release(self, job_id: str, token: str, next_due_in_s: float | None = None) -> None:
        """Give the lease back; with ``next_due_in_s``, note when the job's next step is due."""
        if next_due_in_s is None:
            self._release(keys=[keys.lock_key(job_id)], args=[token])
            return
        pipe = self.redis.pipeline(transaction=False)
        due = time.time() + next_due_in_s
        pipe.set(keys.due_key(job_id), f"{due:.3f}", px=int((next_due_in_s + 3600) * 1000))
        # EVALSHA straight away: a Script object in a pipeline first asks SCRIPT EXISTS (a round trip).
        pipe.evalsha(self._release.sha, 1, keys.lock_key(job_id), token)
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:  # a restarted Redis forgot the script
            self._release(keys=[keys.lock_key(job_id)], args=[token])

    def transition(self, job_id: str, to: JobState, message: str = "", **fields: object) -> Job:
        """Move to ``to`` (compare-and-set against the table), set ``fields``, note it in the history."""
        job = self.update(job_id, transition_change(to, message, fields))
        self.notify(job)
        if job.kind == JobKind.destroy and to == JobState.gone:
            self._vm_gone(job)
        return job

    @staticmethod
    def notify(job: Job) -> None:
        """Run the transition hooks for a state change written with ``update`` (``transition`` does it itself)."""
        for hook in TRANSITION_HOOKS:  # after the compare-and-set: each hook sees each change once
            hook(job)

    def _vm_gone(self, destroy: Job) -> None:
        """A destroy job found its VM gone: the create job that made the VM says so (and leaves ``vms``)."""
        owner = self.redis.hget(jobindex.INSTANCES, jobindex.instance_field(destroy.provider, destroy.instance_id))
        if owner is None:
            return

        def note(job: Job) -> None:
            if job.instance_id == destroy.instance_id and job.vm_destroyed_by is None:
                job.vm_destroyed_by = destroy.id
                job.record(f"VM destroyed by destroy job {destroy.id}")

        try:
            self.update(owner, note)
        except KeyError:  # the create job's record expired meanwhile
            jobindex.forget(self.redis, [owner])

    # -- listing ---------------------------------------------------------------------------
    def list(self, query: jobindex.JobQuery, limit: int = 50, cursor: str | None = None) -> jobindex.JobPage:
        """The newest jobs matching ``query`` (see ``jobindex.query``)."""
        return jobindex.query(self.redis, query, limit, cursor)
