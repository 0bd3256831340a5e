"""Fleet files: validation with line numbers, and `vmq apply` / `vmq destroy --fleet` end to end on the sim."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from bench.harness import RedisServer
from bench.probes import wait_for
from producer.cli import app
from producer.client import Provisioner
from producer.fleet import FleetError, load_fleet
from producer.fleetrun import FleetRunner
from tests.conftest import KOMBU_KEYS
from vmqueue import keys
from vmqueue.models import Job, JobKind, JobState
from vmqueue.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fleet.yaml"
runner = CliRunner()

BAD = """\
fleet: demo
defaults:
  provider: sim
  region: sim-1
  image: ubuntu-24.04
  ssh_key: example.pub
  script: missing.sh
vms:
  - name: web
    count: 2
    instance_type: small
  - name: Bad_Name
    instance_type: small
    labels: {Team: x}
  - name: db
    provider: aws
    instance_type: t3.micro
    options:
      zone: a
  - name: x
    count: 0
    colour: red
  - name: nothing-set
"""


def _fleet_dir(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the example (key and script beside it); ``text`` replaces the fleet file."""
    for name in ("fleet.yaml", "example.pub", "init.sh"):
        shutil.copy(EXAMPLE.parent / name, tmp_path / name)
    if text is not None:
        (tmp_path / "fleet.yaml").write_text(text)
    return tmp_path / "fleet.yaml"


def test_the_example_fleet_is_valid():
    fleet = load_fleet(EXAMPLE)
    assert fleet.name == "example"
    assert [vm.ident for vm in fleet.vms] == ["sim/web-1", "sim/web-2", "sim/web-3", "sim/db-1"]
    db = fleet.vms[-1].request
    assert db.spec.labels == {"team": "web", "role": "db", "vmqueue-fleet": "example"}
    assert db.spec.image == "debian-12" and db.startup_script.startswith("#!/bin/sh")


def test_every_problem_is_reported_with_its_line(tmp_path):
    with pytest.raises(FleetError) as caught:
        load_fleet(_fleet_dir(tmp_path, BAD))
    found = {(p.line, p.where) for p in caught.value.problems}
    assert found == {
        (7, "defaults.script"),  # the file is missing: reported where the default sets it
        (12, "vms[1] (Bad_Name).name"),
        (14, "vms[1] (Bad_Name).labels"),
        (19, "vms[2] (db).options.aws.zone"),
        (20, "vms[3] (x).instance_type"),  # its invalid fields hide none of its other problems
        (21, "vms[3].count"),
        (22, "vms[3].colour"),
        (23, "vms[4] (nothing-set).instance_type"),
    }
    text = str(caught.value)
    assert "fleet.yaml:14: vms[1] (Bad_Name).labels: label key 'Team'" in text
    assert "instance_type: required: set it on the VM or in defaults" in text


def test_an_invalid_field_hides_no_other_problem_of_its_entry(tmp_path):
    # A newcomer's file: the bad ready_when was reported, the missing instance_type of the same entry was not.
    text = "fleet: d\ndefaults: {provider: sim, region: sim-1, image: debian-12, ssh_key: example.pub, ssh_port: 0}\n"
    text += "vms:\n  - name: web\n    ready_when: sometimes\n  - name: db\n    instance_type: small\n"
    text += "  - name: api\n    instance_type: small\n    ssh_port: 22\n"
    with pytest.raises(FleetError) as caught:
        load_fleet(_fleet_dir(tmp_path, text))
    assert {(p.line, p.where) for p in caught.value.problems} == {
        (2, "defaults.ssh_port"),  # reported once, where it is set: not again as each entry's problem
        (4, "vms[0] (web).instance_type"),
        (5, "vms[0].ready_when"),
    }


