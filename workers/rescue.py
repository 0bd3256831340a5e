"""Stalled jobs: an unfinished job whose next step nobody will run, because its message was lost.

Celery on Redis delivers at least once, except in one window: kombu takes a message off the queue
with BRPOP and only then records it as unacked. A worker SIGKILLed in between (a busy worker
always has messages arriving) loses that message for good, and the job it carried stays
``destroying`` or ``provisioning`` forever. The chaos suite (bench/chaos.py, R6) lost one destroy
chain in most SIGKILLs of a busy worker.

The job store knows better than the broker: a job that is not finished, whose lease nobody holds
and whose next step was due more than a visibility timeout ago (after which kombu would have
restored any message a dead worker held) has no message left. Sending its task again is safe:
every step is idempotent, and a surplus message is dropped by the due-time check. The sweep task
runs this on each pass (``vmq sweep``); knows no Celery: the caller sends the messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from vmqueue import keys
from vmqueue.jobstore import JobStore
from vmqueue.models import Job
from vmqueue.settings import Settings

BATCH = 500


def stalled_after_s(settings: Settings) -> float:
    """How overdue a step must be before its message counts as lost: kombu restores within this."""
    return settings.visibility_timeout_s + 2 * settings.unacked_restore_interval_s + 5.0


def stalled_jobs(store: JobStore, provider: str, grace_s: float, now: float | None = None) -> Iterator[Job]:
    """Unfinished jobs of ``provider`` whose next step is overdue by ``grace_s`` and whose lease is free."""
    now = time.time() if now is None else now
    client = store.redis
    job_keys = [
        k for k in client.scan_iter(match=f"{keys.JOB_PREFIX}*", count=1000) if not k.endswith(keys.SCRIPT_SUFFIX)
    ]
    for start in range(0, len(job_keys), BATCH):
        ids = [k.removeprefix(keys.JOB_PREFIX) for k in job_keys[start : start + BATCH]]
        pipe = client.pipeline(transaction=False)
        pipe.mget([keys.job_key(i) for i in ids])
        pipe.mget([keys.due_key(i) for i in ids])
        pipe.mget([keys.lock_key(i) for i in ids])
        raws, dues, locks = pipe.execute()
        for raw, due, lock in zip(raws, dues, locks, strict=True):
            if raw is None or lock is not None:
                continue
            job = Job.model_validate_json(raw)
            if job.provider != provider or job.finished:
                continue
            # A job that never ran a step has no due time: its first message was due when it was recorded.
            due_at = float(due) if due else job.updated_at.timestamp()
            if now > due_at + grace_s:
                yield job
