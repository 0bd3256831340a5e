"""Stalled jobs: an unfinished job whose next step nobody will run, because its message was lost.

Celery on Redis delivers at least once, except in one window: kombu takes a message off the queue
with BRPOP and only then records it as unacked. A worker SIGKILLed in between (a busy worker
always has messages arriving) loses that message for good, and the job it carried stays
``destroying`` or ``provisioning`` forever. The chaos suite (bench/chaos.py, R6) lost one destroy
chain in most SIGKILLs of a busy worker.

The job store knows better than the broker: a job that is not finished, whose lease nobody holds
and whose next step was due more than a visibility timeout ago (after which kombu would have
restored any message a dead worker held) may have no message left. It has none for sure when no
message for it waits in its queue or is held unacked by a worker (``broker_job_ids``): a job stuck
behind a long queue is not lost, and re-sending it on every pass only multiplied the backlog.
Sending a lost job's task again is safe: every step is idempotent, and the message carries the
step number the job expects (``Due.seq``), so a surplus copy is dropped. A record whose first
message was never published (``enqueued_at`` unset: the publish failed in an outage, and so did
marking the job failed) is failed, not sent: its caller was told the enqueue failed. The sweep task
runs this on each pass (``vmq sweep``); knows no Celery: the caller sends the messages.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from vmqueue import keys
from vmqueue.jobstore import Due, JobStore
from vmqueue.models import Job, JobState
from vmqueue.settings import Settings

BATCH = 500
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]


@dataclass(frozen=True)
class Stalled:
    job: Job
    seq: int  # the step number the job expects: what a re-sent message must carry
    never_enqueued: bool  # its first message was never published: fail it, do not send it


def stalled_after_s(settings: Settings) -> float:
    """How overdue a step must be before its message counts as lost: kombu restores within this."""
    return settings.visibility_timeout_s + 2 * settings.unacked_restore_interval_s + 5.0


def stalled_jobs(store: JobStore, provider: str, grace_s: float, now: float | None = None) -> Iterator[Stalled]:
    """Unfinished jobs of ``provider`` overdue by ``grace_s``, lease free, with no message in the broker."""
    now = time.time() if now is None else now
    client = store.redis
    job_keys = [
        k for k in client.scan_iter(match=f"{keys.JOB_PREFIX}*", count=1000) if not k.endswith(keys.SCRIPT_SUFFIX)
    ]
    overdue: list[tuple[Job, Due | None]] = []
    for start in range(0, len(job_keys), BATCH):
        ids = [k.removeprefix(keys.JOB_PREFIX) for k in job_keys[start : start + BATCH]]
        pipe = client.pipeline(transaction=False)
        pipe.mget([keys.job_key(i) for i in ids])
        pipe.mget([keys.due_key(i) for i in ids])
        pipe.mget([keys.lock_key(i) for i in ids])
        raws, dues, locks = pipe.execute()
        for raw, raw_due, lock in zip(raws, dues, locks, strict=True):
            if raw is None or lock is not None:
                continue
            job = Job.model_validate_json(raw)
            if job.provider != provider or job.finished:
                continue
            due = Due.parse(raw_due)
            # A job that never ran a step has no due time: its first message was due when it was published.
            due_at = due.at if due else (job.enqueued_at or job.created_at).timestamp()
            if now > due_at + grace_s:
                overdue.append((job, due))
    if not overdue:
        return
    waiting = broker_job_ids(client, keys.queue_name(provider))
    for job, due in overdue:
        if job.id in waiting:
            continue  # its message is in the queue (a backlog) or held by a worker: not lost
        never = job.state == JobState.queued and due is None and job.enqueued_at is None
        yield Stalled(job, (due.seq or 0) if due else 0, never)


def broker_job_ids(client: redis.Redis, queue: str, chunk: int = 1000) -> set[str]:
    """Job ids of the messages waiting in ``queue`` and of every message a worker holds unacked.

    Reads kombu's Redis transport as it stores them (a list per queue; the ``unacked`` hash), in
    chunks; a message it cannot parse is skipped. O(queue length), which a sweep pass can afford.
    """
    found: set[str] = set()
    start = 0
    while batch := client.lrange(queue, start, start + chunk - 1):
        for raw in batch:
            found.update(_job_ids(raw))
        start += chunk
    for _, held in client.hscan_iter(UNACKED_KEY, count=chunk):
        try:
            found.update(_job_ids(json.loads(held)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    found.discard("")
    return found


def _job_ids(raw: str | bytes | dict) -> list[str]:
    """The job ids a task message carries: a job task's one, or a ``vmq.create_many``'s list."""
    try:
        message = raw if isinstance(raw, dict) else json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        first = args[0] if args else None
        if isinstance(first, list):
            return [job_id for job_id in first if isinstance(job_id, str)]
        return [first] if isinstance(first, str) else []
    except (ValueError, KeyError, IndexError, TypeError):
        return []
