"""List, cancel and extend through the HTTP API (real uvicorn) and the vmq CLI (in-process)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from producer.cli import app
from tests.test_web import api  # noqa: F401 - the fixture (a uvicorn of this module's own), shared

runner = CliRunner()
# No test worker serves hetzner: its jobs stay queued, so the API's cancel meets a queued job.
QUEUED = {"provider": "hetzner", "name": "api-q", "region": "fsn1", "instance_type": "cx22", "image": "debian-12"}


def test_list_cancel_extend_over_http(api, redis_client, ssh_key):  # noqa: F811
    created = [
        api.post("/vms", json={"spec": {**QUEUED, "name": f"api-{i}"}, "ssh_key": ssh_key}).json() for i in range(3)
    ]
    page = api.get("/jobs", params={"provider": "hetzner", "state": "queued", "limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == [created[2]["id"], created[1]["id"]] and page["next_cursor"]
    rest = api.get("/jobs", params={"provider": "hetzner", "limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [created[0]["id"]] and rest["next_cursor"] is None
    assert api.get("/jobs", params={"name": "api-1"}).json()["jobs"][0]["id"] == created[1]["id"]
    assert api.get("/vms").json() == {"vms": [], "next_cursor": None}  # none has a VM yet

    job_id = created[0]["id"]
    extended = api.post(f"/jobs/{job_id}/extend", json={"ttl_s": 600})
    assert extended.status_code == 200 and extended.json()["expires_at"]
    cancelled = api.post(f"/jobs/{job_id}/cancel", json={"by": "alice", "reason": "changed my mind"})
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["cancel"]["by"] == "alice (api key #2)"  # the key's place in VMQ_API_KEYS, not the key
    assert api.post(f"/jobs/{job_id}/cancel").json()["cancel"] == cancelled.json()["cancel"]  # idempotent
    assert api.get("/jobs", params={"state": "cancelled"}).json()["jobs"][0]["id"] == job_id
    events = api.get(f"/jobs/{job_id}/events").text
    assert '"state":"cancelled"' in events and '"by":"alice (api key #2)"' in events

    assert api.post(f"/jobs/{job_id}/extend", json={"ttl_s": 60}).status_code == 409
    assert api.post("/jobs/nope/cancel").status_code == 404
    assert (
        api.post(
            f"/jobs/{created[1]['id']}/extend", json={"ttl_s": 5, "expires_at": "2031-01-01T00:00:00Z"}
        ).status_code
        == 422
    )
    for params in ({"state": "exploded"}, {"label": "nokey"}, {"limit": 0}, {"cursor": "x"}, {"provider": "nimbus"}):
        assert api.get("/jobs", params=params).status_code == 422, params
    bad_ttl = api.post("/vms", json={"spec": QUEUED, "ssh_key": ssh_key, "expires_at": "2001-01-01T00:00:00Z"})
    assert bad_ttl.status_code == 422 and "in the past" in bad_ttl.text
    for method, path in (("GET", "/jobs"), ("GET", "/vms"), ("POST", f"/jobs/{job_id}/cancel")):
        assert api.request(method, path, headers={"Authorization": ""}).status_code == 401


def test_cli_lists_cancels_and_extends(cli_env, provisioner, ssh_key):
    job = provisioner.create_vm(QUEUED, ssh_key)
    listed = runner.invoke(app, ["jobs", "--provider", "hetzner", "--state", "queued", "--json"])
    assert listed.exit_code == 0 and [j["id"] for j in json.loads(listed.output)["jobs"]] == [job.id]
    extended = runner.invoke(app, ["extend", job.id, "--expires-at", "2031-01-01T00:00:00Z"])
    assert extended.exit_code == 0 and "2031-01-01 00:00:00" in extended.output
    done = runner.invoke(app, ["cancel", job.id, "--reason", "test", "--by", "bob", "--json"])
    assert done.exit_code == 0 and json.loads(done.output)["state"] == "cancelled"
    assert "cancelled by bob" in provisioner.get_job(job.id).history[-1].message
    assert runner.invoke(app, ["cancel", "nope"]).exit_code == 1
    assert runner.invoke(app, ["extend", job.id, "--ttl", "60"]).exit_code == 1  # cancelled: nothing to extend
    bad = runner.invoke(app, ["jobs", "--since", "last tuesday"])
    assert bad.exit_code == 2 and "--since 'last tuesday'" in bad.output
    vms = runner.invoke(app, ["vms"])  # the one job was cancelled before any VM: nothing to list, said so
    assert vms.exit_code == 0 and vms.output.startswith("No VMs; create one with `vmq create`"), vms.output
