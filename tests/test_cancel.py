"""Cancel, through the real pipeline: a real sim worker, real Redis; exactly zero VMs at the end."""

from __future__ import annotations

import random
import threading
import time

import pytest

from bench.probes import wait_for
from producer.control import CancelRefused
from vmqueue.models import CleanupState, JobState

pytestmark = pytest.mark.system


def spec(name: str = "web-1") -> dict:
    return {"provider": "sim", "name": name, "region": "sim-1", "instance_type": "small", "image": "ubuntu-24.04"}


def state_of(provisioner, job_id: str) -> JobState:
    return provisioner.get_job(job_id).state


def ended_cancelled_and_clean(provisioner, sim, job_id: str, cleanup: CleanupState | None) -> None:
    job = provisioner.wait(job_id, timeout_s=30)
    assert job.state == JobState.cancelled
    assert job.cleanup == cleanup
    assert job.cancel is not None and job.cancel.by == "alice"
    assert sim.live_vms() == []


@pytest.fixture
def paused_queue(sim_worker, provisioner):
    """The session's sim worker stops taking messages; ``resume()`` starts it again (also at teardown)."""
    control = provisioner.celery.control

    def resume() -> None:
        control.add_consumer("vmq.sim", destination=[sim_worker.name], reply=True, timeout=5)

    control.cancel_consumer("vmq.sim", destination=[sim_worker.name], reply=True, timeout=5)
    yield resume
    resume()


def test_cancel_of_a_queued_create_never_calls_the_provider(paused_queue, provisioner, sim, redis_client, ssh_key):
    job = provisioner.create_vm(spec(), ssh_key, "#!/bin/sh\necho hi\n")
    cancelled = provisioner.cancel(job.id, by="alice", reason="order withdrawn")
    assert cancelled.state == JobState.cancelled  # at once: no worker had acted
    assert not redis_client.exists(f"vmq:job:{job.id}:script")
    assert "cancelled by alice before any worker acted: order withdrawn" in cancelled.history[-1].message
    paused_queue()
    wait_for(lambda: redis_client.llen("vmq.sim") == 0, 15, "the create message consumed")
    time.sleep(0.5)  # the worker's step (a no-op on a cancelled job) has run
    assert sim.calls().get("create", 0) == 0
    ended_cancelled_and_clean(provisioner, sim, job.id, None)


def test_cancel_racing_the_create_answer_destroys_the_vm_it_made(sim_worker, provisioner, sim, ssh_key):
    # The create call takes 1.5 s: the cancel lands while it is out, and its answer comes after.
    sim.configure(latency_ms=1500, boot_s=0.5)
    job = provisioner.create_vm(spec(), ssh_key)
    wait_for(lambda: state_of(provisioner, job.id) == JobState.submitting, 15, "submitting")
    time.sleep(0.3)
    asked = provisioner.cancel(job.id, by="alice")
    assert asked.state == JobState.submitting and asked.cancel_pending
    sim.configure(latency_ms=0)
    ended_cancelled_and_clean(provisioner, sim, job.id, CleanupState.done)
    job = provisioner.get_job(job.id)
    assert job.instance_id is not None  # the answer was recorded, then the VM destroyed
    assert sim.calls()["create"] == 1 and sim.calls()["destroy"] == 1
    # Events report the request (who, while submitting) and the end, like any change.
    changes = [change for _, change in provisioner.events([job.id])]
    asked = [c for c in changes if c.cancel is not None]
    assert asked[0].state == JobState.submitting and asked[0].cancel.by == "alice"
    assert "cancel requested by alice" in asked[0].message
    assert [c.state for c in changes if c.previous != c.state][-1] == JobState.cancelled
    assert changes[-1].finished and changes[-1].cleanup == CleanupState.done


def test_cancel_while_provisioning_destroys_the_booting_vm(sim_worker, provisioner, sim, ssh_key):
    sim.configure(boot_s=5)  # long enough that the tick chain carries the job when the cancel comes
    job = provisioner.create_vm(spec(), ssh_key)
    wait_for(lambda: state_of(provisioner, job.id) == JobState.provisioning, 15, "provisioning")
    provisioner.cancel(job.id, by="alice")
    ended_cancelled_and_clean(provisioner, sim, job.id, CleanupState.done)
    # Acted on at once (the step sent with the cancel), not when the tick saw the VM running.
    assert JobState.running not in [e.state for e in provisioner.get_job(job.id).history]


