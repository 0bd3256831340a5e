"""The job index: Redis sorted sets the job store keeps beside the records, so listing never scans keys.

Every job id is a member of several sorted sets, scored by its creation time in integer microseconds
(exact in a double until the year 2255):

- ``vmq:idx:all``, ``vmq:idx:kind:<kind>``, ``vmq:idx:provider:<provider>``, ``vmq:idx:state:<state>``;
- create jobs: ``vmq:idx:name:<vm name>`` and ``vmq:idx:label:<key>=<value>`` per label (a fleet's VMs
  carry ``vmqueue-fleet=<fleet>``, so a fleet is a label);
- ``vmq:idx:vms``: create jobs whose VM lives (``Job.vm_lives``) — what ``vmq vms`` lists;
- ``vmq:idx:expires:<provider>``: running creates whose VM is to be destroyed at ``expires_at`` (scored by
  it; workers/expiry.py).

Besides: the hash ``vmq:idx:instances`` ("<provider>/<instance id>" -> the create job whose VM it is,
so a destroy job that ends ``gone`` can tell that create job) and the hash ``vmq:idx:of`` (job id ->
the entries it has), so the entries of a record that expired can be removed without knowing the record.

The job store computes ``changes(snapshot(before), after)`` on every write and applies them in the same Lua
script (or MULTI) as the record, so an index never disagrees with a record it has seen. A query walks
the smallest of its filter sets newest-first and checks the others with ZMSCORE: the 50 newest failed
jobs cost one ZREVRANGEBYSCORE of about 50 entries and one MGET, whatever the number of records
(bench/listing.py).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmqueue import keys
from vmqueue.models import LABEL_FLEET, LABEL_KEY, LABEL_VALUE, Job, JobKind, JobState
from vmqueue.options import ProviderName

ALL = keys.index_key("all")
VMS = keys.index_key("vms")
INSTANCES = keys.index_key("instances")
OF = keys.index_key("of")
TRIM_CURSOR = keys.index_key("trim-cursor")

T = TypeVar("T")
MAX_LIMIT = 1000
# An index write: (key, op, argument). Ops: "z+" add to a sorted set with score=argument; "z-" remove;
# "h+" set field=argument of a hash to the job id; "h-" delete field=argument; "of" the entry list.
Op = tuple[str, str, str]


def micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def expires_key(provider: str) -> str:
    return keys.index_key("expires", provider)


def label_key(name: str, value: str) -> str:
    return keys.index_key("label", f"{name}={value}")


def instance_field(provider: str, instance_id: str) -> str:
    return f"{provider}/{instance_id}"


def expiry_due(job: Job) -> bool:
    """The job's VM is to be destroyed at ``expires_at`` and that destroy has not been enqueued yet.

    Only a running create's: one still booting joins the schedule once it runs (a destroy sent while
    it boots would fail the create for a VM that vanished)."""
    return (
        job.expires_at is not None
        and job.expired_at is None
        and job.state in (JobState.running, JobState.ready)
        and job.vm_lives
        and not job.cancel_pending
    )


def entries(job: Job) -> dict[str, int]:
    """Every sorted set the job belongs in, with its score."""
    score = micros(job.created_at)
    out = {
        ALL: score,
        keys.index_key("kind", job.kind): score,
        keys.index_key("provider", job.provider): score,
        keys.index_key("state", job.state): score,
    }
    if job.spec is not None:
        out[keys.index_key("name", job.spec.name)] = score
        for name, value in job.spec.labels.items():
            out[label_key(name, value)] = score
    if job.vm_lives:
        out[VMS] = score
    if expiry_due(job):
        out[expires_key(job.provider)] = micros(job.expires_at)
    return out


@dataclass(frozen=True)
class Snapshot:
    """What the index holds for a job: its sorted sets (with scores) and its ``instances`` field."""

    sets: dict[str, int]
    instance: str | None


def snapshot(job: Job | None) -> Snapshot:
    if job is None:
        return Snapshot({}, None)
    return Snapshot(entries(job), instance_field(job.provider, job.instance_id) if job.vm_lives else None)


def changes(before: Snapshot, after: Job) -> list[Op]:
    """The index writes that take the index from ``before`` to what ``after`` needs."""
    now = snapshot(after)
    old, new = before.sets, now.sets
    ops: list[Op] = [(k, "z-", "") for k in old if k not in new]
    ops += [(k, "z+", str(score)) for k, score in new.items() if old.get(k) != score]
    if before.instance != now.instance:
        if before.instance:
            ops.append((INSTANCES, "h-", before.instance))
        if now.instance:
            ops.append((INSTANCES, "h+", now.instance))
    if ops:
        ops.append((OF, "of", json.dumps({"z": sorted(new), "h": now.instance})))
    return ops


def apply(pipe: redis.client.Pipeline, job_id: str, ops: Iterable[Op]) -> None:
    """Queue ``ops`` on a pipeline (the MULTI path of the store; the Lua path does the same in Redis)."""
    for key, op, arg in ops:
        if op == "z+":
            pipe.zadd(key, {job_id: int(arg)})
        elif op == "z-":
            pipe.zrem(key, job_id)
        elif op == "h+":
            pipe.hset(key, arg, job_id)
        elif op == "h-":
            pipe.hdel(key, arg)
        elif op == "of":
            pipe.hset(key, job_id, arg)


# The same in Lua, after the record's own write (see JobStore): KEYS[first..] the index keys,
# ARGV[member] the job id, then an (op, argument) pair per index key.
LUA_APPLY = """
local function index(first, member, argv_at)
  for i = first, #KEYS do
    local op, arg = ARGV[argv_at], ARGV[argv_at + 1]
    argv_at = argv_at + 2
    if op == 'z+' then redis.call('zadd', KEYS[i], arg, member)
    elseif op == 'z-' then redis.call('zrem', KEYS[i], member)
    elseif op == 'h+' then redis.call('hset', KEYS[i], arg, member)
    elseif op == 'h-' then redis.call('hdel', KEYS[i], arg)
    elseif op == 'of' then redis.call('hset', KEYS[i], member, arg)
    end
  end
