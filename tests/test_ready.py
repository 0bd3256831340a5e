"""Readiness (ready_when ssh / cloud_init) with real probes: real asyncssh servers on loopback
addresses (the sim host), a real HTTP API that cloud-init's phone-home reaches over real HTTP, and
real Celery workers."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bench.harness import free_port, sim_spec
from bench.probes import wait_for
from bench.ready import SimHostProcess
from producer.cli import app as cli_app
from tests import test_flower
from tests.test_metrics import _samples
from tests.test_web import Server
from vmqueue import keys
from vmqueue.models import CleanupState, Job, JobState
from vmqueue.readiness import HostKey

pytestmark = pytest.mark.system

API_KEY = "ready-test-key"
cli = CliRunner()
flower = test_flower.flower  # a real Flower on the session's Redis, fed by the workers' task events


@pytest.fixture(scope="module")
def _sim_host_process(test_env, tmp_path_factory) -> Iterator[int]:
    port = free_port()
    host = SimHostProcess(test_env, tmp_path_factory.mktemp("simhost"))
    yield port
    host.stop()


@pytest.fixture
def sim_host(_sim_host_process, sim) -> Iterator[int]:
    """The sim VMs' insides (real sshd, real cloud-init phone-home); yields the port their sshd uses."""
    # sshd 2 s after boot: the tick may see a VM running up to a tick (1 s) after it booted, and
    # _ready_after_running needs half a second between running and ready (a 1 s delay failed 2 in 9).
    sim.configure(ssh_port=_sim_host_process, ssh_delay_s=2.0, cloud_init_s=1.0, boot_s=0.5)
    yield _sim_host_process
    sim.reset()


def _sim_host_keys(sim, job) -> set[str]:
    record = sim.redis.hget(f"vmq:sim:vm:{job.instance_id}", "host_keys")
    return {HostKey.parse(line).sha256 for line in json.loads(record)}


def test_ssh_ready_records_host_keys_and_phases_at_no_api_cost(sim_worker, provisioner, sim, sim_host, ssh_key):
    plain = provisioner.create_vm(sim_spec("plain-1"), ssh_key)
    # ssh-2 names no port: its probes go where the sim reports the VM's sshd (VMInfo.ssh_port).
    ports = ({"ssh_port": sim_host}, {})
    public = [
        provisioner.create_vm(sim_spec(f"ssh-{i}"), ssh_key, ready_when="ssh", **port)
        for i, port in enumerate(ports, 1)
    ]
    private = provisioner.create_vm(
        sim_spec("ssh-p"), ssh_key, ready_when="ssh", ready_via="private", ssh_port=sim_host
    )

    plain = provisioner.wait(plain.id, timeout_s=30)
    assert plain.state == JobState.running and plain.ready_at is None and plain.host_keys == []
    for job in [*public, private]:
        job = provisioner.wait(job.id, timeout_s=30)
        assert job.state == JobState.ready, job.history
        # Phases: running (the API said so), then ready once sshd answered (1 s after boot in the sim).
        assert job.running_at is not None and job.ready_at is not None
        assert [e.state for e in job.history][-2:] == [JobState.running, JobState.ready]
        assert job.ready_at > job.running_at
        # The key the scanner read over SSH is one the VM's sshd holds: the type OpenSSH prefers.
        assert [k.type for k in job.host_keys] == ["ssh-ed25519"]
        assert {k.sha256 for k in job.host_keys} <= _sim_host_keys(sim, job)
        # The probes are free: as many provider API calls as a job that stopped at running.
        assert job.api_calls == plain.api_calls
        assert job.probe_port == sim_host and job.vm.ssh_port == sim_host
    # Off the schedule once settled (the scanner settles a batch of jobs, then unschedules them at once).
    wait_for(lambda: sim.redis.zcard(keys.READY_DUE) + sim.redis.hlen(keys.READY_TARGETS) == 0, 10, "unscheduled")


def _record_ttl_s(redis_client, job: Job) -> int:
    """The job record's TTL in Redis: -1 when it never expires (its VM lives on)."""
    return redis_client.ttl(keys.job_key(job.id))


