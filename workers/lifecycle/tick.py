"""The tick: one chain per provider reads every watched VM at once and settles the jobs whose VM settled."""

from __future__ import annotations

import time

from vmqueue.jobstore import InvalidTransition
from vmqueue.models import Job, JobKind, JobState, VMInfo, VMStatus
from workers.calls import ProviderCalls
from workers.lifecycle.common import Next, Steps, log
from workers.providers.base import SETTLED_STATUSES, BatchReads, Provider
from workers.providers.errors import ProviderError


class TickSteps(Steps):
    """Coalesced status reads: the watch list and the provider's tick chain."""

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
        return Next(self.tick_s(provider_name, len(members)))

    def revive_ticks(self, providers: list[str]) -> None:
        """Start a tick chain for each of ``providers`` that has VMs watched but no live chain."""
        for provider_name in self.watch.providers_waiting(providers):
            if token := self.watch.claim_ticker(provider_name):
                log.warning("provider=%s no tick chain alive for watched VMs; starting one", provider_name)
                self.start_ticker(provider_name, token)

    def _settle(self, provider_name: str, instance_id: str, job_id: str, vm: VMInfo | None, reread: bool) -> None:
        lease, job, due = self.store.acquire_and_get(job_id, self.settings.step_lease_s)
        if lease is None:
            return  # the job's own chain is acting on it now
        kick = None
        try:
            with self.store.fenced(job_id, lease, self.settings.step_lease_s):
                if job is None or job.state != JobState.provisioning or job.instance_id != instance_id:
                    self.watch.remove(provider_name, instance_id)
                    return
                # Absent, dead or overdue in the batch: one targeted read says why (a GCP insert that
                # failed for capacity raises CapacityError there, and the job fails over instead of failing).
                outcome = self._read_create(job) if reread else self._observe_create(job, vm, 0)
                if outcome is not None and self.store.get(job_id).state != JobState.provisioning:
                    kick = outcome  # a cleanup or a failover: the job needs its own chain again
        except InvalidTransition:  # LeaseLost included: this tick outlived the job's lease
            kick = None
        finally:
            seq = self._hand_back(job_id, lease, due, kick)
        if seq is not None and self.start_job is not None:
            self.start_job(job_id, kick.countdown_s, seq)

    def tick_s(self, provider_name: str, watched: int = 1) -> float:
        """The provider's tick interval for ``watched`` VMs, within its read budget (workers/budget.py)."""
        base = getattr(self.providers(provider_name), "budget_profile", None)
        return self.limit.tick_interval_s(provider_name, base, watched)

    def _batched(self, provider: Provider) -> bool:
        return self.start_ticker is not None and isinstance(provider, BatchReads)

    def _watch(self, job: Job) -> bool:
        """Put the job's VM on the watch list; True when no tick chain was alive (the caller reads this once)."""
        deadline = job.deadline_at.timestamp()
        if self.watch.add(job.provider, job.instance_id, job.id, deadline):
            return False
        token = self.watch.claim_ticker(job.provider)
        if token:
            self.start_ticker(job.provider, token)
        return True

    def _watched(self, job: Job) -> Next:
        """The tick chain carries this job to its deadline: no message of its own until then."""
        remaining = job.deadline_at.timestamp() - time.time()
        return Next(max(remaining, 0.0) + self.tick_s(job.provider), message=False)

    def _unwatch(self, job: Job) -> None:
        if job.kind == JobKind.create and job.instance_id:
            self.watch.remove(job.provider, job.instance_id)
