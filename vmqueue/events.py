"""Live job events: every change of a job's state (or of its cleanup) as an entry in Redis streams.

The job store writes the event in the same step as the record (inside the add script for a new
job, the compare-and-set script for a change; ``queue_event`` on its MULTI path), so no state change escapes and none is
published that was not stored. Two capped streams hold each event:

- ``vmq:events:<job id>``: that job's events (``job_events_maxlen``, expires with the record's TTL),
  for ``GET /jobs/{id}/events`` and ``vmq watch JOB_ID``; its entry ids are the SSE event ids.
- ``vmq:events``: every job's events (``events_maxlen``, trimmed approximately), for ``vmq watch``.

Each entry has one field, ``data``: a ``JobChange`` as JSON. A reader that resumes after an id it
saw misses nothing the stream still holds (Redis stream ids only grow).
``Cursor`` is the reading logic, without I/O, shared by the blocking and the asyncio readers.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from pydantic import BaseModel, Field

from vmqueue import keys
from vmqueue.models import CancelRequest, CleanupState, Job, JobError, JobKind, JobState, VMInfo, utcnow
from vmqueue.settings import Settings

# A stream entry id ("<ms>-<seq>"), or "0" for "from the start".
STREAM_ID = re.compile(r"^(0|\d{1,20}-\d{1,20})$")


class JobChange(BaseModel):
    """One event: what a job became. ``previous`` is ``None`` for the job's first record (``queued``)."""

    job_id: str
    kind: JobKind
    provider: str
    state: JobState
    previous: JobState | None = None
    cleanup: CleanupState | None = None
    finished: bool = Field(description="the job will change no more (its cleanup, if any, is over)")
    message: str = ""
    at: datetime = Field(default_factory=utcnow)
    instance_id: str | None = None
    vm: VMInfo | None = None
    error: JobError | None = None
    cancel: CancelRequest | None = Field(None, description="who asked to cancel the job, and when")


def change_of(
    job: Job, previous: JobState | None, previous_cleanup: CleanupState | None, cancel_asked: bool = False
) -> JobChange | None:
    """The event for ``job`` as just written, or ``None`` when neither its state nor its cleanup changed
    and no cancel was asked for (``cancel_asked``: this write recorded ``Job.cancel``)."""
    if previous is not None and job.state == previous and job.cleanup == previous_cleanup and not cancel_asked:
        return None
    return describe(job, previous)


def describe(job: Job, previous: JobState | None) -> JobChange:
    """``job`` as an event, coming from state ``previous`` (``None``: its first record)."""
    return JobChange(
        job_id=job.id,
        kind=job.kind,
        provider=job.provider,
        state=job.state,
        previous=previous,
        cleanup=job.cleanup,
        finished=job.finished,
        message=job.history[-1].message if job.history else "",
        at=job.updated_at,
        instance_id=job.instance_id,
        vm=job.vm,
        error=job.error,
        cancel=job.cancel,
    )


def queue_event(pipe: Any, job_id: str, data: str, settings: Settings) -> None:
    """Queue on ``pipe`` (blocking or asyncio) the writes of one event (``JobChange`` JSON) to both
    streams; the compare-and-set script in ``jobstore`` does the same in Lua."""
    pipe.xadd(keys.EVENTS_KEY, {"data": data}, maxlen=settings.events_maxlen, approximate=True)
    pipe.xadd(keys.events_key(job_id), {"data": data}, maxlen=settings.job_events_maxlen, approximate=False)
    pipe.expire(keys.events_key(job_id), settings.job_ttl_s)


Event = tuple[str, JobChange]  # (stream entry id, the change)


class Cursor:
    """Where a reader of job events is: the last id read per stream and the jobs it still waits for.

    ``job_ids`` given: those jobs' own streams, each until the job is finished (``done`` then).
    None: the stream of all jobs, never done. ``after`` is the id to resume after ("0": from the start).
    """

    def __init__(self, job_ids: list[str] | None, after: str = "0"):
        if not STREAM_ID.match(after):
            raise ValueError(f"event id {after!r}: expected <milliseconds>-<sequence>, e.g. 1700000000000-0")
        self.all_jobs = not job_ids
        streams = [keys.EVENTS_KEY] if self.all_jobs else [keys.events_key(j) for j in job_ids or []]
        self.last: dict[str, str] = dict.fromkeys(streams, after)
        self.waiting: set[str] = set(job_ids or [])

    @property
    def done(self) -> bool:
        return not self.all_jobs and not self.waiting

    def streams(self) -> dict[str, str]:
        """XREAD's streams argument: each stream still read, with the id to read after."""
        if self.all_jobs:
            return dict(self.last)
        return {keys.events_key(j): self.last[keys.events_key(j)] for j in sorted(self.waiting)}

    def take(self, reply: list[Any] | None) -> list[Event]:
        """The (event id, change) pairs of an XREAD reply, in order; advances the cursor past them."""
        out: list[Event] = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                change = JobChange.model_validate_json(fields["data"])
                self.last[stream] = entry_id
                out.append((entry_id, change))
                if change.finished:
                    self.waiting.discard(change.job_id)
        return out

    def settle(self, jobs: dict[str, Job | None]) -> None:
        """After a read found nothing new: a job that is gone or finished has no event left to come
        (its final event is written with its record, so it was read already, or expired)."""
        for job_id, job in jobs.items():
            if job is None or job.finished:
                self.waiting.discard(job_id)


# -- readers: the same loop, blocking and asyncio -------------------------------------------------
# How long one blocking XREAD waits before the reader checks whether the jobs it waits for ended.
BLOCK_MS = 5_000
BATCH = 100


def follow(
    client: redis.Redis, cursor: Cursor, get_job: Callable[[str], Job | None], block_ms: int = BLOCK_MS
) -> Iterator[Event]:
    """(event id, change) as they come, until ``cursor.done`` (for ever when reading all jobs)."""
    block: int | None = None  # the first read returns at once: what the streams already hold
    while not cursor.done:
        reply = client.xread(cursor.streams(), count=BATCH, block=block)
        yield from cursor.take(reply)
        if not reply and not cursor.all_jobs:
            cursor.settle({job_id: get_job(job_id) for job_id in cursor.waiting})
        block = block_ms


async def afollow(
    client: redis.asyncio.Redis,
    cursor: Cursor,
    get_job: Callable[[str], Awaitable[Job | None]],
    block_ms: int = BLOCK_MS,
) -> AsyncIterator[Event]:
    """``follow`` for asyncio: the XREADs and record reads are awaited."""
    block: int | None = None
    while not cursor.done:
        reply = await client.xread(cursor.streams(), count=BATCH, block=block)
        for item in cursor.take(reply):
            yield item
        if not reply and not cursor.all_jobs:
            cursor.settle({job_id: await get_job(job_id) for job_id in cursor.waiting})
        block = block_ms


def latest_id(client: redis.Redis) -> str:
    """The id of the newest event of all jobs ("0" when there is none): where "from now on" starts."""
    newest = client.xrevrange(keys.EVENTS_KEY, count=1)
    return newest[0][0] if newest else "0"


async def alatest_id(client: redis.asyncio.Redis) -> str:
    newest = await client.xrevrange(keys.EVENTS_KEY, count=1)
    return newest[0][0] if newest else "0"
