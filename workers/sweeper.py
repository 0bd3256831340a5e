"""The orphan sweeper: VMs that carry vmqueue's ownership label but belong to no live job.

Knows no Celery (the ``vmq.sweep`` task calls ``Sweeper.run``). Two passes: an orphan is reported
and remembered (Redis hash, first-seen time) on one pass, and destroyed only when a later pass,
at least ``delay_s`` after, still finds it orphaned; a VM that stopped being an orphan (a job
adopted it, it went away) is forgotten. Orphanhood is stable, so the delay is a safety margin
against surprises (clock skew, a record written late), not a race the sweeper must win: a live
job's record only moves towards final states, and a missing record never comes back.

Who owns a VM, from its ``vmqueue-job`` label, judged first by the job's own record:
- a create job that is queued, submitting or provisioning: live (it may not have recorded the
  instance id yet; it will adopt or destroy the VM);
- a running create job whose recorded instance is this VM: live (the user's VM);
- a failed create job whose cleanup is pending or destroying: live (the cleanup is under way);
  whose cleanup was skipped (``destroy_on_failure=False``): kept on purpose, not an orphan;
- no record, but a fleet entry naming the job (and no other VM): live (fleets keep their VMs
  beyond the job record's TTL). A fleet entry never overrides what the job's record says: a fleet
  job whose create failed and whose cleanup failed is an orphan like any other.
Everything else is an orphan: no label, no record (expired after ``VMQ_JOB_TTL_S`` or never
written), a job of another kind, a job that recorded another instance, a failed create whose
cleanup failed or finished (yet the VM is still here), or one that failed before recording it.
A VM already terminating is left alone.

Resources an adapter creates beside a VM that can outlive it (``list_owned_extras``: Azure NICs,
public IPs and disks, EC2 volumes) carry the same labels and go through the same two passes and
guards. One in use (attached to a VM or a NIC) goes with what uses it and is never an orphan; one
attached to nothing is owned only while its create is in flight or its cleanup is under way.

What a pass refuses to do, because the sweeper is the last line of defence and must never destroy
what someone still owns:
- destroy anything when the job store's continuity is in doubt: its epoch marker
  (``vmq:epoch``, ``StoreEpoch``) is missing (the store was emptied, restarted without its data,
  or a replica without it took over), Redis evicted keys since the epoch began, or the epoch
  differs from the one the previous pass of the same periodic sweeper saw. Such a pass begins a
  new epoch, reports, and destroys nothing;
- destroy a VM on "its record is gone" alone when the VM is younger than the record TTL (the
  record cannot have expired, so the store lost it), was created before the current epoch began
  (its record may have gone with the old store), or its age is unknown;
- destroy more than ``max_destroy_share`` of the VMs it lists (rounded up); the rest are held for
  later passes, oldest orphan first.

Each pass also sends again the task of every stalled job of the provider: one whose message the
broker lost (workers/rescue.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial

import redis

from vmqueue import keys
from vmqueue.jobstore import InvalidTransition, JobStore
from vmqueue.models import LABEL_JOB, CleanupState, Job, JobError, JobKind, JobState, VMInfo, VMStatus, job_id_of
from vmqueue.sweep import REPORT_TTL_S, Action, Orphan, OwnedResource, StoreEpoch, SweepReport, SweepRequest
from workers.providers.base import Provider
from workers.providers.errors import ProviderError
from workers.rescue import stalled_jobs

log = logging.getLogger("vmqueue.sweeper")

IN_FLIGHT = (JobState.queued, JobState.submitting, JobState.provisioning)
DELETING = (VMStatus.terminating, VMStatus.terminated)
LOCK_S = 60  # one orphan pass per provider at a time; a sweep killed with its worker frees it after this
RECORD_GONE = "its job record is gone (expired or never written)"


def owner_of(vm: VMInfo) -> str | None:
    """The job id a VM's ``vmqueue-job`` label names (a failover attempt's label carries a suffix)."""
    label = vm.labels.get(LABEL_JOB)
    return job_id_of(label) if label else None


def orphan_reason(vm: VMInfo, job: Job | None, fleet_jobs: Mapping[str, str | None]) -> str | None:
    """Why no live job owns ``vm``; ``None`` when one does (or the VM is kept on purpose).

    ``fleet_jobs`` maps the create jobs fleets name to the instance id each entry recorded (None:
    not yet). A fleet entry counts only when the job's record is gone: the record, where it exists,
    is the better witness (a failed create whose cleanup failed is an orphan, fleet or not).
    """
    job_id = owner_of(vm)
    if not job_id:
        return f"no {LABEL_JOB} label"
    if job is None:
        if job_id in fleet_jobs:
            recorded = fleet_jobs[job_id]
            if recorded in (None, vm.instance_id):
                return None  # the fleet outlives the job record's TTL
            return f"its job record is gone and its fleet entry names another VM ({recorded})"
        return RECORD_GONE
    if job.kind != JobKind.create:
        return f"labelled with a {job.kind} job"
    if job.instance_id is not None and job.instance_id != vm.instance_id:
        return f"its job recorded another VM ({job.instance_id})"
    if job.state in IN_FLIGHT or job.state in (JobState.running, JobState.ready):
        return None
    if job.cleanup in (CleanupState.pending, CleanupState.destroying, CleanupState.skipped):
        return None
    if job.cleanup is None and job.state == JobState.cancelled:
        return "its create was cancelled before recording this VM"
    if job.cleanup is None:
        return f"its create failed ({job.error.code if job.error else 'unknown'}) before recording this VM"
    return f"its create failed and the cleanup {job.cleanup}"


def record_loss_guard(created: datetime | None, epoch: StoreEpoch, ttl_s: float, now: datetime) -> str | None:
    """Why "its record is gone" does not justify destroying what was created at ``created``; None
    when it does.

    A create writes its record before it makes the VM (and its extras), and the record expires
    ``ttl_s`` after that (never, once the VM runs). So a record legitimately gone belongs to a VM
    older than ``ttl_s``, created while the store has been continuous (after the current epoch began).
    """
    if created is None:
        return "its record is gone and the provider gives no creation time, so it may have been lost"
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    if created < epoch.born_at:
        return (
            f"created before the job store's current epoch began ({epoch.born_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{epoch.why}): its record may have been lost with the store"
        )
    age = now - created
    if age < timedelta(seconds=ttl_s):
        return (
            f"created {_span(age)} ago, less than the job record TTL ({_span(timedelta(seconds=ttl_s))}): "
            "the record cannot have expired, so the store lost it"
        )
    return None


def extra_orphan_reason(resource: OwnedResource, job: Job | None, fleet_jobs: Mapping[str, str | None]) -> str | None:
    """Why no live job owns an extra resource (a NIC, a public IP, a disk, a volume); None when one does.

    One in use (attached to a VM or a NIC) goes with what uses it, so it is never an orphan here. One
    attached to nothing is owned only while its create is in flight (it may be about to attach it)
    or its cleanup is under way; a fleet entry counts as for VMs, when the record is gone.
    """
    if resource.attached_to:
        return None
    job_id = _extra_owner(resource)
    if not job_id:
        return f"attached to nothing and no {LABEL_JOB} label"
    if job is None:
        return None if job_id in fleet_jobs else RECORD_GONE
    if job.state in IN_FLIGHT:
        return None
    if job.cleanup in (CleanupState.pending, CleanupState.destroying):
        return None
    return f"attached to nothing, and its {job.kind} job is {job.state}"


def _extra_owner(resource: OwnedResource) -> str | None:
    label = resource.labels.get(LABEL_JOB)
    return job_id_of(label) if label else None


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds} s"


class Sweeper:
    def __init__(
        self,
        store: JobStore,
        provider: Provider,
        calls: Callable[..., object],
        resend: Callable[[Job, int], None] | None = None,  # (job, the step number its message carries)
        stalled_after_s: float = 0.0,
    ):
        self.store = store
        self.redis = store.redis
        self.provider = provider
        self.calls = calls  # ProviderCalls: the shared rate limit and quick retries
        self.resend = resend  # sends a stalled job's task again (workers/rescue.py); None: don't look
        self.stalled_after_s = stalled_after_s
        self._seen: dict[str, float] = {}  # this pass: orphan id -> when a pass first reported it
        self._now = 0.0  # this pass's clock (epoch s)

    def run(self, request: SweepRequest) -> SweepReport:
        """One pass; the report is also stored in Redis for whoever asked."""
        report = SweepReport(id=request.id, provider=request.provider, dry_run=request.dry_run, delay_s=request.delay_s)
        # Stalled jobs first, and whatever the lock says: sending a task twice is harmless, and a
        # sweep killed with its worker must not hold the rescue up until its lock expires.
        self._rescue(request, report)
        lock = keys.sweep_lock_key(request.provider)
        if not request.dry_run and not self.redis.set(lock, request.id, nx=True, ex=LOCK_S):
            report.error = f"another sweep of {request.provider} is running (sweep {self.redis.get(lock)})"
        else:
            try:
                self._pass(request, report)
            except ProviderError as exc:
                report.error = f"listing the VMs failed: {exc.code}: {exc}"
            finally:
                if not request.dry_run and self.redis.get(lock) == request.id:
                    self.redis.delete(lock)
        self.redis.set(keys.sweep_report_key(request.id), report.model_dump_json(), ex=REPORT_TTL_S)
        return report

    def _rescue(self, request: SweepRequest, report: SweepReport) -> None:
        if self.resend is None:
            return
        for stalled in stalled_jobs(self.store, request.provider, self.stalled_after_s):
            job = stalled.job
            if stalled.never_enqueued:
                report.never_enqueued.append(job.id)
                if not request.dry_run:
                    self._fail_never_enqueued(job)
                continue
            if not request.dry_run:
                self.resend(job, stalled.seq)
            report.rescued.append(job.id)
            log.warning("job=%s provider=%s stalled %s job sent again", job.id, job.provider, job.state)

    def _fail_never_enqueued(self, job: Job) -> None:
        """A record whose message was never published: its caller was told the enqueue failed."""
        error = JobError(
            code="enqueue_failed", message="its message was never published (the enqueue failed)", retryable=True
        )
        try:
            self.store.transition(job.id, JobState.failed, f"failed: {error.message}", error=error)
        except InvalidTransition:  # a worker got to it after all
            return
        if job.idempotency_key:
            self.store.release_idempotency_key(job.idempotency_key, job.id)
        log.warning("job=%s provider=%s never enqueued: failed", job.id, job.provider)

    def _pass(self, request: SweepRequest, report: SweepReport) -> None:
        # The epoch before the lists: records lost after this read show up on the next pass.
        report.epoch, report.refused = self._epoch(request)
        if report.refused:
            log.error("provider=%s sweep %s destroys nothing: %s", request.provider, request.id, report.refused)
        vms = [vm for vm in self.calls(self.provider.list_owned_vms) if vm.status not in DELETING]
        extras: list[OwnedResource] = self.calls(self.provider.list_owned_extras)
        report.listed, report.extras_listed = len(vms), len(extras)
        # Rounded so 0.2 x 15 is 3, not the 4 that float noise would make of it.
        report.destroy_limit = math.ceil(round(request.max_destroy_share * (len(vms) + len(extras)), 6))
        jobs = self._jobs([owner_of(vm) for vm in vms] + [_extra_owner(r) for r in extras])
        fleet_jobs = self._fleet_jobs()
        self._seen = {k: float(v) for k, v in self.redis.hgetall(keys.sweep_seen_key(request.provider)).items()}
        self._now = time.time()
        found: list[tuple[Orphan, Callable[[], None], datetime | None]] = []
        for vm in vms:
            reason = orphan_reason(vm, jobs.get(owner_of(vm) or ""), fleet_jobs)
            if reason is None:
                report.owned += 1
                continue
            orphan = Orphan(
                instance_id=vm.instance_id,
                name=vm.name,
                status=vm.status,
                job_id=owner_of(vm),
                reason=reason,
                action=Action.reported,
            )
            found.append((orphan, partial(self.provider.destroy_vm, vm.instance_id), vm.created_at))
        for resource in extras:
            job_id = _extra_owner(resource)
            reason = extra_orphan_reason(resource, jobs.get(job_id or ""), fleet_jobs)
            if reason is None:
                continue
            orphan = Orphan(
                instance_id=resource.resource_id,
                kind=resource.kind,
                name=resource.name,
                status="unattached",
                job_id=job_id,
                reason=reason,
                action=Action.reported,
            )
            found.append((orphan, partial(self.provider.delete_extra, resource), resource.created_at))
        due = [item for item in (self._note(request, report, *entry) for entry in found) if item is not None]
        self._destroy_due(request, report, due)
        orphan_ids = {orphan.instance_id for orphan, _, _ in found}
        forgotten = [i for i in self._seen if i not in orphan_ids]
        if forgotten and not request.dry_run:  # adopted, or gone: a later orphan starts its wait anew
            self.redis.hdel(keys.sweep_seen_key(request.provider), *forgotten)

    def _note(
        self,
        request: SweepRequest,
        report: SweepReport,
        orphan: Orphan,
        destroy: Callable[[], None],
        created: datetime | None,
    ) -> tuple[float, Callable[[], None], Orphan] | None:
        """Report one orphan; remember it on its first pass; returns it when its delay has passed."""
        first = self._seen.get(orphan.instance_id)
        orphan.first_seen = datetime.fromtimestamp(first, UTC) if first else None
        if orphan.reason == RECORD_GONE:  # said on every pass, so a first report already tells
            now = datetime.fromtimestamp(self._now, UTC)
            orphan.kept_because = record_loss_guard(created, report.epoch, self.store.ttl_s, now)
        report.orphans.append(orphan)
        if first is None:
            if not request.dry_run:
                self.redis.hset(keys.sweep_seen_key(request.provider), orphan.instance_id, self._now)
            log.warning(
                "provider=%s %s=%s orphan reported: %s",
                request.provider,
                orphan.kind,
                orphan.instance_id,
                orphan.reason,
            )
            orphan.action = Action.would_report if request.dry_run else Action.reported
            return None
        if self._now - first < request.delay_s:
            orphan.action = Action.waiting
            return None
        return first, destroy, orphan

    def _destroy_due(
        self, request: SweepRequest, report: SweepReport, due: list[tuple[float, Callable[[], None], Orphan]]
    ) -> None:
        """Destroy the orphans past their delay, oldest report first, within the guards and the limit."""
        sent = 0
        for _first, destroy, orphan in sorted(due, key=lambda item: item[0]):
            if report.refused or orphan.kept_because:
                orphan.action = Action.kept
                orphan.kept_because = orphan.kept_because or f"this pass destroys nothing: {report.refused}"
                log.warning(
                    "provider=%s %s=%s orphan kept: %s",
                    request.provider, orphan.kind, orphan.instance_id, orphan.kept_because,
                )  # fmt: skip
                continue
            if sent >= (report.destroy_limit or 0):
                orphan.action = Action.held
                continue
            sent += 1
            orphan.action = Action.would_destroy if request.dry_run else self._destroy(request, orphan, destroy)

    def _destroy(self, request: SweepRequest, orphan: Orphan, destroy: Callable[[], None]) -> Action:
        try:
            self.calls(destroy)
        except ProviderError as exc:
            log.error(
                "provider=%s %s=%s orphan destroy failed: %s", request.provider, orphan.kind, orphan.instance_id, exc
            )
            return Action.destroy_failed
        self.redis.hdel(keys.sweep_seen_key(request.provider), orphan.instance_id)
        log.warning("provider=%s %s=%s orphan destroyed", request.provider, orphan.kind, orphan.instance_id)
        return Action.destroyed

    def _epoch(self, request: SweepRequest) -> tuple[StoreEpoch, str | None]:
        """The store's epoch, and why this pass must destroy nothing (None: the store is continuous).

        A missing marker, or keys evicted since it was written, begin a new epoch (not in a dry run).
        """
        evicted = self._evicted_keys()
        raw = self.redis.get(keys.EPOCH_KEY)
        if raw is None:
            epoch = StoreEpoch(evicted_keys=evicted, why="the epoch marker was missing")
            if not request.dry_run and not self.redis.set(keys.EPOCH_KEY, epoch.model_dump_json(), nx=True):
                epoch = StoreEpoch.model_validate_json(self.redis.get(keys.EPOCH_KEY) or epoch.model_dump_json())
            return epoch, (
                f"the job store's epoch marker ({keys.EPOCH_KEY}) was missing: the store was emptied, restarted "
                "without its data, or a replica without it took over, so job records may be lost; "
                "a new epoch begins now"
            )
        epoch = StoreEpoch.model_validate_json(raw)
        if evicted > epoch.evicted_keys:
            lost = evicted - epoch.evicted_keys
            epoch = StoreEpoch(evicted_keys=evicted, why=f"Redis evicted {lost} keys")
            if not request.dry_run:
                self.redis.set(keys.EPOCH_KEY, epoch.model_dump_json())
            return epoch, (
                f"Redis evicted {lost} keys since the epoch began (maxmemory; use noeviction for vmqueue): "
                "job records may be among them; a new epoch begins now"
            )
        if evicted < epoch.evicted_keys and not request.dry_run:
            # Redis restarted with its data (or CONFIG RESETSTAT): its counter starts again from 0.
            epoch.evicted_keys = evicted
            self.redis.set(keys.EPOCH_KEY, epoch.model_dump_json())
        if request.epoch is not None and request.epoch != epoch.id:
            return epoch, (
                f"the job store's epoch changed since the previous pass ({request.epoch[:12]} -> {epoch.id[:12]}): "
                "job records may have been lost in between"
            )
        return epoch, None

    def _evicted_keys(self) -> int:
        try:
            return int(self.redis.info("stats").get("evicted_keys", 0))
        except redis.ResponseError:  # a managed Redis that forbids INFO: evictions go unseen
            log.warning("INFO stats refused: keys evicted from the job store cannot be detected")
            return 0

    def _jobs(self, job_ids: list[str | None]) -> dict[str, Job]:
        wanted = sorted({i for i in job_ids if i})
        raws = self.redis.mget([keys.job_key(i) for i in wanted]) if wanted else []
        return {i: Job.model_validate_json(raw) for i, raw in zip(wanted, raws, strict=True) if raw}

    def _fleet_jobs(self) -> dict[str, str | None]:
        """Create jobs that fleets name, and the instance id each entry recorded
        (producer/fleetrun.py: entry -> {"job_id", "instance_id"})."""
        jobs: dict[str, str | None] = {}
        for key in self.redis.scan_iter(match=f"{keys.FLEET_PREFIX}*", count=1000, _type="hash"):
            for raw in self.redis.hvals(key):
                try:
                    entry = json.loads(raw)
                    jobs[entry["job_id"]] = entry.get("instance_id")
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("fleet record %s holds an entry that is not {job_id, ...}: %.80r", key, raw)
        return jobs
