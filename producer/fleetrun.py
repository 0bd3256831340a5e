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

Every change of an entry is a compare-and-set on the job id it replaces (one Lua call), and a
release of an idempotency key is a compare-and-delete: two applies at once never undo each other.

``destroy`` destroys every VM the record holds (also ones since removed from the file), then forgets
them and releases their idempotency keys, so the next apply creates them anew. An entry is
forgotten only when its VM is gone or provably never existed: a create still in flight is
cancelled (``Provisioner.cancel``, recorded in the job store): a queued one ends at once without
calling the provider, one past queued ends at its worker's next check, and a VM it made meanwhile
is destroyed by the create's own cleanup. The entry is forgotten once the create has ended and
its VM, if any, is gone, and shows as ``cancelled``. The entry stays while that is not settled, so
a destroy that times out leaves it for the next run to finish.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from producer.client import IdempotencyConflict, JobNotFound, Provisioner
from producer.control import CancelRefused
from producer.fleet import Fleet, FleetVM
from vmqueue import keys
from vmqueue.models import CleanupState, Job, JobKind, JobState, VMStatus, utcnow

POLL_S = 0.5

# Writes an entry only if it still names the job it replaces (ARGV[2]; "" = the entry is absent).
# Returns the entry as it now is, so a caller that lost the race sees who won.
_PUT = """
local current = redis.call('hget', KEYS[1], ARGV[1])
local job = ''
if current then job = cjson.decode(current)['job_id'] end
if job ~= ARGV[2] then return current or '' end
redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
return ARGV[3]
"""
# Forgets an entry and releases its idempotency key (KEYS[2]), each only if it still names the job.
_FORGET = """
local current = redis.call('hget', KEYS[1], ARGV[1])
if current and cjson.decode(current)['job_id'] == ARGV[2] then redis.call('hdel', KEYS[1], ARGV[1]) end
if redis.call('get', KEYS[2]) == ARGV[2] then redis.call('del', KEYS[2]) end
return 1
"""


class FleetConflict(RuntimeError):
    """Another apply replaced a fleet entry with a job other than the one this apply made."""


