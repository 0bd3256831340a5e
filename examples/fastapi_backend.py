"""A web backend on vmqueue: ``POST /servers`` creates a VM and answers 202 at once; vmqueue's
webhook workers POST the outcome to ``/webhooks/vmqueue``, which verifies it and records it.

    pip install 'vmqueue[web,webhooks]'
    export VMQ_WEBHOOK_SECRET=whsec_...           # the secret the webhook workers sign with
    export CALLBACK_BASE=https://backend.example.com   # where those workers reach this app
    vmq worker --provider sim & vmq worker --webhooks &
    uvicorn examples.fastapi_backend:app --port 8080
    curl -X POST localhost:8080/servers -H 'content-type: application/json' \\
         -d '{"name": "web-1", "ssh_key": "ssh-ed25519 AAAA... me@laptop"}'
    curl localhost:8080/servers/<id>              # "creating", then "running" with its IP

The orders live in memory to keep the example short; a real backend keeps them in its database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, status
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from producer import AsyncProvisioner


class ServerRequest(BaseModel):
    name: str
    ssh_key: str


class Server(BaseModel):
    id: str
    name: str
    status: str = "creating"  # creating, running, failed
    job_id: str | None = None
    ipv4: str | None = None
    error: str | None = None


servers: dict[str, Server] = {}
seen_webhooks: set[str] = set()  # webhook-id: a delivery can come twice (at least once)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncProvisioner() as vmq:
        app.state.vmq = vmq
        app.state.verifier = Webhook(os.environ["VMQ_WEBHOOK_SECRET"])
        yield


app = FastAPI(title="vmqueue example backend", lifespan=lifespan)


@app.post("/servers", status_code=status.HTTP_202_ACCEPTED)
async def create_server(body: ServerRequest, request: Request) -> Server:
    """Enqueue the VM and answer at once; the webhook tells us how it went."""
    server = Server(id=uuid.uuid4().hex[:12], name=body.name)
    spec = {"provider": "sim", "name": body.name, "region": "sim-1", "instance_type": "small", "image": "debian-12"}
    job = await request.app.state.vmq.create_vm(
        spec,
        body.ssh_key,
        idempotency_key=f"server-{server.id}",  # a retried request never makes a second VM
        callback_url=f"{os.environ['CALLBACK_BASE']}/webhooks/vmqueue",
    )
    server.job_id = job.id
    servers[server.id] = server
    return server


@app.get("/servers/{server_id}")
async def get_server(server_id: str) -> Server:
    if server_id not in servers:
        raise HTTPException(404, "no such server")
    return servers[server_id]


@app.post("/webhooks/vmqueue", status_code=status.HTTP_204_NO_CONTENT)
async def vmqueue_webhook(request: Request) -> None:
    """Verify the signature (Standard Webhooks), drop a repeat, record the job's outcome."""
    body = await request.body()
    try:
        event = request.app.state.verifier.verify(body, dict(request.headers))
    except WebhookVerificationError:
        raise HTTPException(400, "bad signature") from None
    if request.headers["webhook-id"] in seen_webhooks:
        return
    seen_webhooks.add(request.headers["webhook-id"])
    job = event["data"]
    server = next((s for s in servers.values() if s.job_id == job["id"]), None)
    if server is None:
        return  # not ours (any more): answer 2xx anyway, or vmqueue retries it
    if event["type"] == "job.running":
        server.status, server.ipv4 = "running", (job.get("vm") or {}).get("public_ipv4")
    elif event["type"] == "job.failed":
        server.status, server.error = "failed", (job.get("error") or {}).get("message")
