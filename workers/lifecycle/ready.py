"""Ready steps: carry a running job on to ``ready`` (SSH answered, cloud-init phoned home) or fail it.

A job whose ``ready_when`` asks for more than ``running`` goes on the readiness schedule
(workers/readyqueue.py) when its VM runs; the scanner of some worker process (workers/readyscan.py)
probes it or waits for its phone-home, and calls back here to settle it. Settling takes the job's
lease like every step, so a scanner, the job's own chain and the tick never act on a job at once.
Probes cost no provider API call: the address is the one the running VM's read recorded.
"""

from __future__ import annotations

import functools
import time

from vmqueue.jobstore import TRANSITION_HOOKS, InvalidTransition
from vmqueue.models import Job, JobError, JobState, utcnow
from vmqueue.readiness import HostKey, ReadyVia, ReadyWhen, spend_token
from workers.lifecycle.common import Next, Steps, log
from workers.readyqueue import ReadyQueue, ReadyTarget


class ReadySteps(Steps):
    """From ``running`` to ``ready``: schedule, settle, expire."""

    @functools.cached_property
    def ready_queue(self) -> ReadyQueue:
        return ReadyQueue(self.store.redis)

    def _await_ready(self, job: Job) -> Next | None:
        """The job just became running (or a redelivered message found it so): schedule its readiness."""
        if not job.awaiting_ready:
            return None
        if job.ready_when == ReadyWhen.cloud_init and job.phoned_home_at is not None:
            self._become_ready(job, job.host_keys, "cloud-init phoned home before the VM was seen running")
            return None
        host = None
        if job.ready_when == ReadyWhen.ssh:
            vm = job.vm
            if job.ready_via == ReadyVia.private:
                host = vm.private_ipv4 if vm else None
            else:
                host = (vm.public_ipv4 or vm.public_ipv6) if vm else None
            if host is None:
                error = JobError(
                    code="no_address",
                    message=f"ready_when=ssh via the {job.ready_via} address, but the VM has none "
                    "(use ready_via=private from inside its network, or ready_when=cloud_init)",
                )
                return self._fail(job, error, 0)
        since = job.running_at.timestamp()
        target = ReadyTarget(
            job_id=job.id,
            provider=job.provider,
            mode=job.ready_when,
            host=host,
            port=job.probe_port,
            deadline=since + job.ready_deadline_s,
            since=since,
        )
        # SSH: probe now; cloud-init: nothing to do before the deadline unless the API wakes the job.
        self.ready_queue.add(target, time.time() if host else target.deadline)
        return None

    def ready_reached(self, answered: dict[str, list[HostKey]]) -> list[str]:
        """The scanner's probes of these jobs (job id -> the host keys read) succeeded: settle each
        ``ready``, then take them off the schedule in one round trip. Returns the jobs whose lease
        was busy (the scanner tries those again soon); the others are settled, were already, or
        (another delivery took the lease meanwhile) come back to a scanner when their entry's lease ends.

        Each job costs three round trips (its lease with its record, the compare-and-set, the
        release); the schedule's bookkeeping is shared by the batch.
        """
        busy, done = [], []
        for job_id, host_keys in answered.items():
            lease, job, _ = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
            if lease is None:
                busy.append(job_id)
                continue
            try:
                with self.store.fenced(job_id, lease, self.settings.step_lease_s):
                    if job is not None and job.awaiting_ready:
                        self._become_ready(job, host_keys, f"ssh answered on {job.ready_via} port {job.probe_port}")
                done.append(job_id)
            except InvalidTransition:  # LeaseLost included: another delivery acts on the job
                pass  # its entry stays: the scanner lets it go, and its lease brings it back if still needed
            finally:
                self.store.release(job_id, lease)
        self.ready_queue.remove(*done)
        return busy

    def ready_due(self, job_id: str, now: float, deadline: float) -> bool:
        """A claimed entry the scanner does not probe: settled elsewhere (the HTTP API), past its
        deadline, or (cloud-init) not yet. False when the job's lease is busy (retry soon)."""
        lease, job, due = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if lease is None:
            return False
        kick = None
        try:
            with self.store.fenced(job_id, lease, self.settings.step_lease_s):
                kick = self._ready_due(job_id, job, now, deadline)
        except InvalidTransition:  # LeaseLost included: another delivery acts on the job
            kick = None
        finally:
            seq = self._hand_back(job_id, lease, due, kick)
        if seq is not None and self.start_job is not None:
            self.start_job(job_id, kick.countdown_s, seq)  # the destroy-on-failure runs in the job's own chain
        return True

    def _ready_due(self, job_id: str, job: Job | None, now: float, deadline: float) -> Next | None:
        """``ready_due``'s decision, under the job's lease; a ``Next`` when the job's chain must go on."""
        if job is None or not job.awaiting_ready:
            if job is not None and job.state == JobState.ready:
                # Settled by the HTTP API: the transition hooks (metrics) run in the workers.
                for hook in TRANSITION_HOOKS:
                    hook(job)
            self.ready_queue.remove(job_id)
            return None
        if now >= deadline:
            kick = self._ready_expired(job)
            self.ready_queue.remove(job_id)
            return kick
        self.ready_queue.reschedule(job_id, deadline)
        return None

    def _ready_expired(self, job: Job) -> Next | None:
        what = {ReadyWhen.ssh: "ssh did not answer", ReadyWhen.cloud_init: "cloud-init did not phone home"}
        error = JobError(
            code="ready_timeout",
            message=f"running but not ready: {what[job.ready_when]} within {job.ready_deadline_s:.0f}s",
            retryable=True,
        )
        if job.ready_when == ReadyWhen.cloud_init:
            spend_token(self.store.redis, job.id)
        return self._fail(job, error, 0)

    def _become_ready(self, job: Job, host_keys: list[HostKey], message: str) -> None:
        job = self.store.transition(job.id, JobState.ready, f"ready: {message}", ready_at=utcnow(), host_keys=host_keys)
        if job.ready_when == ReadyWhen.cloud_init:  # only cloud_init has a token (producer/submit.py)
            spend_token(self.store.redis, job.id)
        waited = (job.ready_at - job.running_at).total_seconds() if job.running_at else 0.0
        log.info(
            "job=%s provider=%s instance=%s ready %.1fs after running", job.id, job.provider, job.instance_id, waited
        )
