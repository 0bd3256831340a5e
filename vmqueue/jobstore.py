"""The job store: one JSON record per job in Redis, changed only by compare-and-set.

The startup script lives beside the record under its own key, so it is never part of a task
message, a log line or anything ``Job`` serializes; it is deleted once the create is over.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from vmqueue import jobindex, keys
from vmqueue.events import change_of, describe, queue_event
from vmqueue.models import Job, JobKind, JobState, transition_allowed, utcnow
from vmqueue.settings import Settings

# Compare-and-set in one round trip: writes only if the record is still what this process last saw,
# and with it the change's event (ARGV[3], if any) to both event streams (vmqueue/events.py) and the
# change's job index writes (KEYS[5..], ARGV[10..]: vmqueue/jobindex.py). A step's write is fenced
# by its lease: with KEYS[4] a lock key (else ""), it writes only while that lock holds the step's
# token ARGV[8], and returns -1 (nothing written) once another delivery took it. A lease that merely
# ran out (its worker stalled) with nobody acting since (the record is as the step last saw it) is
# taken back for ARGV[9] ms: no other delivery can have acted on a record nobody changed.
_CAS = (
    jobindex.LUA_APPLY
    + """
local current = redis.call('get', KEYS[1])
if KEYS[4] ~= '' then
  local holder = redis.call('get', KEYS[4])
  if holder ~= ARGV[8] then
    if holder or current ~= ARGV[1] then return -1 end
    redis.call('set', KEYS[4], ARGV[8], 'PX', ARGV[9])
  end
end
if current ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL')
if ARGV[3] ~= '' then
  redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
  redis.call('xadd', KEYS[3], 'MAXLEN', ARGV[5], '*', 'data', ARGV[3])
  redis.call('expire', KEYS[3], ARGV[6])
end
index(5, ARGV[7], 10)
return 1
"""
)
# A new job in one command: its record (ARGV[1], TTL ARGV[2]), its startup script (KEYS[4], ARGV[6],
# when ARGV[7] is '1'), its readiness token digest (KEYS[5], ARGV[9], if any), its first event to both
# streams, and its index entries (KEYS[7..], ARGV[11..]). With an idempotency key (KEYS[6], else ""),
# the key is bound to the job id (ARGV[8], TTL ARGV[10]) in the same step, or, if it is bound
# already, nothing is written and the job id it names is returned.
# One script, not a pipeline of a dozen commands: each reply costs the client more than Redis's work
# (bench/enqueue.py), and it is all or nothing like MULTI/EXEC, without its round trips.
_ADD = (
    jobindex.LUA_APPLY
    + """
if KEYS[6] ~= '' then
  local bound = redis.call('get', KEYS[6])
  if bound then return bound end
  redis.call('set', KEYS[6], ARGV[8], 'EX', ARGV[10])
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[7] == '1' then redis.call('set', KEYS[4], ARGV[6], 'EX', ARGV[2]) end
redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
redis.call('xadd', KEYS[3], 'MAXLEN', ARGV[5], '*', 'data', ARGV[3])
redis.call('expire', KEYS[3], ARGV[2])
if ARGV[9] ~= '' then redis.call('set', KEYS[5], ARGV[9], 'EX', ARGV[2]) end
index(7, ARGV[8], 11)
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

# Ends a step: note the next step (due time and message sequence number ARGV[4]) and free the lease,
# while the lease is ours, or ran out with no other step noted since (the noted number is still the
# one before ARGV[4]). Returns 0 otherwise: another delivery acted, and this step's outcome is dropped.
_RELEASE_WITH_DUE = """
local holder = redis.call('get', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return 0 end
  local noted = redis.call('get', KEYS[2])
  local seq = noted and tonumber(string.match(noted, ' (%d+)$')) or 0
  if seq + 1 ~= tonumber(ARGV[4]) then return 0 end
end
redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('del', KEYS[1])
return 1
"""


# Extends a lease only while it still holds the step's token.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


