"""Webhooks, the Celery side: dispatch when a job ends, deliver with retries on ``vmq.webhooks``.

workers/delivery.py says how one attempt is made (signature, address checks); this module:

- Dispatch: a job store transition hook (``dispatch``) sends one ``vmq.webhook`` message to the
  ``vmq.webhooks`` queue when a job with a callback reaches a state in ``NOTIFY_STATES``. The
  delivery runs in a worker of that queue (``vmq worker --webhooks``), never inside a job's step or
  its lease, so a slow or failing receiver delays no job: it occupies a webhook thread for at most
  ``VMQ_WEBHOOK_TIMEOUT_S`` per connect or read.
- At least once: the message is acknowledged late; a failed attempt (no answer, a timeout, any
  non-2xx) is retried with a Celery countdown (it holds no thread while it waits), at most
  ``VMQ_WEBHOOK_MAX_ATTEMPTS`` times in all, after ``delivery.backoff_s``. The ``webhook-id`` stays
  the same across attempts, so a receiver drops a duplicate by it.
- Every attempt is recorded on the job (``Job.webhooks``: outcome, status code, error, duration).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import TYPE_CHECKING

from celery import Task

from vmqueue import keys
from vmqueue.connection import connect
from vmqueue.jobstore import TRANSITION_HOOKS, JobStore
from vmqueue.models import MAX_DELIVERIES, Job
from vmqueue.webhooks import NOTIFY_STATES, event_type
from workers.app import app, settings

if TYPE_CHECKING:
    from workers.delivery import Deliverer

log = logging.getLogger("vmqueue.webhooks")


# -- the Celery side ---------------------------------------------------------------------------
@cache
def _store() -> JobStore:
    return JobStore(connect(settings), settings)


@cache
def _deliverer() -> Deliverer:
    from workers.delivery import Deliverer  # the webhooks extra: only workers of vmq.webhooks need it

    return Deliverer(settings)


def dispatch(job: Job) -> None:
    """Transition hook: a job with a callback reached a state its caller is told about."""
    if not job.callback_url or job.state not in NOTIFY_STATES:
        return
    event = event_type(job.state)
    try:
        deliver.apply_async(args=[job.id, event], queue=keys.WEBHOOK_QUEUE, argsrepr=f"({event} job={job.id})")
    except Exception:  # noqa: BLE001 - a webhook must never break the job it reports
        log.exception("job=%s could not enqueue its %s webhook", job.id, event)


@app.task(bind=True, name=keys.TASK_WEBHOOK, max_retries=None, acks_late=True)
def deliver(self: Task, job_id: str, event: str) -> None:
    """Deliver one webhook; retried with backoff until delivered, refused or out of attempts."""
    store = _store()
    job = store.get(job_id)
    if job is None or not job.callback_url:
        log.warning("job=%s %s webhook dropped: the job or its callback is gone", job_id, event)
        return
    attempt = self.request.retries + 1
    record, retry_after = _deliverer().deliver(job, event, attempt)
    last = attempt >= settings.webhook_max_attempts
    if record.outcome == "retrying" and last:
        record.outcome = "gave_up"

    def note(j: Job) -> None:
        j.webhooks.append(record)
        del j.webhooks[:-MAX_DELIVERIES]

    store.update(job_id, note)
    log.info(
        "job=%s webhook %s attempt %d: %s %s",
        job_id,
        event,
        attempt,
        record.outcome,
        record.error or record.status_code,
    )
    if record.outcome == "retrying":
        from workers.delivery import backoff_s

        raise self.retry(countdown=backoff_s(settings, attempt, retry_after))


if dispatch not in TRANSITION_HOOKS:
    TRANSITION_HOOKS.append(dispatch)
