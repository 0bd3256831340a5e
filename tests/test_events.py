"""Live job events: the streams the job store writes, SSE through a real uvicorn, `vmq watch`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from producer.cli import app as cli
from tests.test_web import KEY, Server
from vmqueue import keys
from vmqueue.events import JobChange
from vmqueue.jobstore import JobStore
from vmqueue.models import CleanupState, Job, JobKind, JobState, VMSpec

SPEC = {"provider": "sim", "name": "ev-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}


def _stream(redis_client, key: str) -> list[tuple[str, JobChange]]:
    return [(i, JobChange.model_validate_json(f["data"])) for i, f in redis_client.xrange(key)]


def _hetzner_create(store: JobStore) -> Job:
    """A create job no worker serves here (no Hetzner worker runs): only the test changes it."""
    spec = VMSpec(provider="hetzner", name="ev", region="fsn1", instance_type="cx22", image="debian-12")
    return store.add(Job(kind=JobKind.create, provider="hetzner", spec=spec))


@pytest.mark.system
def test_every_change_of_a_real_job_is_an_event_in_order(provisioner, sim_worker, sim, ssh_key, redis_client):
    sim.configure(error_rate=1.0)  # the VM ends in error: the job fails and its cleanup runs
    try:
        job = provisioner.wait(provisioner.create_vm(SPEC, ssh_key).id, timeout_s=30, poll_s=0.2)
    finally:
        sim.configure(error_rate=0.0)
    assert job.state == JobState.failed and job.cleanup == CleanupState.done

    events = [c for _, c in _stream(redis_client, keys.events_key(job.id))]
    states = [(c.state, c.cleanup) for c in events]
    assert states[:3] == [(JobState.queued, None), (JobState.submitting, None), (JobState.provisioning, None)]
    assert states[3:] == [
        (JobState.failed, CleanupState.pending),
        (JobState.failed, CleanupState.destroying),
        (JobState.failed, CleanupState.done),
    ]
    # Each event names the state it came from; only the last says the job is finished.
    assert [c.previous for c in events[1:4]] == [JobState.queued, JobState.submitting, JobState.provisioning]
    assert [c.finished for c in events] == [False] * 5 + [True]
    assert events[3].error.code and events[2].instance_id == job.instance_id
    # The stream of all jobs holds the same events; the per-job stream expires with the record's TTL.
    everything = [c for _, c in _stream(redis_client, keys.EVENTS_KEY) if c.job_id == job.id]
    assert everything == events
    assert 0 < redis_client.ttl(keys.events_key(job.id)) <= provisioner.settings.job_ttl_s


def test_streams_are_capped_and_a_write_without_a_state_change_is_no_event(settings, redis_client):
    store = JobStore(redis_client, settings.model_copy(update={"job_events_maxlen": 10, "events_maxlen": 100}))
    job = _hetzner_create(store)
    store.transition(job.id, JobState.submitting)
    store.update(job.id, lambda j: setattr(j, "polls", 1))  # not a state change
    store.transition(job.id, JobState.submitting, "retrying the submit")  # the same state again
    assert len(redis_client.xrange(keys.events_key(job.id))) == 2
    for _ in range(200):  # capacity failovers: provisioning <-> submitting
        store.transition(job.id, JobState.provisioning)
        store.transition(job.id, JobState.submitting)
    assert redis_client.xlen(keys.events_key(job.id)) == 10  # exact for a job's own stream
    assert 100 <= redis_client.xlen(keys.EVENTS_KEY) < 402  # approximate (whole nodes) for all jobs


# -- Server-Sent Events through a real uvicorn ------------------------------------------------------
@pytest.fixture(scope="module")
def api(test_env, tmp_path_factory) -> Iterator[httpx.Client]:
    server = Server({**test_env, "VMQ_API_KEYS": KEY}, tmp_path_factory.mktemp("sse") / "uvicorn.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
            yield client
    finally:
        server.stop()


def _sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Events of a text/event-stream, as {field: value}; comments (pings) skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def test_sse_resumes_after_last_event_id_missing_nothing(api, settings, redis_client):
    store = JobStore(redis_client, settings)
    job = _hetzner_create(store)
    seen: list[tuple[str, str]] = []
    with api.stream("GET", f"/jobs/{job.id}/events") as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = _sse(answer.iter_lines())
        first = next(events)
        seen.append((first["id"], json.loads(first["data"])["state"]))
        store.transition(job.id, JobState.submitting)
        second = next(events)
        seen.append((second["id"], json.loads(second["data"])["state"]))
    # Disconnected: the job changes meanwhile, to its end.
    store.transition(job.id, JobState.provisioning, instance_id="42")
    store.transition(job.id, JobState.running)
    with api.stream("GET", f"/jobs/{job.id}/events", headers={"Last-Event-ID": seen[-1][0]}) as answer:
        rest = list(_sse(answer.iter_lines()))
    assert rest[-1]["event"] == "end"
    seen += [(e["id"], json.loads(e["data"])["state"]) for e in rest[:-1]]
    assert seen == [(i, c.state) for i, c in _stream(redis_client, keys.events_key(job.id))]
    assert [s for _, s in seen] == ["queued", "submitting", "provisioning", "running"]
    # A finished job's stream replays and ends at once; errors are answered before any stream.
    with api.stream("GET", f"/jobs/{job.id}/events") as answer:
        assert [e.get("event") for e in _sse(answer.iter_lines())] == [None] * 4 + ["end"]
    assert api.get(f"/jobs/{job.id}/events", headers={"Last-Event-ID": "x; DROP"}).status_code == 400
    assert api.get("/jobs/nope/events").status_code == 404
    assert api.get(f"/jobs/{job.id}/events", headers={"Authorization": "Bearer no"}).status_code == 401


@pytest.mark.system
def test_sse_follows_a_real_create_to_running(api, sim_worker, ssh_key):
    job = api.post("/vms", json={"spec": {**SPEC, "name": "ev-sse"}, "ssh_key": ssh_key}).json()
    with api.stream("GET", f"/jobs/{job['id']}/events", timeout=30) as answer:
        events = list(_sse(answer.iter_lines()))
    changes = [JobChange.model_validate_json(e["data"]) for e in events[:-1]]
    assert [c.state for c in changes] == ["queued", "submitting", "provisioning", "running"]
    assert changes[-1].finished and changes[-1].vm.public_ipv4 and events[-1]["event"] == "end"


# -- vmq watch ----------------------------------------------------------------------------------
def test_vmq_watch_prints_each_change_and_exits_with_the_jobs_outcome(cli_env, settings, redis_client):
    store = JobStore(redis_client, settings)
    ok, bad = _hetzner_create(store), _hetzner_create(store)
    for state in (JobState.submitting, JobState.provisioning, JobState.running):
        store.transition(ok.id, state)
    store.transition(bad.id, JobState.failed, "failed: auth", cleanup=None)
    runner = CliRunner()

    result = runner.invoke(cli, ["watch", ok.id])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[3:6] for line in lines][1:] == [
        ["queued", "->", "submitting"],
        ["submitting", "->", "provisioning"],
        ["provisioning", "->", "running"],
    ]
    result = runner.invoke(cli, ["watch", ok.id, bad.id, "--json"])
    assert result.exit_code == 1  # one of them failed
    assert '"state": "failed"' in result.output and '"state": "running"' in result.output
    assert runner.invoke(cli, ["watch", "nope"]).exit_code == 1
    assert runner.invoke(cli, ["watch", ok.id, "--after", "later"]).exit_code == 2


def test_blocking_readers_follow_live_changes_of_one_job_and_of_all_jobs(provisioner, settings, redis_client):
    import threading
    import time

    store = JobStore(redis_client, settings)
    earlier = _hetzner_create(store)  # before "now": not in the all-jobs reader's view
    job = _hetzner_create(store)
    one: list[JobChange] = []
    every: list[JobChange] = []

    def read_one() -> None:
        one.extend(c for _, c in provisioner.events([job.id]))

    def read_all() -> None:
        for _, change in provisioner.events():
            every.append(change)
            if change.finished:
                return

    readers = [threading.Thread(target=read_one), threading.Thread(target=read_all)]
    for reader in readers:
        reader.start()
    time.sleep(0.3)  # both readers block in XREAD now
    for state in (JobState.submitting, JobState.provisioning, JobState.running):
        store.transition(job.id, state)
        time.sleep(0.05)
    for reader in readers:
        reader.join(10)
    assert not any(reader.is_alive() for reader in readers)
    assert [c.state for c in one] == ["queued", "submitting", "provisioning", "running"]
    assert [c.state for c in every] == ["submitting", "provisioning", "running"]
    assert earlier.id not in {c.job_id for c in every}