def test_ssh_never_answering_fails_at_ready_deadline_and_vm_is_destroyed(
    sim_worker, provisioner, settings, sim, sim_host, ssh_key
):
    sim.configure(unreachable_rate=1)
    job = provisioner.create_vm(sim_spec("dead-1"), ssh_key, ready_when="ssh", ready_deadline_s=2, ssh_port=sim_host)
    kept = provisioner.create_vm(
        sim_spec("dead-kept"),
        ssh_key,
        ready_when="ssh",
        ready_deadline_s=2,
        ssh_port=sim_host,
        destroy_on_failure=False,
    )
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.failed
    assert job.error.code == "ready_timeout" and "ssh did not answer within 2s" in job.error.message
    assert job.running_at is not None and job.ready_at is None
    assert job.cleanup == CleanupState.done  # destroy-on-failure, as for a create that never ran
    # Its record was made permanent at running (a running VM's record must outlive the TTL); once
    # the VM is destroyed it expires like any failed create's.
    assert 0 < _record_ttl_s(sim.redis, job) <= settings.job_ttl_s
    # Kept on purpose (destroy_on_failure=False): the VM lives on, and so does its record.
    kept = provisioner.wait(kept.id, timeout_s=30)
    assert kept.error.code == "ready_timeout" and kept.cleanup == CleanupState.skipped
    assert _record_ttl_s(sim.redis, kept) == -1
    assert [vm["instance_id"] for vm in sim.live_vms()] == [kept.instance_id]


@pytest.fixture(scope="module")
def api(test_env, tmp_path_factory) -> Iterator[Server]:
    server = Server({**test_env, "VMQ_API_KEYS": API_KEY}, tmp_path_factory.mktemp("web") / "uvicorn.log")
    yield server.wait_ready()
    server.stop()


def test_cloud_init_phone_home_settles_job_over_real_http(
    sim_worker, settings, redis_client, sim, sim_host, api, ssh_key
):
    from producer import Provisioner

    provisioner = Provisioner(settings.model_copy(update={"ready_base_url": api.url}))
    job = provisioner.create_vm(sim_spec("ci-1"), ssh_key, "#!/bin/sh\necho hi\n", ready_when="cloud_init")
    # The user-data sent holds the user's script and a phone_home to this job's URL; the token is
    # not on the job record, whose store keeps only its digest.
    sent = redis_client.get(f"vmq:job:{job.id}:script")
    assert "echo hi" in sent and "phone_home" in sent and f"/ready/{job.id}/" in sent
    token = sent.split(f"/ready/{job.id}/", 1)[1].split()[0]
    assert token not in provisioner.get_job(job.id).model_dump_json()
    assert token not in redis_client.get(f"vmq:ready:token:{job.id}")

    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.ready, job.history
    assert job.phoned_home_at is not None and job.running_at <= job.ready_at
    assert {k.sha256 for k in job.host_keys} == _sim_host_keys(sim, job)  # cloud-init posts every key
    assert "cloud-init phoned home" in job.history[-1].message

    # The web API shows the phases and keys.
    shown = httpx.get(f"{api.url}/jobs/{job.id}", headers={"X-API-Key": API_KEY}, timeout=5).json()
    assert shown["state"] == "ready" and shown["ready_when"] == "cloud_init"
    assert shown["running_at"] and shown["ready_at"] and len(shown["host_keys"]) == 2
    # The token was one-time: a replay (or any guess) is refused, and the job is unchanged.
    assert httpx.post(f"{api.url}/ready/{job.id}/{token}", content=b"instance_id=x", timeout=5).status_code == 403
    assert httpx.post(f"{api.url}/ready/{job.id}/guess", content=b"", timeout=5).status_code == 403
    assert provisioner.get_job(job.id).ready_at == job.ready_at


def test_cloud_init_never_phoning_home_fails_at_ready_deadline(sim_worker, settings, sim, sim_host, api, ssh_key):
    from producer import Provisioner

    sim.configure(unreachable_rate=1)
    provisioner = Provisioner(settings.model_copy(update={"ready_base_url": api.url}))
    job = provisioner.create_vm(sim_spec("ci-dead"), ssh_key, ready_when="cloud_init", ready_deadline_s=2)
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.failed and job.error.code == "ready_timeout"
    assert "cloud-init did not phone home" in job.error.message
    assert job.cleanup == CleanupState.done and sim.live_vms() == []
    assert not sim.redis.exists(f"vmq:ready:token:{job.id}")  # a failed job's token opens nothing
    assert 0 < _record_ttl_s(sim.redis, job) <= settings.job_ttl_s  # expires like any failed create's


def test_cloud_init_is_refused_at_the_producer_without_base_url(provisioner, redis_client, app_keys, ssh_key):
    assert provisioner.settings.ready_base_url is None
    with pytest.raises(ValidationError, match="VMQ_READY_BASE_URL"):
        provisioner.create_vm(sim_spec("ci-x"), ssh_key, ready_when="cloud_init")
    assert app_keys() == set()  # nothing was recorded or enqueued


