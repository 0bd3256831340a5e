"""Expiry: a running create's VM is destroyed by an ordinary destroy job once its ``expires_at`` passed.

Who checks: the tick supervisor thread every worker runs (workers/tasks.py), every couple of
seconds, for the providers the worker serves. Not the tick chain itself, which lives only while VMs
are being watched and stops once every create settled (a fleet of running VMs has none); not the
sweeper, which runs only when an operator schedules it and lists every VM at the provider (an API
call per pass, pointless for a question the job store answers). The supervisor runs as long as any
worker of the provider runs, and nothing can destroy a VM without one anyway.

What it reads: the sorted set ``vmq:idx:expires:<provider>`` the job store keeps (vmqueue/jobindex.py:
running creates with an ``expires_at`` whose destroy was not enqueued yet, scored by it), from its
low end up to now: a check costs one ZRANGEBYSCORE however many VMs exist.

Exactly one destroy job per expiry, whatever crashes or how many workers check at once:
1. the checker takes the create job's lease (another checker, or the job's own step, skips it);
2. claims the expiry by compare-and-set: ``expiry_job_id`` = ``<job id>-expiry``, only while the
   job is still due (``Provisioner.extend`` refuses once it is set, so an extend either moved the
   time before, or fails after), and records the destroy job under that id in the same MULTI/EXEC
   (``JobStore.update_adding``): whoever reads the claim finds the job it names (``vmq job``);
3. sends the destroy job's message;
4. marks ``expired_at``, which takes the job off the schedule. A checker that died between 2 and 4
   leaves the job on it, and the next check picks up at step 3 (a second message for one destroy
   job is harmless: the step's lease and due time drop it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vmqueue import jobindex
from vmqueue.jobindex import expires_key, expiry_due
from vmqueue.jobstore import JobStore
from vmqueue.models import Job, JobKind, utcnow
from vmqueue.settings import Settings

log = logging.getLogger("vmqueue.expiry")

BATCH = 100  # expired VMs handled per provider per check; the rest come at the next one
LEASE_S = 30.0


def destroy_id(job_id: str) -> str:
    """The id of the destroy job an expiry of create job ``job_id`` enqueues (one per job, ever)."""
    return f"{job_id}-expiry"


class Expiry:
    def __init__(self, store: JobStore, settings: Settings, publish: Callable[[Job], None]):
        self.store = store
        self.settings = settings
        self.publish = publish  # sends a job's first message (workers/tasks.py)

    def run(self, providers: list[str], now: float | None = None) -> list[str]:
        """Enqueue the destroy of every VM of ``providers`` whose expiry passed; their destroy job ids."""
        now = time.time() if now is None else now
        pipe = self.store.redis.pipeline(transaction=False)
        for provider in providers:
            pipe.zrangebyscore(expires_key(provider), "-inf", int(now * 1_000_000), start=0, num=BATCH)
        enqueued = []
        for job_id in (job_id for due in pipe.execute() for job_id in due):
            if (destroy := self._expire(job_id)) is not None:
                enqueued.append(destroy)
        return enqueued

    def _expire(self, job_id: str) -> str | None:
        lease = self.store.acquire(job_id, LEASE_S)
        if lease is None:
            return None  # another checker, or the job's own step: next time
        try:
            job = self.store.get(job_id)
            if job is None:
                jobindex.forget(self.store.redis, [job_id])
                return None
            if not self._claim(job):
                return None
            return self._enqueue(self.store.get(job_id))
        finally:
            self.store.release(job_id, lease)

    def _claim(self, job: Job) -> bool:
        """Step 2; False when the job is no longer due (extended, cancelled, destroyed meanwhile)."""
        claimed: list[bool] = []

        def claim(j: Job) -> Job | None:
            claimed.clear()
            if not expiry_due(j) or j.expires_at > utcnow():
                return None
            claimed.append(True)
            if j.expiry_job_id is not None:
                return None  # claimed (and recorded) by a checker that died before step 4
            j.expiry_job_id = destroy_id(j.id)
            j.record(f"expired at {j.expires_at:%Y-%m-%d %H:%M:%S} UTC: destroy job {j.expiry_job_id}")
            return self._destroy_job(j)

        self.store.update_adding(job.id, claim)
        return bool(claimed)

    def _destroy_job(self, job: Job) -> Job:
        """The destroy job of ``job``'s expiry, as step 2 records it (not runnable until published)."""
        destroy = Job(
            id=destroy_id(job.id),
            kind=JobKind.destroy,
            provider=job.provider,
            instance_id=job.instance_id,
            deadline_s=self.settings.deadline_s,
        )
        destroy.record(f"the VM of create job {job.id} expired at {job.expires_at:%Y-%m-%d %H:%M:%S} UTC")
        return destroy

    def _enqueue(self, job: Job) -> str:
        """Steps 3 and 4."""
        destroy = self.store.get(job.expiry_job_id)
        if destroy is None:  # a claim written before claims carried their record
            destroy = self.store.add(self._destroy_job(job))
        self.publish(destroy)
        self.store.update(job.id, lambda j: setattr(j, "expired_at", utcnow()))
        log.info(
            "job=%s provider=%s instance=%s expired: destroy job %s", job.id, job.provider, job.instance_id, destroy.id
        )
        return destroy.id
