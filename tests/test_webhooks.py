"""Webhooks: real HTTP receivers on loopback (one fails, one times out, one answers slowly), the
signature verified with the standardwebhooks package, the address guard, and a real webhook worker."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bench.probes import wait_for
from producer import Provisioner
from vmqueue.models import Job, JobKind
from vmqueue.webhooks import InvalidCallbackURL
from workers.delivery import Deliverer, allowed_address

SPEC = {"provider": "sim", "name": "hook-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}
SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


class Receiver:
    """A local HTTP server; ``behaviour[path](n)`` -> (status, delay_s) for the n-th request (from 1)."""

    def __init__(self, behaviour: dict[str, Callable[[int], tuple[int, float]]]):
        self.requests: dict[str, list[dict]] = {path: [] for path in behaviour}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                seen = receiver.requests[self.path]
                seen.append({"at": time.time(), "headers": dict(self.headers), "body": body.decode()})
                status, delay = behaviour[self.path](len(seen))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the deliverer gave up waiting and closed the connection
                    pass

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(
        {
            "/ok": lambda n: (200, 0),
            "/flaky": lambda n: (500, 0) if n <= 2 else (200, 0),  # fails twice, then takes it
            "/slow": lambda n: (200, 0.6),  # slow, within the timeout
            "/hang": lambda n: (200, 2.5) if n == 1 else (204, 0),  # the first attempt times out
            "/down": lambda n: (503, 0),  # fails every time
            "/gone": lambda n: (200, 0),
            "/failed": lambda n: (200, 0),
        }
    )
    yield server
    server.close()


def _verified(request: dict) -> dict:
    """The payload, once the standardwebhooks package accepts its signature."""
    return Webhook(SECRET).verify(request["body"], request["headers"])


def _deliverer(settings, **flags: bool) -> Deliverer:
    return Deliverer(
        settings.model_copy(
            update={"webhook_secret": SecretStr(SECRET), **{f"webhook_{k}": v for k, v in flags.items()}}
        )
    )


def _job(url: str) -> Job:
    return Job(
        kind=JobKind.get, provider="sim", instance_id="sim-1", callback_url=url, ssh_key="ssh-ed25519 AAAAKEYMARKER"
    )


def test_signature_round_trip_with_the_standardwebhooks_package(settings, receiver):
    deliverer = _deliverer(settings, allow_http=True, allow_private=True)
    job = _job(f"{receiver.url}/ok")
    record, _ = deliverer.deliver(job, "job.done", 1)
    assert record.outcome == "delivered" and record.status_code == 200
    request = receiver.requests["/ok"][0]
    body = _verified(request)
    assert body["type"] == "job.done" and body["data"]["id"] == job.id
    assert "ssh_key" not in body["data"] and "KEYMARKER" not in request["body"]
    assert request["headers"]["webhook-id"] == f"msg_{job.id}_job.done"
    with pytest.raises(WebhookVerificationError):  # a changed body
        Webhook(SECRET).verify(request["body"].replace("job.done", "job.gone"), request["headers"])
    with pytest.raises(WebhookVerificationError):  # another secret
        Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode()).verify(request["body"], request["headers"])
    # Without a secret nothing is sent unsigned.
    unsigned = Deliverer(settings.model_copy(update={"webhook_allow_http": True, "webhook_allow_private": True}))
    assert unsigned.deliver(job, "job.done", 1)[0].outcome == "refused"
    assert len(receiver.requests["/ok"]) == 1


def test_private_and_loopback_addresses_and_plain_http_are_refused(settings, receiver, monkeypatch):
    port = receiver.server.server_address[1]
    guarded = _deliverer(settings, allow_http=True)
    for url in (
        f"{receiver.url}/ok",
        f"http://localhost:{port}/ok",
        f"http://[::1]:{port}/ok",
        f"http://[::ffff:127.0.0.1]:{port}/ok",
        "http://10.1.2.3/ok",  # refused before any connection is tried
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/ok",
    ):
        record, _ = guarded.deliver(_job(url), "job.done", 1)
        assert record.outcome == "refused" and "not a public address" in record.error, url
    # A name whose DNS answer is private is refused too; with private addresses allowed, the
    # connection goes to the address that was checked (the name itself resolves nowhere else).
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: real("127.0.0.1", *a, **k) if host == "hooks.example.test" else real(host, *a, **k),
    )
    rebinding = _job(f"http://hooks.example.test:{port}/ok")
    assert guarded.deliver(rebinding, "job.done", 1)[0].outcome == "refused"
    assert receiver.requests["/ok"] == []
    assert _deliverer(settings, allow_http=True, allow_private=True).deliver(rebinding, "job.done", 1)[0].outcome == (
        "delivered"
    )
    # https only by default, at the worker and at the producer.
    https_only = _deliverer(settings, allow_private=True)
    assert "https" in https_only.deliver(_job(f"{receiver.url}/ok"), "job.done", 1)[0].error
    for global_address in ("93.184.216.34", "2606:4700::1111"):
        assert allowed_address(global_address, allow_private=False)
    for local in ("100.64.0.1", "fc00::1", "fe80::1%eth0", "224.0.0.1", "192.168.1.1"):
        assert not allowed_address(local, allow_private=False), local


def test_the_producer_refuses_callback_urls_it_will_not_call(provisioner, app_keys, ssh_key):
    for url in (
        "http://hooks.example.com/x",
        "ftp://hooks.example.com/x",
        "https://u:p@hooks.example.com/",
        "https:///x",
    ):
        with pytest.raises(InvalidCallbackURL, match="callback_url"):
            provisioner.create_vm(SPEC, ssh_key, callback_url=url)
    with pytest.raises(InvalidCallbackURL):
        provisioner.destroy_vm("sim", "sim-1", callback_url="http://hooks.example.com/x")
    assert app_keys() == set()


@pytest.mark.system
def test_webhooks_from_a_real_worker_retry_time_out_give_up_and_never_delay_a_job(
    settings, test_env, worker_factory, sim_worker, receiver, ssh_key, sim
):
    worker_factory(
        "webhooks",
        env={
            "VMQ_WEBHOOK_SECRET": SECRET,
            "VMQ_WEBHOOK_ALLOW_HTTP": "true",
            "VMQ_WEBHOOK_ALLOW_PRIVATE": "true",
            "VMQ_WEBHOOK_TIMEOUT_S": "1",
            "VMQ_WEBHOOK_RETRY_BASE_S": "0.2",
            "VMQ_WEBHOOK_RETRY_MAX_S": "0.5",
            "VMQ_WEBHOOK_MAX_ATTEMPTS": "4",
        },
        concurrency=4,
    )
    vmq = Provisioner(settings.model_copy(update={"webhook_allow_http": True}))
    paths = ("/ok", "/flaky", "/slow", "/hang", "/down")
    jobs = {
        p: vmq.create_vm({**SPEC, "name": f"hook{p.replace('/', '-')}"}, ssh_key, callback_url=receiver.url + p)
        for p in paths
    }
    done = {p: vmq.wait(j.id, timeout_s=30, poll_s=0.1) for p, j in jobs.items()}
    assert {j.state for j in done.values()} == {"running"}
    gone = vmq.wait(vmq.destroy_vm("sim", done["/ok"].instance_id, callback_url=receiver.url + "/gone").id, 30, 0.1)
    failed = vmq.wait(vmq.get_vm("sim", "sim-999999999", callback_url=receiver.url + "/failed").id, 30, 0.1)
    assert gone.state == "gone" and failed.state == "failed"

    def settled() -> dict[str, Job]:
        now = {p: vmq.get_job(j.id) for p, j in jobs.items()}
        now["/gone"], now["/failed"] = vmq.get_job(gone.id), vmq.get_job(failed.id)
        ended = all(j.webhooks and j.webhooks[-1].outcome != "retrying" for j in now.values())
        return now if ended else {}

    final = wait_for(settled, 30, "every webhook delivered or given up")
    outcomes = {p: [(d.outcome, d.status_code) for d in j.webhooks] for p, j in final.items()}
    assert outcomes["/ok"] == outcomes["/slow"] == outcomes["/gone"] == outcomes["/failed"] == [("delivered", 200)]
    assert outcomes["/flaky"] == [("retrying", 500), ("retrying", 500), ("delivered", 200)]
    assert outcomes["/hang"][0] == ("retrying", None) and "timeout" in final["/hang"].webhooks[0].error
    assert outcomes["/hang"][-1] == ("delivered", 204)
    assert outcomes["/down"] == [("retrying", 503)] * 3 + [("gave_up", 503)]
    assert final["/slow"].webhooks[0].duration_ms >= 600
    # What each receiver got: signed, one webhook-id per job and event across all attempts.
    events = {"/gone": "job.gone", "/failed": "job.failed"}
    for path, requests in receiver.requests.items():
        assert len(requests) == len(final[path].webhooks), path
        assert len({r["headers"]["webhook-id"] for r in requests}) == 1
        for request in requests:
            body = _verified(request)
            assert body["type"] == events.get(path, "job.running") and body["data"]["id"] == final[path].id
            assert "ssh_key" not in body["data"]
    # The receiver that hung was called only after its job had reached running: no job waited for it.
    running_at = next(e.at for e in final["/hang"].history if e.state == "running").timestamp()
    assert receiver.requests["/hang"][0]["at"] >= running_at - 0.05
    assert max((j.history[-1].at - j.created_at).total_seconds() for j in done.values()) < 10
    assert json.loads(receiver.requests["/ok"][0]["body"])["data"]["vm"]["status"] == "running"
    vmq.destroy_vm("sim", done["/flaky"].instance_id)


@pytest.mark.system
def test_the_example_backend_answers_202_and_learns_the_outcome_by_webhook(
    test_env, worker_factory, sim_worker, ssh_key, tmp_path
):
    import httpx

    from bench.harness import free_port
    from tests.test_web import Server

    worker_factory(
        "webhooks",
        env={"VMQ_WEBHOOK_SECRET": SECRET, "VMQ_WEBHOOK_ALLOW_HTTP": "true", "VMQ_WEBHOOK_ALLOW_PRIVATE": "true"},
        concurrency=2,
    )
    env = {**test_env, "VMQ_WEBHOOK_SECRET": SECRET, "VMQ_WEBHOOK_ALLOW_HTTP": "true"}
    port = free_port()
    backend = Server(
        {**env, "CALLBACK_BASE": f"http://127.0.0.1:{port}"},
        tmp_path / "example.log",
        app="examples.fastapi_backend:app",
        health="/docs",
        port=port,
    )
    try:
        backend.wait_ready()
        answer = httpx.post(f"{backend.url}/servers", json={"name": "example-1", "ssh_key": ssh_key}, timeout=10)
        assert answer.status_code == 202 and answer.json()["status"] == "creating"
        server_id = answer.json()["id"]
        server = wait_for(
            lambda: (s := httpx.get(f"{backend.url}/servers/{server_id}").json())["status"] != "creating" and s,
            30,
            "the webhook reaching the example backend",
        )
        assert server["status"] == "running" and server["ipv4"]
        forged = httpx.post(f"{backend.url}/webhooks/vmqueue", content=b"{}", headers={"webhook-id": "x"})
        assert forged.status_code == 400
    finally:
        backend.stop()
