"""The orphan sweeper: VMs that carry vmqueue's ownership label but belong to no live job.

Knows no Celery (the ``vmq.sweep`` task calls ``Sweeper.run``). Two passes: an orphan is reported
and remembered (Redis hash, first-seen time) on one pass, and destroyed only when a later pass,
at least ``delay_s`` after, still finds it orphaned; a VM that stopped being an orphan (a job
adopted it, it went away) is forgotten. Orphanhood is stable, so the delay is a safety margin
against surprises (clock skew, a record written late), not a race the sweeper must win: a live
job's record only moves towards final states, and a missing record never comes back.

Who owns a VM, from its ``vmqueue-job`` label:
- a create job that is queued, submitting or provisioning: live (it may not have recorded the
  instance id yet; it will adopt or destroy the VM);
- a running create job whose recorded instance is this VM: live (the user's VM);
- a failed create job whose cleanup is pending or destroying: live (the cleanup is under way);
  whose cleanup was skipped (``destroy_on_failure=False``): kept on purpose, not an orphan;
- a fleet entry naming the job: live (fleets keep their VMs beyond the job record's TTL).
Everything else is an orphan: no label, no record (expired after ``VMQ_JOB_TTL_S`` or never
written), a job of another kind, a job that recorded another instance, a failed create whose
cleanup failed or finished (yet the VM is still here), or one that failed before recording it.
A VM already terminating is left alone.

Each pass also sends again the task of every stalled job of the provider: one whose message the
broker lost (workers/rescue.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from vmqueue import keys
from vmqueue.jobstore import JobStore
from vmqueue.models import LABEL_JOB, CleanupState, Job, JobKind, JobState, VMInfo, VMStatus, job_id_of
from vmqueue.sweep import REPORT_TTL_S, Action, Orphan, SweepReport, SweepRequest
from workers.providers.base import Provider
from workers.providers.errors import ProviderError
from workers.rescue import stalled_jobs

log = logging.getLogger("vmqueue.sweeper")

IN_FLIGHT = (JobState.queued, JobState.submitting, JobState.provisioning)
DELETING = (VMStatus.terminating, VMStatus.terminated)
LOCK_S = 60  # one orphan pass per provider at a time; a sweep killed with its worker frees it after this


def owner_of(vm: VMInfo) -> str | None:
    """The job id a VM's ``vmqueue-job`` label names (a failover attempt's label carries a suffix)."""
    label = vm.labels.get(LABEL_JOB)
    return job_id_of(label) if label else None


def orphan_reason(vm: VMInfo, job: Job | None, fleet_jobs: set[str]) -> str | None:
    """Why no live job owns ``vm``; ``None`` when one does (or the VM is kept on purpose)."""
    job_id = owner_of(vm)
    if not job_id:
        return f"no {LABEL_JOB} label"
    if job_id in fleet_jobs:
        return None
    if job is None:
        return "its job record is gone (expired or never written)"
    if job.kind != JobKind.create:
        return f"labelled with a {job.kind} job"
    if job.instance_id is not None and job.instance_id != vm.instance_id:
        return f"its job recorded another VM ({job.instance_id})"
    if job.state in IN_FLIGHT or job.state == JobState.running:
        return None
    if job.cleanup in (CleanupState.pending, CleanupState.destroying, CleanupState.skipped):
        return None
    if job.cleanup is None:
        return f"its create failed ({job.error.code if job.error else 'unknown'}) before recording this VM"
    return f"its create failed and the cleanup {job.cleanup}"


class Sweeper:
    def __init__(
        self,
        store: JobStore,
        provider: Provider,
        calls: Callable[..., object],
        resend: Callable[[Job], None] | None = None,
        stalled_after_s: float = 0.0,
    ):
        self.store = store
        self.redis = store.redis
        self.provider = provider
        self.calls = calls  # ProviderCalls: the shared rate limit and quick retries
        self.resend = resend  # sends a stalled job's task again (workers/rescue.py); None: don't look
        self.stalled_after_s = stalled_after_s

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
        for job in stalled_jobs(self.store, request.provider, self.stalled_after_s):
            if not request.dry_run:
                self.resend(job)
            report.rescued.append(job.id)
            log.warning("job=%s provider=%s stalled %s job sent again", job.id, job.provider, job.state)

    def _pass(self, request: SweepRequest, report: SweepReport) -> None:
        vms = [vm for vm in self.calls(self.provider.list_owned_vms) if vm.status not in DELETING]
        report.listed = len(vms)
        jobs = self._jobs([owner_of(vm) for vm in vms])
        fleet_jobs = self._fleet_jobs()
        seen_key = keys.sweep_seen_key(request.provider)
        seen = {k: float(v) for k, v in self.redis.hgetall(seen_key).items()}
        now = time.time()
        orphan_ids = set()
        for vm in vms:
            job_id = owner_of(vm)
            reason = orphan_reason(vm, jobs.get(job_id), fleet_jobs)
            if reason is None:
                report.owned += 1
                continue
            orphan_ids.add(vm.instance_id)
            first = seen.get(vm.instance_id)
            orphan = Orphan(
                instance_id=vm.instance_id,
                name=vm.name,
                status=vm.status,
                job_id=job_id,
                reason=reason,
                action=Action.reported,
                first_seen=datetime.fromtimestamp(first, UTC) if first else None,
            )
            orphan.action = self._act(request, vm, first, now)
            report.orphans.append(orphan)
        forgotten = [i for i in seen if i not in orphan_ids]
        if forgotten and not request.dry_run:  # adopted, or gone: a later orphan starts its wait anew
            self.redis.hdel(seen_key, *forgotten)

    def _act(self, request: SweepRequest, vm: VMInfo, first: float | None, now: float) -> Action:
        seen_key = keys.sweep_seen_key(request.provider)
        if first is None:
            if not request.dry_run:
                self.redis.hset(seen_key, vm.instance_id, now)
            log.warning("provider=%s instance=%s orphan reported", request.provider, vm.instance_id)
            return Action.would_report if request.dry_run else Action.reported
        if now - first < request.delay_s:
            return Action.waiting
        if request.dry_run:
            return Action.would_destroy
        try:
            self.calls(self.provider.destroy_vm, vm.instance_id)
        except ProviderError as exc:
            log.error("provider=%s instance=%s orphan destroy failed: %s", request.provider, vm.instance_id, exc)
            return Action.destroy_failed
        self.redis.hdel(seen_key, vm.instance_id)
        log.warning("provider=%s instance=%s orphan destroyed", request.provider, vm.instance_id)
        return Action.destroyed

    def _jobs(self, job_ids: list[str | None]) -> dict[str, Job]:
        wanted = sorted({i for i in job_ids if i})
        raws = self.redis.mget([keys.job_key(i) for i in wanted]) if wanted else []
        return {i: Job.model_validate_json(raw) for i, raw in zip(wanted, raws, strict=True) if raw}

    def _fleet_jobs(self) -> set[str]:
        """Create jobs that fleets name (producer/fleetrun.py: entry -> {"job_id", "instance_id"})."""
        jobs: set[str] = set()
        for key in self.redis.scan_iter(match=f"{keys.FLEET_PREFIX}*", count=1000, _type="hash"):
            for raw in self.redis.hvals(key):
                try:
                    jobs.add(json.loads(raw)["job_id"])
                except (ValueError, KeyError, TypeError):
                    log.warning("fleet record %s holds an entry that is not {job_id, ...}: %.80r", key, raw)
        return jobs
