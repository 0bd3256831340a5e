"""Readiness parts on their own: the SSH probe against a real asyncssh server, the user-data merge,
cloud-init's validator failing where it must, the job store's guard, the metrics hook."""

from __future__ import annotations

import asyncio
import email

import asyncssh
import pytest
import yaml
from prometheus_client import REGISTRY

from bench.harness import free_port
from tests.providers.cloudinit_schema import PHONE_HOME_URL, assert_cloud_init_accepts
from vmqueue.jobstore import InvalidTransition, JobStore
from vmqueue.models import Job, JobKind, JobState, utcnow
from vmqueue.readiness import phone_home_config
from vmqueue.userdata import cloud_configs, merge_user_data
from workers.readyscan import fetch_host_keys, ssh_banner

ALGS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512"]


def _probe(every: bool, port: int, serve: bool = True) -> list:
    async def run() -> list:
        keys = [asyncssh.generate_private_key(t) for t in ("ssh-ed25519", "ecdsa-sha2-nistp256")]
        server = await asyncssh.listen("127.0.0.1", port, server_host_keys=keys) if serve else None
        try:
            options = asyncssh.SSHClientConnectionOptions(known_hosts=None, client_keys=None, agent_path=None)
            await ssh_banner("127.0.0.1", port, 5)
            found = await fetch_host_keys("127.0.0.1", port, ALGS, options, 5, every)
        finally:
            if server:
                server.close()
        expected = {k.get_algorithm(): k.get_fingerprint("sha256") for k in keys}
        return [(k.type, k.sha256 == expected[k.type], k.openssh.split()[0]) for k in found]

    return asyncio.run(run())


def test_probe_reads_the_preferred_host_key_or_every_type():
    assert _probe(False, free_port()) == [("ssh-ed25519", True, "ssh-ed25519")]
    # Every type the server has (RSA, which it lacks, fails its own negotiation and is skipped).
    assert sorted(_probe(True, free_port())) == [
        ("ecdsa-sha2-nistp256", True, "ecdsa-sha2-nistp256"),
        ("ssh-ed25519", True, "ssh-ed25519"),
    ]


def test_probe_of_a_closed_port_or_a_non_ssh_service_raises():
    with pytest.raises(OSError):
        _probe(False, free_port(), serve=False)

    async def http_like() -> None:
        async def answer(reader, writer):
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await ssh_banner("127.0.0.1", port, 5)
        finally:
            server.close()

    with pytest.raises(ConnectionError, match="no SSH version line"):
        asyncio.run(http_like())


OURS = phone_home_config(PHONE_HOME_URL)


def test_merge_into_cloud_config_keeps_the_users_keys_and_appends_lists():
    user = "#cloud-config\nruncmd: [[echo, one]]\nphone_home_extra: 1\nssh_authorized_keys: [mine]\n"
    merged = merge_user_data(user, {"ssh_authorized_keys": ["ours"], "runcmd": [["echo", "two"]], **OURS})
    doc = yaml.safe_load(merged)
    assert merged.startswith("#cloud-config\n")
    assert doc["runcmd"] == [["echo", "one"], ["echo", "two"]] and doc["ssh_authorized_keys"] == ["mine", "ours"]
    assert doc["phone_home"] == OURS["phone_home"] and doc["phone_home_extra"] == 1


def test_merge_of_a_shell_script_makes_mime_multipart_and_is_deterministic():
    script = "#!/bin/bash\necho hi\n"
    merged = merge_user_data(script, OURS)
    assert merged == merge_user_data(script, OURS)  # EC2 compares retries under one ClientToken
    parts = email.message_from_string(merged).get_payload()
    assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config"]
    assert parts[0].get_payload(decode=True).decode() == script
    assert parts[1]["Merge-Type"] == "list(append)+dict(no_replace,recurse_list)+str()"
    assert cloud_configs(merged) == [OURS]
    # A MIME script gets one more part; no script gets our cloud-config alone.
    again = merge_user_data(merged, {"ssh_authorized_keys": ["k"]})
    assert [p.get_content_type() for p in email.message_from_string(again).get_payload()][-1] == "text/cloud-config"
    assert cloud_configs(again) == [OURS, {"ssh_authorized_keys": ["k"]}]
    assert yaml.safe_load(merge_user_data(None, OURS)) == OURS


def test_cloud_init_validator_rejects_a_bad_phone_home():
    bad = merge_user_data("#!/bin/sh\n", {"phone_home": {"url": PHONE_HOME_URL, "tries": "often", "extra": 1}})
    with pytest.raises(AssertionError, match="phone_home"):
        assert_cloud_init_accepts([bad])


def _job(**fields) -> Job:
    return Job(kind=JobKind.create, provider="sim", instance_id="sim-1", **fields)


def test_a_running_job_leaves_running_only_while_it_awaits_readiness(redis_client, settings):
    store = JobStore(redis_client, settings)
    plain = store.add(_job(state=JobState.running))
    with pytest.raises(InvalidTransition):
        store.transition(plain.id, JobState.failed, "late failure")
    with pytest.raises(InvalidTransition):
        store.transition(plain.id, JobState.ready, "ready")
    waiting = store.add(_job(state=JobState.running, ready_when="ssh"))
    assert waiting.awaiting_ready and not waiting.finished
    done = store.transition(waiting.id, JobState.ready, "ready", ready_at=utcnow())
    assert done.final and done.succeeded and done.finished
    with pytest.raises(InvalidTransition):
        store.transition(done.id, JobState.failed, "after ready")


def test_metrics_count_ready_jobs_and_enqueue_to_ready():
    from workers.metrics import job_changed

    labels = {"provider": "sim", "ready_when": "cloud_init"}
    before = REGISTRY.get_sample_value("vmq_create_enqueue_to_ready_seconds_count", labels) or 0
    finished = {"provider": "sim", "kind": "create", "state": "running"}
    running_before = REGISTRY.get_sample_value("vmq_jobs_finished_total", finished) or 0
    job_changed(_job(state=JobState.running, ready_when="cloud_init", running_at=utcnow()))
    # Awaiting readiness is not finished: counted in enqueue-to-running only.
    assert (REGISTRY.get_sample_value("vmq_jobs_finished_total", finished) or 0) == running_before
    job_changed(_job(state=JobState.ready, ready_when="cloud_init", running_at=utcnow(), ready_at=utcnow()))
    assert REGISTRY.get_sample_value("vmq_create_enqueue_to_ready_seconds_count", labels) == before + 1
