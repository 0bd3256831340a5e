"""Taking a job back (cancel) and moving a VM's expiry (extend): changes recorded in the job store,
written once as protocols of ``producer.submit`` for the blocking and the asyncio client.

A cancel is not Celery's revoke (which lives in worker memory and is lost on a restart). It is a
compare-and-set on the record, so it cannot race a worker's own change:

- queued (no worker acted yet): the job ends ``cancelled`` here and now; the worker that takes its
  message later finds it final, and a create never calls the provider;
- a create submitting, provisioning or running: the request is recorded (``Job.cancel``) and the
  job's step is sent again; the worker holding the job's lease ends it ``cancelled`` at its next
  check, which comes before each provider call and right after the create call answers, so a VM
  made meanwhile is known and destroyed by the job's ordinary cleanup (workers/lifecycle/cancel.py);
- a destroy past queued: refused, its delete may already be on the wire;
- a job already finished: refused; a job already cancelled (or asked to be): the job, unchanged.
"""

from __future__ import annotations

from datetime import datetime

from producer.submit import Call, Protocol, expiry
from vmqueue.models import CancelRequest, Job, JobKind, JobState


class CancelRefused(ValueError):
    """The job cannot be cancelled (any more): it finished, or its delete was sent."""


class ExtendRefused(ValueError):
    """The job has no VM whose expiry can move: not a create, its VM is gone, or expiry already fired."""


def cancel(job_id: str, by: str, reason: str = "") -> Protocol[Job]:
    """Record a cancel of ``job_id`` asked by ``by`` (a protocol of ``producer.submit``: ``run`` it with
    a blocking store, ``arun`` with an asyncio one); the job as it is now.

    Raises KeyError for an unknown job and ``CancelRefused`` for one that cannot be cancelled.
    """
    request = CancelRequest(by=by, reason=reason)
    verdict: list[str] = []

    def change(job: Job) -> None:
        verdict.clear()
        if job.cancel is not None or job.state == JobState.cancelled:
            return  # idempotent: the first request stands
        if job.state == JobState.queued:
            job.cancel = request
            job.state = JobState.cancelled
            job.record(f"cancelled by {by} before any worker acted{_why(reason)}")
            verdict.append("cancelled")
            return
        if job.kind == JobKind.destroy and job.state == JobState.destroying:
            raise CancelRefused(f"job {job.id}: a destroy cannot be cancelled once its delete was sent")
        if job.kind != JobKind.create or job.state in (JobState.failed, JobState.gone, JobState.done):
            raise CancelRefused(f"job {job.id} already ended {job.state}; nothing to cancel")
        if job.vm_destroyed_by is not None:
            raise CancelRefused(f"job {job.id}: its VM was destroyed by job {job.vm_destroyed_by}")
        job.cancel = request
        job.record(f"cancel requested by {by}{_why(reason)}")

    job = yield Call("update", (job_id, change))
    if verdict == ["cancelled"] and job.kind == JobKind.create:
        yield Call("create_ended", (job.id, False))  # its startup script goes now
    if job.cancel_pending or (job.cancel is not None and job.cancel.reported_at is None):
        # The job's own task again, so a worker acts at once, even on a job that had no message of
        # its own (a VM the tick chain watches, a running VM), and reports a queued job's cancel
        # (its webhook, its metrics: workers/lifecycle/cancel.py); also on a repeated cancel, so a
        # lost message does not leave the request unheard.
        yield Call("publish", (job,))
    return job


def _why(reason: str) -> str:
    return f": {reason}" if reason else ""


def required_expiry(ttl_s: float | None, expires_at: datetime | None) -> datetime:
    """``expiry`` for an extend, where one of the two is required."""
    expires = expiry(ttl_s, expires_at)
    if expires is None:
        raise ValueError("give ttl_s or expires_at")
    return expires


def extend(job_id: str, expires_at: datetime, by: str) -> Protocol[Job]:
    """Move the expiry of a create job's VM to ``expires_at`` (a protocol, as ``cancel``); KeyError
    for an unknown job, ``ExtendRefused`` when there is no VM whose expiry can move."""

    def change(job: Job) -> None:
        if job.kind != JobKind.create:
            raise ExtendRefused(f"job {job.id} is a {job.kind} job; only a create's VM expires")
        if job.expiry_job_id is not None:
            raise ExtendRefused(f"job {job.id}: its VM expired already (destroy job {job.expiry_job_id})")
        if job.state in (JobState.failed, JobState.cancelled) or job.cancel_pending or job.vm_destroyed_by:
            raise ExtendRefused(f"job {job.id} is {job.state}: its VM is gone or being destroyed")
        before = job.expires_at.isoformat() if job.expires_at else "never"
        job.expires_at = expires_at
        job.record(f"expiry moved from {before} to {expires_at.isoformat()} by {by}")

    return (yield Call("update", (job_id, change)))
