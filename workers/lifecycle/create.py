"""Create steps: submit the create (once per placement) and read the VM until it runs."""

from __future__ import annotations

from vmqueue.jobstore import LeaseLost
from vmqueue.models import (
    LABEL_JOB,
    CleanupState,
    Job,
    JobError,
    JobState,
    Phase,
    VMInfo,
    VMStatus,
    attempt_key,
    utcnow,
)
from vmqueue.sshkeys import SSHPublicKey
from workers.calls import ProviderCalls
from workers.lifecycle.common import DEAD, GONE, Next, Steps, log, log_running, running_fields
from workers.providers.errors import CapacityError, NotFoundError, ProviderError

# A create that waits for its slot in the provider's API budget says so once in its history (a backlog's
# last creates sat queued for minutes with nothing to say why).
WAITING_FOR_SLOT = "waiting for its create slot"
SLOT_NOTE_S = 5.0  # shorter waits go unsaid (the sim's burst of 500 leaves the rest under a second)


class CreateSteps(Steps):
    """Submit a create job's request and follow its VM to ``running``."""

    def _create(self, job: Job) -> Next | None:
        if job.cancel_pending:
            return self._cancelled(job)
        if job.state in (JobState.queued, JobState.submitting):
            return self._submit(job)
        if job.state == JobState.provisioning:
            return self._poll_create(job)
        if job.awaiting_ready:  # a re-sent message (rescue): the schedule entry may be lost with Redis
            return self._await_ready(job)
        if job.state in (JobState.failed, JobState.cancelled) and job.cleanup in (
            CleanupState.pending,
            CleanupState.destroying,
        ):
            return self._cleanup(job)
        return None

    def _submit(self, job: Job) -> Next | None:
        provider = self.providers(job.provider)
        # No create of this job was ever sent (still queued): it may skip the adapter's lookups, and
        # it waits for its slot in the provider's API budget as a countdown, holding no thread.
        first_attempt = job.state == JobState.queued
        if first_attempt:
            delay = self.limit.create_delay(job.provider, job.id, getattr(provider, "budget_profile", None))
            if delay > 0.05:
                if delay >= SLOT_NOTE_S and not any(e.message.startswith(WAITING_FOR_SLOT) for e in job.history):
                    message = f"{WAITING_FOR_SLOT} in {job.provider}'s API budget: {delay:.0f}s"
                    self.store.update(job.id, lambda j: j.record(message))
                return Next(delay)
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        # A create call of this placement went out before and its outcome is unknown (an error that
        # may have come after the provider acted, or a worker that died in the call): a VM may exist.
        ambiguous = job.state == JobState.submitting and job.prepared_spec is not None
        if utcnow() >= job.deadline_at:  # the deadline counts from enqueue: time in the queue is spent too
            if ambiguous and (adopted := self._adopt_lost_vm(job, calls)):
                return adopted
            error = JobError(
                code="deadline_exceeded",
                message=f"not running {job.deadline_s:.0f}s after enqueue (it waited in the queue)",
                retryable=True,
            )
            return self._fail(job, error, calls.count)
        try:
            # Every create parameter is fixed once and stored, so each retry sends the identical request.
            # prepare_spec may call the provider (an image lookup): the shared limit and retries apply.
            spec = job.prepared_spec or calls(provider.prepare_spec, job.spec.at_placement(job.placement))
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count, Phase.submit)
        job = self.store.transition(
            job.id,
            JobState.submitting,
            f"create attempt {job.attempts + 1} in {spec.region} ({spec.instance_type})",
            change=lambda j: setattr(j.phases.submit, "started_at", j.phases.submit.started_at or utcnow()),
            attempts=job.attempts + 1,
            submitted_at=job.submitted_at or utcnow(),
            prepared_spec=spec,
        )
        if job.cancel_pending:  # asked while this step prepared: the create is never sent
            return self._cancelled(job, calls.count)
        try:
            vm = calls(
                provider.create_vm,
                spec,
                SSHPublicKey.parse(job.ssh_key),
                self.store.script(job.id),
                job_id=attempt_key(job.id, job.placement),
                first_attempt=first_attempt,
            )
        except ProviderError as exc:
            # Before failing over or failing after an ambiguous outcome (an earlier attempt, or this
            # retryable error), look for the VM that attempt may have made.
            if (ambiguous or exc.retryable) and self._gives_up(job, exc, Phase.submit):
                if adopted := self._adopt_lost_vm(job, calls):
                    return adopted
            if isinstance(exc, CapacityError):
                return self._fail_over(job, exc, calls.count)
            return self._call_failed(job, exc, calls.count, Phase.submit)
        try:
            return self._accepted(job, vm, calls.count, f"provider accepted the create: {vm.instance_id}")
        except LeaseLost:
            self._drop_stale_vm(job, vm, calls)
            raise

    def _drop_stale_vm(self, job: Job, vm: VMInfo, calls: ProviderCalls) -> None:
        """This step lost its lease while its create call was out, and the call made a VM. If the job
        moved on without it (failed, cancelled, or failed over to another placement), nobody will ever
        record this VM: destroy it now rather than leave it to the orphan sweeper. If the job is still
        at this placement, its next create call gets this VM back by its token: leave it."""
        now = self.store.get(job.id)
        if now is not None and now.placement == job.placement and not now.finished:
            return
        if now is not None and now.instance_id == vm.instance_id:
            return
        log.warning(
            "job=%s provider=%s instance=%s made by a stale step: destroyed", job.id, job.provider, vm.instance_id
        )
        try:
            calls(self.providers(job.provider).destroy_vm, vm.instance_id)
        except ProviderError as exc:  # the sweeper finds it by its ownership labels
            log.warning("job=%s instance=%s stale VM destroy failed: %s", job.id, vm.instance_id, exc)

    def _accepted(self, job: Job, vm: VMInfo, count: int, message: str) -> Next:
        job = self.store.transition(
            job.id, JobState.provisioning, message, instance_id=vm.instance_id, vm=vm, api_calls=job.api_calls + count
        )
        if job.cancel_pending:  # asked while the create call was out: its VM is known now, and goes
            return self._cancelled(job)
        log.info("job=%s provider=%s instance=%s created; polling", job.id, job.provider, vm.instance_id)
        if self._batched(self.providers(job.provider)) and not self._watch(job):
            return self._watched(job)
        return Next(self.poll_delay(0))

    def _adopt_lost_vm(self, job: Job, calls: ProviderCalls) -> Next | None:
        """Find a VM carrying this attempt's label (a create whose answer was lost); adopt it if found."""
        label = attempt_key(job.id, job.placement)
        try:
            owned = calls(self.providers(job.provider).list_owned_vms)
        except ProviderError as exc:  # cannot tell: the sweeper finds a VM of a failed job by its label
            log.warning("job=%s provider=%s looking for a lost VM failed: %s", job.id, job.provider, exc)
            return None
        vm = next((v for v in owned if v.labels.get(LABEL_JOB) == label and v.status not in GONE), None)
        if vm is None:
            return None
        log.warning("job=%s provider=%s instance=%s adopted after a lost answer", job.id, job.provider, vm.instance_id)
        return self._accepted(
            job, vm, calls.count, f"found the VM of an earlier attempt by its label: {vm.instance_id}"
        )

    def _poll_create(self, job: Job) -> Next | None:
        provider = self.providers(job.provider)
        # Watched again each time: a restarted Redis may have lost the entry.
        if self._batched(provider) and not self._watch(job):
            return self._watched(job)
        return self._read_create(job)

    def _read_create(self, job: Job) -> Next | None:
        """One targeted read of a provisioning job's VM, applied to the job."""
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        try:
            vm = calls(self.providers(job.provider).get_vm, job.instance_id)
        except NotFoundError:
            vm = None
        except CapacityError as exc:  # a create that failed after it was accepted (GCP, Azure, Hetzner, DigitalOcean)
            return self._fail_over(job, exc, calls.count)
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count, Phase.poll)
        return self._observe_create(job, vm, calls.count)

    def _observe_create(self, job: Job, vm: VMInfo | None, count: int) -> Next | None:
        """Apply what a read found (``vm`` None: not found) to a provisioning job."""
        since_submit = (utcnow() - job.submitted_at).total_seconds()
        if job.vm_destroyed_by is not None and (vm is None or vm.status != VMStatus.running):
            # Not vanished, nor in error: a destroy job took it on purpose (deleting, or gone).
            message = f"its VM was destroyed by destroy job {job.vm_destroyed_by} before it was seen running"
            return self._fail(job, JobError(code="vm_destroyed", message=message), count)
        if vm is None and since_submit > self.settings.not_found_grace_s:
            # Past the consistency window a NotFound is real: the VM vanished.
            return self._fail(job, JobError(code="vm_vanished", message="the VM disappeared while booting"), count)
        polls = job.polls + 1
        if vm is not None and vm.status == VMStatus.running:
            job = self.store.transition(job.id, JobState.running, "running", **running_fields(job, vm, count))
            self._unwatch(job)
            if job.cancel_pending:  # asked while it booted
                return self._cancelled(job)
            # A running VM may live for years; its job record must outlive VMQ_JOB_TTL_S, or the
            # sweeper would take the VM for an orphan.
            self.store.create_ended(job.id, vm_lives=True)
            log_running(job)
            return self._await_ready(job)  # ready_when ssh / cloud_init: on to the readiness schedule
        if vm is not None and vm.status in DEAD:
            error = JobError(code="vm_error", message=f"the VM ended in {vm.provider_status} instead of running")
            return self._fail(job, error, count, vm=vm)
        if utcnow() >= job.deadline_at:
            error = JobError(
                code="deadline_exceeded",
                message=f"not running {job.deadline_s:.0f}s after enqueue "
                f"(last status {vm.status if vm else 'not found'})",
                retryable=True,
            )
            return self._fail(job, error, count, vm=vm)

        def note(j: Job) -> None:
            j.polls, j.api_calls, j.vm = polls, j.api_calls + count, vm or j.vm

        self.store.update(job.id, note)
        return Next(self.poll_delay(polls))
