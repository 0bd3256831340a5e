"""An optional HTTP API over the ``Provisioner`` for web backends: ``pip install 'vmqueue[web]'``.

Run it with ``vmq web`` or ``uvicorn producer.web:app``. Every call validates with the same
pydantic contract as the Python API, enqueues, and answers 202 with the ``Job`` at once; a client
follows ``GET /jobs/{id}``. The endpoints are ``async def`` over the ``AsyncProvisioner``: Redis and
the publish are awaited on the event loop, so no request holds a thread.

Auth: an API key from ``VMQ_API_KEYS`` (comma-separated, so keys can be rotated), sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The app refuses to start without a key
unless ``VMQ_WEB_ALLOW_NO_AUTH=true`` says so explicitly (e.g. behind an authenticating proxy).
Startup scripts may hold secrets: no response echoes one, 422 errors included.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError
from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sse_starlette import EventSourceResponse, ServerSentEvent

from producer import phonehome, weblisting
from producer.aclient import AsyncProvisioner
from producer.submit import IdempotencyConflict, JobNotFound, expiry
from vmqueue.connection import RedisUnavailable, check_redis_async
from vmqueue.events import STREAM_ID
from vmqueue.models import CreateRequest, Job
from vmqueue.options import ProviderName
from vmqueue.sshkeys import SSHKeyField
from vmqueue.webhooks import InvalidCallbackURL


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMQ_", extra="ignore")

    api_keys: str = Field("", description="comma-separated API keys; any of them is accepted")
    web_allow_no_auth: bool = Field(False, description="start without API keys (only behind another auth layer)")


CallbackURL = Annotated[
    str | None,
    Field(max_length=2048, description="https URL the workers POST the job to when it ends (Standard Webhooks)"),
]


class CreateVMBody(CreateRequest):
    """``POST /vms``: the contract's create request, plus the options of ``Provisioner.create_vm``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ssh_key: Annotated[SSHKeyField, WithJsonSchema({"type": "string", "description": "an OpenSSH public key line"})]
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, description="the same key never creates twice (kept 1 day)"
    )
    deadline_s: float | None = Field(None, gt=0, le=86_400, description="seconds until running, else fail")
    callback_url: CallbackURL = None
    ttl_s: float | None = Field(None, gt=0, description="destroy the VM this many seconds from now")
    expires_at: datetime | None = Field(None, description="destroy the VM at this time (with a zone)")

    @model_validator(mode="after")
    def _expiry(self) -> CreateVMBody:
        expiry(self.ttl_s, self.expires_at)  # one of them, with a zone, in the future: 422 otherwise
        return self


class JobView(Job):
    """``GET /jobs/{id}``: the job, and what its state alone does not say."""

    notice: str | None = Field(None, description="e.g. that no worker serves the job's queue, and how to start one")


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


def _authorize(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> None:
    keys: list[str] = request.app.state.api_keys
    if not keys:  # started with VMQ_WEB_ALLOW_NO_AUTH
        return
    given = (bearer.credentials if bearer else None) or header or ""
    # compare_digest against every key (no early exit): the time taken says nothing about the keys.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    if not given or not any(matches):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
        )


async def _provisioner(request: Request) -> AsyncProvisioner:
    provisioner: AsyncProvisioner = request.app.state.provisioner
    await provisioner.ensure_redis()  # Redis down: 503 naming the URL within seconds, not after the retries
    return provisioner


Auth = Depends(_authorize)
CallbackQuery = Annotated[
    str | None, Query(max_length=2048, description="https URL the workers POST the job to when it ends")
]
Vmq = Annotated[AsyncProvisioner, Depends(_provisioner)]