def test_duplicate_names_and_broken_yaml(tmp_path):
    duplicate = "fleet: d\ndefaults: {provider: sim, region: r, instance_type: s, image: debian-12, ssh_key: x.pub}\n"
    duplicate += "vms:\n  - name: web\n    count: 2\n  - name: web-2\n"
    with pytest.raises(FleetError, match=r"fleet.yaml:6: vms\[1\]: sim/web-2 is already defined on line 4"):
        load_fleet(_fleet_dir(tmp_path, duplicate.replace("x.pub", "example.pub")))
    with pytest.raises(FleetError, match=r"fleet.yaml:4: not valid YAML"):
        load_fleet(_fleet_dir(tmp_path, "fleet: d\nvms:\n  - name: [\n"))


def test_apply_of_an_invalid_file_exits_2_and_enqueues_nothing(cli_env, redis_client, tmp_path):
    result = runner.invoke(app, ["apply", str(_fleet_dir(tmp_path, BAD))])
    assert result.exit_code == 2
    assert "8 problem(s)" in result.output and "fleet.yaml:19: vms[2] (db).options.aws.zone" in result.output
    assert "Nothing was enqueued" in result.output
    assert [k for k in redis_client.scan_iter() if not k.startswith(KOMBU_KEYS)] == []


def test_destroy_needs_an_instance_or_a_fleet_but_not_both(cli_env):
    assert runner.invoke(app, ["destroy", "sim"]).exit_code == 2
    both = runner.invoke(app, ["destroy", "sim", "sim-1", "--fleet", str(EXAMPLE)])
    assert both.exit_code == 2 and "--fleet FILE alone" in both.output


def _apply(path: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["apply", str(path), "--json", "--timeout", "60", *extra])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.system
def test_apply_is_idempotent_and_destroy_fleet_removes_it(cli_env, sim_worker, sim, redis_client):
    code, first = _apply(EXAMPLE)
    assert code == 0, first
    assert [(vm["name"], vm["action"], vm["state"]) for vm in first["vms"]] == [
        ("web-1", "created", "running"),
        ("web-2", "created", "running"),
        ("web-3", "created", "running"),
        ("db-1", "created", "running"),
    ]
    assert all(vm["instance_id"] and vm["public_ipv4"] and vm["private_ipv4"] for vm in first["vms"])
    creates = sim.calls()["create"]
    assert len(sim.live_vms()) == 4

    # Again, with the human output: nothing new is created.
    again = runner.invoke(app, ["apply", str(EXAMPLE), "--timeout", "60"])
    assert again.exit_code == 0, again.output
    assert "4 existing" in again.output and "web-3" in again.output and "4/4 running 4" in again.output
    assert sim.calls()["create"] == creates and len(sim.live_vms()) == 4

    # Past the job records' TTL the fleet record still knows the VMs: they are read, not created.
    redis_client.delete(keys.job_key(first["vms"][0]["job_id"]))
    code, third = _apply(EXAMPLE)
    assert code == 0 and third["vms"][0]["action"] == "checked" and third["vms"][0]["state"] == "running"
    assert [vm["job_id"] for vm in third["vms"][1:]] == [vm["job_id"] for vm in first["vms"][1:]]
    assert sim.calls()["create"] == creates

    # A VM destroyed behind the fleet's back, past its job's TTL: reported, then created again.
    web1 = third["vms"][0]
    assert runner.invoke(app, ["destroy", "sim", web1["instance_id"], "--wait"]).exit_code == 0
    redis_client.delete(keys.job_key(web1["job_id"]))
    code, lost = _apply(EXAMPLE)
    assert code == 1 and lost["vms"][0]["note"] == "the VM no longer exists; the next apply creates it"
    code, back = _apply(EXAMPLE)
    assert code == 0 and back["vms"][0]["action"] == "created" and len(sim.live_vms()) == 4

    gone = runner.invoke(app, ["destroy", "--fleet", str(EXAMPLE), "--json", "--timeout", "60"])
    assert gone.exit_code == 0, gone.output
    assert {vm["state"] for vm in json.loads(gone.stdout)["vms"]} == {"gone"}
    assert sim.live_vms() == []
    assert redis_client.hgetall(keys.fleet_key("example")) == {}

    # Destroyed and forgotten: the next apply creates the fleet anew.
    code, fourth = _apply(EXAMPLE)
    assert code == 0 and {vm["action"] for vm in fourth["vms"]} == {"created"}
    assert len(sim.live_vms()) == 4
    human = runner.invoke(app, ["destroy", "--fleet", str(EXAMPLE), "--timeout", "60"])
    assert human.exit_code == 0, human.output
    # The summary agrees with the table, whose every row says gone (it said "4 destroying").
    assert human.output.rstrip().endswith("4 gone") and "destroying" not in human.output, human.output


