"""Apply and destroy a fleet: which VMs to create, which already exist, and following their jobs.

Idempotency of ``apply`` has two layers:

1. The fleet record, a Redis hash ``vmq:fleet:<fleet>`` with no TTL, maps each VM's identity
   (``<provider>/<name>``) to its create job and, once known, its instance id. Re-running apply
   reads it first and enqueues nothing for a VM whose create job is live, running, or failed with a
   VM still there; it creates again only where the previous create failed without leaving a VM.
   The record outlives the job records (7 days) and the idempotency keys (1 day): a VM whose job
   expired is read again with a ``get`` job instead of being created twice.
2. Each create carries the idempotency key ``fleet:<fleet>:<provider>/<name>``, so two applies
   racing each other, or an apply that died between enqueueing and recording, still make one job.

``destroy`` destroys every VM the record holds (also ones since removed from the file), then forgets
them and releases their idempotency keys, so the next apply creates them anew.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from producer.client import IdempotencyConflict, Provisioner
from producer.fleet import Fleet, FleetVM
from vmqueue import keys
from vmqueue.models import CleanupState, Job, JobKind, JobState, VMStatus, utcnow

POLL_S = 0.5


@dataclass
class Tracked:
    """One VM of the fleet and the job apply or destroy follows for it."""

    ident: str  # "<provider>/<name>"
    action: str  # created | existing | checked (read again: its create job expired) | destroying | none
    job_id: str | None = None
    job: Job | None = None
    note: str = ""

    @property
    def provider(self) -> str:
        return self.ident.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.ident.split("/", 1)[1]

    @property
    def finished(self) -> bool:
        return self.job_id is None or (self.job is not None and self.job.finished)

    @property
    def state(self) -> str:
        if self.job is None:
            return "forgotten" if self.job_id is None else "unknown"
        if self.job.kind == JobKind.get and self.job.state == JobState.done:
            return "running" if self.job.vm.status == VMStatus.running else str(self.job.vm.status)
        return str(self.job.state)

    def row(self) -> dict[str, str | None]:
        job, vm = self.job, self.job.vm if self.job else None
        error = f"{job.error.code}: {job.error.message}" if job and job.error else None
        return {
            "name": self.name,
            "provider": self.provider,
            "action": self.action,
            "job_id": self.job_id,
            "instance_id": (job.instance_id if job else None) or (vm.instance_id if vm else None),
            "public_ipv4": vm.public_ipv4 if vm else None,
            "public_ipv6": vm.public_ipv6 if vm else None,
            "private_ipv4": vm.private_ipv4 if vm else None,
            "state": self.state,
            "error": error,
            "note": self.note or None,
        }


class FleetRunner:
    def __init__(self, provisioner: Provisioner, fleet: str):
        self.provisioner = provisioner
        self.store = provisioner.store
        self.redis = provisioner.store.redis
        self.fleet = fleet
        self.key = keys.fleet_key(fleet)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, fleet: Fleet) -> list[Tracked]:
        """Enqueue a create for every VM of the file that does not exist from an earlier apply."""
        records = self._records()
        return [self._apply_one(vm, records.get(vm.ident)) for vm in fleet.vms]

    def _apply_one(self, vm: FleetVM, record: dict | None) -> Tracked:
        idem = self._idempotency_key(vm.ident)
        if record is not None:
            job = self.store.get(record["job_id"])
            if job is None and record.get("instance_id"):
                read = self.provisioner.get_vm(vm.provider, record["instance_id"])
                return Tracked(vm.ident, "checked", read.id, read, "its create job expired; the VM was read again")
            if job is not None and not _replaceable(job):
                return Tracked(vm.ident, "existing", job.id, job, _drift(job, vm))
            # The earlier create left no VM: forget it, so the create below is a new job.
            self.store.release_idempotency_key(idem, record["job_id"])
            self.redis.hdel(self.key, vm.ident)
        before = utcnow()
        try:
            job = self.provisioner.create_vm(
                vm.request.spec,
                vm.request.ssh_key,
                vm.request.startup_script,
                idempotency_key=idem,
                deadline_s=vm.deadline_s,
            )
        except IdempotencyConflict:
            # Another apply (or one that died before recording) holds the key: adopt its job.
            job = self.store.get(self.redis.get(keys.idempotency_key(idem)) or "")
            if job is None:
                raise
        self._record(vm.ident, job.id)
        return Tracked(vm.ident, "created" if job.created_at >= before else "existing", job.id, job)

    def settle_applied(self, tracked: list[Tracked]) -> None:
        """Forget the VMs that a read found gone: the next apply creates them anew."""
        records = self._records()
        for item in tracked:
            job = item.job
            if item.action == "checked" and job and job.error and job.error.code == "not_found":
                if item.ident in records:
                    self._forget(item.ident, records[item.ident]["job_id"])
                item.note = "the VM no longer exists; the next apply creates it"

    # -- destroy ----------------------------------------------------------------------------
    def destroy(self, timeout_s: float) -> list[Tracked]:
        """Enqueue a destroy for every VM the fleet record holds; creates still in flight are awaited
        (up to ``timeout_s``) until they report an instance id."""
        records = self._records()
        jobs = self._await_instance_ids({ident: r["job_id"] for ident, r in records.items()}, timeout_s)
        tracked = []
        for ident, record in sorted(records.items()):
            job = jobs.get(ident)
            instance_id = (job.instance_id if job else None) or record.get("instance_id")
            provider = ident.split("/", 1)[0]
            if instance_id is None or (job and job.state == JobState.failed and job.cleanup == CleanupState.done):
                self._forget(ident, record["job_id"])
                tracked.append(Tracked(ident, "none", None, None, "no VM exists for it"))
                continue
            # No idempotency key: destroy is safe to repeat, and a re-run must retry a failed destroy.
            gone = self.provisioner.destroy_vm(provider, instance_id)
            tracked.append(Tracked(ident, "destroying", gone.id, gone))
        return tracked

    def settle_destroyed(self, tracked: list[Tracked]) -> None:
        """Forget the VMs whose destroy finished ``gone``: the next apply creates them anew."""
        records = self._records()
        for item in tracked:
            if item.job and item.job.state == JobState.gone and item.ident in records:
                self._forget(item.ident, records[item.ident]["job_id"])

    # -- following --------------------------------------------------------------------------
    def follow(
        self, tracked: list[Tracked], timeout_s: float, on_update: Callable[[list[Tracked]], None] | None = None
    ) -> bool:
        """Refresh every job until all are finished or ``timeout_s`` passed; True if all finished."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh(tracked)
            if on_update:
                on_update(tracked)
            if all(t.finished for t in tracked):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def refresh(self, tracked: list[Tracked]) -> None:
        live = [t for t in tracked if t.job_id]
        if not live:
            return
        raws = self.redis.mget([keys.job_key(t.job_id) for t in live])
        records = self._records()
        for item, raw in zip(live, raws, strict=True):
            if raw is None:
                continue
            item.job = Job.model_validate_json(raw)
            record = records.get(item.ident)
            job = item.job
            if job.kind == JobKind.create and job.instance_id and record and not record.get("instance_id"):
                self._record(item.ident, job.id, job.instance_id)

    # -- the fleet record -------------------------------------------------------------------
    def _idempotency_key(self, ident: str) -> str:
        return f"fleet:{self.fleet}:{ident}"

    def _records(self) -> dict[str, dict]:
        return {ident: json.loads(raw) for ident, raw in self.redis.hgetall(self.key).items()}

    def _record(self, ident: str, job_id: str, instance_id: str | None = None) -> None:
        self.redis.hset(self.key, ident, json.dumps({"job_id": job_id, "instance_id": instance_id}))

    def _forget(self, ident: str, job_id: str) -> None:
        self.redis.hdel(self.key, ident)
        self.store.release_idempotency_key(self._idempotency_key(ident), job_id)

    def _await_instance_ids(self, job_ids: dict[str, str], timeout_s: float) -> dict[str, Job]:
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = {ident: job for ident, job_id in job_ids.items() if (job := self.store.get(job_id))}
            waiting = [j for j in jobs.values() if j.instance_id is None and not j.finished]
            if not waiting or time.monotonic() >= deadline:
                return jobs
            time.sleep(POLL_S)


def _replaceable(job: Job) -> bool:
    """A failed create that left no VM behind: the fleet may create that VM again."""
    if job.kind != JobKind.create or job.state != JobState.failed:
        return False
    return job.instance_id is None or job.cleanup == CleanupState.done


def _drift(job: Job, vm: FleetVM) -> str:
    if job.spec == vm.request.spec:  # the job keeps the spec as requested
        return ""
    return "the file changed since this VM was created; destroy --fleet and apply to re-create it"


def all_running(tracked: list[Tracked]) -> bool:
    return all(t.state == "running" for t in tracked)


def all_gone(tracked: list[Tracked]) -> bool:
    return all(t.action == "none" or t.state == "gone" for t in tracked)
