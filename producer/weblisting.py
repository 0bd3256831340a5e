"""The HTTP API's routes to list, cancel and extend (``producer.web`` includes them).

- ``GET /jobs`` and ``GET /vms``: the newest jobs (or the VMs vmqueue manages) matching the query
  parameters ``kind``, ``provider``, ``state``, ``name``, ``label`` (``key=value``, repeatable),
  ``fleet``, ``since``, ``until`` (ISO 8601 creation times), at most ``limit`` (1..1000, default 50);
  the answer's ``next_cursor``, passed back as ``cursor``, gives the next (older) page. Served by the
  job index (vmqueue/jobindex.py), never by scanning keys.
- ``POST /jobs/{id}/cancel`` (body optional: ``by``, ``reason``): 200 with the job (``cancelled`` at
  once if it was queued, else with its ``cancel`` recorded until the worker ends it), 409 when it
  finished or is a destroy whose delete was sent, 404 when unknown. The history names ``by`` and
  the API key that asked (its position in ``VMQ_API_KEYS``, never the key).
- ``POST /jobs/{id}/extend`` (body: ``ttl_s`` or ``expires_at``): 200 with the job, 409 when its VM
  already expired or is gone, 422 for a bad time.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from producer.aclient import AsyncProvisioner
from producer.control import CancelRefused, ExtendRefused
from vmqueue.jobindex import MAX_LIMIT, JobQuery
from vmqueue.models import Job, JobKind, JobState
from vmqueue.options import ProviderName

JobId = Annotated[str, Path(max_length=128)]


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="pass as ``cursor`` for the next, older page; null: no more")


class VMList(BaseModel):
    vms: list[Job] = Field(description="the create jobs whose VM lives (their ``vm`` field is the VM)")
    next_cursor: str | None


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str | None = Field(None, min_length=1, max_length=100, description="who asks (a user of your backend)")
    reason: str = Field("", max_length=500)


class ExtendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: float | None = Field(None, gt=0, description="the VM is destroyed this many seconds from now")
    expires_at: datetime | None = Field(None, description="the VM is destroyed at this time (with a zone)")

    @model_validator(mode="after")
    def _one(self) -> ExtendBody:
        if (self.ttl_s is None) == (self.expires_at is None):
            raise ValueError("give ttl_s or expires_at (one of them)")
        return self


def caller(request: Request) -> str:
    """Which API key asked, by its position in ``VMQ_API_KEYS`` (the key itself is never recorded)."""
    keys: list[str] = request.app.state.api_keys
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    for number, key in enumerate(keys, 1):
        if hmac.compare_digest(given.encode(), key.encode()):
            return f"api key #{number}"
    return "an unauthenticated client"  # VMQ_WEB_ALLOW_NO_AUTH: another layer knows who


def _query(
    kind: JobKind | None = None,
    provider: ProviderName | None = None,
    state: JobState | None = None,
    name: str | None = None,
    label: Annotated[list[str], Query(description="key=value, repeatable")] = [],  # noqa: B006
    fleet: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    labels = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"label {item!r} must look like key=value")
        labels[key] = value
    return {
        "kind": kind,
        "provider": provider,
        "state": state,
        "name": name,
        "labels": labels,
        "fleet": fleet,
        "since": since,
        "until": until,
    }


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[str | None, Query(max_length=200)]


def _provisioner(request: Request) -> AsyncProvisioner:
    return request.app.state.provisioner  # made by producer.web's lifespan


# Module-level: FastAPI resolves these (string) annotations in the module's namespace.
Vmq = Annotated[AsyncProvisioner, Depends(_provisioner)]
Filters = Annotated[dict[str, Any], Depends(_query)]


def router(auth: Any) -> APIRouter:
    """The routes, behind ``auth`` (the app's API-key dependency)."""
    routes = APIRouter(dependencies=[auth])

    @routes.get("/jobs", response_model=JobList, tags=["jobs"])
    async def list_jobs(vmq: Vmq, filters: Filters, limit: Limit = 50, cursor: Cursor = None) -> JobList:
        """The newest jobs matching every filter given, ``limit`` per page."""
        page = await _page(vmq.list_jobs, filters, limit, cursor)
        return JobList(jobs=page.jobs, next_cursor=page.next_cursor)

    @routes.get("/vms", response_model=VMList, tags=["vms"])
    async def list_vms(vmq: Vmq, filters: Filters, limit: Limit = 50, cursor: Cursor = None) -> VMList:
        """The VMs vmqueue manages (create jobs whose VM lives), newest first."""
        page = await _page(vmq.list_vms, filters, limit, cursor)
        return VMList(vms=page.jobs, next_cursor=page.next_cursor)

    @routes.post("/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"])
    async def cancel(job_id: JobId, request: Request, vmq: Vmq, body: CancelBody | None = None) -> Job:
        """Take a job back; idempotent."""
        body = body or CancelBody()
        who = caller(request)
        try:
            return await vmq.cancel(job_id, by=f"{body.by} ({who})" if body.by else who, reason=body.reason)
        except CancelRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None

    @routes.post("/jobs/{job_id}/extend", response_model=Job, tags=["jobs"])
    async def extend(job_id: JobId, body: ExtendBody, request: Request, vmq: Vmq) -> Job:
        """Move the expiry of a create's VM."""
        try:
            return await vmq.extend(job_id, ttl_s=body.ttl_s, expires_at=body.expires_at, by=caller(request))
        except ExtendRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None

    return routes


async def _page(list_fn: Any, filters: dict[str, Any], limit: int, cursor: str | None) -> Any:
    """A page; 422 for a filter or cursor the index refuses (pydantic's errors go to the app's handler)."""
    query = JobQuery.model_validate(filters)
    try:
        return await list_fn(query, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
