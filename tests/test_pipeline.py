"""The whole pipeline on the simulated cloud: producer -> Redis -> real Celery workers -> job store."""

from __future__ import annotations

import json
import threading
import time

import pytest

from producer.client import IdempotencyConflict
from vmqueue.models import CleanupState, JobState, VMStatus

pytestmark = pytest.mark.system

SECRET = "MARKER-7f3a-never-in-a-message"


def spec(name: str = "web-1", **extra: object) -> dict:
    return {
        "provider": "sim",
        "name": name,
        "region": "sim-1",
        "instance_type": "small",
        "image": "ubuntu-24.04",
        "labels": {"team": "infra"},
        **extra,
    }


def test_create_running_with_ip_then_destroy_gone(sim_worker, provisioner, sim, redis_client, ssh_key):
    job = provisioner.create_vm(spec(), ssh_key, "#!/bin/sh\necho hello\n")
    assert job.state == JobState.queued

    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.running
    assert job.vm.status == VMStatus.running
    assert job.vm.public_ipv4 and job.vm.private_ipv4
    assert job.vm.image == "sim-ubuntu-2404"  # the alias was resolved once and stored with the job
    assert job.vm.labels == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": job.id}
    assert redis_client.ttl(f"vmq:job:{job.id}") == -1  # a running VM's record never expires
    states = [event.state for event in job.history]
    assert states[0] == JobState.submitting and JobState.provisioning in states and states[-1] == JobState.running

    gone = provisioner.wait(provisioner.destroy_vm("sim", job.vm.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone
    assert sim.live_vms() == []


def test_vms_in_flight_share_batched_status_reads(sim_worker, provisioner, sim, redis_client, ssh_key):
    sim.configure(boot_s=2)
    jobs = [provisioner.create_vm(spec(f"web-{i}"), ssh_key) for i in range(20)]
    finished = [provisioner.wait(job.id, timeout_s=30) for job in jobs]
    assert all(job.state == JobState.running and job.vm.public_ipv4 for job in finished)
    calls = sim.calls()
    # One batched read covers every VM in flight: far fewer reads than one per VM per poll.
    assert calls["get_many"] >= 1
    assert calls["create"] == 20 and calls.get("get", 0) + calls["get_many"] < 20
    assert redis_client.hlen("vmq:watch:sim") == 0  # nothing is watched once every job settled


def test_a_lost_tick_chain_is_replaced(sim_worker, provisioner, sim, redis_client, ssh_key):
    sim.configure(boot_s=1.5)
    job = provisioner.create_vm(spec(), ssh_key)
    _wait_for(lambda: redis_client.exists("vmq:ticker:sim"), timeout_s=10)
    redis_client.set("vmq:ticker:sim", "a-chain-that-died", px=500)  # as if its worker had been killed
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.running


def test_get_of_a_missing_vm_fails_not_found(sim_worker, provisioner):
    job = provisioner.wait(provisioner.get_vm("sim", "sim-999999").id, timeout_s=30)
    assert job.state == JobState.failed
    assert job.error.code == "not_found"


def test_get_reads_a_running_vm(sim_worker, provisioner, ssh_key):
    created = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    read = provisioner.wait(provisioner.get_vm("sim", created.instance_id).id, timeout_s=30)
    assert read.state == JobState.done
    assert read.vm.status == VMStatus.running and read.vm.public_ipv4 == created.vm.public_ipv4


def test_destroy_of_an_unknown_vm_is_gone(sim_worker, provisioner):
    job = provisioner.wait(provisioner.destroy_vm("sim", "sim-424242").id, timeout_s=30)
    assert job.state == JobState.gone


def test_same_create_message_delivered_twice_makes_one_vm(sim_worker, provisioner, sim, ssh_key):
    job = provisioner.create_vm(spec(), ssh_key)
    # The producer already sent one message; a second identical one is what at-least-once delivery does.
    provisioner.celery.send_task("vmq.create", args=[job.id], queue="vmq.sim")
    provisioner.celery.send_task("vmq.create", args=[job.id], queue="vmq.sim")
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.running
    assert len(sim.live_vms()) == 1
    assert sim.calls().get("create") >= 1


def test_idempotency_key_dedups_at_the_producer(sim_worker, provisioner, sim, ssh_key):
    first = provisioner.create_vm(spec(), ssh_key, idempotency_key="order-42")
    second = provisioner.create_vm(spec(), ssh_key, idempotency_key="order-42")
    assert second.id == first.id
    provisioner.wait(first.id, timeout_s=30)
    # Also once the worker has fixed the job's parameters (the alias resolved in the stored spec).
    assert provisioner.create_vm(spec(), ssh_key, idempotency_key="order-42").id == first.id
    with pytest.raises(IdempotencyConflict):
        provisioner.create_vm(spec(name="other"), ssh_key, idempotency_key="order-42")
    assert len(sim.live_vms()) == 1


def test_worker_killed_mid_create_then_restarted_makes_exactly_one_vm(
    sim_worker_paused, worker_factory, provisioner, sim, ssh_key
):
    # The create call takes 1.5 s, so the SIGKILL lands inside it: the VM may or may not exist yet.
    sim.configure(latency_ms=1500, boot_s=0.5)
    worker = worker_factory("sim")
    job = provisioner.create_vm(spec(), ssh_key)
    _wait_for(lambda: provisioner.get_job(job.id).state == JobState.submitting, timeout_s=15)
    time.sleep(0.3)
    worker.kill()

    sim.configure(latency_ms=0)
    worker_factory("sim")  # the message comes back after the visibility timeout
    job = provisioner.wait(job.id, timeout_s=60)
    assert job.state == JobState.running
    assert len(sim.live_vms()) == 1
    assert job.attempts >= 2  # it really ran again


def test_vm_stuck_pending_fails_at_the_deadline_and_is_destroyed(sim_worker, provisioner, sim, ssh_key):
    sim.configure(stuck_rate=1.0)
    job = provisioner.create_vm(spec(), ssh_key, deadline_s=2)
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.failed
    assert job.error.code == "deadline_exceeded"
    assert job.cleanup == CleanupState.done
    assert sim.live_vms() == []


def test_vm_ending_in_error_fails_and_is_destroyed(sim_worker, provisioner, sim, ssh_key):
    sim.configure(error_rate=1.0)
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    assert job.state == JobState.failed and job.error.code == "vm_error"
    assert job.cleanup == CleanupState.done
    assert sim.live_vms() == []


def test_destroy_on_failure_can_be_turned_off(sim_worker, provisioner, sim, ssh_key):
    sim.configure(error_rate=1.0)
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key, destroy_on_failure=False).id, timeout_s=30)
    assert job.state == JobState.failed and job.cleanup == CleanupState.skipped
    assert len(sim.live_vms()) == 1