def test_cloud_init_refuses_a_script_with_its_own_phone_home(settings, redis_client, app_keys, ssh_key):
    from producer import Provisioner

    provisioner = Provisioner(settings.model_copy(update={"ready_base_url": "http://127.0.0.1:9"}))
    script = "#cloud-config\nphone_home:\n  url: http://127.0.0.1:9/mine\n"
    with pytest.raises(ValidationError, match="phone_home of its own"):
        provisioner.create_vm(sim_spec("ci-y"), ssh_key, script, ready_when="cloud_init")
    # A user-data near the provider's limit leaves no room for the phone_home: refused, naming the sizes.
    big = "#!/bin/sh\n" + "#" * (64 * 1024 - 200) + "\n"
    with pytest.raises(ValidationError, match="with the phone_home that ready_when=cloud_init adds"):
        provisioner.create_vm(sim_spec("ci-z"), ssh_key, big, ready_when="cloud_init")
    assert app_keys() == set()


# -- the CLI and fleets wait for readiness ----------------------------------------------------------
# The sim host's sshd answers 2 s after the VM boots (the sim_host fixture), and the CLI reads the job
# every 0.5 s: a CLI that stopped at running would return, and print, a job that is still running.


def _only_job(redis_client) -> Job:
    (key,) = [k for k in redis_client.scan_iter("vmq:job:*") if k.count(":") == 2]
    return Job.model_validate_json(redis_client.get(key))


def _ready_after_running(job: Job) -> None:
    assert job.state == JobState.ready, job.history
    assert [e.state for e in job.history][-2:] == [JobState.running, JobState.ready]
    assert (job.ready_at - job.running_at).total_seconds() >= 0.5  # long enough for a poll to see running
    assert job.host_keys


def test_cli_create_wait_returns_once_ready_and_prints_host_keys(
    cli_env, sim_worker, sim, sim_host, redis_client, ssh_key
):
    create = ["create", "-p", "sim", "--region", "sim-1", "--type", "small", "--image", "debian-12"]
    # No --ssh-port, as the README's steps: the probes go where the sim says its VM's sshd is.
    ssh = ["--ssh-key", ssh_key, "--ready-when", "ssh", "--wait", "--timeout", "30"]
    result = cli.invoke(cli_app, [*create, "--name", "cli-ready-1", *ssh])
    assert result.exit_code == 0, result.output
    job = _only_job(redis_client)  # as the CLI left it: ready, not running
    _ready_after_running(job)
    assert job.ssh_port is None and job.probe_port == sim_host and f"port {sim_host}" in job.history[-1].message
    # What it printed: the phases with their times, and the host keys (type, SHA256 fingerprint) of this VM.
    phases = r"\n  running +\d\d:\d\d:\d\d\n  ready +\d\d:\d\d:\d\d  \(ssh, [\d.]+s after running\)"
    assert re.search(phases, result.output)
    for key in job.host_keys:
        assert f"host key {key.type} {key.sha256}" in result.output
    assert {k.sha256 for k in job.host_keys} <= _sim_host_keys(sim, job)

    # --json: the job as a script reads it, with its phases and keys.
    redis_client.delete(keys.job_key(job.id))
    result = cli.invoke(cli_app, [*create, "--name", "cli-ready-2", *ssh, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["state"] == "ready" and shown["running_at"] and shown["ready_at"]
    assert [k["sha256"] for k in shown["host_keys"]] == [k.sha256 for k in _only_job(redis_client).host_keys]


def test_fleet_apply_with_ready_when_waits_for_ready(
    cli_env, sim_worker, sim, sim_host, redis_client, ssh_key, tmp_path
):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: ready-demo\n"
        "defaults:\n  provider: sim\n  region: sim-1\n  instance_type: small\n  image: debian-12\n"
        f"  ssh_key: {json.dumps(ssh_key.strip())}\n  ready_when: ssh\n  ssh_port: {sim_host}\n"
        "vms:\n  - name: web\n    count: 2\n  - name: plain-1\n    ready_when: running\n"
    )
    result = cli.invoke(cli_app, ["apply", str(fleet), "--json", "--timeout", "30"])
    assert result.exit_code == 0, result.output
    rows = {vm["name"]: vm for vm in json.loads(result.stdout)["vms"]}
    assert {name: vm["state"] for name, vm in rows.items()} == {
        "web-1": "ready",
        "web-2": "ready",
        "plain-1": "running",
    }
    for name in ("web-1", "web-2"):
        _ready_after_running(Job.model_validate_json(redis_client.get(keys.job_key(rows[name]["job_id"]))))


def test_fleet_ssh_port_is_checked_with_its_line(tmp_path, ssh_key):
    from producer.fleet import FleetError, load_fleet

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: f\ndefaults:\n  provider: sim\n  region: sim-1\n  instance_type: small\n  image: debian-12\n"
        f"  ssh_key: {json.dumps(ssh_key.strip())}\nvms:\n  - name: a\n    ready_when: ssh\n    ssh_port: 0\n"
    )
    with pytest.raises(FleetError, match=r"fleet.yaml:11: vms\[0\]\.ssh_port: .*greater than or equal to 1"):
        load_fleet(fleet)