def test_cancel_of_a_running_create_destroys_its_vm(sim_worker, provisioner, sim, redis_client, ssh_key):
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    assert job.state == JobState.running and redis_client.ttl(f"vmq:job:{job.id}") == -1
    assert provisioner.list_vms().jobs[0].id == job.id
    provisioner.cancel(job.id, by="alice")
    ended_cancelled_and_clean(provisioner, sim, job.id, CleanupState.done)
    assert redis_client.ttl(f"vmq:job:{job.id}") > 0  # its record expires again, like any ended job
    assert provisioner.list_vms().jobs == []


def test_cancel_is_idempotent_and_history_says_who_and_when(sim_worker, provisioner, sim, ssh_key):
    job = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    first = provisioner.cancel(job.id, by="alice", reason="not needed")
    second = provisioner.cancel(job.id, by="bob")
    asked = ("by", "at", "reason")
    assert second.cancel.model_dump(include=set(asked)) == first.cancel.model_dump(
        include=set(asked)
    )  # the first stands
    ended_cancelled_and_clean(provisioner, sim, job.id, CleanupState.done)
    third = provisioner.cancel(job.id, by="bob")
    assert third.state == JobState.cancelled and third.cancel.by == "alice"
    messages = [e.message for e in provisioner.get_job(job.id).history]
    assert sum("cancel requested by alice: not needed" in m for m in messages) == 1
    assert not any("bob" in m for m in messages)
    assert any(m.startswith("cancelled (asked by alice at ") for m in messages)


def test_cancel_of_a_queued_destroy_sends_no_delete(paused_queue, sim_worker, provisioner, sim, redis_client, ssh_key):
    paused_queue()
    created = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    provisioner.celery.control.cancel_consumer("vmq.sim", destination=[sim_worker.name], reply=True, timeout=5)
    destroy = provisioner.destroy_vm("sim", created.instance_id)
    assert provisioner.cancel(destroy.id, by="alice").state == JobState.cancelled
    paused_queue()
    wait_for(lambda: redis_client.llen("vmq.sim") == 0, 15, "the destroy message consumed")
    time.sleep(0.5)
    assert sim.calls().get("destroy", 0) == 0 and len(sim.live_vms()) == 1
    assert provisioner.wait(provisioner.destroy_vm("sim", created.instance_id).id, timeout_s=30).state == JobState.gone
    assert sim.live_vms() == []


def test_a_destroy_cannot_be_cancelled_once_its_delete_was_sent(sim_worker, provisioner, sim, ssh_key):
    sim.configure(destroy_s=1.5)
    created = provisioner.wait(provisioner.create_vm(spec(), ssh_key).id, timeout_s=30)
    destroy = provisioner.destroy_vm("sim", created.instance_id)
    wait_for(lambda: provisioner.get_job(destroy.id).delete_sent_at, 15, "delete sent")
    with pytest.raises(CancelRefused, match="once its delete was sent"):
        provisioner.cancel(destroy.id, by="alice")
    assert provisioner.wait(destroy.id, timeout_s=30).state == JobState.gone
    assert provisioner.get_job(destroy.id).cancel is None
    assert provisioner.get_job(created.id).vm_destroyed_by == destroy.id  # the create job knows
    assert sim.live_vms() == []
    with pytest.raises(CancelRefused, match="already ended gone"):
        provisioner.cancel(destroy.id, by="alice")


