"""The HTTP API over real HTTP: uvicorn in a subprocess on a loopback port, real Redis, the real sim worker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.harness import ROOT, free_port
from tests.conftest import KOMBU_KEYS

KEY = "test-key-9d1c"
SECRET = "MARKER-web-never-echoed"
SPEC = {"provider": "sim", "name": "api-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}


class Server:
    def __init__(
        self, env: dict[str, str], log: Path, app: str = "producer.web:app", health: str = "/healthz", port: int = 0
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = health
        self._log = log.open("wb")
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30) -> Server:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def api(test_env, tmp_path_factory) -> Iterator[httpx.Client]:
    server = Server({**test_env, "VMQ_API_KEYS": f"other-key, {KEY}"}, tmp_path_factory.mktemp("web") / "uvicorn.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
            yield client
    finally:
        server.stop()


def _follow(api: httpx.Client, job_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = api.get(f"/jobs/{job_id}").json()
        if job["state"] in ("running", "gone", "done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_refuses_to_start_without_an_api_key(test_env, tmp_path):
    server = Server({**test_env, "VMQ_API_KEYS": ""}, tmp_path / "uvicorn.log")
    try:
        assert server.process.wait(30) != 0
    finally:
        server.stop()
    assert "refusing to start without an API key" in server.log_path.read_text()


def test_every_vm_route_needs_a_valid_key(api, redis_client):
    wrong = ({"Authorization": ""}, {"Authorization": "Bearer x"}, {"Authorization": "", "X-API-Key": KEY[:-1]})
    for method, path in (("POST", "/vms"), ("GET", "/jobs/x"), ("GET", "/vms/sim/sim-1"), ("DELETE", "/vms/sim/1")):
        for headers in wrong:
            answer = api.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers)
    assert api.get("/jobs/nope", headers={"Authorization": "", "X-API-Key": "other-key"}).status_code == 404


@pytest.mark.system
def test_create_follow_read_destroy_over_http(api, sim_worker, ssh_key, sim):
    body = {"spec": SPEC, "ssh_key": ssh_key, "startup_script": f"#!/bin/sh\nexport TOKEN={SECRET}\n"}
    answer = api.post("/vms", json=body)
    assert answer.status_code == 202 and SECRET not in answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/jobs/{job['id']}" and job["state"] == "queued"
    assert job["has_startup_script"] is True

    job = _follow(api, job["id"])
    assert job["state"] == "running" and job["vm"]["public_ipv4"]
    assert SECRET not in api.get(f"/jobs/{job['id']}").text

    read = api.get(f"/vms/sim/{job['instance_id']}")
    assert read.status_code == 202
    assert _follow(api, read.json()["id"])["vm"]["status"] == "running"

    gone = api.delete(f"/vms/sim/{job['instance_id']}")
    assert gone.status_code == 202 and _follow(api, gone.json()["id"])["state"] == "gone"
    assert sim.live_vms() == []


@pytest.mark.system
def test_idempotency_key_returns_the_same_job(api, sim_worker, ssh_key):
    body = {"spec": {**SPEC, "name": "api-2"}, "ssh_key": ssh_key, "idempotency_key": "order-1"}
    first, second = api.post("/vms", json=body).json(), api.post("/vms", json=body).json()
    assert first["id"] == second["id"]
    other = api.post("/vms", json={**body, "spec": {**SPEC, "name": "api-3"}})
    assert other.status_code == 409
    assert _follow(api, first["id"])["state"] == "running"


def test_invalid_requests_are_422_naming_the_field_and_never_echo_the_script(api, redis_client, ssh_key):
    bad = {"spec": {**SPEC, "name": "Bad_Name", "options": {"zone": "a"}}, "ssh_key": ssh_key}
    answer = api.post("/vms", json={**bad, "startup_script": f"#!/bin/sh\n{SECRET}\n"})
    assert answer.status_code == 422 and SECRET not in answer.text
    locations = {tuple(e["loc"]) for e in answer.json()["detail"]}
    assert ("body", "spec", "name") in locations and ("body", "spec", "options", "sim", "zone") in locations

    huge = api.post("/vms", json={"spec": SPEC, "ssh_key": ssh_key, "startup_script": f"#!/bin/sh\n{SECRET * 5000}"})
    assert huge.status_code == 422 and SECRET not in huge.text and "startup_script is" in huge.text

    wrong_key = api.post("/vms", json={"spec": SPEC, "ssh_key": "ssh-dss AAAA"})
    assert wrong_key.status_code == 422 and ["body", "ssh_key"] in [e["loc"] for e in wrong_key.json()["detail"]]
    assert api.get("/vms/linode/1").status_code == 422
    assert api.delete("/vms/sim/bad id").status_code == 422
    assert [k for k in redis_client.scan_iter() if not k.startswith(KOMBU_KEYS)] == []


def test_openapi_documents_the_routes_and_the_auth(api):
    document = api.get("/openapi.json").json()
    assert {"/vms", "/jobs/{job_id}", "/vms/{provider}/{instance_id}"} <= set(document["paths"])
    assert set(document["paths"]["/vms/{provider}/{instance_id}"]) == {"get", "delete"}
    assert {"HTTPBearer", "APIKeyHeader"} <= set(document["components"]["securitySchemes"])
    body = document["components"]["schemas"]["CreateVMBody"]["properties"]
    assert body["ssh_key"]["type"] == "string" and "idempotency_key" in body


def test_a_callback_url_the_workers_would_not_call_is_422(api, redis_client, ssh_key):
    answer = api.post("/vms", json={"spec": SPEC, "ssh_key": ssh_key, "callback_url": "http://hooks.example.com/x"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "callback_url"]
    assert "https" in answer.json()["detail"][0]["msg"]
    answer = api.delete("/vms/sim/sim-1", params={"callback_url": "https://user:pw@hooks.example.com/x"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "callback_url"]
    assert [k for k in redis_client.scan_iter() if not k.startswith("_kombu.")] == []