def create_app(
    provisioner: AsyncProvisioner | None = None, api_keys: list[str] | None = None, allow_no_auth: bool | None = None
) -> FastAPI:
    """The API; arguments left ``None`` come from the environment when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = WebSettings()
        keys = api_keys if api_keys is not None else [k.strip() for k in settings.api_keys.split(",") if k.strip()]
        no_auth = settings.web_allow_no_auth if allow_no_auth is None else allow_no_auth
        if not keys and not no_auth:
            raise RuntimeError(
                "refusing to start without an API key: set VMQ_API_KEYS (comma-separated), "
                "or VMQ_WEB_ALLOW_NO_AUTH=true when another layer authenticates"
            )
        app.state.api_keys = keys
        # Made here, inside the server's event loop, which its asyncio connections belong to.
        app.state.provisioner = provisioner or AsyncProvisioner()
        try:
            yield
        finally:
            if provisioner is None:
                await app.state.provisioner.aclose()

    # FastAPIOffline: /docs and /redoc load their scripts from this app, not from a CDN (no internet needed).
    app = FastAPIOffline(
        title="vmqueue",
        version="0.1.0",
        summary="Create, inspect and destroy cloud VMs as jobs on a queue.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ValidationError, _invalid)
    app.add_exception_handler(JobNotFound, _error(status.HTTP_404_NOT_FOUND))
    app.add_exception_handler(IdempotencyConflict, _error(status.HTTP_409_CONFLICT))
    app.add_exception_handler(InvalidCallbackURL, _bad_callback)
    app.add_exception_handler(RedisUnavailable, _error(status.HTTP_503_SERVICE_UNAVAILABLE))  # names the URL
    for unavailable in (redis.ConnectionError, redis.TimeoutError, OperationalError):
        app.add_exception_handler(unavailable, _error(status.HTTP_503_SERVICE_UNAVAILABLE, "queue unavailable"))

    @app.post("/vms", status_code=202, response_model=Job, dependencies=[Auth], tags=["vms"])
    async def create_vm(body: CreateVMBody, response: Response, vmq: Vmq) -> Job:
        """Validate and enqueue a create; follow the returned job at ``GET /jobs/{id}``."""
        job = await vmq.create_vm(
            body.spec,
            body.ssh_key,
            body.startup_script,
            idempotency_key=body.idempotency_key,
            deadline_s=body.deadline_s,
            callback_url=body.callback_url,
            ttl_s=body.ttl_s,
            expires_at=body.expires_at,
            ready_when=body.ready_when,
            ready_deadline_s=body.ready_deadline_s,
            ready_via=body.ready_via,
            ssh_port=body.ssh_port,
        )
        response.headers["Location"] = f"/jobs/{job.id}"
        return job

    @app.get("/jobs/{job_id}", response_model=JobView, dependencies=[Auth], tags=["jobs"])
    async def get_job(job_id: Annotated[str, Path(max_length=128)], vmq: Vmq) -> JobView:
        """A job's state, VM, error and history, and a ``notice`` when its state alone misleads;
        any unique prefix of its id works."""
        job = await vmq.get_job(job_id)
        return JobView.model_validate({**job.model_dump(), "notice": await vmq.notice(job)})

    @app.get("/jobs/{job_id}/events", response_class=EventSourceResponse, dependencies=[Auth], tags=["jobs"])
    async def job_events(
        job_id: Annotated[str, Path(max_length=128)],
        vmq: Vmq,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    ) -> EventSourceResponse:
        """The job's changes as Server-Sent Events, from the first the stream holds (or after
        ``Last-Event-ID``) until the job is finished; then one ``end`` event and the stream closes.

        Each event: ``id`` (resume after it with ``Last-Event-ID``) and ``data``, a ``JobChange``
        (job_id, kind, provider, state, previous, cleanup, finished, message, at, instance_id, vm,
        error). 404 for an unknown job, 400 for an id that is not a stream id (``<ms>-<seq>``).
        """
        after = last_event_id or "0"
        if not STREAM_ID.match(after):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "Last-Event-ID: expected <milliseconds>-<sequence>")
        await vmq.get_job(job_id)  # 404 now, not an empty stream

        async def stream() -> AsyncIterator[ServerSentEvent]:
            async for event_id, change in vmq.events([job_id], after):
                yield ServerSentEvent(change.model_dump_json(), id=event_id)
            yield ServerSentEvent("{}", event="end")

        return EventSourceResponse(stream(), ping=15)

    @app.get("/vms/{provider}/{instance_id:path}", status_code=202, response_model=Job, dependencies=[Auth])
    async def get_vm(
        provider: ProviderName, instance_id: str, response: Response, vmq: Vmq, callback_url: CallbackQuery = None
    ) -> Job:
        """Enqueue a read of one VM (through a worker, like every provider call)."""
        job = await vmq.get_vm(provider, instance_id, callback_url=callback_url)
        response.headers["Location"] = f"/jobs/{job.id}"
        return job

    @app.delete("/vms/{provider}/{instance_id:path}", status_code=202, response_model=Job, dependencies=[Auth])
    async def destroy_vm(
        provider: ProviderName, instance_id: str, response: Response, vmq: Vmq, callback_url: CallbackQuery = None
    ) -> Job:
        """Enqueue a destroy; a VM that is already gone ends the job ``gone`` too."""
        job = await vmq.destroy_vm(provider, instance_id, callback_url=callback_url)
        response.headers["Location"] = f"/jobs/{job.id}"
        return job

    app.include_router(weblisting.router(Auth))  # list, cancel, extend
    app.include_router(phonehome.router)  # cloud-init's phone_home (ready_when=cloud_init): token, not API key

    @app.get("/healthz", tags=["ops"], responses={503: {"description": "Redis does not answer"}})
    async def healthz(request: Request) -> JSONResponse:
        """Readiness, without auth: 200 when Redis answers, else 503 saying which URL does not."""
        try:
            await check_redis_async(request.app.state.provisioner.settings)
        except RedisUnavailable as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "redis": "ok"})

    return app


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field, without pydantic's ``input``: it could echo a startup script."""
    errors: list[Any] = exc.errors()  # type: ignore[attr-defined]
    detail = [{"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def _bad_callback(request: Request, exc: Exception) -> JSONResponse:
    where = ["body", "callback_url"] if request.method == "POST" else ["query", "callback_url"]
    detail = [{"loc": where, "msg": str(exc).removeprefix("callback_url: "), "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=422)


def _error(code: int, message: str | None = None):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": message or str(exc)}, status_code=code)

    return handler


app = create_app()
