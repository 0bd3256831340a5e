"""vmqueue on a Sentinel-managed Redis: real redis-server and sentinel processes on loopback ports.

One master, two replicas and three sentinels per module; the tests fail the master over (gracefully,
so the old master answers READONLY, and by SIGKILL) while a real sim worker runs jobs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.harness import Worker, sim_spec
from bench.probes import Sim
from bench.sentinel import MASTER_NAME, SentinelRedis
from tests.conftest import FAST_ENV
from vmqueue.connection import (
    broker_transport_options,
    connect,
    is_sentinel_url,
    limits_storage_uri,
    parse_sentinel_url,
)
from vmqueue.models import JobState
from vmqueue.settings import Settings

pytestmark = pytest.mark.system


def test_a_sentinel_url_names_every_sentinel_and_the_masters_db_and_password():
    target = parse_sentinel_url("sentinel://:s3cret@h1:26380/2;sentinel://h2;sentinel://h3:26381")
    assert target.sentinels == [("h1", 26380), ("h2", 26379), ("h3", 26381)]
    assert (target.db, target.password) == (2, "s3cret")
    settings = Settings(redis_url="sentinel://h1:26380;sentinel://h2:26381", redis_master_name="main")
    assert broker_transport_options(settings)["master_name"] == "main"
    uri, options = limits_storage_uri(settings)
    assert uri == "redis+sentinel://h1:26380,h2:26381/main" and options["use_replicas"] is False
    assert not is_sentinel_url("redis://h1:6379/0") and broker_transport_options(Settings()) == {}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sentinel://h1:26379;redis://h2:6379", "is not a sentinel:// address"),
        ("sentinel://h1:port", "is not a number"),
        ("sentinel://", "without a host"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_its_reason(url, problem):
    with pytest.raises(ValueError, match=problem):
        parse_sentinel_url(url)


def test_with_wait_replicas_an_enqueue_waits_for_replicas_and_says_when_none_answered(settings, redis_client, caplog):
    """Against a Redis with no replica the enqueue still returns (after the WAIT timeout) and says
    the job is on the master only; the record and its script are both there."""
    from producer import Provisioner

    client = Provisioner(settings.model_copy(update={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 50}))
    job = client.create_vm(sim_spec("wait-1"), _key(), "#!/bin/sh\necho hi\n")
    assert client.get_job(job.id).id == job.id and client.store.script(job.id) == "#!/bin/sh\necho hi\n"
    assert f"job={job.id} recorded on the master, but only 0 of 1 replicas acknowledged" in caplog.text


@pytest.fixture(scope="module")
def sentinel_redis():
    with SentinelRedis(replicas=2, sentinels=3, down_after_ms=1000) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ha_env(sentinel_redis: SentinelRedis, test_env: dict[str, str]) -> dict[str, str]:
    return {
        **test_env,
        "REDIS_URL": sentinel_redis.url,
        "VMQ_REDIS_MASTER_NAME": MASTER_NAME,
        "VMQ_REDIS_WAIT_REPLICAS": "1",
    }


@pytest.fixture(scope="module")
def ha_settings(ha_env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("VMQ_").lower(): v for k, v in FAST_ENV.items()}
    return Settings(redis_url=ha_env["REDIS_URL"], redis_master_name=MASTER_NAME, redis_wait_replicas=1, **fields)


@pytest.fixture(scope="module")
def ha_worker(ha_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    worker = Worker("sim", ha_env, 16, Path(tmp_path_factory.mktemp("ha-logs"))).wait_ready(60)
    yield worker
    worker.stop()


def _run(provisioner, count: int, tag: str) -> list[str]:
    return [provisioner.create_vm(sim_spec(f"{tag}-{i}"), _key()).id for i in range(count)]


def _key() -> str:
    from tests.providers.contract import make_ed25519_key

    return make_ed25519_key()


def _wait_all(provisioner, ids: list[str], timeout_s: float = 60, sweep_every_s: float | None = None) -> list:
    """The jobs once all finished (or at the timeout). ``sweep_every_s``: meanwhile, the deployment's
    periodic sweeper (its rescue re-sends a step whose message a failover lost)."""
    from producer.sweep import request_sweep
    from vmqueue.sweep import SweepRequest

    deadline = time.monotonic() + timeout_s
    next_sweep = time.monotonic() + (sweep_every_s or 0)
    while True:
        jobs = [provisioner.get_job(i) for i in ids]
        if all(j.finished for j in jobs) or time.monotonic() > deadline:
            return jobs
        if sweep_every_s and time.monotonic() > next_sweep:
            request_sweep(provisioner.celery, SweepRequest(provider="sim", delay_s=24 * 3600))
            next_sweep = time.monotonic() + sweep_every_s
        time.sleep(0.2)


def test_every_part_runs_on_sentinel_and_rides_out_a_graceful_failover(sentinel_redis, ha_settings, ha_worker):
    """The job store, rate limiter, broker and sim all reach the master through the sentinels; a
    SENTINEL FAILOVER demotes the master mid-run (its clients get READONLY) and nothing is lost."""
    from producer import Provisioner
    from workers.calls import SharedRateLimit

    provisioner = Provisioner(ha_settings)
    SharedRateLimit(ha_settings).acquire("sim")  # the limits storage speaks redis+sentinel
    before = _run(provisioner, 10, "ha-a")
    old = sentinel_redis.master_port()
    sentinel_redis.failover()
    during = _run(provisioner, 10, "ha-b")  # enqueued while the master changes
    new = sentinel_redis.wait_promoted(old)
    jobs = _wait_all(provisioner, before + during)
    assert new != old
    assert [j.state for j in jobs] == [JobState.running] * 20, [(j.state, j.error) for j in jobs]
    sim = Sim(connect(ha_settings))
    owners = [sim.job_of(vm) for vm in sim.existing_vms()]
    assert sorted(o for o in owners if o in {*before, *during}) == sorted(before + during)


def test_a_killed_master_loses_no_job_and_makes_no_second_vm(sentinel_redis, ha_settings, ha_worker):
    """SIGKILL of the master while creates and destroys run: Sentinel promotes a replica, producers
    and the worker reconnect by themselves, every job ends, one VM per running job."""
    from producer import Provisioner

    sentinel_redis.wait_healthy()  # the previous test's failover is over: one failure at a time
    provisioner = Provisioner(ha_settings)
    created = _wait_all(provisioner, _run(provisioner, 10, "ha-c"))
    assert all(j.state == JobState.running for j in created)
    destroys = [provisioner.destroy_vm("sim", j.instance_id).id for j in created[:5]]
    creates = _run(provisioner, 10, "ha-d")
    killed = sentinel_redis.kill_master()
    sentinel_redis.wait_promoted(killed)
    more = _run(provisioner, 5, "ha-e")  # a producer after the failover finds the new master itself
    jobs = _wait_all(provisioner, destroys + creates + more, timeout_s=90, sweep_every_s=3)
    unfinished = [(j.id, j.kind, j.state, [h.message for h in j.history][-3:]) for j in jobs if not j.finished]
    assert not unfinished
    running = {j.id for j in jobs if j.kind == "create" and j.state == JobState.running}
    sim = Sim(connect(ha_settings))
    per_job = [o for o in map(sim.job_of, sim.existing_vms()) if o in running]
    assert sorted(per_job) == sorted(running)  # exactly one VM per running job
    assert all(j.state == JobState.gone for j in jobs[:5])


def test_flower_reads_the_queues_through_the_sentinels(ha_env, tmp_path):
    """Flower gets its broker URL and master name from the one Celery configuration."""
    from bench.probes import Flower

    flower = Flower(ha_env, tmp_path).wait_ready(60)
    try:
        answer = flower.get("/api/queues/length")
        assert answer.status_code == 200, answer.text
        assert "vmq.sim" in {q["name"] for q in answer.json()["active_queues"]}
    finally:
        flower.stop()


def test_the_async_client_reaches_the_master_through_the_sentinels(ha_settings, sentinel_redis):
    """The web API's AsyncProvisioner (redis.asyncio) speaks Sentinel too."""
    import asyncio

    from producer.aclient import AsyncProvisioner

    async def enqueue_and_read() -> tuple[str, str]:
        client = AsyncProvisioner(ha_settings)
        job = await client.get_vm("sim", "sim-nothing")
        return job.id, (await client.get_job(job.id)).id

    created, read = asyncio.run(enqueue_and_read())
    assert created == read


def test_a_command_on_a_connection_to_the_killed_master_reaches_the_new_one(sentinel_redis, ha_settings):
    """The reconnect inside a command's retry asks the sentinels again (redis-py 7 would retry the
    dead master's address until its retries ran out), for the blocking and the asyncio client."""
    import asyncio

    from vmqueue.connection import connect_async

    sentinel_redis.wait_healthy()
    blocking = connect(ha_settings)
    blocking.set("vmq:test:before", "1")  # a pooled connection to the current master

    async def async_client():
        client = connect_async(ha_settings)
        await client.set("vmq:test:before-async", "1")
        return client

    loop = asyncio.new_event_loop()
    try:
        aclient = loop.run_until_complete(async_client())
        killed = sentinel_redis.kill_master()
        assert blocking.set("vmq:test:after", "1")  # its connection died with the master
        assert loop.run_until_complete(aclient.set("vmq:test:after-async", "1"))
        assert sentinel_redis.master_port() != killed
        loop.run_until_complete(aclient.aclose())
    finally:
        loop.close()