end
"""


# A query is written once, without I/O (like producer/submit.py): a generator that yields batches of
# Redis commands (redis-py method name, args, kwargs), each run in one pipeline, and is sent back
# their results; ``query`` runs it with a blocking client, ``aquery`` with redis.asyncio.
Command = tuple[str, tuple[object, ...], dict[str, object]]
Steps = Generator[list[Command], list[object], T]


def _cmd(name: str, *args: object, **kwargs: object) -> Command:
    return name, args, kwargs


def forget_steps(job_ids: Sequence[str]) -> Steps[None]:
    """Remove every index entry of jobs whose record is gone (expired), from what ``vmq:idx:of`` says."""
    if not job_ids:
        return
    (recorded,) = yield [_cmd("hmget", OF, list(job_ids))]
    batch = []
    for job_id, raw in zip(job_ids, recorded, strict=True):
        held = json.loads(raw) if raw else {"z": [ALL], "h": None}
        batch += [_cmd("zrem", key, job_id) for key in held["z"]]
        if held["h"]:
            batch.append(_cmd("hdel", INSTANCES, held["h"]))
        batch.append(_cmd("hdel", OF, job_id))
    yield batch


def forget(client: redis.Redis, job_ids: Sequence[str]) -> None:
    run(client, forget_steps(job_ids))


def run(client: redis.Redis, steps: Steps[T]) -> T:
    """Carry index steps out with a blocking client."""
    results: list[object] | None = None
    while True:
        try:
            batch = steps.send(results)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        pipe = client.pipeline(transaction=False)
        for name, args, kwargs in batch:
            getattr(pipe, name)(*args, **kwargs)
        results = pipe.execute()


async def arun(client: redis.asyncio.Redis, steps: Steps[T]) -> T:
    """``run`` with redis.asyncio."""
    results: list[object] | None = None
    while True:
        try:
            batch = steps.send(results)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        pipe = client.pipeline(transaction=False)
        for name, args, kwargs in batch:
            getattr(pipe, name)(*args, **kwargs)
        results = await pipe.execute()


def trim(client: redis.Redis, older_than: float, batch: int = 1000) -> int:
    """Forget up to ``batch`` index entries created before ``older_than`` (epoch s) whose record expired.

    Each sweep pass runs it (workers/tasks.py); a query also forgets the expired records it meets.
    Only records older than the job TTL can have expired, so only that end of ``vmq:idx:all`` is read,
    resuming where the last call stopped (records of living VMs never expire and are passed over).
    Returns how many jobs were forgotten.
    """
    cursor = client.get(TRIM_CURSOR)
    low = f"({cursor}" if cursor else "-inf"
    found = client.zrangebyscore(ALL, low, int(older_than * 1_000_000), start=0, num=batch, withscores=True)
    if not found:
        client.delete(TRIM_CURSOR)  # wrap: the next call starts from the oldest entry again
        return 0
    ids = [member for member, _ in found]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.exists(keys.job_key(job_id))
    missing = [job_id for job_id, exists in zip(ids, pipe.execute(), strict=True) if not exists]
    forget(client, missing)
    if len(found) < batch:
        client.delete(TRIM_CURSOR)
    else:
        client.set(TRIM_CURSOR, int(found[-1][1]))
    return len(missing)


class JobQuery(BaseModel):
    """What to list; every filter given must hold. Times are creation times (``Job.created_at``, UTC
    when given without a zone). Raises pydantic's ValidationError naming a bad filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: JobKind | None = None
    provider: ProviderName | None = None
    state: JobState | None = None
    name: str | None = Field(None, min_length=1, max_length=63, description="the VM name a create asked for")
    labels: dict[str, str] = Field(default_factory=dict, description="labels the create's spec carries")
    fleet: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$", description="a fleet's name")
    vms: bool = Field(False, description="only create jobs whose VM lives (what `vmq vms` lists)")
    since: datetime | None = None
    until: datetime | None = None

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
                raise ValueError(f"label {key}={value}: keys and values as VMSpec labels take them (a-z 0-9 _ -)")
        return labels

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, at: datetime | None) -> datetime | None:
        return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at

    @model_validator(mode="after")
    def _window(self) -> JobQuery:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    def sets(self) -> list[str]:
        """The sorted sets whose intersection the query is (``vmq:idx:all`` without a filter)."""
        sets = []
        if self.kind is not None:
            sets.append(keys.index_key("kind", self.kind))
        if self.provider is not None:
            sets.append(keys.index_key("provider", self.provider))
        if self.state is not None:
            sets.append(keys.index_key("state", self.state))
        if self.name is not None:
            sets.append(keys.index_key("name", self.name))
        labels = {**self.labels, **({LABEL_FLEET: self.fleet} if self.fleet is not None else {})}
        sets += [label_key(k, v) for k, v in sorted(labels.items())]
        if self.vms:
            sets.append(VMS)
        return sets or [ALL]


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None  # pass it back as ``cursor`` for the next (older) page; None: no more