def test_cancels_at_random_moments_leave_no_vm(sim_worker, provisioner, sim, ssh_key):
    """Cancels landing anywhere in a create's life (queued, in the create call, booting, running)."""
    sim.configure(latency_ms=500, boot_s=1.0)
    jobs = [provisioner.create_vm(spec(f"race-{i}"), ssh_key) for i in range(12)]
    # From at once (queued, or the create call out) over booting to running, in random order.
    delays = random.Random(19).sample([0, 0, 0.05, 0.1, 0.2, 0.35, 0.6, 0.9, 1.2, 1.5, 2.2, 2.8], 12)
    seen: list[JobState] = []

    def cancel_later(job_id: str, delay_s: float) -> None:
        time.sleep(delay_s)
        seen.append(provisioner.cancel(job_id, by="alice").state)

    threads = [threading.Thread(target=cancel_later, args=(j.id, d)) for j, d in zip(jobs, delays, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = [provisioner.wait(job.id, timeout_s=45) for job in jobs]
    assert len(set(seen)) >= 3, f"cancels met too few states to mean anything: {seen}"
    assert all(job.state == JobState.cancelled for job in ended)
    # A VM whose id was recorded was destroyed; a job without one never had a VM made.
    assert all(job.cleanup == (CleanupState.done if job.instance_id else None) for job in ended)
    assert sim.live_vms() == []
    assert sim.calls().get("destroy", 0) == sum(job.instance_id is not None for job in ended)


def test_webhooks_report_cancels_made_by_the_producer_and_by_the_worker(
    paused_queue, worker_factory, settings, sim, ssh_key
):
    from producer import Provisioner
    from tests.test_webhooks import SECRET, Receiver, _verified

    receiver = Receiver({"/queued": lambda n: (200, 0), "/booting": lambda n: (200, 0)})
    try:
        worker_factory(
            "webhooks",
            env={"VMQ_WEBHOOK_SECRET": SECRET, "VMQ_WEBHOOK_ALLOW_HTTP": "true", "VMQ_WEBHOOK_ALLOW_PRIVATE": "true"},
            concurrency=2,
        )
        vmq = Provisioner(settings.model_copy(update={"webhook_allow_http": True}))
        queued = vmq.create_vm(spec("hook-q"), ssh_key, callback_url=receiver.url + "/queued")
        assert vmq.cancel(queued.id, by="alice").state == JobState.cancelled  # by the producer: no hooks there
        paused_queue()  # a worker takes the job's message and reports the cancel
        sim.configure(boot_s=5)
        booting = vmq.create_vm(spec("hook-b"), ssh_key, callback_url=receiver.url + "/booting")
        wait_for(lambda: state_of(vmq, booting.id) == JobState.provisioning, 15, "provisioning")
        vmq.cancel(booting.id, by="bob")
        ended = vmq.wait(booting.id, timeout_s=30)
        assert ended.state == JobState.cancelled and sim.live_vms() == []
        wait_for(lambda: all(receiver.requests.values()), 20, "both webhooks")
        time.sleep(1.0)  # a second report would have come by now
        for path, job, who in (("/queued", queued, "alice"), ("/booting", booting, "bob")):
            (request,) = receiver.requests[path]  # reported once
            body = _verified(request)
            assert body["type"] == "job.cancelled" and body["data"]["id"] == job.id
            assert body["data"]["cancel"]["by"] == who and body["data"]["cancel"]["reported_at"]
    finally:
        receiver.close()


def test_vmq_wait_on_a_cancelled_job_exits_1(paused_queue, provisioner, ssh_key, test_env, redis_client, cli_env):
    """A cancelled job did not succeed: `vmq wait` (and `create --wait`, `apply`) exit 1 for it."""
    from typer.testing import CliRunner

    from producer.cli import app

    job = provisioner.cancel(provisioner.create_vm(spec(), ssh_key).id).id
    assert not provisioner.get_job(job).succeeded
    result = CliRunner().invoke(app, ["wait", job, "--timeout", "5"], env={"REDIS_URL": test_env["REDIS_URL"]})
    assert result.exit_code == 1, result.output


def test_vmq_cancel_and_extend_take_the_id_prefix_the_table_shows(
    paused_queue, provisioner, ssh_key, test_env, cli_env
):
    """The job table shows 8 characters of an id; `vmq cancel` and `vmq extend` said "no job" for them."""
    from typer.testing import CliRunner

    from producer.cli import app

    env = {"REDIS_URL": test_env["REDIS_URL"]}
    job = provisioner.create_vm(spec(), ssh_key, ttl_s=3600)
    extended = CliRunner().invoke(app, ["extend", job.id[:8], "--ttl", "7200"], env=env)
    assert extended.exit_code == 0, extended.output
    assert provisioner.get_job(job.id).expires_at > job.expires_at
    cancelled = CliRunner().invoke(app, ["cancel", job.id[:8]], env=env)
    assert cancelled.exit_code == 0, cancelled.output
    assert provisioner.get_job(job.id).state == JobState.cancelled
