"""``Provisioner.create_vms``: many creates validated first, stored in one MULTI/EXEC, published in one batch."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.client import IdempotencyConflict
from vmqueue import keys
from vmqueue.models import JobState

pytestmark = pytest.mark.system


def spec(name: str, **extra: object) -> dict:
    return {
        "provider": "sim",
        "name": name,
        "region": "sim-1",
        "instance_type": "small",
        "image": "ubuntu-24.04",
        **extra,
    }


def test_create_vms_runs_every_job_like_create_vm(sim_worker, provisioner, sim, ssh_key) -> None:
    sim.configure(boot_s=1)
    creates = [{"spec": spec(f"bulk-{i}"), "ssh_key": ssh_key} for i in range(12)]
    creates[3]["startup_script"] = "#!/bin/sh\necho hi\n"
    jobs = provisioner.create_vms(creates)
    assert [job.spec.name for job in jobs] == [f"bulk-{i}" for i in range(12)]
    assert all(job.state == JobState.queued for job in jobs)
    finished = [provisioner.wait(job.id, timeout_s=60) for job in jobs]
    assert all(job.state == JobState.running and job.vm.public_ipv4 for job in finished)
    assert finished[3].has_startup_script and sim.calls()["create"] >= 12


def test_one_bad_create_enqueues_nothing_and_names_its_index(provisioner, redis_client, ssh_key) -> None:
    creates = [{"spec": spec(f"ok-{i}"), "ssh_key": ssh_key} for i in range(5)]
    creates[3] = {"spec": spec("bad", region=""), "ssh_key": ssh_key}
    before = redis_client.llen(keys.queue_name("sim"))
    with pytest.raises(ValidationError) as raised:
        provisioner.create_vms(creates)
    assert "in create 3 of the batch" in "".join(raised.value.__notes__)
    assert redis_client.llen(keys.queue_name("sim")) == before
    assert not [k for k in redis_client.scan_iter(f"{keys.JOB_PREFIX}*") if "ok-" in (redis_client.get(k) or "")]


def test_idempotency_keys_in_a_batch_return_the_same_jobs(sim_worker, provisioner, ssh_key) -> None:
    creates = [{"spec": spec(f"idem-{i}"), "ssh_key": ssh_key, "idempotency_key": f"batch-{i}"} for i in range(4)]
    first = provisioner.create_vms(creates)
    again = provisioner.create_vms([*creates, {"spec": spec("idem-new"), "ssh_key": ssh_key}])
    assert [j.id for j in again[:4]] == [j.id for j in first] and again[4].id not in {j.id for j in first}
    clash = [{"spec": spec("other"), "ssh_key": ssh_key, "idempotency_key": "batch-0"}]
    with pytest.raises(IdempotencyConflict):
        provisioner.create_vms([{"spec": spec("fresh"), "ssh_key": ssh_key, "idempotency_key": "fresh-1"}, *clash])
    # The conflict released the key this call had claimed: a later batch gets it.
    [fresh] = provisioner.create_vms([{"spec": spec("fresh"), "ssh_key": ssh_key, "idempotency_key": "fresh-1"}])
    # Every job ends here, so no create of this test lands in the next one's cloud.
    for job in [*again, fresh]:
        assert provisioner.wait(job.id, timeout_s=60).state == JobState.running


def _jobs(count: int) -> list:
    from vmqueue.models import Job, JobKind, VMSpec

    return [Job(kind=JobKind.create, provider="sim", ssh_key="k", spec=VMSpec(**spec(f"m-{i}"))) for i in range(count)]


def test_many_creates_share_messages_few_stay_one_message_each() -> None:
    from producer.bulk import MESSAGE_JOBS, messages

    many = messages(_jobs(1000))
    assert {task for task, *_ in many} == {keys.TASK_CREATE_MANY}
    assert len(many) >= 64 and all(1 < len(args[0]) <= MESSAGE_JOBS for _, _, _, args, _ in many)
    carried = [job_id for _, _, _, args, _ in many for job_id in args[0]]
    assert len(carried) == len(set(carried)) == 1000
    assert all(queue == "vmq.sim" and "m-" in argsrepr for _, queue, _, _, argsrepr in many)
    few = _jobs(63)
    assert [(task, task_id, args) for task, _, task_id, args, _ in messages(few)] == [
        (keys.TASK_CREATE, job.id, [job.id]) for job in few
    ]


def _task_events(pubsub) -> list[dict]:
    """The Celery events published on Redis so far, decoded as Flower's receiver decodes them."""
    import base64
    import json

    events = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        if message["type"] != "pmessage":
            continue
        envelope = json.loads(message["data"])
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        events += decoded if isinstance(decoded, list) else [decoded]  # a worker's buffered events: a list
    return events


