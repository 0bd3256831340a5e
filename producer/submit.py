"""What ``Provisioner`` and ``AsyncProvisioner`` share: validation, job building and the submission
protocol, each written once.

The submission protocol (``submit``) is written without I/O: a generator that yields each Redis or
broker operation it needs as a ``Call`` and is sent back its result (or has its exception thrown
in). ``run`` carries the calls out with blocking clients, ``arun`` awaits them, so the sync and the
async client follow the very same steps (idempotency key, record, publish, what a failed publish
leaves) and a change to those steps is made in one place.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from vmqueue import keys
from vmqueue.jobindex import JobQuery
from vmqueue.models import CreateRequest, InstanceRef, Job, JobError, JobKind, JobState, VMSpec, utcnow
from vmqueue.readiness import ReadyVia, ReadyWhen, new_token, phone_home_config, phone_home_url, token_digest
from vmqueue.settings import Settings
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.userdata import merge_user_data
from vmqueue.webhooks import check_callback_url

TASKS = keys.TASK_OF_KIND

T = TypeVar("T")
MAX_TTL_S = 10 * 365 * 24 * 3600  # ten years: beyond, a TTL is a typo, not an intent


class JobNotFound(LookupError):
    pass


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a different request."""


class JobTimeout(TimeoutError):
    def __init__(self, job: Job, timeout_s: float):
        super().__init__(f"job {job.id} is still {job.state} after {timeout_s:.0f}s")
        self.job = job


# -- validation and job building ------------------------------------------------------------------
def build_create(
    settings: Settings,
    spec: VMSpec | dict[str, Any],
    ssh_key: str | SSHPublicKey,
    startup_script: str | None = None,
    *,
    idempotency_key: str | None = None,
    deadline_s: float | None = None,
    destroy_on_failure: bool | None = None,
    ttl_s: float | None = None,
    expires_at: datetime | None = None,
    callback_url: str | None = None,
    ready_when: ReadyWhen | str = ReadyWhen.running,
    ready_deadline_s: float | None = None,
    ready_via: ReadyVia | str = ReadyVia.public,
    ssh_port: int | None = None,
) -> tuple[Job, str | None]:
    """The create job and the user-data to send; raises pydantic's ``ValidationError`` naming the bad field.

    ``ready_when``: ``running`` ends the job when the provider says so; ``ssh`` when the VM's SSH
    port (``ssh_port`` on its ``ready_via`` address; default: where the VM says its sshd is, else 22)
    completes a key exchange; ``cloud_init`` when cloud-init's final stage posts to
    ``VMQ_READY_BASE_URL`` (refused without it): the user-data sent is then the user's script with
    a phone_home merged in, whose URL holds a per-job one-time token. Not ready ``ready_deadline_s``
    (default ``VMQ_READY_DEADLINE_S``) after running fails the job and destroys the VM. The job
    records the VM's SSH host keys (``Job.host_keys``). ValueError for a bad ``ttl_s``/``expires_at``;
    ``InvalidCallbackURL`` for a callback URL vmqueue will not call.
    """
    request = CreateRequest.model_validate(
        {
            "spec": spec,
            "ssh_key": ssh_key,
            "startup_script": startup_script,
            "ready_when": ready_when,
            "ready_deadline_s": ready_deadline_s,
            "ready_via": ready_via,
            "ssh_port": ssh_port,
        },
        context={"ready_base_url": settings.ready_base_url},
    )
    expires = expiry(ttl_s, expires_at)
    job = Job(
        kind=JobKind.create,
        provider=request.spec.provider,
        spec=request.spec,
        ssh_key=request.ssh_key.openssh,
        has_startup_script=startup_script is not None,
        deadline_s=deadline_s if deadline_s is not None else settings.deadline_s,
        destroy_on_failure=settings.destroy_on_failure if destroy_on_failure is None else destroy_on_failure,
        idempotency_key=idempotency_key,
        expires_at=expires,
        callback_url=_callback(settings, callback_url),
        ready_when=request.ready_when,
        ready_deadline_s=request.ready_deadline_s or settings.ready_deadline_s,
        ready_via=request.ready_via,
        ssh_port=request.ssh_port,
    )
    if request.ready_when != ReadyWhen.cloud_init:
        return job, request.startup_script
    # The fingerprint is of the user's request; the user-data sent differs per job (its token).
    job.request_hash = request_hash(job, request.startup_script) if idempotency_key else None
    token = new_token()  # only in the user-data; the store keeps its digest until the VM uses it
    job._ready_token_digest = token_digest(token)
    url = phone_home_url(settings.ready_base_url, job.id, token)
    return job, merge_user_data(request.startup_script, phone_home_config(url))