@pytest.mark.system
def test_a_failed_create_exits_1_and_is_created_again_by_the_next_apply(
    cli_env,
    sim_worker,
    sim,
    tmp_path,
):
    path = _fleet_dir(tmp_path)
    sim.configure(capacity_rate=1.0)
    code, first = _apply(path)
    assert code == 1
    assert {(vm["state"], vm["error"].split(":")[0]) for vm in first["vms"]} == {("failed", "capacity")}

    sim.configure(capacity_rate=0.0)
    code, second = _apply(path)
    assert code == 0 and {(vm["action"], vm["state"]) for vm in second["vms"]} == {("created", "running")}
    assert len(sim.live_vms()) == 4

    # A changed entry is reported, not replaced: apply never destroys.
    path.write_text(path.read_text().replace("instance_type: large", "instance_type: xlarge"))
    code, third = _apply(path)
    assert code == 0 and len(sim.live_vms()) == 4
    assert [vm["name"] for vm in third["vms"] if vm["note"]] == ["db-1"]
    assert runner.invoke(app, ["destroy", "--fleet", str(path), "--timeout", "60"]).exit_code == 0
    assert sim.live_vms() == []


ONE_VM = """\
fleet: solo
defaults: {provider: sim, region: sim-1, instance_type: small, image: debian-12, ssh_key: example.pub}
vms:
  - name: web-1
"""


def _create_jobs(redis_client) -> set[str]:
    jobs = (Job.model_validate_json(redis_client.get(k)) for k in redis_client.scan_iter(match=keys.job_key("*")))
    return {j.id for j in jobs if j.kind == JobKind.create}


def test_two_applies_at_once_after_a_failed_create_make_one_job(settings, redis_client, tmp_path):
    # Issue 13 (4): the slower apply releases the failed job's idempotency key just after the faster
    # one released it and claimed it again for its new job. The release must not delete that claim.
    fleet = load_fleet(_fleet_dir(tmp_path, ONE_VM))
    fast, slow = Provisioner(settings), Provisioner(settings)
    failed = Job(kind=JobKind.create, provider="sim", state=JobState.failed, spec=fleet.vms[0].request.spec)
    fast.store.add(failed)
    fast.store.claim_idempotency_key("fleet:solo:sim/web-1", failed.id)
    redis_client.hset(keys.fleet_key("solo"), "sim/web-1", json.dumps({"job_id": failed.id, "instance_id": None}))

    idem = keys.idempotency_key("fleet:solo:sim/web-1")
    client = slow.store.redis
    send = client.execute_command
    raced = []

    def the_faster_apply_first(*args, **options):
        # The faster apply runs whole just before the slower one's first write of the key.
        if not raced and args[0] in ("DEL", "EVALSHA", "EVAL") and idem in args:
            raced.append(FleetRunner(fast, "solo").apply(fleet)[0].job_id)
        return send(*args, **options)

    client.execute_command = the_faster_apply_first
    (slower,) = FleetRunner(slow, "solo").apply(fleet)
    assert raced, "the interleaving under test did not happen"
    assert _create_jobs(redis_client) == {failed.id, raced[0]}  # one new job, not two
    assert slower.job_id == raced[0] and redis_client.get(idem) == raced[0]
    assert json.loads(redis_client.hget(keys.fleet_key("solo"), "sim/web-1"))["job_id"] == raced[0]