def parse_cursor(cursor: str) -> tuple[int, str]:
    """``<score>:<job id>``, as ``JobPage.next_cursor`` gives it; ValueError otherwise."""
    score, sep, member = cursor.partition(":")
    if not sep or not member or not score.isdigit():
        raise ValueError(f"cursor {cursor!r} is not one this API returned (<number>:<job id>)")
    return int(score), member


def query_steps(q: JobQuery, limit: int = 50, cursor: str | None = None) -> Steps[JobPage]:
    """The newest jobs matching ``q``, at most ``limit``, older than ``cursor`` if given.

    Walks the smallest filter set from the newest entry (or the cursor) down and keeps the members
    every other filter set holds (ZMSCORE), in chunks, until ``limit`` are found; its cost follows
    the entries walked, not the number of records. Entries whose record expired are forgotten.
    Raises ValueError for a limit outside 1..1000 or a cursor this module did not return.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIMIT}, got {limit}")
    last = parse_cursor(cursor) if cursor else None  # (score, member) of the last entry already walked
    sets = q.sets()
    sizes = yield [_cmd("zcard", key) for key in sets]
    driving = sets[sizes.index(min(sizes))]
    others = [key for key in sets if key != driving]
    until = micros(q.until) if q.until else None
    low: int | str = micros(q.since) if q.since else "-inf"
    chunk = max(limit, 100)
    matched: list[tuple[str, int, str]] = []  # (record, score, job id)
    more = False
    while len(matched) < limit:
        tops = [x for x in (last[0] if last else None, until) if x is not None]
        # Members at the last score come in descending order and those >= the last one were walked:
        # ask for that many more (a handful at most: scores are microseconds).
        (ties,) = (yield [_cmd("zcount", driving, last[0], last[0])]) if last else (0,)
        (walked,) = yield [
            _cmd(
                "zrevrangebyscore",
                driving,
                min(tops) if tops else "+inf",
                low,
                start=0,
                num=chunk + ties,
                withscores=True,
            )
        ]
        exhausted = len(walked) < chunk + ties
        fresh = [(m, int(s)) for m, s in walked if last is None or int(s) != last[0] or m < last[1]]
        if not fresh:
            break
        last = (fresh[-1][1], fresh[-1][0])
        if others:
            held = yield [_cmd("zmscore", key, [m for m, _ in fresh]) for key in others]
            fresh = [entry for i, entry in enumerate(fresh) if all(scores[i] is not None for scores in held)]
        while fresh and len(matched) < limit:
            batch, fresh = fresh[: limit - len(matched)], fresh[limit - len(matched) :]
            (raws,) = yield [_cmd("mget", [keys.job_key(m) for m, _ in batch])]
            yield from forget_steps([m for (m, _), raw in zip(batch, raws, strict=True) if raw is None])
            matched += [(raw, score, m) for (m, score), raw in zip(batch, raws, strict=True) if raw is not None]
        if len(matched) >= limit:
            more = bool(fresh) or not exhausted
            break
        if exhausted:
            break
    jobs = [Job.model_validate_json(raw) for raw, _, _ in matched]
    return JobPage(jobs, f"{matched[-1][1]}:{matched[-1][2]}" if more else None)


def query(client: redis.Redis, q: JobQuery, limit: int = 50, cursor: str | None = None) -> JobPage:
    """``query_steps`` with a blocking client."""
    return run(client, query_steps(q, limit, cursor))


async def aquery(client: redis.asyncio.Redis, q: JobQuery, limit: int = 50, cursor: str | None = None) -> JobPage:
    """``query_steps`` with redis.asyncio."""
    return await arun(client, query_steps(q, limit, cursor))
