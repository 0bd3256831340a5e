"""The orphan sweeper: who owns a VM (unit), and two passes through the CLI and a real sim worker."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from bench.probes import wait_for
from producer.cli import app
from tests import test_cli
from vmqueue import keys
from vmqueue.models import CleanupState, Job, JobError, JobKind, JobState, VMInfo, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from workers.sweeper import orphan_reason, owner_of

cli_env = test_cli.cli_env  # REDIS_URL and VMQ_* of the test session for the CLI
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
    reason = orphan_reason(_vm(), job, fleet_jobs=set())
    assert reason is None if orphan is None else orphan in reason


def test_a_vm_without_job_label_is_an_orphan_and_a_fleet_keeps_its_vm():
    assert "no vmqueue-job label" in orphan_reason(_vm(job_id=None), None, set())
    assert orphan_reason(_vm(), None, fleet_jobs={"j1"}) is None  # the fleet outlives the job record's TTL


def test_a_failed_over_vm_belongs_to_its_job():
    # A capacity failover's attempt labels its VM "<job id>-p<n>": still the job's own VM.
    vm = _vm(job_id="j1-p2")
    assert owner_of(vm) == "j1"
    assert orphan_reason(vm, _job(JobState.running), fleet_jobs=set()) is None
    assert orphan_reason(vm, None, fleet_jobs={"j1"}) is None


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
    redis_client.delete(keys.job_key(expired.id))  # its record expired: nobody tracks the VM any more
    # A create that failed and whose cleanup failed too, and one whose cleanup was turned off.
    broken = _stored_job(provisioner, cloud, ssh_key, "broken", state=JobState.failed, cleanup=CleanupState.failed)
    kept = _stored_job(provisioner, cloud, ssh_key, "kept", state=JobState.failed, cleanup=CleanupState.skipped)
    # A create still submitting: the VM exists, the job has not recorded its id yet.
    pending = _stored_job(provisioner, cloud, ssh_key, "pending", state=JobState.submitting, record_instance=False)
    orphans = {expired.instance_id, broken}

    first = _sweep("--delay", "1")
    assert first["listed"] == 5 and first["owned"] == 3
    assert _actions(first) == dict.fromkeys(orphans, "reported")
    assert {o["reason"] for o in first["orphans"]} == {
        "its job record is gone (expired or never written)",
        "its create failed and the cleanup failed",
    }
    assert len(sim.existing_vms()) == 5  # a first pass destroys nothing

    assert _actions(_sweep("--delay", "60")) == dict.fromkeys(orphans, "waiting")
    time.sleep(1.1)  # the delay of the next passes has passed since the first report
    assert _actions(_sweep("--delay", "1", "--dry-run")) == dict.fromkeys(orphans, "would_destroy")
    assert len(sim.existing_vms()) == 5  # a dry run changes nothing

    assert _actions(_sweep("--delay", "1")) == dict.fromkeys(orphans, "destroyed")
    # The sim deletes asynchronously, like a cloud: the deleted VMs leave within its destroy time.
    wait_for(lambda: len(sim.existing_vms()) == 3, timeout_s=10, what="the orphans are deleted")
    assert {vm["instance_id"] for vm in sim.existing_vms()} == {live.instance_id, kept, pending}
    assert redis_client.hgetall(keys.sweep_seen_key("sim")) == {}
    assert _sweep("--delay", "1")["orphans"] == []


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
