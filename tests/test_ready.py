"""Readiness (ready_when ssh / cloud_init) with real probes: real asyncssh servers on loopback
addresses (the sim host), a real HTTP API that cloud-init's phone-home reaches over real HTTP, and
real Celery workers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from bench.harness import free_port, sim_spec
from bench.ready import SimHostProcess
from tests.test_web import Server
from vmqueue.models import CleanupState, JobState
from vmqueue.readiness import HostKey

pytestmark = pytest.mark.system

API_KEY = "ready-test-key"


@pytest.fixture(scope="module")
def _sim_host_process(test_env, tmp_path_factory) -> Iterator[int]:
    port = free_port()
    host = SimHostProcess(test_env, tmp_path_factory.mktemp("simhost"))
    yield port
    host.stop()


@pytest.fixture
def sim_host(_sim_host_process, sim) -> Iterator[int]:
    """The sim VMs' insides (real sshd, real cloud-init phone-home); yields the port their sshd uses."""
    sim.configure(ssh_port=_sim_host_process, ssh_delay_s=1.0, cloud_init_s=1.0, boot_s=0.5)
    yield _sim_host_process
    sim.reset()


def _sim_host_keys(sim, job) -> set[str]:
    record = sim.redis.hget(f"vmq:sim:vm:{job.instance_id}", "host_keys")
    return {HostKey.parse(line).sha256 for line in json.loads(record)}


def test_ssh_ready_records_host_keys_and_phases_at_no_api_cost(sim_worker, provisioner, sim, sim_host, ssh_key):
    plain = provisioner.create_vm(sim_spec("plain-1"), ssh_key)
    public = [provisioner.create_vm(sim_spec(f"ssh-{i}"), ssh_key, ready_when="ssh", ssh_port=sim_host) for i in (1, 2)]
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
    assert sim.redis.zcard("vmq:ready:due") == 0 and sim.redis.hlen("vmq:ready:targets") == 0


def test_ssh_never_answering_fails_at_ready_deadline_and_vm_is_destroyed(
    sim_worker, provisioner, sim, sim_host, ssh_key
):
    sim.configure(unreachable_rate=1)
    job = provisioner.create_vm(sim_spec("dead-1"), ssh_key, ready_when="ssh", ready_deadline_s=2, ssh_port=sim_host)
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.failed
    assert job.error.code == "ready_timeout" and "ssh did not answer within 2s" in job.error.message
    assert job.running_at is not None and job.ready_at is None
    assert job.cleanup == CleanupState.done  # destroy-on-failure, as for a create that never ran
    assert sim.live_vms() == []


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