@dataclass
class Tracked:
    """One VM of the fleet and the job apply or destroy follows for it."""

    ident: str  # "<provider>/<name>"
    # created | existing | checked (read again: its create job expired) | cancelling (destroy: a create
    # in flight, cancelled) | cancelled (destroy: that create ended and its VM, if any, is gone) |
    # destroying | none
    action: str
    job_id: str | None = None
    job: Job | None = None
    note: str = ""
    create_id: str | None = None  # destroy: the create job the fleet entry names
    settled: bool = True  # destroy: False while a step is still to take for this entry
    cancel_sent: bool = False  # destroy: this run asked for the create's cancel (once a run: each ask republishes)

    @property
    def provider(self) -> str:
        return self.ident.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.ident.split("/", 1)[1]

    @property
    def finished(self) -> bool:
        return self.settled and (self.job_id is None or (self.job is not None and self.job.finished))

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
        self._put = self.redis.register_script(_PUT)
        self._forget_script = self.redis.register_script(_FORGET)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, fleet: Fleet) -> list[Tracked]:
        """Enqueue a create for every VM of the file that does not exist from an earlier apply.

        The creates go in one ``Provisioner.create_vms`` call (one MULTI/EXEC, one batched publish),
        each with its own idempotency key; then each entry is recorded by compare-and-set.
        """
        records = self._records()
        tracked: dict[str, Tracked] = {}
        to_create: list[tuple[FleetVM, str]] = []  # (VM, the job id its entry names now: "" if none)
        for vm in fleet.vms:
            done = self._existing(vm, records.get(vm.ident))
            if isinstance(done, Tracked):
                tracked[vm.ident] = done
            else:
                to_create.append((vm, done))
        if to_create:
            before = utcnow()
            for (vm, replaces), job in zip(to_create, self._create_all([vm for vm, _ in to_create]), strict=True):
                tracked[vm.ident] = self._recorded(vm, job, replaces, before)
        return [tracked[vm.ident] for vm in fleet.vms]

    def _existing(self, vm: FleetVM, record: dict | None) -> Tracked | str:
        """What an earlier apply left for ``vm``: a ``Tracked`` when nothing is to be created, else the
        job id its entry names ("": none) for the new create's compare-and-set."""
        if record is None:
            return ""
        job = self.store.get(record["job_id"])
        if job is None and record.get("instance_id"):
            read = self.provisioner.get_vm(vm.provider, record["instance_id"])
            return Tracked(vm.ident, "checked", read.id, read, "its create job expired; the VM was read again")
        if job is not None and not _replaceable(job):
            return Tracked(vm.ident, "existing", job.id, job, _drift(job, vm))
        # The earlier create left no VM: release its key (only if it is still its own: another
        # apply may have claimed it since), so the create is a new job. The entry stays until that
        # job replaces it.
        self.store.release_idempotency_key(self._idempotency_key(vm.ident), record["job_id"])
        return record["job_id"]

    def _create_all(self, vms: list[FleetVM]) -> list[Job]:
        """One job per VM, in order: one ``create_vms`` batch; if a key is held by another request
        (``IdempotencyConflict``: the batch stored nothing), each VM alone, adopting the holder's job."""
        try:
            return self.provisioner.create_vms(self._create_args(vm) for vm in vms)
        except IdempotencyConflict:
            return [self._create_one(vm) for vm in vms]

    def _create_args(self, vm: FleetVM) -> dict:
        return {
            "spec": vm.request.spec,
            "ssh_key": vm.request.ssh_key,
            "startup_script": vm.request.startup_script,
            "idempotency_key": self._idempotency_key(vm.ident),
            "deadline_s": vm.deadline_s,
            "ttl_s": vm.ttl_s,
            "expires_at": vm.expires_at,
            "ready_when": vm.request.ready_when,
            "ready_deadline_s": vm.request.ready_deadline_s,
            "destroy_on_failure": vm.destroy_on_failure,
            "ready_via": vm.request.ready_via,
            "ssh_port": vm.request.ssh_port,
        }

    def _create_one(self, vm: FleetVM) -> Job:
        args = self._create_args(vm)
        try:
            return self.provisioner.create_vm(**args)
        except IdempotencyConflict:
            # Another apply (or one that died before recording) holds the key: adopt its job.
            job = self.store.get(self.redis.get(keys.idempotency_key(args["idempotency_key"])) or "")
            if job is None:
                raise
            return job

    def _recorded(self, vm: FleetVM, job: Job, replaces: str, before: datetime) -> Tracked:
        now = self._record(vm.ident, job.id, replaces=replaces)
        if now is None or now["job_id"] != job.id:
            # Unreachable while the idempotency key binds the VM to one job; it expires after a day,
            # so say it plainly rather than track a second VM under one name.
            raise FleetConflict(
                f"{vm.ident}: another apply recorded job {now and now['job_id']} while this one made job {job.id}; "
                f"run 'vmq job {job.id}' and destroy the VM you do not want"
            )
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
    def destroy(self) -> list[Tracked]:
        """Take the first step for every VM the fleet record holds: a destroy for each VM whose create
        finished, a cancel for each create still in flight (``advance_destroy``)."""
        tracked = [
            Tracked(ident, "cancelling", record["job_id"], None, create_id=record["job_id"], settled=False)
            for ident, record in sorted(self._records().items())
        ]
        self.refresh(tracked)
        self.advance_destroy(tracked)
        return tracked

    def advance_destroy(self, tracked: list[Tracked]) -> None:
        """One step of ``destroy --fleet`` for every entry not settled (``follow`` calls it each round).

        A create not finished is cancelled (once per run; the job store keeps the request) and
        awaited: its worker ends it, and its cleanup destroys a VM it made. An entry is forgotten only
        when the create finished without a VM, or its VM is gone: destroyed by the create's cleanup,
        or by a destroy job sent here for a VM whose create finished (ran, or failed or was cancelled
        with a cleanup that did not destroy it).
        """
        records = self._records()
        for item in tracked:
            if item.settled:
                continue
            create = self.store.get(item.create_id or "")
            record = records.get(item.ident) or {}
            destroying = item.job if item.action == "destroying" else None
            if destroying is None and create is not None and not create.finished:
                create = self._cancel(item, create)
                if create is not None and not create.finished:
                    item.action, item.job_id, item.job = "cancelling", create.id, create
                    item.note = (
                        f"its create was cancelled; its cleanup destroys {create.instance_id}"
                        if create.instance_id
                        else "its create is in flight: cancelled, any VM it makes is destroyed by its cleanup"
                    )
                    continue
            instance_id = (create.instance_id if create else None) or record.get("instance_id")
            if destroying is not None and destroying.instance_id == instance_id:
                if destroying.state == JobState.failed:
                    item.settled = True  # the destroy's error is the row's; the entry stays
                elif destroying.state == JobState.gone:
                    if create is None or create.finished:
                        self._forget(item.ident, item.create_id or "")
                        item.settled = True
                    else:
                        item.note = "its VM is gone; waiting for its create job to end"
                continue
            cancelled = create is not None and create.state == JobState.cancelled
            if instance_id is None:
                self._forget(item.ident, item.create_id or "")
                item.settled = True
                if cancelled:
                    item.action, item.job_id, item.job = "cancelled", create.id, create
                    item.note = "its create was cancelled before it made a VM"
                    continue
                item.action, item.job_id, item.job = "none", None, None
                item.note = (
                    "its create ended without recording a VM"
                    if create
                    else "its create job expired without recording a VM"
                )
                continue
            if destroying is None and create and _cleaned_up(create):
                self._forget(item.ident, create.id)
                item.settled = True
                if cancelled:
                    item.action, item.job_id, item.job = "cancelled", create.id, create
                    item.note = f"its create was cancelled; its cleanup destroyed {instance_id}"
                    continue
                item.action, item.job_id, item.job = "none", None, None
                item.note = "no VM exists for it (its failed create's cleanup destroyed it)"
                continue
            # No idempotency key: destroy is safe to repeat, and a re-run must retry a failed destroy.
            gone = self.provisioner.destroy_vm(item.provider, instance_id)
            item.action, item.job_id, item.job = "destroying", gone.id, gone

    def _cancel(self, item: Tracked, create: Job) -> Job | None:
        """Ask once per run for the cancel of ``create`` (idempotent: the first request stands, a repeat
        only sends the job's step again); the create as it is now (None: its record expired)."""
        if item.cancel_sent:
            return create
        item.cancel_sent = True
        try:
            return self.provisioner.cancel(create.id, by="vmq destroy --fleet", reason=f"fleet {self.fleet} destroyed")
        except CancelRefused:
            return self.store.get(create.id)  # it ended meanwhile (or a destroy took its VM): read as it is
        except JobNotFound:
            return None

    # -- following --------------------------------------------------------------------------
    def follow(
        self,
        tracked: list[Tracked],
        timeout_s: float,
        on_update: Callable[[list[Tracked]], None] | None = None,
        step: Callable[[list[Tracked]], None] | None = None,
    ) -> bool:
        """Refresh every job (and take ``step``) until all are finished or ``timeout_s`` passed;
        True if all finished."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh(tracked)
            if step:
                step(tracked)
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
                self._record(item.ident, job.id, job.instance_id, replaces=job.id)

    # -- the fleet record -------------------------------------------------------------------
    def _idempotency_key(self, ident: str) -> str:
        return f"fleet:{self.fleet}:{ident}"

    def _records(self) -> dict[str, dict]:
        return {ident: json.loads(raw) for ident, raw in self.redis.hgetall(self.key).items()}

    def _record(self, ident: str, job_id: str, instance_id: str | None = None, *, replaces: str) -> dict | None:
        """Set the entry to ``job_id`` if it still names ``replaces`` ("": absent); the entry as it now is."""
        raw = json.dumps({"job_id": job_id, "instance_id": instance_id})
        now = self._put(keys=[self.key], args=[ident, replaces, raw])
        return json.loads(now) if now else None

    def _forget(self, ident: str, job_id: str) -> None:
        """Drop the entry and release its idempotency key, each only if it still names ``job_id``."""
        idem = keys.idempotency_key(self._idempotency_key(ident))
        self._forget_script(keys=[self.key, idem], args=[ident, job_id])


def _replaceable(job: Job) -> bool:
    """A failed create that left no VM behind: the fleet may create that VM again."""
    if job.kind != JobKind.create or job.state != JobState.failed:
        return False
    return job.instance_id is None or job.cleanup == CleanupState.done


def _cleaned_up(job: Job) -> bool:
    """A create that ended failed or cancelled and whose own cleanup destroyed its VM."""
    return job.state in (JobState.failed, JobState.cancelled) and job.cleanup == CleanupState.done


def _drift(job: Job, vm: FleetVM) -> str:
    if job.spec == vm.request.spec:  # the job keeps the spec as requested
        return ""
    return "the file changed since this VM was created; destroy --fleet and apply to re-create it"


def all_running(tracked: list[Tracked]) -> bool:
    """Every VM runs, and is ready where its ``ready_when`` asked for more than running."""
    return all(t.state == "running" if t.job is None or t.job.kind == JobKind.get else t.job.succeeded for t in tracked)


def all_gone(tracked: list[Tracked]) -> bool:
    """Every entry settled with no VM left: destroyed, cancelled (its VM, if any, destroyed) or none."""
    return all(t.action in ("none", "cancelled") or t.state == "gone" for t in tracked)