def test_an_entry_is_replaced_only_by_compare_and_set_on_the_job_it_replaces(settings, redis_client):
    runner = FleetRunner(Provisioner(settings), "solo")
    assert runner._record("sim/a", "j1", replaces="") == {"job_id": "j1", "instance_id": None}
    assert runner._record("sim/a", "j2", replaces="j0") == {"job_id": "j1", "instance_id": None}  # lost the race
    assert runner._record("sim/a", "j1", "sim-9", replaces="j1")["instance_id"] == "sim-9"
    redis_client.set(keys.idempotency_key("fleet:solo:sim/a"), "j2")
    runner._forget("sim/a", "j0")  # names neither: both stay
    assert redis_client.hexists(keys.fleet_key("solo"), "sim/a") and redis_client.exists(
        keys.idempotency_key("fleet:solo:sim/a")
    )
    runner._forget("sim/a", "j1")  # the entry goes, the key (bound to j2 since) stays
    assert not redis_client.hexists(keys.fleet_key("solo"), "sim/a")
    assert redis_client.get(keys.idempotency_key("fleet:solo:sim/a")) == "j2"


THREE_VMS = ONE_VM.replace("fleet: solo", "fleet: trio").replace("  - name: web-1\n", "  - name: web\n    count: 3\n")


@pytest.fixture
def private_redis(settings) -> Iterator[tuple[Settings, redis.Redis]]:
    """A redis-server of the test's own, no worker on it: its command counts are the producer's alone
    and the jobs stay queued (a session worker would otherwise run them into the next test)."""
    server = RedisServer(aof=False)
    server.start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        yield settings.model_copy(update={"redis_url": server.url}), client
        client.close()
    finally:
        server.cleanup()


