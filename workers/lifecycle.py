"""The job lifecycle, as named steps the tasks call: submit, poll, finish, clean up.

Knows no provider (it calls the ``Provider`` protocol) and no Celery (a step returns ``Next`` and
the task turns that into a countdown retry, which holds no worker slot while it waits). Every step
is safe to run twice: the job store's compare-and-set, a per-job lease and the adapters'
idempotency make a redelivered or duplicated message harmless.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from producer.jobstore import InvalidTransition, JobStore
from producer.models import CleanupState, Job, JobError, JobKind, JobState, VMInfo, VMStatus, attempt_key, utcnow
from producer.settings import Settings, tick_interval_s
from producer.sshkeys import SSHPublicKey
from workers.backoff import exponential_backoff, full_jitter_backoff
from workers.calls import ProviderCalls, SharedRateLimit
from workers.providers.base import SETTLED_STATUSES, BatchReads, Provider
from workers.providers.errors import CapacityError, NotFoundError, ProviderError
from workers.watchlist import WatchList

log = logging.getLogger("vmqueue.worker")

# A message may fire this much before the step it was scheduled for is due (clock and ETA slack).
EARLY_TOLERANCE_S = 0.5
GONE = (VMStatus.terminated,)
DEAD = (VMStatus.error, VMStatus.terminated, VMStatus.terminating)


@dataclass(frozen=True)
class Next:
    """Run the same task again for this job after ``countdown_s``.

    ``message=False``: send nothing; the tick chain carries the job until then (its deadline), and
    ``countdown_s`` only tells when the job's next step is due (for duplicate and stall checks).
    """

    countdown_s: float
    message: bool = True


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        providers: Callable[[str], Provider],
        limit: SharedRateLimit,
        start_ticker: Callable[[str, str], None] | None = None,
        start_job: Callable[[str, float], None] | None = None,
    ):
        self.store = store
        # Starts the batch-read chain of a provider (provider, lease token); None: every job reads alone.
        self.start_ticker = start_ticker
        # Sends a create job's step again (job id, countdown): a watched job the tick settled into
        # something that needs its own chain (a cleanup, a failover).
        self.start_job = start_job
        self.watch = WatchList(store.redis, self.tick_s)
        self.settings = settings
        self.providers = providers  # name -> Provider: the lazy registry's get_provider
        self.limit = limit
        self.poll_delay = exponential_backoff(settings.poll_initial_s, settings.poll_max_s, settings.poll_factor)
        self.retry_delay = full_jitter_backoff(settings.retry_base_s, settings.retry_max_s)

    # -- entry points, one per task ---------------------------------------------------------
    def run(self, job_id: str, kind: JobKind) -> Next | None:
        """One step of a job; ``None`` when the job needs no further step from this chain."""
        token, job, due = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if token is None:  # another delivery of this job is acting now; look again later
            return Next(min(self.settings.poll_initial_s, 5.0))
        outcome = None
        try:
            if job is None:
                log.warning("job=%s dropped: no such job in the store (expired or never enqueued)", job_id)
                return None
            if job.kind != kind:
                log.warning("job=%s dropped: a %s message for a %s job", job_id, kind, job.kind)
                return None
            if due and time.time() < due - EARLY_TOLERANCE_S:
                log.info(
                    "job=%s provider=%s duplicate message dropped; the job's own chain goes on", job.id, job.provider
                )
                return None
            outcome = getattr(self, f"_{kind}")(job)
            return outcome
        except InvalidTransition as exc:
            log.info("job=%s: %s; another delivery finished this step", job_id, exc)
            return None
        finally:
            self.store.release(job_id, token, outcome.countdown_s if outcome else None)

    # -- create -----------------------------------------------------------------------------
    def _create(self, job: Job) -> Next | None:
        if job.state in (JobState.queued, JobState.submitting):
            return self._submit(job)
        if job.state == JobState.provisioning:
            return self._poll_create(job)
        if job.state == JobState.failed and job.cleanup in (CleanupState.pending, CleanupState.destroying):
            return self._cleanup(job)
        return None

    def _submit(self, job: Job) -> Next | None:
        provider = self.providers(job.provider)
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
        try:
            vm = calls(
                provider.create_vm,
                spec,
                SSHPublicKey.parse(job.ssh_key),
                self.store.script(job.id),
                job_id=attempt_key(job.id, job.placement),
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
        except CapacityError as exc:  # an asynchronous create failure: no VM came to be (GCP)
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
                job.id, JobState.running, "running", vm=vm, polls=polls, api_calls=job.api_calls + count
            )
            self._unwatch(job)
            # A running VM may live for years; its job record must outlive VMQ_JOB_TTL_S, or the
            # sweeper would take the VM for an orphan.
            self.store.create_ended(job.id, vm_lives=True)
            log.info(
                "job=%s provider=%s instance=%s running ip=%s", job.id, job.provider, vm.instance_id, vm.public_ipv4
            )
            return None
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

    # -- coalesced reads: one tick chain per provider ----------------------------------------
    def tick(self, provider_name: str, token: str) -> Next | None:
        """Read every watched VM of a provider at once; settle the jobs whose VM settled or whose deadline passed."""
        if not self.watch.renew(provider_name, token):
            return None  # a stale chain (its lease ran out and another took over)
        members = self.watch.members(provider_name)
        if not members:
            self.watch.release(provider_name, token)
            return None
        calls = ProviderCalls(provider_name, self.limit, self.settings)
        now = time.time()
        try:
            vms = calls(self.providers(provider_name).get_vms, sorted(members))
        except ProviderError as exc:
            log.warning("provider=%s batched read failed (%s: %s); next tick", provider_name, exc.code, exc)
            vms = None  # deadlines still hold: those past theirs are read one by one below
        settle = []
        for instance_id, (job_id, deadline) in members.items():
            vm = vms.get(instance_id) if vms is not None else None
            if now > deadline or (vms is not None and (vm is None or vm.status in SETTLED_STATUSES)):
                settle.append((provider_name, instance_id, job_id, vm, vm is None or vm.status != VMStatus.running))
        for args in settle:
            self._settle(*args)
        return Next(self.tick_s(provider_name))

    def revive_ticks(self, providers: list[str]) -> None:
        """Start a tick chain for each of ``providers`` that has VMs watched but no live chain."""
        for provider_name in self.watch.providers_waiting(providers):
            if token := self.watch.claim_ticker(provider_name):
                log.warning("provider=%s no tick chain alive for watched VMs; starting one", provider_name)
                self.start_ticker(provider_name, token)

    def _settle(self, provider_name: str, instance_id: str, job_id: str, vm: VMInfo | None, reread: bool) -> None:
        lease, job, _ = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if lease is None:
            return  # the job's own chain is acting on it now
        kick = None
        try:
            if job is None or job.state != JobState.provisioning or job.instance_id != instance_id:
                self.watch.remove(provider_name, instance_id)
                return
            # Absent, dead or overdue in the batch: one targeted read says why (a GCP insert that failed
            # for capacity raises CapacityError there, and the job fails over instead of failing).
            outcome = self._read_create(job) if reread else self._observe_create(job, vm, 0)
            if outcome is not None and self.store.get(job_id).state != JobState.provisioning:
                kick = outcome  # a cleanup or a failover: the job needs its own chain again
        except InvalidTransition:
            pass
        finally:
            self.store.release(job_id, lease, 0.0 if kick else None)
        if kick is not None and self.start_job is not None:
            self.start_job(job_id, kick.countdown_s)

    @functools.cache  # noqa: B019 - one runner per process, a handful of providers
    def tick_s(self, provider_name: str) -> float:
        return tick_interval_s(self.settings, provider_name)

    def _batched(self, provider: Provider) -> bool:
        return self.start_ticker is not None and isinstance(provider, BatchReads)

    def _watch(self, job: Job) -> bool:
        """Put the job's VM on the watch list; True when no tick chain was alive (the caller reads this once)."""
        deadline = job.submitted_at.timestamp() + job.deadline_s
        if self.watch.add(job.provider, job.instance_id, job.id, deadline):
            return False
        token = self.watch.claim_ticker(job.provider)
        if token:
            self.start_ticker(job.provider, token)
        return True

    def _watched(self, job: Job) -> Next:
        """The tick chain carries this job to its deadline: no message of its own until then."""
        remaining = job.submitted_at.timestamp() + job.deadline_s - time.time()
        return Next(max(remaining, 0.0) + self.tick_s(job.provider), message=False)

    def _unwatch(self, job: Job) -> None:
        if job.kind == JobKind.create and job.instance_id:
            self.watch.remove(job.provider, job.instance_id)

    # -- destroy (a destroy job, or the cleanup of a failed create) -------------------------
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

    # -- get --------------------------------------------------------------------------------
    def _get(self, job: Job) -> Next | None:
        if job.state != JobState.queued:
            return None
        calls = ProviderCalls(job.provider, self.limit, self.settings)
        try:
            vm = calls(self.providers(job.provider).get_vm, job.instance_id)
        except ProviderError as exc:
            job = self.store.update(job.id, lambda j: _set(j, attempts=j.attempts + 1))
            return self._call_failed(job, exc, calls.count)
        self.store.transition(
            job.id, JobState.done, f"status {vm.status}", vm=vm, api_calls=job.api_calls + calls.count
        )
        return None

    # -- failure ----------------------------------------------------------------------------
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


def _set(job: Job, **fields: object) -> None:
    for name, value in fields.items():
        setattr(job, name, value)


def _job_error(exc: ProviderError) -> JobError:
    return JobError(code=exc.code, message=exc.message, retryable=exc.retryable, provider_code=exc.provider_code)
