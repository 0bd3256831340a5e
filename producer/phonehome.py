"""The phone-home route: where a VM's cloud-init reports that it finished (``ready_when=cloud_init``).

``POST /ready/{job_id}/{token}`` with cloud-init's phone_home body (form-encoded ``pub_key_rsa``,
``pub_key_ecdsa``, ``pub_key_ed25519``, ``instance_id``, ``hostname``, ``fqdn``; "N/A" for a key it
lacks; cloud-init's cc_phone_home module). No API key: the VM has none and must never get one. The
per-job token from the URL is the credential: 256 random bits, of which the store keeps only the
SHA-256, compared in constant time, spent once the job is settled. Answers:

- 200 ``{"job_id", "state"}``: recorded (and the job settled ``ready`` if its VM was seen running;
  otherwise the worker settles it the moment it sees the VM run);
- 403: unknown job or wrong/spent token (one answer for both: it tells a prober nothing);
- 409: the job cannot become ready any more (failed, or not a ``cloud_init`` job);
- 413 / 422: a body too large, or host keys that are not OpenSSH public keys.

Kept apart from producer/web.py (included there) so that the app's other routes can change freely.
Async end to end, like the app (the job store on ``redis.asyncio``).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status

from vmqueue import keys
from vmqueue.ajobstore import AsyncJobStore
from vmqueue.jobstore import InvalidTransition
from vmqueue.models import Job, JobState, utcnow
from vmqueue.readiness import PHONE_HOME_KEY_FIELDS, HostKey, ReadyWhen, digest_matches

MAX_BODY_BYTES = 64 * 1024  # three public keys and three names fit many times over
READY_PATH = re.compile(r"^(/ready/[^/?]+/)[^/?]+")

router = APIRouter(tags=["ready"])


class TokenRedactingFilter(logging.Filter):
    """Access log lines show ``/ready/<job>/***``, never the token (uvicorn logs each request's path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str) and args[2].startswith("/ready/"):
            record.args = (*args[:2], READY_PATH.sub(r"\1***", args[2]), *args[3:])
        return True


# Whoever serves the app (``vmq web``, ``uvicorn producer.web:app``) logs access through this logger.
if not any(isinstance(f, TokenRedactingFilter) for f in logging.getLogger("uvicorn.access").filters):
    logging.getLogger("uvicorn.access").addFilter(TokenRedactingFilter())


def _host_keys(form: dict[str, list[str]]) -> list[HostKey]:
    found = []
    for name in PHONE_HOME_KEY_FIELDS:
        value = (form.get(name) or [""])[0].strip()
        if not value or value == "N/A":  # cloud-init posts N/A for a key file it could not read
            continue
        try:
            found.append(HostKey.parse(value))
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"{name}: {exc}") from None
    return found


@router.post("/ready/{job_id}/{token}")
async def phone_home(
    job_id: Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9_-]+$")],
    token: Annotated[str, Path(max_length=128)],
    request: Request,
) -> dict[str, str]:
    """cloud-init's phone_home: record the VM's host keys and settle its ``ready_when=cloud_init`` job."""
    store: AsyncJobStore = request.app.state.provisioner.store
    if not digest_matches(await store.redis.get(keys.ready_token_key(job_id)), token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "unknown job or token")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_BODY_BYTES} bytes")
    form = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    host_keys = _host_keys(form)
    now = utcnow()

    def change(job: Job) -> None:
        if job.ready_when != ReadyWhen.cloud_init or job.state in (JobState.failed, JobState.ready):
            return
        job.phoned_home_at = job.phoned_home_at or now
        job.host_keys = host_keys
        if job.state == JobState.running:
            job.state, job.ready_at = JobState.ready, now
            job.record("ready: cloud-init phoned home")
        else:  # the VM finished before any worker saw it running: the worker settles it then
            job.record("cloud-init phoned home; waiting for the provider to report the VM running")

    try:
        job = await store.update(job_id, change)
    except (KeyError, InvalidTransition):
        raise HTTPException(status.HTTP_409_CONFLICT, "the job cannot become ready") from None
    if job.ready_when != ReadyWhen.cloud_init or job.state == JobState.failed:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the job is {job.state}; it cannot become ready")
    if job.state == JobState.ready:
        pipe = store.redis.pipeline(transaction=False)
        pipe.delete(keys.ready_token_key(job_id))  # spent: it opens nothing any more
        pipe.zadd(keys.READY_DUE, {job_id: 0}, xx=True)  # a worker's scanner unschedules and counts it
        await pipe.execute()
    return {"job_id": job_id, "state": str(job.state)}
