"""Destroy steps: a destroy job, and the cleanup of a create that failed after its VM existed."""

from __future__ import annotations

from collections.abc import Callable

from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState, utcnow
from workers.calls import ProviderCalls
from workers.lifecycle.common import GONE, Next, Steps, _set, log
from workers.providers.errors import NotFoundError, ProviderError


class DestroySteps(Steps):
    """Send the delete (idempotent), then read until the provider says gone."""

    def _destroy(self, job: Job) -> Next | None:
        if job.state in (JobState.queued, JobState.destroying):
            if job.state == JobState.queued:
                job = self.store.transition(job.id, JobState.destroying, "destroy requested", attempts=1)
            return self._drive_destroy(job, on_gone=lambda j: self._gone(j))
        return None

    def _cleanup(self, job: Job) -> Next | None:
        if job.cleanup == CleanupState.pending:
            job = self.store.update(job.id, lambda j: _set(j, cleanup=CleanupState.destroying))
        return self._drive_destroy(job, on_gone=lambda j: self._cleaned(j))

    def _drive_destroy(self, job: Job, on_gone: Callable[[Job], None]) -> Next | None:
        """Send the delete (again after a crash: it is idempotent), then poll until the provider says gone."""
        provider = self.providers(job.provider)
        calls = ProviderCalls(job.provider, self.limit, self.settings)
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
            if job.kind == JobKind.create:
                return self._cleanup_failed(job, exc, calls.count)
            return self._call_failed(job, exc, calls.count)
        job = self.store.update(job.id, lambda j: _set(j, polls=j.polls + 1, api_calls=j.api_calls + calls.count))
        if vm is None or vm.status in GONE:
            on_gone(job)
            return None
        if (utcnow() - job.delete_sent_at).total_seconds() > job.deadline_s:
            error = JobError(
                code="deadline_exceeded", message=f"still {vm.provider_status} after {job.deadline_s:.0f}s"
            )
            if job.kind == JobKind.create:
                return self._cleanup_failed(job, ProviderError(error.message, provider_code=error.code), 0)
            return self._fail(job, error, 0, vm=vm)
        return Next(self.poll_delay(job.polls))

    def _gone(self, job: Job) -> None:
        self.store.transition(job.id, JobState.gone, "the provider reports the VM gone")
        log.info("job=%s provider=%s instance=%s gone", job.id, job.provider, job.instance_id)

    def _cleaned(self, job: Job) -> None:
        self.store.update(job.id, lambda j: (_set(j, cleanup=CleanupState.done), j.record("cleanup: VM destroyed")))
        log.info("job=%s provider=%s instance=%s destroyed after failure", job.id, job.provider, job.instance_id)