def build_destroy(
    settings: Settings,
    provider: str,
    instance_id: str,
    *,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
) -> Job:
    ref = InstanceRef(provider=provider, instance_id=instance_id)
    return Job(
        kind=JobKind.destroy,
        provider=ref.provider,
        instance_id=ref.instance_id,
        deadline_s=settings.deadline_s,
        idempotency_key=idempotency_key,
        callback_url=_callback(settings, callback_url),
    )


def build_get(settings: Settings, provider: str, instance_id: str, *, callback_url: str | None = None) -> Job:
    ref = InstanceRef(provider=provider, instance_id=instance_id)
    return Job(
        kind=JobKind.get,
        provider=ref.provider,
        instance_id=ref.instance_id,
        callback_url=_callback(settings, callback_url),
    )


def _callback(settings: Settings, url: str | None) -> str | None:
    return None if url is None else check_callback_url(url, settings)


def expiry(ttl_s: float | None, expires_at: datetime | None, now: datetime | None = None) -> datetime | None:
    """``expires_at`` from a create's or an extend's arguments (at most one of them); ValueError otherwise."""
    if ttl_s is not None and expires_at is not None:
        raise ValueError("give ttl_s or expires_at, not both")
    now = now or utcnow()
    if ttl_s is not None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S}] seconds, got {ttl_s}")
        return now + timedelta(seconds=ttl_s)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone (e.g. 2030-01-01T00:00:00Z)")
        if expires_at <= now:
            raise ValueError(f"expires_at {expires_at.isoformat()} is in the past")
        if expires_at > now + timedelta(seconds=MAX_TTL_S):
            raise ValueError(f"expires_at {expires_at.isoformat()} is more than ten years away")
    return expires_at


def list_query(query: JobQuery | dict[str, Any] | None, vms: bool = False) -> JobQuery:
    """A list filter from a ``JobQuery`` or its fields; ``vms``: only create jobs whose VM lives."""
    parsed = query if isinstance(query, JobQuery) else JobQuery.model_validate(query or {})
    return parsed.model_copy(update={"vms": True}) if vms else parsed


def os_user() -> str:
    """Who runs this process, for a job's history when the caller did not say who asked."""
    try:
        return f"user {getpass.getuser()}"
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "unknown user"


def request_hash(job: Job, startup_script: str | None) -> str:
    """What makes two requests "the same" for an idempotency key, computed before any worker acts."""
    fields = job.model_dump(mode="json", include={"kind", "provider", "spec", "instance_id", "ssh_key"})
    if job.ready_when != ReadyWhen.running:  # only then: fingerprints of earlier requests stay as they were
        fields.update(job.model_dump(mode="json", include={"ready_when", "ready_via", "ssh_port"}))
    fields["startup_script"] = startup_script
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def found(job: Job | None, job_id: str, settings: Settings) -> Job:
    """``job``, or ``JobNotFound`` saying why a job may be missing."""
    if job is None:
        raise JobNotFound(f"no job {job_id!r} (unknown, or expired after {settings.job_ttl_s}s)")
    return job


