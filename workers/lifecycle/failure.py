"""Failure steps: retry later, fail over to the next placement, fail (and clean up), give up a cleanup."""

from __future__ import annotations

from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState
from workers.lifecycle.common import Next, Steps, _job_error, _set, log
from workers.providers.errors import CapacityError, ProviderError


class FailureSteps(Steps):
    """What a provider error or a dead VM does to a job."""

    def _fail_over(self, job: Job, exc: CapacityError, count: int) -> Next | None:
        """No capacity here: try the spec's next placement, or fail once every one said no.

        Adapters raise CapacityError only when the provider refused the VM, so no VM of this attempt
        exists; the next attempt gets a new idempotency token (``attempt_key``) and a fresh
        ``prepare_spec`` (an image id may differ per region).
        """
        placements = [job.spec.at_placement(i) for i in range(len(job.spec.fallbacks) + 1)]
        here = placements[job.placement]
        if job.placement + 1 >= len(placements):
            tried = ", ".join(f"{p.region} ({p.instance_type})" for p in placements)
            message = (
                f"{exc.message}; no capacity in any placement tried: {tried}" if len(placements) > 1 else exc.message
            )
            error = JobError(code=exc.code, message=message, provider_code=exc.provider_code)
            return self._fail(job, error, count)
        there = placements[job.placement + 1]
        message = (
            f"no capacity in {here.region} ({here.instance_type}): {exc.message}; "
            f"failing over to {there.region} ({there.instance_type})"
        )
        self._unwatch(job)
        self.store.transition(
            job.id,
            JobState.submitting,
            message,
            placement=job.placement + 1,
            prepared_spec=None,
            instance_id=None,
            vm=None,
            api_calls=job.api_calls + count,
        )
        log.warning("job=%s provider=%s %s", job.id, job.provider, message)
        return Next(0)

    def _call_failed(self, job: Job, exc: ProviderError, count: int) -> Next | None:
        """Layer 2: a retryable error retries the step later, honouring Retry-After; others fail."""
        error = _job_error(exc)
        if exc.retryable and job.attempts < self.settings.max_attempts:
            delay = exc.retry_after_s if exc.retry_after_s is not None else self.retry_delay(job.attempts)
            message = f"{error.code}: {error.message}; retry in {delay:.1f}s"
            self.store.update(job.id, lambda j: (_set(j, api_calls=j.api_calls + count), j.record(message)))
            log.warning("job=%s provider=%s %s", job.id, job.provider, message)
            return Next(delay)
        return self._fail(job, error, count)

    def _fail(self, job: Job, error: JobError, count: int, vm=None) -> Next | None:
        has_vm = job.instance_id is not None and job.kind == JobKind.create
        cleanup = None
        if has_vm:
            cleanup = CleanupState.pending if job.destroy_on_failure else CleanupState.skipped
        job = self.store.transition(
            job.id,
            JobState.failed,
            f"failed: {error.code}: {error.message}",
            error=error,
            cleanup=cleanup,
            api_calls=job.api_calls + count,
            vm=vm or job.vm,
        )
        # A VM kept on purpose (cleanup skipped) lives on like a running one.
        self.store.create_ended(job.id, vm_lives=cleanup == CleanupState.skipped)
        self._unwatch(job)
        log.error("job=%s provider=%s failed: %s: %s", job.id, job.provider, error.code, error.message)
        if cleanup == CleanupState.pending:
            return Next(0)
        return None

    def _cleanup_failed(self, job: Job, exc: ProviderError, count: int) -> Next | None:
        attempts = job.attempts + 1
        if exc.retryable and attempts <= self.settings.max_attempts:
            delay = exc.retry_after_s if exc.retry_after_s is not None else self.retry_delay(attempts)
            message = f"cleanup: {exc.code}: {exc}; retry in {delay:.1f}s"
            self.store.update(
                job.id, lambda j: (_set(j, attempts=attempts, api_calls=j.api_calls + count), j.record(message))
            )
            return Next(delay)
        message = f"cleanup failed: {exc.code}: {exc}; the sweeper will find the VM by its ownership labels"
        self.store.update(job.id, lambda j: (_set(j, cleanup=CleanupState.failed), j.record(message)))
        log.error("job=%s provider=%s instance=%s %s", job.id, job.provider, job.instance_id, message)
        return None
