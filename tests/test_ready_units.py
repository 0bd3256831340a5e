"""Readiness parts on their own: the SSH probe against a real asyncssh server, the user-data merge,
cloud-init's validator failing where it must, the job store's guard, the metrics hook."""

from __future__ import annotations

import asyncio
import email
import errno
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import asyncssh
import pytest
import redis
import yaml
from prometheus_client import REGISTRY

from bench.harness import RedisServer, free_port
from tests.providers.cloudinit_schema import PHONE_HOME_URL, assert_cloud_init_accepts
from vmqueue import keys
from vmqueue.jobstore import InvalidTransition, JobStore
from vmqueue.models import Job, JobKind, JobState, utcnow
from vmqueue.readiness import ReadyWhen, phone_home_config
from vmqueue.settings import Settings
from vmqueue.userdata import cloud_configs, merge_user_data
from workers.readyqueue import ReadyQueue, ReadyTarget
from workers.readyscan import (
    SWITCH_INTERVAL_S,
    ReadyScanner,
    begin_connect,
    favour_io_threads,
    open_ssh,
    probe_ssh,
    probe_wait,
)

ALGS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512"]


class _Counting(asyncssh.SSHServer):
    connections = 0

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        type(self).connections += 1


def _probe(every: bool, port: int, serve: bool = True) -> tuple[list, int]:
    """Probe a real asyncssh server on ``port``: (keys found, TCP connections it accepted)."""

    async def run() -> tuple[list, int]:
        keys = [asyncssh.generate_private_key(t) for t in ("ssh-ed25519", "ecdsa-sha2-nistp256")]
        _Counting.connections = 0
        server = (
            await asyncssh.listen("127.0.0.1", port, server_host_keys=keys, server_factory=_Counting) if serve else None
        )
        try:
            options = asyncssh.SSHClientConnectionOptions(known_hosts=None, client_keys=None, agent_path=None)
            found = await probe_ssh("127.0.0.1", port, ALGS, options, 5, every)
        finally:
            if server:
                server.close()
        expected = {k.get_algorithm(): k.get_fingerprint("sha256") for k in keys}
        return [(k.type, k.sha256 == expected[k.type], k.openssh.split()[0]) for k in found], _Counting.connections

    return asyncio.run(run())


def test_probe_reads_the_preferred_host_key_on_the_connection_it_opened_or_every_type():
    # One TCP connection: the version line is peeked on it and the key exchange runs on it.
    assert _probe(False, free_port()) == ([("ssh-ed25519", True, "ssh-ed25519")], 1)
    # Every type the server has (RSA, which it lacks, fails its own negotiation and is skipped).
    found, connections = _probe(True, free_port())
    assert sorted(found) == [
        ("ecdsa-sha2-nistp256", True, "ecdsa-sha2-nistp256"),
        ("ssh-ed25519", True, "ssh-ed25519"),
    ]
    assert connections == 3  # the first, then one per other type asked for


def _serve_lines(lines: bytes) -> tuple[bytes, bytes]:
    """``open_ssh`` against a server that sends ``lines`` then closes: (what the socket still holds, ``b""``)."""

    async def run() -> bytes:
        async def answer(reader, writer):
            writer.write(lines)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(5):
                sock = await open_ssh("127.0.0.1", port)
            with sock:
                return sock.recv(100)
        finally:
            server.close()

    return asyncio.run(run())


