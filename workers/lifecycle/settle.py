"""Settling what the tick saw: each job whose watched VM settled or whose deadline passed.

The common case, a provisioning job whose VM the batched read saw running, is settled for the whole
batch at once (``_settle_running``): its leases, compare-and-sets, unwatch, create ends and releases
cost a round trip each for all the jobs together (vmqueue/jobbatch.py), where job by job they cost
six round trips per job on the tick's one thread. Everything else goes job by job (``_settle``): a VM
absent, dead or overdue in the batch is read again alone, and a job with a cancel pending, or whose
record changed under the batch, takes the ordinary step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from vmqueue.jobbatch import Held, JobBatch
from vmqueue.jobstore import InvalidTransition, transition_change
from vmqueue.models import Job, JobState, VMInfo
from workers.lifecycle.common import Next, Steps, log_running, running_fields


class SettleSteps(Steps):
    """Settle the jobs of a tick: the VMs seen running all at once, the others one by one."""

    @functools.cached_property
    def batch(self) -> JobBatch:
        return JobBatch(self.store)

    def _settle(self, provider_name: str, instance_id: str, job_id: str, vm: VMInfo | None, reread: bool) -> None:
        """Settle one job under its own lease; a job whose lease is busy is left for the next tick."""
        lease, job, due = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if lease is None:
            return  # the job's own chain is acting on it now
        held = Held(job_id, lease, None, job, due)
        self._act_held(held, lambda: self._decide(provider_name, instance_id, job, vm, reread), keep=True)

    def _decide(
        self, provider_name: str, instance_id: str, job: Job | None, vm: VMInfo | None, reread: bool
    ) -> Next | None:
        """What settling one job does, under its lease."""
        if job is None or job.state != JobState.provisioning or job.instance_id != instance_id:
            self.watch.remove(provider_name, instance_id)
            return None
        # Absent, dead or overdue in the batch: one targeted read says why (a GCP insert that
        # failed for capacity raises CapacityError there, and the job fails over instead of failing).
        return self._read_create(job) if reread else self._observe_create(job, vm, 0)

    def _act_held(self, held: Held, act: Callable[[], Next | None], keep: bool, seen: str | None = None) -> None:
        """Run ``act`` with every write to the job fenced by its lease (``keep``: renew the lease
        meanwhile; ``seen``: the record as read, else this thread's last ``acquire_and_get``), then
        give the lease back, handing the job to its own chain if it needs one (a cleanup, a failover)."""
        kick = None
        try:
            lease_s = self.settings.step_lease_s if keep else None
            with self.store.fenced(held.job_id, held.token, lease_s, seen=seen):
                outcome = act()
                if outcome is not None and self.store.get(held.job_id).state != JobState.provisioning:
                    kick = outcome  # a cleanup or a failover: the job needs its own chain again
        except InvalidTransition:  # LeaseLost included: this tick outlived the job's lease
            kick = None
        finally:
            seq = self._hand_back(held.job_id, held.token, held.due, kick)
        if seq is not None and self.start_job is not None:
            self.start_job(held.job_id, kick.countdown_s, seq)

    def _settle_running(self, provider_name: str, seen: dict[str, tuple[str, VMInfo]]) -> None:
        """Settle the jobs whose VM the batched read saw running (job id -> (instance id, the VM)).

        A few round trips for all: the leases with the records; the ``running`` compare-and-sets, each
        fenced by its job's lease; the unwatch; the create ends; the releases. Per job as ever: the
        transition hooks once, the history line, the log line, and readiness (``_await_ready``) for
        a ``ready_when`` that asks for more. A job whose lease is busy is left for the next tick; one
        no longer provisioning this VM leaves the watch list; one with a cancel pending, or whose
        record changed since the batch read it, takes the ordinary step under the lease it holds.
        """
        lease_s = self.settings.step_lease_s
        held = self.batch.acquire(seen, lease_s)
        release = dict(held)  # those still to be given back together at the end
        with self.batch.kept(held.values(), lease_s):
            try:
                self._settle_held_running(provider_name, seen, held, release)
            finally:
                self.batch.release(release.values())

    def _settle_held_running(
        self, provider_name: str, seen: dict[str, tuple[str, VMInfo]], held: dict[str, Held], release: dict[str, Held]
    ) -> None:
        """``_settle_running`` once the leases are held; a job handed back on its own leaves ``release``."""
        lease_s = self.settings.step_lease_s
        changes, alone, unwatch = {}, [], []
        for job_id, h in held.items():
            instance_id, vm = seen[job_id]
            job = h.job
            if job is None or job.state != JobState.provisioning or job.instance_id != instance_id:
                unwatch.append(instance_id)
            elif job.cancel_pending:  # running, then cancelled and cleaned up: the ordinary step
                alone.append(job_id)
            else:
                changes[job_id] = (h, transition_change(JobState.running, "running", running_fields(job, vm, 0)))
        writes = self.batch.update(changes, lease_s)
        self.store.notify_all(writes.written.values())
        self.watch.remove(provider_name, *unwatch, *(job.instance_id for job in writes.written.values()))
        self.batch.create_ended(writes.written, vm_lives=True)
        for job in writes.written.values():
            log_running(job)
            if job.awaiting_ready:  # ready_when ssh / cloud_init: on to the readiness schedule
                h = release.pop(job.id)
                self._act_held(h, functools.partial(self._await_ready, job), keep=False, seen=writes.raws[job.id])
        for job_id in [*alone, *writes.stale]:
            instance_id, vm = seen[job_id]
            h = release.pop(job_id)
            decide = functools.partial(self._decide, provider_name, instance_id, h.job, vm, False)
            self._act_held(h, decide, keep=False, seen=h.raw)
