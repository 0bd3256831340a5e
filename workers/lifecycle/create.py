"""Create steps: submit the create (once per placement) and read the VM until it runs."""

from __future__ import annotations

from vmqueue.models import CleanupState, Job, JobError, JobState, VMInfo, VMStatus, attempt_key, utcnow
from vmqueue.sshkeys import SSHPublicKey
from workers.calls import ProviderCalls
from workers.lifecycle.common import DEAD, Next, Steps, _set, log
from workers.providers.errors import CapacityError, NotFoundError, ProviderError


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
                return Next(delay)
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        try:
            # Every create parameter is fixed once and stored, so each retry sends the identical request.
            spec = job.prepared_spec or provider.prepare_spec(job.spec.at_placement(job.placement))
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count)
        job = self.store.transition(
            job.id,
            JobState.submitting,
            f"create attempt {job.attempts + 1} in {spec.region} ({spec.instance_type})",
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
        except CapacityError as exc:
            return self._fail_over(job, exc, calls.count)
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count)
        job = self.store.transition(
            job.id,
            JobState.provisioning,
            f"provider accepted the create: {vm.instance_id}",
            instance_id=vm.instance_id,
            vm=vm,
            api_calls=job.api_calls + calls.count,
        )
        if job.cancel_pending:  # asked while the create call was out: its VM is known now, and goes
            return self._cancelled(job)
        log.info("job=%s provider=%s instance=%s created; polling", job.id, job.provider, vm.instance_id)
        if self._batched(provider) and not self._watch(job):
            return self._watched(job)
        return Next(self.poll_delay(0))

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
            return self._call_failed(job, exc, calls.count)
        return self._observe_create(job, vm, calls.count)

    def _observe_create(self, job: Job, vm: VMInfo | None, count: int) -> Next | None:
        """Apply what a read found (``vm`` None: not found) to a provisioning job."""
        since_submit = (utcnow() - job.submitted_at).total_seconds()
        if vm is None and since_submit > self.settings.not_found_grace_s:
            # Past the consistency window a NotFound is real: the VM vanished.
            return self._fail(job, JobError(code="vm_vanished", message="the VM disappeared while booting"), count)
        polls = job.polls + 1
        if vm is not None and vm.status == VMStatus.running:
            job = self.store.transition(
                job.id,
                JobState.running,
                "running",
                vm=vm,
                polls=polls,
                api_calls=job.api_calls + count,
                running_at=utcnow(),
            )
            self._unwatch(job)
            if job.cancel_pending:  # asked while it booted
                return self._cancelled(job)
            # A running VM may live for years; its job record must outlive VMQ_JOB_TTL_S, or the
            # sweeper would take the VM for an orphan.
            self.store.create_ended(job.id, vm_lives=True)
            log.info(
                "job=%s provider=%s instance=%s running ip=%s", job.id, job.provider, vm.instance_id, vm.public_ipv4
            )
            return self._await_ready(job)  # ready_when ssh / cloud_init: on to the readiness schedule
        if vm is not None and vm.status in DEAD:
            error = JobError(code="vm_error", message=f"the VM ended in {vm.provider_status} instead of running")
            return self._fail(job, error, count, vm=vm)
        if since_submit > job.deadline_s:
            error = JobError(
                code="deadline_exceeded",
                message=f"not running after {job.deadline_s:.0f}s (last status {vm.status if vm else 'not found'})",
                retryable=True,
            )
            return self._fail(job, error, count, vm=vm)
        self.store.update(job.id, lambda j: _set(j, polls=polls, api_calls=j.api_calls + count, vm=vm or j.vm))
        return Next(self.poll_delay(polls))
