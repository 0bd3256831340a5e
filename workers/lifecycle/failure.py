"""Failure steps: retry later, fail over to the next placement, fail (and clean up), give up a cleanup."""

from __future__ import annotations

from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState, Phase, VMInfo, utcnow
from vmqueue.settings import max_countdown_s
from workers.lifecycle.common import Next, Steps, _job_error, _set, log, phase_deadline
from workers.providers.errors import OWN_THROTTLE, CapacityError, ProviderError, RateLimitedError


class FailureSteps(Steps):
    """What a provider error or a dead VM does to a job."""

    def _fail_over(self, job: Job, exc: CapacityError, count: int) -> Next | None:
        """No capacity here: try the spec's next placement, or fail once every one said no.

        Adapters raise CapacityError only when the provider refused the VM, so no VM of this attempt
        exists (the submit step first looks for one after an ambiguous outcome); the next attempt gets
        a new idempotency token (``attempt_key``) and a fresh ``prepare_spec`` (an image id may differ
        per region).
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

    def _gives_up(self, job: Job, exc: ProviderError, phase: Phase) -> bool:
        """Whether this error ends ``phase``: not retryable, its attempts spent, or its deadline passed."""
        if not exc.retryable:
            return True
        failures = job.phases.of(phase).failures + _attempt(exc)
        return failures >= self.settings.max_attempts or utcnow() >= phase_deadline(job, phase, self.settings)

    def _call_failed(self, job: Job, exc: ProviderError, count: int, phase: Phase) -> Next | None:
        """Layer 2: a retryable error retries the phase later, within its attempts and its deadline.

        The wait is the provider's hint (Retry-After, a rate-limit reset) when it gave one, else a
        backoff whose floor grows with the phase's failures; either is capped by what is left of the
        phase's deadline and stays far below the visibility timeout. What ends the phase: a
        non-retryable error (its own code), the attempts spent (the last error's code, "after N
        attempts"), or the deadline (``deadline_exceeded``, naming the last error).
        """
        error = _job_error(exc)
        failures = job.phases.of(phase).failures + _attempt(exc)
        left_s = (phase_deadline(job, phase, self.settings) - utcnow()).total_seconds()
        if exc.retryable and failures < self.settings.max_attempts and left_s > 0:
            wanted = exc.retry_after_s if exc.retry_after_s is not None else self.retry_delay(max(failures - 1, 0))
            delay = min(wanted, left_s, max_countdown_s(self.settings))
            again = f"retry {failures}" if _attempt(exc) else "no attempt spent (nothing was sent), again"
            message = f"{phase}: {error.code}: {error.message}; {again} in {delay:.1f}s"

            def note(j: Job) -> None:
                j.phases.of(phase).failures = failures
                j.api_calls += count
                j.record(message)

            self.store.update(job.id, note)
            log.warning("job=%s provider=%s %s", job.id, job.provider, message)
            return Next(delay)
        if exc.retryable and left_s <= 0:
            error = JobError(
                code="deadline_exceeded",
                message=f"{phase} not done by its deadline; last error {error.code}: {error.message}",
                retryable=True,
                provider_code=exc.provider_code,
            )
        elif exc.retryable:
            error = error.model_copy(update={"message": f"{error.message} (gave up after {failures} {phase} attempts)"})
        if phase == Phase.cleanup:
            return self._cleanup_failed(job, error, count)
        return self._fail(job, error, count)

    def _fail(self, job: Job, error: JobError, count: int, vm: VMInfo | None = None) -> Next | None:
        """Fail the job; whether a cleanup follows is decided from the record being written (which
        may know a VM this step's snapshot did not), never from the snapshot."""

        def change(j: Job) -> None:
            # A VM a destroy job already took needs no cleanup (a second DELETE), as for a cancel.
            has_vm = j.instance_id is not None and j.kind == JobKind.create and j.vm_destroyed_by is None
            j.cleanup = (CleanupState.pending if j.destroy_on_failure else CleanupState.skipped) if has_vm else None
            if j.cleanup == CleanupState.pending:
                j.phases.cleanup.started_at = utcnow()
            j.error = error
            j.api_calls += count
            j.vm = vm or j.vm

        job = self.store.transition(job.id, JobState.failed, f"failed: {error.code}: {error.message}", change=change)
        # A VM kept on purpose (cleanup skipped) lives on like a running one.
        self.store.create_ended(job.id, vm_lives=job.cleanup == CleanupState.skipped)
        self._unwatch(job)
        log.error("job=%s provider=%s failed: %s: %s", job.id, job.provider, error.code, error.message)
        if job.cleanup == CleanupState.pending:
            return Next(0)
        return None

    def _cleanup_failed(self, job: Job, error: JobError, count: int) -> None:
        message = f"cleanup failed: {error.code}: {error.message}; the sweeper will find the VM by its ownership labels"
        self.store.update(
            job.id, lambda j: (_set(j, cleanup=CleanupState.failed, api_calls=j.api_calls + count), j.record(message))
        )
        log.error("job=%s provider=%s instance=%s %s", job.id, job.provider, job.instance_id, message)
        return None


def _attempt(exc: ProviderError) -> int:
    """What an error costs of a phase's attempts: one, or none when vmqueue's own budget held the request
    back (nothing was sent; a destroy behind a backlog of creates that fill DigitalOcean's windows met
    it at every retry and failed after ``max_attempts``). The phase's deadline still bounds the wait."""
    return 0 if isinstance(exc, RateLimitedError) and exc.provider_code == OWN_THROTTLE else 1
