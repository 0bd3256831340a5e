"""AsyncProvisioner: the Provisioner API on redis.asyncio, publishing without a thread (real Redis, real worker)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pydantic import ValidationError

from producer.aclient import AsyncProvisioner
from producer.submit import IdempotencyConflict, JobNotFound
from vmqueue import keys

SPEC = {"provider": "sim", "name": "async-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}


def _masked(raw: str) -> dict:
    """A queued message with what differs between any two sends (ids, tags, host) blanked."""
    message = json.loads(raw)
    for name in ("id", "root_id", "origin"):
        message["headers"][name] = "*"
    for name in ("correlation_id", "delivery_tag"):
        message["properties"][name] = "*"
    return message


def test_the_async_publish_pushes_what_send_task_pushes(settings, redis_client, provisioner):
    queue = keys.queue_name("oci")  # no worker of the session consumes it
    provisioner.celery.send_task(keys.TASK_CREATE, args=["job-1"], queue=queue, argsrepr="(r)", kwargsrepr="{}")
    sync_raw = redis_client.rpop(queue)

    async def publish() -> None:
        async with AsyncProvisioner(settings, celery_app=provisioner.celery) as vmq:
            await vmq.publisher.send_task(keys.TASK_CREATE, ["job-1"], queue, "(r)")

    asyncio.run(publish())
    async_raw = redis_client.rpop(queue)
    assert _masked(async_raw) == _masked(sync_raw)
    assert json.loads(async_raw)["headers"]["id"] != json.loads(sync_raw)["headers"]["id"]
    with pytest.raises(KeyError, match="vmq.nowhere"):
        AsyncProvisioner(settings).publisher.message(keys.TASK_CREATE, ["x"], "vmq.nowhere", "(x)")


@pytest.mark.system
def test_async_create_read_destroy_and_idempotency_with_a_real_worker(settings, sim_worker, ssh_key, sim):
    async def scenario() -> None:
        threads = threading.active_count()
        async with AsyncProvisioner(settings) as vmq:
            # 30 creates at once on one event loop, one of them repeated under an idempotency key.
            specs = [{**SPEC, "name": f"async-{i}"} for i in range(30)]
            jobs = await asyncio.gather(*(vmq.create_vm(s, ssh_key, idempotency_key=f"k-{s['name']}") for s in specs))
            again = await vmq.create_vm(specs[0], ssh_key, idempotency_key="k-async-0")
            assert again.id == jobs[0].id
            with pytest.raises(IdempotencyConflict):
                await vmq.create_vm(specs[1], ssh_key, idempotency_key="k-async-0")
            # Nothing ran in a thread: no executor was made and no thread started.
            assert asyncio.get_running_loop()._default_executor is None  # type: ignore[attr-defined]
            assert threading.active_count() == threads

            done = await asyncio.gather(*(vmq.wait(j.id, timeout_s=30, poll_s=0.2) for j in jobs))
            assert {j.state for j in done} == {"running"}
            read = await vmq.wait((await vmq.get_vm("sim", done[0].instance_id)).id, timeout_s=30, poll_s=0.2)
            assert read.state == "done" and read.vm.status == "running"
            gone = await asyncio.gather(*(vmq.destroy_vm("sim", j.instance_id) for j in done))
            gone = await asyncio.gather(*(vmq.wait(j.id, timeout_s=30, poll_s=0.2) for j in gone))
            assert {j.state for j in gone} == {"gone"}

    asyncio.run(scenario())
    assert sim.live_vms() == []


def test_async_bad_input_is_refused_before_anything_is_written(settings, redis_client, app_keys, ssh_key):
    async def scenario() -> None:
        async with AsyncProvisioner(settings) as vmq:
            with pytest.raises(ValidationError) as caught:
                await vmq.create_vm({**SPEC, "name": "Not_A_Hostname"}, ssh_key)
            assert caught.value.errors()[0]["loc"] == ("spec", "name")
            with pytest.raises(ValidationError, match="instance_id"):
                await vmq.destroy_vm("sim", "bad id")
            with pytest.raises(JobNotFound, match="no job 'nope'"):
                await vmq.get_job("nope")

    asyncio.run(scenario())
    assert app_keys() == set()
