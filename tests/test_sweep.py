"""The orphan sweeper: who owns a VM (unit), and two passes through the CLI and a real sim worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from bench.probes import wait_for
from producer.cli import app
from vmqueue import keys
from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState, VMInfo, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import StoreEpoch
from workers.sweeper import orphan_reason, owner_of, record_loss_guard

runner = CliRunner()
SPEC = {"provider": "sim", "region": "sim-1", "instance_type": "small", "image": "ubuntu-24.04"}


def _vm(job_id: str | None = "j1", instance_id: str = "sim-1") -> VMInfo:
    labels = {"managed-by": "vmqueue", **({"vmqueue-job": job_id} if job_id else {})}
    return VMInfo(provider="sim", instance_id=instance_id, status=VMStatus.running, labels=labels)


def _job(state: JobState, kind: JobKind = JobKind.create, instance_id: str | None = "sim-1", **fields) -> Job:
    return Job(id="j1", kind=kind, provider="sim", state=state, instance_id=instance_id, **fields)


@pytest.mark.parametrize(
    ("job", "orphan"),
    [
        (_job(JobState.queued, instance_id=None), None),
        (_job(JobState.submitting, instance_id=None), None),  # the create may not have recorded it yet
        (_job(JobState.provisioning), None),
        (_job(JobState.running), None),
        (_job(JobState.failed, cleanup=CleanupState.pending), None),
        (_job(JobState.failed, cleanup=CleanupState.destroying), None),
        (_job(JobState.failed, cleanup=CleanupState.skipped), None),  # destroy_on_failure=False: kept on purpose
        (_job(JobState.failed, cleanup=CleanupState.failed), "the cleanup failed"),
        (_job(JobState.failed, cleanup=CleanupState.done), "the cleanup done"),
        (_job(JobState.failed, instance_id=None, error=JobError(code="auth", message="x")), "failed (auth) before"),
        (_job(JobState.running, instance_id="sim-2"), "recorded another VM (sim-2)"),
        (_job(JobState.gone, kind=JobKind.destroy), "labelled with a destroy job"),
        (None, "job record is gone"),
    ],
)
def test_who_owns_a_vm(job, orphan):
    reason = orphan_reason(_vm(), job, fleet_jobs={})
    assert reason is None if orphan is None else orphan in reason
    # A fleet naming the job changes nothing while the job's record exists: the record decides.
    fleet_reason = orphan_reason(_vm(), job, fleet_jobs={"j1": "sim-1"})
    assert fleet_reason == reason if job is not None else fleet_reason is None


def test_a_vm_without_job_label_is_an_orphan_and_a_fleet_keeps_its_vm():
    assert "no vmqueue-job label" in orphan_reason(_vm(job_id=None), None, {})
    assert orphan_reason(_vm(), None, fleet_jobs={"j1": None}) is None  # the fleet outlives the job record's TTL
    assert orphan_reason(_vm(), None, fleet_jobs={"j1": "sim-1"}) is None
    assert "fleet entry names another VM (sim-7)" in orphan_reason(_vm(), None, fleet_jobs={"j1": "sim-7"})


def test_a_fleet_vm_whose_create_failed_and_whose_cleanup_failed_is_an_orphan():
    # Issue 13 (2): the job says "the sweeper will find it"; the fleet entry must not hide it.
    failed = _job(JobState.failed, cleanup=CleanupState.failed, error=JobError(code="timeout", message="x"))
    assert orphan_reason(_vm(), failed, fleet_jobs={"j1": "sim-1"}) == "its create failed and the cleanup failed"
    before = _job(JobState.failed, instance_id=None, error=JobError(code="auth", message="x"))
    assert "before recording" in orphan_reason(_vm(), before, fleet_jobs={"j1": None})


def test_a_record_gone_justifies_a_destroy_only_for_an_old_vm_of_a_continuous_store():
    now = datetime(2025, 6, 1, tzinfo=UTC)
    epoch = StoreEpoch(born_at=now - timedelta(days=30), why="first pass")
    week = 7 * 24 * 3600

    def aged(days: float | None) -> VMInfo:
        return _vm().model_copy(update={"created_at": None if days is None else now - timedelta(days=days)})

    assert record_loss_guard(aged(8).created_at, epoch, week, now) is None  # its record expired: an orphan
    assert "less than the job record TTL (7.0 d)" in record_loss_guard(aged(2).created_at, epoch, week, now)
    assert "before the job store's current epoch began" in record_loss_guard(aged(40).created_at, epoch, week, now)
    assert "no creation time" in record_loss_guard(aged(None).created_at, epoch, week, now)
    naive = aged(8).model_copy(update={"created_at": (now - timedelta(days=8)).replace(tzinfo=None)})
    assert record_loss_guard(naive.created_at, epoch, week, now) is None


def test_a_failed_over_vm_belongs_to_its_job():
    # A capacity failover's attempt labels its VM "<job id>-p<n>": still the job's own VM.
    vm = _vm(job_id="j1-p2")
    assert owner_of(vm) == "j1"
    assert orphan_reason(vm, _job(JobState.running), fleet_jobs={}) is None
    assert orphan_reason(vm, None, fleet_jobs={"j1": None}) is None


def _sweep(*args: str) -> dict:
    result = runner.invoke(app, ["sweep", "-p", "sim", "--json", "--timeout", "30", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _actions(report: dict) -> dict[str, str]:
    return {o["instance_id"]: o["action"] for o in report["orphans"]}


@pytest.mark.system
def test_sweep_reports_first_and_destroys_on_a_later_pass(cli_env, sim_worker, provisioner, redis_client, sim, ssh_key):
    from workers.providers.sim import SimProvider

    cloud = SimProvider(redis_client)
    live = provisioner.wait(provisioner.create_vm({**SPEC, "name": "live"}, ssh_key).id, timeout_s=30)
    expired = provisioner.wait(provisioner.create_vm({**SPEC, "name": "expired"}, ssh_key).id, timeout_s=30)
    # Its record expired: the store has been continuous for 30 days, the VM was made 8 days ago and
    # its record (a failed create's, say) is gone. Nobody tracks the VM any more.
    _old_store(redis_client, days=30)
    _age(redis_client, expired.instance_id, days=8)
    redis_client.delete(keys.job_key(expired.id))
    # A create that failed and whose cleanup failed too, and one whose cleanup was turned off.
    broken = _stored_job(provisioner, cloud, ssh_key, "broken", state=JobState.failed, cleanup=CleanupState.failed)
    kept = _stored_job(provisioner, cloud, ssh_key, "kept", state=JobState.failed, cleanup=CleanupState.skipped)
    # A create still submitting: the VM exists, the job has not recorded its id yet.
    pending = _stored_job(provisioner, cloud, ssh_key, "pending", state=JobState.submitting, record_instance=False)
    orphans = {expired.instance_id, broken}

    first = _sweep("--delay", "1", "--max-destroy-share", "1")
    assert first["listed"] == 5 and first["owned"] == 3 and first["refused"] is None
    assert _actions(first) == dict.fromkeys(orphans, "reported")
    assert {o["reason"] for o in first["orphans"]} == {
        "its job record is gone (expired or never written)",
        "its create failed and the cleanup failed",
    }
    assert len(sim.existing_vms()) == 5  # a first pass destroys nothing

    assert _actions(_sweep("--delay", "60")) == dict.fromkeys(orphans, "waiting")
    time.sleep(1.1)  # the delay of the next passes has passed since the first report
    assert _actions(_sweep("--delay", "1", "--dry-run", "--max-destroy-share", "1")) == dict.fromkeys(
        orphans, "would_destroy"
    )
    assert len(sim.existing_vms()) == 5  # a dry run changes nothing

    assert _actions(_sweep("--delay", "1", "--max-destroy-share", "1")) == dict.fromkeys(orphans, "destroyed")
    # The sim deletes asynchronously, like a cloud: the deleted VMs leave within its destroy time.
    wait_for(lambda: len(sim.existing_vms()) == 3, timeout_s=10, what="the orphans are deleted")
    assert {vm["instance_id"] for vm in sim.existing_vms()} == {live.instance_id, kept, pending}
    assert redis_client.hgetall(keys.sweep_seen_key("sim")) == {}
    assert _sweep("--delay", "1")["orphans"] == []


def _old_store(redis_client, days: float) -> None:
    """The job store has been continuous for ``days``: its epoch marker was written that long ago."""
    born = datetime.now(UTC) - timedelta(days=days)
    redis_client.set(keys.EPOCH_KEY, StoreEpoch(born_at=born, why="the test's store").model_dump_json())


def _age(redis_client, instance_id: str, days: float) -> None:
    """The simulated cloud says this VM was created ``days`` ago."""
    created_ms = int((time.time() - days * 86400) * 1000)
    redis_client.hset(f"{keys.SIM_PREFIX}vm:{instance_id}", "created_ms", created_ms)


def _stored_job(provisioner, cloud, ssh_key: str, name: str, record_instance: bool = True, **fields) -> str:
    """A job record and its VM made directly, for states the pipeline reaches only by failing."""
    spec = VMSpec(**SPEC, name=name)
    job = Job(kind=JobKind.create, provider="sim", spec=spec, **fields)
    vm = cloud.create_vm(spec, SSHPublicKey.parse(ssh_key), job_id=job.id)
    if record_instance:
        job.instance_id = vm.instance_id
    provisioner.store.add(job)
    return vm.instance_id


@pytest.mark.system
def test_malformed_sweep_request_is_rejected_and_logged(sim_worker, provisioner):
    provisioner.celery.send_task("vmq.sweep", args=[{"provider": "sim", "delay_s": -5}], queue="vmq.sim")
    deadline = time.monotonic() + 15
    # Other tests' rejections may be in the session worker's log too: wait for this one's line.
    while not any("vmq.sweep message rejected" in line and "delay_s" in line for line in sim_worker.log().splitlines()):
        assert time.monotonic() < deadline, "no rejection naming delay_s logged"
        time.sleep(0.1)


@pytest.mark.system
def test_a_pass_sends_again_the_jobs_whose_message_was_lost(
    cli_env, sim_worker, provisioner, redis_client, sim, ssh_key
):
    # A running VM, and a destroy job for it that started and then lost its message (as a SIGKILL
    # between kombu's BRPOP and its unacked record does): state destroying, next step long overdue.
    created = provisioner.wait(provisioner.create_vm({**SPEC, "name": "doomed"}, ssh_key).id, timeout_s=30)
    lost = Job(kind=JobKind.destroy, provider="sim", state=JobState.destroying, instance_id=created.instance_id)
    provisioner.store.add(lost)
    redis_client.set(keys.due_key(lost.id), f"{time.time() - 100:.3f}")
    # Not stalled: a job whose next step is due soon, and a finished one.
    waiting = Job(kind=JobKind.destroy, provider="sim", state=JobState.destroying, instance_id="sim-999")
    provisioner.store.add(waiting)
    redis_client.set(keys.due_key(waiting.id), f"{time.time() + 60:.3f}")

    assert _sweep("--dry-run")["rescued"] == [lost.id]
    assert provisioner.get_job(lost.id).state == JobState.destroying  # a dry run sends nothing
    # A sweep killed with its worker left its lock behind: the orphan pass waits, the rescue does not.
    redis_client.set(keys.sweep_lock_key("sim"), "a-dead-sweep", ex=60)
    result = runner.invoke(app, ["sweep", "-p", "sim", "--json", "--timeout", "30"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and "another sweep" in report["error"]
    assert report["rescued"] == [lost.id]
    assert provisioner.wait(lost.id, timeout_s=30).state == JobState.gone
    assert provisioner.get_job(waiting.id).state == JobState.destroying


def _running(provisioner, ssh_key: str, count: int, prefix: str) -> list[str]:
    ids = [provisioner.create_vm({**SPEC, "name": f"{prefix}-{n}"}, ssh_key).id for n in range(count)]
    return [provisioner.wait(i, timeout_s=30).instance_id for i in ids]


def _store_keys(redis_client) -> list[str]:
    """Everything the job store holds (records, fleets, the epoch, the sweeper's memory); not the
    broker's queues and not the simulated cloud, which stands for the provider."""
    return [k for k in redis_client.scan_iter(match="vmq:*") if not k.startswith(keys.SIM_PREFIX)]


@pytest.mark.system
def test_a_store_that_lost_its_records_destroys_no_running_vm(
    cli_env, sim_worker, provisioner, redis_client, sim, ssh_key
):
    # Issue 13 (1): Redis came back without its data (no AOF): every record is gone, the VMs run.
    running = _running(provisioner, ssh_key, 3, "kept")
    assert _sweep("--delay", "0")["orphans"] == []  # a healthy store: all owned
    redis_client.delete(*_store_keys(redis_client))

    first = _sweep("--delay", "0")
    second = _sweep("--delay", "0")  # the pass that used to destroy them all
    assert sorted(vm["instance_id"] for vm in sim.existing_vms()) == sorted(running)
    assert sim.calls().get("destroy", 0) == 0
    assert "epoch marker (vmq:epoch) was missing" in first["refused"]
    assert _actions(first) == dict.fromkeys(running, "reported")
    assert second["refused"] is None  # a new epoch began with the first pass ...
    assert _actions(second) == dict.fromkeys(running, "kept")  # ... but these VMs predate it
    for orphan in second["orphans"]:
        assert orphan["kept_because"].startswith("created before the job store's current epoch began")
        assert "the epoch marker was missing): its record may have been lost with the store" in orphan["kept_because"]
    assert sorted(vm["instance_id"] for vm in sim.existing_vms()) == sorted(running)
    assert sim.calls().get("destroy", 0) == 0


@pytest.mark.system
def test_a_young_vm_whose_record_is_gone_is_kept_and_an_epoch_change_between_passes_refuses(
    cli_env, sim_worker, provisioner, redis_client, sim, ssh_key
):
    # A replica without the latest writes took over: the epoch is old and intact, a new record is gone.
    _old_store(redis_client, days=30)
    (young,) = _running(provisioner, ssh_key, 1, "young")
    redis_client.delete(*redis_client.keys(keys.job_key("*")))
    _sweep("--delay", "0")
    (kept,) = _sweep("--delay", "0", "--max-destroy-share", "1")["orphans"]
    assert kept["action"] == "kept" and "less than the job record TTL" in kept["kept_because"]

    # The same periodic sweeper's passes carry the epoch: one that changed in between refuses all.
    from producer.sweep import request_sweep, wait_report
    from vmqueue.sweep import SweepRequest

    _age(redis_client, young, days=8)  # now old enough that only the epoch check stands
    request = SweepRequest(provider="sim", delay_s=0, max_destroy_share=1, epoch="an-earlier-epoch")
    request_sweep(provisioner.celery, request)
    report = wait_report(redis_client, request.id, 30)
    assert "epoch changed since the previous pass (an-earlier-e" in report.refused
    assert [(o.instance_id, o.action) for o in report.orphans] == [(young, "kept")]
    assert len(sim.existing_vms()) == 1


@pytest.mark.system
def test_a_pass_destroys_at_most_its_share(cli_env, sim_worker, provisioner, redis_client, sim, ssh_key):
    cloud = __import__("workers.providers.sim", fromlist=["SimProvider"]).SimProvider(redis_client)
    _old_store(redis_client, days=30)
    broken = [
        _stored_job(provisioner, cloud, ssh_key, f"broken-{n}", state=JobState.failed, cleanup=CleanupState.failed)
        for n in range(5)
    ]
    assert set(_actions(_sweep("--delay", "0"))) == set(broken)
    report = _sweep("--delay", "0")  # default share 0.2 of 5 listed: one destroy this pass
    assert report["destroy_limit"] == 1
    assert sorted(_actions(report).values()) == ["destroyed", "held", "held", "held", "held"]
    wait_for(lambda: len(sim.existing_vms()) == 4, timeout_s=10, what="one orphan is deleted")
    told = _sweep("--delay", "0", "--max-destroy-share", "1")  # told otherwise: no limit
    assert sorted(_actions(told).values()) == ["destroyed"] * 4


@pytest.mark.system
def test_the_periodic_sweeper_goes_on_when_a_report_is_late(test_env, redis_client):
    # No worker serves digitalocean here: every report is late. The loop must say so and go on.
    command = [sys.executable, "-m", "producer.cli", "sweep", "-p", "digitalocean", "--every", "1", "--timeout", "1"]
    process = subprocess.Popen(command, env=test_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        late = lambda: sum("no sweep report after 1s" in line for line in lines)  # noqa: E731
        wait_for(lambda: late() >= 2 or process.poll() is not None, timeout_s=60, what="two late reports")
        assert process.poll() is None, "".join(lines)  # it went on after the first late report
    finally:
        process.terminate()
        process.wait(timeout=10)
        reader.join(10)
    assert any("the next pass in 1s" in line for line in lines), lines