# -- metrics: a real worker's /metrics counts a real ready job ---------------------------------------


@pytest.fixture
def sim_worker_frozen(sim_worker_paused) -> Iterator[None]:
    """The session's sim worker neither consumes (paused) nor scans (SIGSTOP: its readiness scanner
    would claim the job half the time and count it in its own registry, which serves no metrics)."""
    pid = sim_worker_paused.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_worker_metrics_count_enqueue_to_ready_of_a_real_ready_job(
    sim_worker_frozen, worker_factory, provisioner, sim_host, ssh_key
):
    port = free_port()
    worker_factory("sim", env={"VMQ_METRICS_PORT": str(port)})
    job = provisioner.create_vm(sim_spec("metrics-ready"), ssh_key, ready_when="ssh", ssh_port=sim_host)
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.ready, job.history

    samples = _samples(port)
    labels = frozenset({("provider", "sim"), ("ready_when", "ssh")})
    assert samples[("vmq_create_enqueue_to_ready_seconds_count", labels)] == 1
    # The one observation is this job's enqueue-to-ready time, from its own timestamps.
    waited = (job.ready_at - job.created_at).total_seconds()
    assert samples[("vmq_create_enqueue_to_ready_seconds_sum", labels)] == pytest.approx(waited, abs=1e-3)
    assert samples[("vmq_create_enqueue_to_running_seconds_count", frozenset({("provider", "sim")}))] == 1
    finished = frozenset({("provider", "sim"), ("kind", "create"), ("state", "ready")})
    assert samples[("vmq_jobs_finished_total", finished)] == 1


# -- Flower: a readiness job's row ends as the job does, at ready -------------------------------------


def test_flower_rows_of_readiness_jobs_end_at_ready_or_ready_timeout(
    sim_worker, settings, sim, sim_host, api, ssh_key, flower
):
    from producer import Provisioner

    sim.configure(cloud_init_s=3)  # cloud-init phones home 3 s after the VM runs: a window to look in
    provisioner = Provisioner(settings.model_copy(update={"ready_base_url": api.url}))
    plain = provisioner.create_vm(sim_spec("fl-plain"), ssh_key)
    ssh = provisioner.create_vm(sim_spec("fl-ssh"), ssh_key, ready_when="ssh", ssh_port=sim_host)
    ci = provisioner.create_vm(sim_spec("fl-ci"), ssh_key, ready_when="cloud_init")
    # Nothing listens on this port: sshd never answers, the job fails ready_timeout and is destroyed.
    dead = provisioner.create_vm(
        sim_spec("fl-dead"), ssh_key, ready_when="ssh", ssh_port=free_port(), ready_deadline_s=2
    )

    def task(job_id: str) -> dict:
        return flower.get("/api/tasks").json().get(job_id) or {}

    # Once Flower shows the plain job (it ran with the others) succeeded, the cloud-init job is
    # running too but waits for its phone-home: its row must not say SUCCESS yet.
    wait_for(lambda: task(plain.id).get("state") == "SUCCESS", 20, "Flower shows the plain job", 0.2)
    time.sleep(0.5)  # any event sent at the cloud-init job's running transition has arrived by now
    assert provisioner.get_job(ci.id).state == JobState.running
    assert task(ci.id).get("state") != "SUCCESS", task(ci.id)

    jobs = {job.id: provisioner.wait(job.id, timeout_s=30) for job in (ssh, ci, dead)}
    assert [jobs[i].state for i in (ssh.id, ci.id)] == [JobState.ready, JobState.ready]
    assert jobs[dead.id].error.code == "ready_timeout" and jobs[dead.id].cleanup == CleanupState.done

    def final() -> bool:
        return all(task(i).get("state") in ("SUCCESS", "FAILURE") for i in jobs)

    wait_for(final, 20, "Flower shows each job's final state", 0.3)
    for job in (jobs[ssh.id], jobs[ci.id]):  # ssh: the scanner settled it; cloud-init: the HTTP API did
        shown = task(job.id)
        assert shown["state"] == "SUCCESS" and shown["result"] == f"ready {job.spec.name} {job.vm.public_ipv4}"
    shown = task(dead.id)  # a job seen running that failed its readiness is a failure, not a success
    assert shown["state"] == "FAILURE" and shown["exception"].startswith("ready_timeout: "), shown