def test_429_with_retry_after_is_retried_after_that_delay(sim_worker, provisioner, sim, ssh_key):
    # Every call meets a 429 until the test lifts it; Retry-After (2 s) exceeds the in-call wait
    # limit (0.5 s in tests), so the task reschedules itself with exactly that countdown.
    sim.configure(rate_limit_rate=1.0, retry_after_s=2)
    job = provisioner.create_vm(spec(), ssh_key)
    # The image lookup meets it first, unless this worker resolved the image before (kept an hour).
    _wait_for(lambda: any(sim.calls().get(f"{k}:rate_limited", 0) for k in ("prepare", "create")), timeout_s=15)
    sim.configure(rate_limit_rate=0.0)
    job = provisioner.wait(job.id, timeout_s=30)
    assert job.state == JobState.running
    assert any("rate_limited" in e.message and "in 2.0s" in e.message for e in job.history)
    creates = [c for c in sim.call_log() if c["kind"] in ("prepare", "create")]  # the image lookup first
    limited = next(c for c in creates if c["outcome"] == "rate_limited")
    after = next(c for c in creates if c["outcome"] == "call" and c["t"] > limited["t"])
    assert after["t"] - limited["t"] >= 2.0  # the next try waited at least Retry-After


def test_transient_errors_are_retried_until_success(sim_worker, provisioner, sim, ssh_key):
    sim.configure(transient_rate=0.5)
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=60)
    assert job.state == JobState.running, job.history
    assert len(sim.live_vms()) == 1


@pytest.mark.parametrize(
    ("knobs", "code"),
    [({"capacity_rate": 1.0}, "capacity"), ({"token": "only-the-right-token"}, "auth")],
)
def test_capacity_and_auth_errors_fail_at_once_without_retry(sim_worker, provisioner, sim, ssh_key, knobs, code):
    sim.configure(**knobs)
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    assert job.state == JobState.failed
    assert job.error.code == code and job.error.retryable is False
    # No retry of any layer: the refused call was made once (auth refuses the first call, the image
    # lookup unless this worker resolved the image before; capacity refuses the create itself).
    refused = {kind: n for kind, n in sim.calls().items() if kind.endswith(f":{code}")}
    assert sum(refused.values()) == 1 and (code == "auth" or refused == {"create:capacity": 1})
    assert sim.calls().get("create", 0) == 1 or code == "auth"
    assert sim.live_vms() == []


