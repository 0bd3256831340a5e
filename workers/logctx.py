"""Every log line a worker writes while running a job carries that job's id and provider.

A task's first argument is its job id (the tick task's: its provider) and its queue names the
provider, so ``task_prerun`` puts both in context variables for the thread that runs the task (the
threads pool gives each task its own thread for its duration) and a filter on the worker's log
handlers copies them onto each record as ``job_id`` and ``provider`` ("-" outside a job).

``VMQ_LOG_FORMAT=json`` makes the worker write one JSON object per line (``ts``, ``level``,
``logger``, ``job_id``, ``provider``, ``msg``) for log shippers; the default text format is
Celery's, whose lifecycle lines already read ``job=<id> provider=<name> ...``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.signals import after_setup_logger, task_postrun, task_prerun

from vmqueue.keys import QUEUE_PREFIX

_job_id: ContextVar[str] = ContextVar("vmq_job_id", default="-")
_provider: ContextVar[str] = ContextVar("vmq_provider", default="-")
_JOB_IN_MESSAGE = re.compile(r"\bjob=([0-9a-f]{32})\b")


class JobContextFilter(logging.Filter):
    """Adds ``job_id`` and ``provider`` to every record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = _job_id.get()
            if record.job_id == "-" and isinstance(record.msg, str) and "job=" in record.msg:
                # A task that acts for many jobs (the provider's batched-read tick) names the job in
                # its message, as every lifecycle line does: take it from there.
                found = _JOB_IN_MESSAGE.search(record.getMessage())
                record.job_id = found.group(1) if found else "-"
        if not hasattr(record, "provider"):
            record.provider = _provider.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "job_id": getattr(record, "job_id", "-"),
            "provider": getattr(record, "provider", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


@after_setup_logger.connect
def _configure(logger: logging.Logger, **_: object) -> None:
    as_json = os.environ.get("VMQ_LOG_FORMAT", "text").lower() == "json"
    for handler in logger.handlers:
        handler.addFilter(JobContextFilter())
        if as_json:
            handler.setFormatter(JsonFormatter())


@task_prerun.connect
def _enter(task: Task, args: tuple | list | None = None, **_: object) -> None:
    queue = (task.request.delivery_info or {}).get("routing_key") or ""
    provider = queue.removeprefix(QUEUE_PREFIX) if queue.startswith(QUEUE_PREFIX) else "-"
    first = str(args[0]) if args and isinstance(args[0], str) else "-"  # vmq.create_many: bind_job per job
    job_id = "-" if first == provider else first  # the tick task's argument is its provider, not a job
    _job_id.set(job_id)
    _provider.set(provider)


def bind_job(job_id: str) -> None:
    """For a task that works for several jobs in turn (``vmq.create_many``): the job at hand now."""
    _job_id.set(job_id)


def bind_provider(provider: str) -> None:
    """For a thread that works for one provider outside any task (the worker's tick timer)."""
    _provider.set(provider)


@task_postrun.connect
def _leave(**_: object) -> None:
    # The pool reuses its threads: the next task on this thread must not inherit this job.
    _job_id.set("-")
    _provider.set("-")