def test_probe_of_a_closed_port_or_a_non_ssh_service_raises():
    with pytest.raises(OSError):
        _probe(False, free_port(), serve=False)
    with pytest.raises(ConnectionError, match="no SSH version line"):
        _serve_lines(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_lines_before_the_version_line_are_dropped_and_the_version_line_left_for_the_key_exchange():
    assert _serve_lines(b"Welcome\r\nto the box\r\nSSH-2.0-OpenSSH_9.6\r\n") == b"SSH-2.0-OpenSSH_9.6\r\n"


def test_a_refused_local_connect_is_known_when_it_begins():
    """The scanner's cheapest probe: a closed port on a local address is refused within ``connect_ex``
    (its pending error read at once), so the probe never enters the event loop."""
    sock, err = begin_connect("127.0.0.1", free_port())
    sock.close()
    assert err == errno.ECONNREFUSED


def test_the_scanner_lowers_the_gil_switch_interval_while_it_probes_and_never_raises_it():
    """The scanner's loop wins the GIL back after each system call within half a millisecond, not
    CPython's five, beside the worker's busy threads."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        favour_io_threads()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S, abs=2e-6)
        favour_io_threads(on=False, default_s=0.005)  # nothing probed: the process's own again
        assert sys.getswitchinterval() == pytest.approx(0.005, abs=2e-6)
        sys.setswitchinterval(0.0001)
        favour_io_threads(default_s=0.0001)
        assert sys.getswitchinterval() == pytest.approx(0.0001, abs=2e-6)  # kept, not raised
    finally:
        sys.setswitchinterval(before)


def test_probe_wait_is_a_share_of_the_wait_so_far_within_its_bounds():
    wait = probe_wait(0.5, 2.0, share=0.1, jitter=0)
    assert [wait(s) for s in (0, 3, 5, 10, 20, 600)] == [0.5, 0.5, 0.5, 1.0, 2.0, 2.0]
    spread = probe_wait(0.5, 2.0, share=0.1, jitter=0.2)
    assert all(0.8 <= spread(10) <= 1.2 for _ in range(100))


@pytest.fixture
def own_redis() -> Iterator[redis.Redis]:
    """A redis-server of this test's own: no worker's scanner claims its entries, and its command
    counts are this test's."""
    server = RedisServer(aof=False)
    server.start()
    yield redis.Redis.from_url(server.url, decode_responses=True)
    server.cleanup()


def _calls(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def _target(job_id: str, port: int) -> ReadyTarget:
    now = time.time()
    return ReadyTarget(job_id=job_id, provider="sim", mode=ReadyWhen.ssh, host="127.0.0.1", port=port,
                       deadline=now + 600, since=now)  # fmt: skip


def test_a_probe_that_finds_nothing_costs_no_redis_round_trip(own_redis):
    """The scanner probes the entries it claimed from memory: a refused probe reschedules nothing in Redis."""
    queue = ReadyQueue(own_redis)
    queue.add(_target("job-1", free_port()), time.time())  # nothing listens there: every probe is refused
    settings = Settings(redis_url="redis://unused", ready_probe_initial_s=0.01, ready_probe_max_s=0.01)
    scanner = ReadyScanner(SimpleNamespace(store=SimpleNamespace(redis=own_redis)), settings)

    async def scan() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(scanner.run(stop))
        while scanner.probes < 20:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(scan())
    assert scanner.probes >= 20 and list(scanner.held) == ["job-1"]
    assert _calls(own_redis, "zadd") == 2  # the entry's add and its claim: none per probe
    assert own_redis.zscore(keys.READY_DUE, "job-1") > time.time()  # held: due again only if its lease ran out


def test_renewing_leases_lets_go_of_an_entry_another_scanner_took_over(own_redis):
    queue = ReadyQueue(own_redis)
    now = time.time()
    for job_id in ("kept", "taken"):
        queue.add(_target(job_id, 22), now)
    lease = now + 30
    assert sorted(t.job_id for t in queue.claim(now, 10, lease)) == ["kept", "taken"]
    own_redis.zadd(keys.READY_DUE, {"taken": now + 99})  # another scanner claimed it after this one stalled
    assert queue.renew({"kept": lease, "taken": lease}, now + 60) == ["kept"]
    assert own_redis.zscore(keys.READY_DUE, "kept") == now + 60
    assert own_redis.zscore(keys.READY_DUE, "taken") == now + 99


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


def test_the_access_log_never_shows_a_phone_home_token() -> None:
    """uvicorn logs each request's path; the phone-home path carries the job's one-time token."""
    import logging

    import producer.phonehome  # noqa: F401 - installs the filter on uvicorn's access logger

    token = "f" * 64
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", f"/ready/job-1/{token}", "1.1", 200), None,
    )  # fmt: skip
    other = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/jobs/job-1", "1.1", 200), None,
    )  # fmt: skip
    for record_ in (record, other):
        assert all(f.filter(record_) for f in logging.getLogger("uvicorn.access").filters)
    assert token not in record.getMessage() and "/ready/job-1/*** HTTP/1.1" in record.getMessage()
    assert "/jobs/job-1 HTTP/1.1" in other.getMessage()
