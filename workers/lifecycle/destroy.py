"""Destroy steps: a destroy job, and the cleanup of a create that failed after its VM existed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState, Phase, VMInfo, utcnow
from workers.calls import ProviderCalls
from workers.lifecycle.common import GONE, Next, Steps, _set, log, phase_deadline
from workers.providers.errors import NotFoundError, ProviderError


class DestroySteps(Steps):
    """Send the delete (idempotent), then read until the provider says gone."""

    def _destroy(self, job: Job) -> Next | None:
        if job.state in (JobState.queued, JobState.destroying):
            if job.state == JobState.queued:
                job = self.store.transition(
                    job.id,
                    JobState.destroying,
                    "destroy requested",
                    change=lambda j: setattr(j.phases.destroy, "started_at", utcnow()),
                    attempts=1,
                )
            return self._drive_destroy(job, Phase.destroy, on_gone=self._gone)
        return None

    def _cleanup(self, job: Job) -> Next | None:
        if job.cleanup == CleanupState.pending:
            job = self.store.update(job.id, lambda j: _set(j, cleanup=CleanupState.destroying))
        return self._drive_destroy(job, Phase.cleanup, on_gone=self._cleaned)

    def _drive_destroy(self, job: Job, phase: Phase, on_gone: Callable[[Job], None]) -> Next | None:
        """Send the delete (again after a crash: it is idempotent), then poll until the provider says gone.

        Adapters answer a delete of an absent VM as done, and some providers (EC2) answer NotFound for
        a VM created moments ago. So a NotFound is believed only once the VM was seen by a read of
        this job, or the consistency window (``VMQ_NOT_FOUND_GRACE_S``) after its creation has passed;
        until then it is read again, and if it shows up the delete goes out again.
        """
        provider = self.providers(job.provider)
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        if utcnow() >= phase_deadline(job, phase, self.settings):
            what = job.vm.provider_status if job.vm else "not confirmed gone"
            error = JobError(code="deadline_exceeded", message=f"{phase}: still {what} at its deadline")
            return self._cleanup_failed(job, error, 0) if phase == Phase.cleanup else self._fail(job, error, 0)
        try:
            if job.delete_sent_at is None:
                calls(provider.destroy_vm, job.instance_id)
                self.store.update(
                    job.id, lambda j: _set(j, delete_sent_at=utcnow(), api_calls=j.api_calls + calls.count)
                )
                return Next(self.poll_delay(0))
            vm = calls(provider.get_vm, job.instance_id)
        except NotFoundError:
            vm = None
        except ProviderError as exc:
            return self._call_failed(job, exc, calls.count, phase)
        gone = vm is None or vm.status in GONE
        if gone and self._not_found_is_real(job, vm):
            job = self.store.update(job.id, lambda j: _set(j, polls=j.polls + 1, api_calls=j.api_calls + calls.count))
            on_gone(job)
            return None
        job = self.store.update(job.id, lambda j: self._note_read(j, vm, calls.count))
        return Next(self.poll_delay(job.polls))

    def _note_read(self, job: Job, vm: VMInfo | None, count: int) -> None:
        job.polls += 1
        job.api_calls += count
        if vm is None:  # not believed yet: read again once the window has passed
            if job.not_found_since is None:
                job.not_found_since = utcnow()
                job.record("the provider does not know the VM yet; reading again within the consistency window")
            return
        if job.kind == JobKind.destroy:
            job.vm = vm  # seen by a read of this job: a later NotFound is real
        if job.not_found_since is not None and vm.status not in GONE:
            # It was invisible when the delete went out, which may not have reached it: delete again.
            job.not_found_since = None
            job.delete_sent_at = None
            job.record(f"the VM showed up ({vm.provider_status}) after a NotFound; deleting it again")

    def _not_found_is_real(self, job: Job, vm: VMInfo | None) -> bool:
        if vm is not None:  # the provider itself says terminated
            return True
        if job.kind == JobKind.destroy and job.vm is not None:
            return True
        # A failed create cleaning up its own VM is that VM's creator (a ready_timeout: it ran).
        creator = job if job.kind == JobKind.create else self.store.creator_of(job.provider, job.instance_id)
        if creator is not None and creator.running_at is not None:
            # Its create saw it running in a read: reads know it, so not finding it now is real (a VM
            # destroyed right after it ran waited out the whole window: `vmq demo`'s destroys took 30 s).
            return True
        grace = timedelta(seconds=self.settings.not_found_grace_s)
        return utcnow() >= self._vm_born(job, creator) + grace

    def _vm_born(self, job: Job, creator: Job | None) -> datetime:
        """The latest the VM can have been created: its create's submit time when vmqueue made it,
        else the first NotFound this job saw (a VM of unknown age gets a full window)."""
        if job.kind == JobKind.create and job.submitted_at is not None:
            return job.submitted_at
        if creator is not None and creator.submitted_at is not None:
            return creator.submitted_at
        return job.not_found_since or utcnow()

    def _gone(self, job: Job) -> None:
        # The store tells the create job that made this VM (vm_destroyed_by); its record expires again.
        self.store.transition(job.id, JobState.gone, "the provider reports the VM deleted")
        log.info("job=%s provider=%s instance=%s gone", job.id, job.provider, job.instance_id)

    def _cleaned(self, job: Job) -> None:
        self.store.update(job.id, lambda j: (_set(j, cleanup=CleanupState.done), j.record("cleanup: VM destroyed")))
        log.info("job=%s provider=%s instance=%s destroyed after failure", job.id, job.provider, job.instance_id)