def task_message(job: Job) -> tuple[str, str, str]:
    """(task name, queue, argsrepr) of a job's first message. The argsrepr is what Flower shows for
    the task (searchable by kind, provider, VM name and job id), never a script or key."""
    name = job.spec.name if job.spec else None
    return TASKS[job.kind], keys.queue_name(job.provider), keys.task_argsrepr(job.kind, job.provider, job.id, name)


# -- the submission protocol, without I/O -----------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One operation of the protocol: a method of the job store, or ``publish`` (the job's message)."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


Protocol = Generator[Call, Any, T]


def submit(job: Job, startup_script: str | None = None) -> Protocol[Job]:
    """Record a job and publish its message; the job, or the job an idempotency key already names.

    Raises ``IdempotencyConflict`` (key used for another request), ``JobNotFound`` (the key's job
    expired) and whatever the store or the publish raised. The key is bound in the same step as the
    record is written (``add_claiming``), so every caller who finds it bound finds the job. A record
    becomes runnable only once its message is published (``mark_enqueued``): a failed publish
    leaves the job ``failed`` (``enqueue_failed``) and its key free, and if even that write fails
    (one Redis outage), the rescue (workers/rescue.py) fails the unmarked record instead of sending it.
    """
    if job.idempotency_key:
        job.request_hash = job.request_hash or request_hash(job, startup_script)  # build_create may have set it
    existing = yield Call("add_claiming", (job, startup_script, job.idempotency_key))
    if existing:
        earlier = yield Call("get", (existing,))
        if earlier is None:
            raise JobNotFound(f"idempotency key {job.idempotency_key!r} names job {existing}, which has expired")
        # Compared by fingerprint: the stored spec changes once a worker fixes its parameters.
        if earlier.request_hash != job.request_hash:
            raise IdempotencyConflict(
                f"idempotency key {job.idempotency_key!r} was used for job {existing} with another request"
            )
        return earlier
    try:
        yield Call("publish", (job,))
    except Exception as exc:
        # Not enqueued: the record says so instead of sitting in "queued" forever.
        error = JobError(code="enqueue_failed", message=f"{type(exc).__name__}: {exc}", retryable=True)
        try:
            yield Call("transition", (job.id, JobState.failed, f"failed: {error.message}"), {"error": error})
            if job.idempotency_key:
                yield Call("release_idempotency_key", (job.idempotency_key, job.id))
        except Exception:  # noqa: BLE001, S110 - the record stays unmarked: the rescue fails it and frees its key
            pass
        raise
    try:
        job = yield Call("mark_enqueued", (job,))
    except Exception:  # noqa: BLE001, S110 - the message is out and a worker runs the job: the caller hears success
        pass
    # With VMQ_REDIS_WAIT_REPLICAS: return only once replicas have the record and the message.
    yield Call("replicated", (job.id,))
    return job


def run(protocol: Protocol[T], store: object, publish: Callable[[Job], object]) -> T:
    """Carry a protocol out with blocking calls: ``publish`` for "publish", ``store``'s methods for the rest."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            call = protocol.throw(error) if error is not None else protocol.send(result)
        except StopIteration as stop:
            return stop.value
        target = publish if call.name == "publish" else getattr(store, call.name)
        try:
            result, error = target(*call.args, **call.kwargs), None
        except Exception as exc:  # handed to the protocol, which decides (and re-raises what it does not handle)
            result, error = None, exc


async def arun(protocol: Protocol[T], store: object, publish: Callable[[Job], Awaitable[object]]) -> T:
    """``run`` for asyncio: ``store``'s methods and ``publish`` are coroutines, awaited in turn."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            call = protocol.throw(error) if error is not None else protocol.send(result)
        except StopIteration as stop:
            return stop.value
        target = publish if call.name == "publish" else getattr(store, call.name)
        try:
            result, error = await target(*call.args, **call.kwargs), None
        except Exception as exc:
            result, error = None, exc