def _execs(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def test_apply_enqueues_its_creates_in_one_batch_each_with_its_own_key(private_redis, tmp_path):
    settings, client = private_redis
    # Provisioner.create_vms stores its jobs in one MULTI/EXEC and publishes them in one batch: one
    # transaction per apply, however many VMs (create_vm one by one uses none).
    for name in ("one", "six"):
        (tmp_path / name).mkdir()
    FleetRunner(Provisioner(settings), "solo").apply(load_fleet(_fleet_dir(tmp_path / "one", ONE_VM)))  # kombu's setup
    six = load_fleet(_fleet_dir(tmp_path / "six", THREE_VMS.replace("trio", "six").replace("count: 3", "count: 6")))
    execs = _execs(client)
    assert len(FleetRunner(Provisioner(settings), "six").apply(six)) == 6
    assert _execs(client) - execs == 1
    fleet = load_fleet(_fleet_dir(tmp_path, THREE_VMS))
    runner = FleetRunner(Provisioner(settings), "trio")
    execs = _execs(client)
    tracked = runner.apply(fleet)
    assert _execs(client) - execs == 1
    assert [t.action for t in tracked] == ["created"] * 3 and len({t.job_id for t in tracked}) == 3
    entries = client.hgetall(keys.fleet_key("trio"))
    for item in tracked:
        assert client.get(keys.idempotency_key(f"fleet:trio:{item.ident}")) == item.job_id
        assert json.loads(entries[item.ident])["job_id"] == item.job_id
    # Applied again: nothing new, no batch.
    execs = _execs(client)
    assert [t.action for t in runner.apply(fleet)] == ["existing"] * 3
    assert _execs(client) == execs
    assert {t.job_id for t in tracked} <= _create_jobs(client)


def test_apply_adopts_the_job_holding_one_entrys_key_and_creates_the_others(private_redis, tmp_path):
    """Another request holds one VM's key (a different spec: IdempotencyConflict, the batch stores
    nothing): that entry adopts the holder's job, the others are created, each under its own key."""
    settings, client = private_redis
    fleet = load_fleet(_fleet_dir(tmp_path, THREE_VMS))
    provisioner = Provisioner(settings)
    held_ident = fleet.vms[1].ident
    other = fleet.vms[1].request.spec.model_copy(update={"instance_type": "large"})
    holder = provisioner.create_vm(other, fleet.vms[1].request.ssh_key, idempotency_key=f"fleet:trio:{held_ident}")
    tracked = FleetRunner(provisioner, "trio").apply(fleet)
    by_ident = {t.ident: t for t in tracked}
    assert by_ident[held_ident].job_id == holder.id
    assert [t.action for t in tracked if t.ident != held_ident] == ["created", "created"]
    assert _create_jobs(client) == {t.job_id for t in tracked}
    entries = client.hgetall(keys.fleet_key("trio"))
    assert {i: json.loads(e)["job_id"] for i, e in entries.items()} == {t.ident: t.job_id for t in tracked}


@pytest.mark.system
def test_destroy_fleet_cancels_the_creates_in_flight(
    cli_env, sim_worker_paused, worker_factory, sim, redis_client, tmp_path
):
    # Issue 13 (3): destroy --fleet runs while one create waits for the (slow) API's answer and two
    # are still queued (a worker of one slot). Every create is cancelled: the queued ones never call
    # the provider, the one in flight ends at its worker's next check and its cleanup destroys the VM
    # it made. An entry is forgotten only once its create ended and its VM is gone; rows say cancelled.
    worker_factory("sim", concurrency=1)
    path = _fleet_dir(tmp_path, THREE_VMS)
    sim.configure(latency_ms=2000)
    assert runner.invoke(app, ["apply", str(path), "--no-wait"]).exit_code == 0
    creates = sorted(_create_jobs(redis_client))
    assert len(creates) == 3

    def states() -> list[str]:
        return sorted(Job.model_validate_json(redis_client.get(keys.job_key(j))).state for j in creates)

    wait_for(lambda: "submitting" in states(), timeout_s=20, what="a create waiting for the API's answer")
    early = runner.invoke(app, ["destroy", "--fleet", str(path), "--json", "--timeout", "1"])
    assert early.exit_code == 1, early.output  # the create in flight outlasts the timeout
    rows = json.loads(early.stdout)["vms"]
    in_flight = [row for row in rows if row["action"] == "cancelling"]
    assert len(in_flight) == 1 and "cancelled" in in_flight[0]["note"], rows
    assert {(row["action"], row["state"]) for row in rows if row not in in_flight} == {("cancelled", "cancelled")}
    # The entry of the create in flight stays; the queued ones ended without a VM and are forgotten.
    assert list(redis_client.hgetall(keys.fleet_key("trio"))) == [f"sim/{in_flight[0]['name']}"]

    done = runner.invoke(app, ["destroy", "--fleet", str(path), "--json", "--timeout", "60"])
    assert done.exit_code == 0, done.output
    (row,) = json.loads(done.stdout)["vms"]
    assert (row["action"], row["state"], row["job_id"]) == ("cancelled", "cancelled", in_flight[0]["job_id"])
    assert row["instance_id"] and "its cleanup destroyed" in row["note"]
    assert redis_client.hgetall(keys.fleet_key("trio")) == {}
    wait_for(lambda: sim.existing_vms() == [], timeout_s=20, what="no VM left")
    assert states() == ["cancelled"] * 3
    assert sim.calls()["create"] == 1  # the queued creates never called the provider
    jobs = (Job.model_validate_json(redis_client.get(k)) for k in redis_client.scan_iter(match=keys.job_key("*")))
    assert [j.id for j in jobs if j.kind == JobKind.destroy] == []  # the create's cleanup destroyed its VM