def test_a_create_many_message_runs_each_job_and_gives_each_its_flower_row(
    sim_worker, provisioner, sim, ssh_key, redis_client, monkeypatch
) -> None:
    """Creates that came in one ``vmq.create_many`` message run like their own messages would, and each
    job gets a task-received event and a final event naming it, as Flower needs for its row."""
    from producer import bulk

    monkeypatch.setattr(bulk, "MESSAGE_SPREAD", 2)  # 12 creates: 2 messages of 6
    sim.configure(boot_s=1)
    # Celery's events are Redis pub/sub messages: listen (subscribed before anything is sent) to all.
    pubsub = redis_client.pubsub()
    pubsub.psubscribe("*celeryev*")
    try:
        creates = [{"spec": spec(f"many-{i}"), "ssh_key": ssh_key} for i in range(12)]
        creates[5]["startup_script"] = "#!/bin/sh\necho hi\n"
        jobs = provisioner.create_vms(creates)
        finished = [provisioner.wait(job.id, timeout_s=60) for job in jobs]
        events: list[dict] = []
        ids = {job.id for job in jobs}
        for _ in range(40):  # the final events trail the records by a publish
            events += _task_events(pubsub)
            if {e.get("uuid") for e in events if e["type"] == "task-succeeded"} >= ids:
                break
    finally:
        pubsub.close()
    assert all(job.state == JobState.running and job.vm.public_ipv4 for job in finished)
    assert finished[5].has_startup_script and sim.calls()["create"] == 12
    batches = {e["uuid"] for e in events if e["type"] == "task-received" and e.get("name") == keys.TASK_CREATE_MANY}
    assert len(batches) == 2
    for job in jobs:
        mine = {e["type"]: e for e in events if e.get("uuid") == job.id}
        assert mine["task-received"]["name"] == keys.TASK_CREATE and mine["task-received"]["parent_id"] in batches
        assert job.spec.name in mine["task-succeeded"]["args"] and mine["task-succeeded"]["name"] == keys.TASK_CREATE


def test_a_redis_outage_in_a_create_many_message_sends_it_again_for_the_jobs_not_run(monkeypatch) -> None:
    """Jobs before the outage ran; the job that met it and those after go in a new message (its retry)."""
    import redis as redis_py

    from workers import jobevents, tasks

    ran: list[str] = []

    class Runner:
        store = None

        def run(self, job_id: str, kind: object, seq: int) -> None:
            if job_id == "c":
                raise redis_py.ConnectionError("Redis went away")
            ran.append(job_id)

    class Retried(Exception):
        pass

    asked: dict = {}

    def retry(**kwargs: object) -> Retried:
        asked.update(kwargs)
        return Retried()

    monkeypatch.setattr(tasks, "runner", lambda: Runner())
    monkeypatch.setattr(jobevents, "received", lambda *a: None)
    monkeypatch.setattr(jobevents, "step_ended", lambda *a, **k: None)
    monkeypatch.setattr(tasks.create_many, "retry", retry)
    with pytest.raises(Retried):
        tasks.create_many.run(["a", "b", "c", "d"])
    assert ran == ["a", "b"] and asked["args"] == [["c", "d"]] and asked["countdown"] == tasks.BROKER_RETRY_S
