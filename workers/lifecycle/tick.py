"""The tick: one chain per provider reads every watched VM at once and settles the jobs whose VM settled."""

from __future__ import annotations

import time

from vmqueue.models import Job, JobKind, VMInfo, VMStatus
from workers.calls import ProviderCalls
from workers.lifecycle.common import Next, log
from workers.lifecycle.settle import SettleSteps
from workers.providers.base import SETTLED_STATUSES, BatchReads, Provider
from workers.providers.errors import ProviderError


class TickSteps(SettleSteps):
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
        provider = self.providers(provider_name)
        vms = None  # deadlines still hold without a batched read: those past theirs are read one by one below
        yield_s = 0.0
        # A VM past its deadline is read anyway: in the batch, not alone (one request each in the windows
        # the wait leaves to creates).
        if not any(now > deadline for _, deadline in members.values()):
            yield_s = self.limit.read_yield_s(provider_name, getattr(provider, "budget_profile", None))
        if yield_s > 0:
            log.debug("provider=%s batched read waits %.1fs for the creates booked before it", provider_name, yield_s)
        else:
            try:
                vms = calls(provider.get_vms, sorted(members))
            except ProviderError as exc:
                log.warning("provider=%s batched read failed (%s: %s); next tick", provider_name, exc.code, exc)
        running: dict[str, tuple[str, VMInfo]] = {}  # job id -> (instance id, VM): settled all at once
        alone = []  # the others, job by job
        for instance_id, (job_id, deadline) in members.items():
            vm = vms.get(instance_id) if vms is not None else None
            if vm is not None and vm.status == VMStatus.running and job_id not in running:
                running[job_id] = (instance_id, vm)
            elif now > deadline or (vms is not None and (vm is None or vm.status in SETTLED_STATUSES)):
                alone.append((provider_name, instance_id, job_id, vm, vm is None or vm.status != VMStatus.running))
        if running:
            self._settle_running(provider_name, running)
        for args in alone:
            self._settle(*args)
        # VMs settling now: more of a fleet booted beside them are about to, so look again soon.
        next_s = self.tick_s(provider_name, len(members), settling=bool(running or alone))
        return Next(min(next_s, yield_s) if yield_s > 0 else next_s)

    def revive_ticks(self, providers: list[str]) -> None:
        """Start a tick chain for each of ``providers`` that has VMs watched but no live chain."""
        for provider_name in self.watch.providers_waiting(providers):
            if token := self.watch.claim_ticker(provider_name):
                log.warning("provider=%s no tick chain alive for watched VMs; starting one", provider_name)
                self.start_ticker(provider_name, token)

    def tick_s(self, provider_name: str, watched: int = 1, settling: bool = False) -> float:
        """The provider's tick interval for ``watched`` VMs, within its read budget (workers/budget.py);
        ``settling`` (the last tick settled some): sooner, as the budget allows (``Budget.tick_interval_s``)."""
        base = getattr(self.providers(provider_name), "budget_profile", None)
        return self.limit.tick_interval_s(provider_name, base, watched, settling)

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