def test_lost_create_answer_still_makes_one_vm(sim_worker, provisioner, sim, ssh_key):
    # The cloud creates the VM but the answer never arrives; the retry carries the same token.
    sim.configure(lost_response_rate=1.0)
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    assert job.state == JobState.running
    assert sim.calls()["create:lost_response"] == 1 and sim.calls()["create"] >= 2
    assert len(sim.live_vms()) == 1


def test_startup_script_never_travels_in_messages_or_task_args(sim_worker, provisioner, redis_client, sim, ssh_key):
    # A 429 makes the create step wait as a scheduled (countdown) retry the worker can be asked about:
    # the retry is where argsrepr would be lost (DESIGN §6), so its args are what must stay clean.
    sim.configure(rate_limit_rate=1.0, retry_after_s=3)
    seen: list[str] = []
    stop = threading.Event()

    def scan_redis() -> None:
        # Everything in Redis but the script's own key: queues, unacked messages, events, job records.
        while not stop.is_set():
            for key in redis_client.scan_iter(count=1000):
                if key.endswith(":script"):
                    continue
                kind = redis_client.type(key)
                values = {
                    "string": lambda k: [redis_client.get(k) or ""],
                    "list": lambda k: redis_client.lrange(k, 0, -1),
                    "hash": lambda k: list(redis_client.hgetall(k).values()),
                    "zset": lambda k: redis_client.zrange(k, 0, -1),
                    "set": lambda k: list(redis_client.smembers(k)),
                }.get(kind, lambda k: [])(key)
                seen.extend(v for v in values if SECRET in v)
            time.sleep(0.02)

    scanner = threading.Thread(target=scan_redis, daemon=True)
    scanner.start()
    job = provisioner.create_vm(spec(), ssh_key, f"#!/bin/sh\nexport TOKEN={SECRET}\n")
    assert provisioner.store.script(job.id) is not None  # stored beside the job for the worker...
    scheduled = _wait_for(lambda: [t for t in _scheduled_tasks(provisioner) if job.id in json.dumps(t)], timeout_s=10)
    sim.configure(rate_limit_rate=0.0)
    job = provisioner.wait(job.id, timeout_s=30)
    stop.set()
    scanner.join()

    assert job.state == JobState.running
    assert seen == []
    assert SECRET not in json.dumps(scheduled)  # the job's poll, with its args as the worker reports them
    assert SECRET not in sim_worker.log()
    assert SECRET not in job.model_dump_json()
    assert provisioner.store.script(job.id) is None  # ...and deleted once the create is over


def _scheduled_tasks(provisioner) -> list:
    replies = provisioner.celery.control.inspect(timeout=1).scheduled() or {}
    return [task for tasks in replies.values() for task in tasks]


def _wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_capacity_failover_moves_to_the_next_placement(sim_worker, provisioner, sim, ssh_key):
    sim.configure(full_regions="sim-1,sim-2")
    fallbacks = [{"region": "sim-2"}, {"region": "sim-3", "instance_type": "large"}, {"region": "sim-4"}]
    job = provisioner.wait(provisioner.create_vm(spec(fallbacks=fallbacks), ssh_key).id, timeout_s=30)
    assert job.state == JobState.running
    assert (job.vm.region, job.vm.instance_type) == ("sim-3", "large")
    assert job.placement == 2
    assert [e.message for e in job.history if "failing over" in e.message] == [
        "no capacity in sim-1 (small): no capacity for small in sim-1; failing over to sim-2 (small)",
        "no capacity in sim-2 (small): no capacity for small in sim-2; failing over to sim-3 (large)",
    ]
    assert len(sim.live_vms()) == 1 and sim.calls()["create:capacity"] == 2
    # The new placement's VM carries its attempt's key, which names the job.
    assert job.vm.labels["vmqueue-job"] == f"{job.id}-p2"


def test_capacity_everywhere_fails_with_every_placement_named(sim_worker, provisioner, sim, ssh_key):
    sim.configure(full_regions="sim-1,sim-2")
    job = provisioner.wait(provisioner.create_vm(spec(fallbacks=[{"region": "sim-2"}]), ssh_key).id, timeout_s=30)
    assert job.state == JobState.failed and job.error.code == "capacity"
    assert "no capacity in any placement tried: sim-1 (small), sim-2 (small)" in job.error.message
    assert sim.live_vms() == []