class LeaseKeeper:
    """Renews the leases of the steps this process is running, every third of a lease.

    A step slower than its lease (a provider call that takes its time) keeps the job while its
    worker is alive; only a worker that stopped (paused, partitioned, dead) loses it, and then the
    fence (``JobStore.fenced``) makes whatever it writes afterwards change nothing. One thread per
    process, one pipelined round trip per renewal round, however many steps run.
    """

    def __init__(self, client: redis.Redis):
        self._renew = client.register_script(_RENEW)
        self._client = client
        self._held: dict[tuple[str, str], int] = {}  # (job id, token) -> lease ms
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, job_id: str, token: str, lease_s: float) -> None:
        with self._lock:
            self._held[(job_id, token)] = int(lease_s * 1000)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmq-lease-keeper", daemon=True)
                self._thread.start()

    def drop(self, job_id: str, token: str) -> None:
        with self._lock:
            self._held.pop((job_id, token), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            period_s = min(held.values(), default=3000) / 3000
            time.sleep(max(period_s, 0.05))
            if not held:
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for (job_id, token), lease_ms in held.items():
                    pipe.evalsha(self._renew.sha, 1, keys.lock_key(job_id), token, lease_ms)
                pipe.execute()
            except redis.exceptions.NoScriptError:
                self._client.script_load(_RENEW)
            except redis.RedisError:  # an outage: the steps' own writes will meet it too
                continue


# Called with the job after every state change this process made; the workers count finished jobs
# for their Prometheus metrics here (workers/metrics.py), the one place every final state passes.
TRANSITION_HOOKS: list[Callable[[Job], None]] = []
# What a hook's owner does around many notifications at once (``JobStore.notify_all``): workers/jobevents.py
# publishes a batch's Flower events in one pipeline, where each was a round trip of its own.
NOTIFY_BATCHES: list[Callable[[], contextlib.AbstractContextManager[None]]] = []


def add_arguments(
    job: Job, startup_script: str | None, settings: Settings, idempotency_key: str | None = None
) -> tuple[list, list]:
    """KEYS and ARGV of ``_ADD`` for a new job, so ``JobStore`` and ``AsyncJobStore`` store one alike."""
    ops = jobindex.changes(jobindex.snapshot(None), job)
    script_keys = [
        keys.job_key(job.id),
        keys.EVENTS_KEY,
        keys.events_key(job.id),
        keys.script_key(job.id),
        keys.ready_token_key(job.id),
        keys.idempotency_key(idempotency_key) if idempotency_key else "",
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
        settings.idempotency_ttl_s,
    ]
    return [*script_keys, *(k for k, _, _ in ops)], [*args, *(x for _, op, arg in ops for x in (op, arg))]


def cas_arguments(
    job_id: str,
    seen: str,
    new_raw: str,
    event: str,
    settings: Settings,
    ops: list[jobindex.Op] | None = None,
    lease: str | None = None,
    lease_s: float = 0.0,
) -> tuple[list, list]:
    """KEYS and ARGV of the compare-and-set script; ``lease``: the token the job's lock must hold
    (``lease_s``: how long it is taken back for if it ran out with nobody acting since)."""
    ops = ops or []
    lock = keys.lock_key(job_id) if lease else ""
    script_keys = [keys.job_key(job_id), keys.EVENTS_KEY, keys.events_key(job_id), lock, *(k for k, _, _ in ops)]
    limits = [settings.events_maxlen, settings.job_events_maxlen, settings.job_ttl_s]
    fence = [job_id, lease or "", int(lease_s * 1000)]
    return script_keys, [seen, new_raw, event, *limits, *fence, *(x for _, op, arg in ops for x in (op, arg))]


def queue_create_ended(pipe: Any, job_id: str, vm_lives: bool, ttl_s: int) -> None:
    """Queue on ``pipe`` (blocking or asyncio) what ``create_ended`` writes."""
    pipe.delete(keys.script_key(job_id))
    if vm_lives:
        pipe.persist(keys.job_key(job_id))
    else:
        pipe.expire(keys.job_key(job_id), ttl_s)


def transition_change(
    to: JobState, message: str, fields: dict[str, object], then: Callable[[Job], None] | None = None
) -> Callable[[Job], None]:
    """The change ``transition`` applies: the state, the fields, ``then`` (which sees the record being
    written, not a snapshot), a line in the history."""

    def change(job: Job) -> None:
        before = job.state
        job.state = to
        for name, value in fields.items():
            setattr(job, name, value)
        if then is not None:
            then(job)
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


class LeaseLost(InvalidTransition):
    """A step's lease ran out and another delivery took it: the stale step may change nothing."""


@dataclass
class _Fence:
    """The lease a step of this thread holds, and the record as this step last saw it (read or wrote)."""

    job_id: str
    token: str
    seen: str | None


# ``JobStore.update`` fences every write to the fenced job with it. Context variables: each worker
# thread runs its own step (the process's record cache is shared by all threads, so it cannot say
# what *this* step saw).
_FENCE: contextvars.ContextVar[_Fence | None] = contextvars.ContextVar("vmq_fence", default=None)
_LAST_READ: contextvars.ContextVar[tuple[str, str | None]] = contextvars.ContextVar("vmq_read", default=("", None))
_LAST_SCRIPT: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("vmq_script", default=None)


@dataclass(frozen=True)
class Due:
    """A job's next step as its last step noted it: when it is due (epoch s, for the rescue) and the
    sequence number the message that runs it carries (duplicate detection; no clock is compared)."""

    at: float
    seq: int | None = None

    def dump(self) -> str:
        return f"{self.at:.3f}" if self.seq is None else f"{self.at:.3f} {self.seq}"

    @classmethod
    def parse(cls, raw: str | None) -> Due | None:
        if not raw:
            return None
        at, _, seq = raw.partition(" ")
        return cls(float(at), int(seq) if seq else None)


class JobStore:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self.ttl_s = settings.job_ttl_s
        self.idempotency_ttl_s = settings.idempotency_ttl_s
        self._release = client.register_script(_RELEASE)
        self._release_with_due = client.register_script(_RELEASE_WITH_DUE)
        self._keeper = LeaseKeeper(client)
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

    def add_claiming(
        self, job: Job, startup_script: str | None = None, idempotency_key: str | None = None
    ) -> str | None:
        """Write a new job as ``add`` does, bound to ``idempotency_key`` in the same script: a caller who
        finds the key bound always finds its record, and a key is never bound to a record not written.

        Returns the id of the job the key was already bound to (nothing written), else None.
        """
        if idempotency_key is None:
            self.add(job, startup_script)
            return None
        add_keys, args = add_arguments(job, startup_script, self.settings, idempotency_key)
        bound = self._add(keys=add_keys, args=args)
        return None if bound == 1 else bound

    def mark_enqueued(self, job: Job) -> Job:
        """The job's first message is published: note it on the record ``add`` wrote from ``job``.

        One compare-and-set against that record (no cache of records kept: a producer writes many);
        if a worker changed the record already, a fresh read-modify-write.
        """
        now = utcnow()
        seen = job.model_dump_json()
        marked, new_raw, event, ops = self._changed(job.id, seen, lambda j: setattr(j, "enqueued_at", now))
        script_keys, args = cas_arguments(job.id, seen, new_raw, event, self.settings, ops)
        if self._cas(keys=script_keys, args=args) != 1:  # a worker got to it first: mark its record
            self.update(job.id, lambda j: setattr(j, "enqueued_at", now))
        return marked  # the job as enqueued, whatever a worker did since (the caller sees "queued")

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

    def acquire_and_get(
        self, job_id: str, lease_s: float, with_script: bool = False
    ) -> tuple[str | None, Job | None, Due | None]:
        """In one round trip: the job's lease, its record, and its next step as noted (``Due``).

        The record and due are None when the lease is not ours. ``with_script``: the job's startup
        script rides in the same round trip, and ``script`` answers from it in this thread (a create
        step that submits needs it; a round trip of its own was a tenth of the step's client CPU).
        """
        token = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.lock_key(job_id), token, nx=True, px=int(lease_s * 1000))
        pipe.get(keys.job_key(job_id))
        pipe.get(keys.due_key(job_id))
        if with_script:
            pipe.get(keys.script_key(job_id))
        acquired, raw, due, *script = pipe.execute()
        if not acquired:
            return None, None, None
        _LAST_READ.set((job_id, raw))
        _LAST_SCRIPT.set((job_id, script[0]) if script else None)
        return token, self._parse(job_id, raw), Due.parse(due)

    def due(self, job_id: str) -> Due | None:
        return Due.parse(self.redis.get(keys.due_key(job_id)))

    @contextlib.contextmanager
    def fenced(self, job_id: str, token: str, lease_s: float | None = None, seen: str | None = None):
        """Within this block every write of this thread to ``job_id`` needs the lease ``token`` still
        held; a write after the lease was lost raises ``LeaseLost`` and changes nothing. With
        ``lease_s`` the lease is renewed while the block runs (``LeaseKeeper``). ``seen``: the record
        as the step last saw it, when that is not this thread's last ``acquire_and_get`` (a batch's)."""
        last_id, last_raw = _LAST_READ.get()
        if seen is None and last_id == job_id:
            seen = last_raw
        reset = _FENCE.set(_Fence(job_id, token, seen))
        if lease_s is not None:
            self._keeper.hold(job_id, token, lease_s)
        try:
            yield
        finally:
            _FENCE.reset(reset)
            if lease_s is not None:
                self._keeper.drop(job_id, token)

    def script(self, job_id: str) -> str | None:
        """The job's startup script (None: it has none, or its create ended and it was deleted).

        A script never changes once stored, so the copy ``acquire_and_get(with_script=True)`` read
        in this thread for this job is as good as a read now."""
        read = _LAST_SCRIPT.get()
        if read is not None and read[0] == job_id:
            return read[1]
        return self.redis.get(keys.script_key(job_id))

    def creator_of(self, provider: str, instance_id: str) -> Job | None:
        """The create job whose VM this is, if vmqueue created it and the VM lives (the job index)."""
        owner = self.redis.hget(jobindex.INSTANCES, jobindex.instance_field(provider, instance_id))
        return self.get(owner) if owner else None

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
        fence = _FENCE.get()
        if fence is not None and fence.job_id != job_id:
            fence = None
        lease = fence.token if fence else None
        if fence is not None:
            seen = fence.seen  # what this step saw, not what another thread of this process wrote since
        else:
            with self._raw_lock:
                seen = self._raw.get(job_id)
        if seen is not None:
            job, new_raw, event, ops = self._changed(job_id, seen, change)
            lease_s = self.settings.step_lease_s
            script_keys, args = cas_arguments(job_id, seen, new_raw, event, self.settings, ops, lease, lease_s)
            done = self._cas(keys=script_keys, args=args)
            if done == -1:
                raise LeaseLost(f"job {job_id}: this step's lease ran out; another delivery holds the job")
            if done:
                self._remember(job_id, new_raw)
                if fence is not None:
                    fence.seen = new_raw
                return job
        written: list[str] = []

        def attempt(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(job_id)
            if lease and pipe.get(keys.lock_key(job_id)) != lease:
                raise LeaseLost(f"job {job_id}: this step's lease ran out; another delivery holds the job")
            job, new_raw, event, ops = self._changed(job_id, raw, change)
            pipe.multi()
            pipe.set(key, new_raw, keepttl=True)
            if event:
                queue_event(pipe, job_id, event, self.settings)
            jobindex.apply(pipe, job_id, ops)
            written.append(new_raw)
            return job

        # The lease is watched too: a lease lost between the read and EXEC aborts the write.
        watched = [key, keys.lock_key(job_id)] if lease else [key]
        job = self.redis.transaction(attempt, *watched, value_from_callable=True)
        self._remember(job_id, written[-1])
        if fence is not None:
            fence.seen = written[-1]
        return job

    def update_adding(self, job_id: str, change: Callable[[Job], Job | None]) -> tuple[Job, Job | None]:
        """``update``, where ``change`` may return a new job to record in the same MULTI/EXEC: no
        reader sees the changed record name a job whose record does not exist yet (the expiry's claim
        names its destroy job, workers/expiry.py). Returns the changed job and the one recorded, if any.

        WATCH/MULTI on a fresh read, retried on a race; not fenced by a step's lease (its caller holds
        the job's lease outside any step). ``KeyError`` when the job does not exist.
        """
        key = keys.job_key(job_id)
        made: list[Job | None] = []
        written: list[str] = []

        def attempt(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.get(key)
            if raw is None:
                raise KeyError(job_id)
            made.clear()
            job, new_raw, event, ops = self._changed(job_id, raw, lambda j: made.append(change(j)))
            pipe.multi()
            pipe.set(key, new_raw, keepttl=True)
            if event:
                queue_event(pipe, job_id, event, self.settings)
            jobindex.apply(pipe, job_id, ops)
            if made[-1] is not None:
                add_keys, args = add_arguments(made[-1], None, self.settings)
                self._add(keys=add_keys, args=args, client=pipe)  # queued in the MULTI (loaded before it)
            written.append(new_raw)
            return job

        job = self.redis.transaction(attempt, key, value_from_callable=True)
        self._remember(job_id, written[-1])
        return job, made[-1]

    @staticmethod
    def _changed(job_id: str, raw: str, change: Callable[[Job], None]) -> tuple[Job, str, str, list[jobindex.Op]]:
        """The changed job, its record, its event as JSON ("" when neither state, cleanup nor a cancel
        request changed) and the job index writes that go with it."""
        return JobStore._change(job_id, Job.model_validate_json(raw), change)

    @staticmethod
    def _change(job_id: str, job: Job, change: Callable[[Job], None]) -> tuple[Job, str, str, list[jobindex.Op]]:
        """``_changed`` for a record parsed already: ``job`` is changed in place (a batch parses each once)."""
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

    def release(self, job_id: str, token: str, next_due_in_s: float | None = None, seq: int | None = None) -> bool:
        """Give the lease back; with ``next_due_in_s``, note when the job's next step is due and the
        sequence number ``seq`` its next message carries. False (nothing noted) when the lease was lost."""
        if next_due_in_s is None:
            return bool(self._release(keys=[keys.lock_key(job_id)], args=[token]))
        due = Due(at=time.time() + next_due_in_s, seq=seq)
        args = [token, due.dump(), int((next_due_in_s + 3600) * 1000), seq or 0]
        return bool(self._release_with_due(keys=[keys.lock_key(job_id), keys.due_key(job_id)], args=args))

    def transition(
        self,
        job_id: str,
        to: JobState,
        message: str = "",
        change: Callable[[Job], None] | None = None,
        **fields: object,
    ) -> Job:
        """Move to ``to`` (compare-and-set against the table), set ``fields``, apply ``change`` (which
        sees the record being written, not a snapshot), note it in the history."""
        job = self.update(job_id, transition_change(to, message, fields, change))
        self.notify(job)
        if job.kind == JobKind.destroy and to == JobState.gone:
            self._vm_gone(job)
        return job

    @staticmethod
    def notify(job: Job) -> None:
        """Run the transition hooks for a state change written with ``update`` (``transition`` does it itself)."""
        for hook in TRANSITION_HOOKS:  # after the compare-and-set: each hook sees each change once
            hook(job)

    @classmethod
    def notify_all(cls, jobs: Iterable[Job]) -> None:
        """``notify`` each of ``jobs``, inside every ``NOTIFY_BATCHES`` context (a batch of state changes)."""
        with contextlib.ExitStack() as stack:
            for batch in NOTIFY_BATCHES:
                stack.enter_context(batch())
            for job in jobs:
                cls.notify(job)

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
            return
        # Its VM gone, the create record expires like any finished job's (VMQ_JOB_TTL_S).
        self.redis.expire(keys.job_key(owner), self.ttl_s)

    # -- listing ---------------------------------------------------------------------------
    def list(self, query: jobindex.JobQuery, limit: int = 50, cursor: str | None = None) -> jobindex.JobPage:
        """The newest jobs matching ``query`` (see ``jobindex.query``)."""
        return jobindex.query(self.redis, query, limit, cursor)
