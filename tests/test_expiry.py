"""Expiry: a create's ttl_s / expires_at destroys its VM through an ordinary destroy job (real worker)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.probes import wait_for
from producer.control import ExtendRefused
from producer.fleet import FleetError, load_fleet
from vmqueue.models import Job, JobKind, JobState, VMInfo, VMSpec, VMStatus
from workers.expiry import Expiry, destroy_id

SPEC = {"provider": "sim", "name": "ttl-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}


@pytest.mark.system
def test_a_vm_past_its_ttl_is_destroyed_by_an_ordinary_destroy_job(sim_worker, provisioner, sim, ssh_key):
    job = provisioner.wait(provisioner.create_vm(SPEC, ssh_key, ttl_s=2).id, timeout_s=30)
    assert job.state == JobState.running and job.expires_at is not None
    assert [j.id for j in provisioner.list_vms().jobs] == [job.id]
    expired = wait_for(lambda: provisioner.get_job(job.id).expiry_job_id, 20, "expiry fired")
    # The claim (expiry_job_id) and the destroy job's record are one write: the id it names is a job.
    destroy = provisioner.wait(expired, timeout_s=30)
    assert destroy.kind == JobKind.destroy and destroy.state == JobState.gone
    assert destroy.instance_id == job.instance_id and f"create job {job.id} expired" in destroy.history[0].message
    job = provisioner.get_job(job.id)
    assert job.expired_at >= job.expires_at and job.vm_destroyed_by == destroy.id
    assert sim.live_vms() == [] and provisioner.list_vms().jobs == []
    with pytest.raises(ExtendRefused, match="expired already"):
        provisioner.extend(job.id, ttl_s=60)


@pytest.mark.system
def test_extend_moves_the_expiry(sim_worker, provisioner, sim, ssh_key):
    job = provisioner.wait(provisioner.create_vm(SPEC, ssh_key, ttl_s=2).id, timeout_s=30)
    moved = provisioner.extend(job.id, ttl_s=3600, by="alice")
    assert moved.expires_at > job.expires_at + timedelta(minutes=50)
    assert "by alice" in moved.history[-1].message
    time.sleep(3.5)  # past the first expiry, with the worker's check running every second
    assert provisioner.get_job(job.id).expiry_job_id is None and len(sim.live_vms()) == 1
    provisioner.extend(job.id, expires_at=datetime.now(UTC) + timedelta(seconds=1))
    wait_for(lambda: provisioner.get_job(job.id).vm_destroyed_by, 30, "destroyed after the second extend")
    assert sim.live_vms() == []


def test_bad_expiry_is_refused_before_anything_is_enqueued(provisioner, redis_client, ssh_key):
    past = datetime.now(UTC) - timedelta(seconds=1)
    for kwargs, message in (
        ({"ttl_s": 0}, "ttl_s must be"),
        ({"ttl_s": 5, "expires_at": datetime.now(UTC) + timedelta(hours=1)}, "not both"),
        ({"expires_at": past}, "in the past"),
        ({"expires_at": datetime(2030, 1, 1)}, "time zone"),
    ):
        with pytest.raises(ValueError, match=message):
            provisioner.create_vm(SPEC, ssh_key, **kwargs)
    assert redis_client.zcard("vmq:idx:all") == 0
    get = provisioner.store.add(Job(kind=JobKind.get, provider="sim", instance_id="sim-1"))
    with pytest.raises(ExtendRefused, match="only a create's VM expires"):
        provisioner.extend(get.id, ttl_s=60)


# A provider no test worker serves: the session's sim worker runs its own expiry checks.
QUIET = "hetzner"


def _running(store, expires_at: datetime) -> Job:
    spec = VMSpec(provider=QUIET, name="x", region="r", instance_type="t", image="img-1")
    job = store.add(Job(kind=JobKind.create, provider=QUIET, spec=spec, expires_at=expires_at))
    store.transition(job.id, JobState.submitting)
    store.transition(job.id, JobState.provisioning, instance_id=f"i-{job.id[:6]}")
    vm = VMInfo(provider=QUIET, instance_id=f"i-{job.id[:6]}", status=VMStatus.running)
    return store.transition(job.id, JobState.running, vm=vm)


def test_checkers_racing_enqueue_one_destroy_per_vm_and_resume_after_a_crash(provisioner, settings, redis_client):
    store = provisioner.store
    due = [_running(store, datetime.now(UTC) + timedelta(milliseconds=200)) for _ in range(30)]
    later = _running(store, datetime.now(UTC) + timedelta(hours=1))
    time.sleep(0.3)
    published: list[str] = []
    # Four workers' checks at the same moment (each with its own store, as in separate processes).
    stores = [type(store)(store.redis, settings) for _ in range(4)]
    checkers = [Expiry(each, settings, lambda j: published.append(j.id)) for each in stores]
    threads = [threading.Thread(target=c.run, args=([QUIET],)) for c in checkers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for checker in checkers:  # whatever one skipped (the lease was another's), a later check takes
        checker.run([QUIET])
    assert sorted(set(published)) == sorted(destroy_id(j.id) for j in due)
    assert len(published) == len(due)
    assert redis_client.zcard(f"vmq:idx:expires:{QUIET}") == 1  # only the one not due yet
    assert provisioner.get_job(later.id).expiry_job_id is None

    # A checker that died after its claim (step 2) but before sending the destroy job: the next one
    # sends it. The claim never names a job that does not exist: the record came in the same write.
    crashed = _running(store, datetime.now(UTC) + timedelta(milliseconds=100))
    time.sleep(0.2)
    assert checkers[0]._claim(store.get(crashed.id))
    claimed = store.get(crashed.id).expiry_job_id
    assert claimed == destroy_id(crashed.id)
    recorded = store.get(claimed)
    assert recorded is not None and recorded.kind == JobKind.destroy and recorded.enqueued_at is None
    assert checkers[1].run([QUIET]) == [claimed]
    destroy = store.get(claimed)
    assert destroy.state == JobState.queued and destroy.instance_id == crashed.instance_id
    assert destroy.history == recorded.history  # recorded once, by the claim; not again by the resume


def test_a_fleet_file_sets_expiry_for_its_vms(tmp_path: Path, ssh_key):
    (tmp_path / "key.pub").write_text(ssh_key)
    defaults = "defaults: {provider: sim, region: sim-1, instance_type: small, image: debian-12, ssh_key: key.pub"
    (tmp_path / "f.yaml").write_text(
        f"fleet: f\n{defaults}, ttl_s: 3600}}\nvms:\n  - name: a\n  - name: b\n    expires_at: 2031-01-01T00:00:00Z\n"
    )
    fleet = load_fleet(tmp_path / "f.yaml")
    assert [(vm.ttl_s, vm.expires_at) for vm in fleet.vms] == [(3600, None), (None, datetime(2031, 1, 1, tzinfo=UTC))]
    (tmp_path / "bad.yaml").write_text(
        f"fleet: f\n{defaults}}}\nvms:\n  - name: a\n    expires_at: 2001-01-01T00:00:00Z\n"
    )
    with pytest.raises(FleetError, match=r"bad.yaml:4: vms\[0\]: expires_at .* is in the past"):
        load_fleet(tmp_path / "bad.yaml")
