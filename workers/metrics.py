"""Prometheus metrics of the workers: what Flower does not show.

Flower shows tasks; a job is many task runs (polls are retries), so it cannot tell how many jobs
ended in which state, how the provider APIs behave, or how long a VM took to run. These can:

- ``vmq_jobs_finished_total{provider,kind,state}``: jobs that reached a final state.
- ``vmq_job_errors_total{provider,kind,code}``: failed jobs by error code (capacity, auth, ...).
- ``vmq_provider_calls_total{provider,method}`` and ``vmq_provider_errors_total{provider,method,error}``:
  adapter calls, and those that raised, by error class (``TransientError``, ``RateLimitedError``, ...).
- ``vmq_create_enqueue_to_running_seconds{provider}``: histogram from enqueue (the producer's
  ``created_at``) to the worker seeing the VM running.
- ``vmq_create_enqueue_to_ready_seconds{provider,ready_when}``: histogram from enqueue to ``ready``
  (ssh answered, cloud-init phoned home), for jobs whose ``ready_when`` asks for it.

A worker serves them on ``VMQ_METRICS_PORT`` (unset: no server) at ``VMQ_METRICS_ADDR``
(default 127.0.0.1), started on worker boot. The threads pool runs every task in the worker's one
process, so the default registry holds everything; run one port per worker process on a host.
Counters start at zero when a worker starts, as Prometheus expects (it sums across workers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from celery.signals import worker_init
from prometheus_client import Counter, Histogram, start_http_server
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmqueue.jobstore import TRANSITION_HOOKS
from vmqueue.models import Job, JobKind, JobState, utcnow

log = logging.getLogger("vmqueue.worker")

JOBS_FINISHED = Counter("vmq_jobs_finished", "Jobs that reached a final state", ["provider", "kind", "state"])
JOB_ERRORS = Counter("vmq_job_errors", "Failed jobs by error code", ["provider", "kind", "code"])
PROVIDER_CALLS = Counter("vmq_provider_calls", "Calls of a provider adapter (one per attempt)", ["provider", "method"])
PROVIDER_ERRORS = Counter(
    "vmq_provider_errors", "Provider adapter calls that raised, by error class", ["provider", "method", "error"]
)
ENQUEUE_TO_RUNNING = Histogram(
    "vmq_create_enqueue_to_running_seconds",
    "Time from enqueueing a create job to its VM running",
    ["provider"],
    buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200),
)

ENQUEUE_TO_READY = Histogram(
    "vmq_create_enqueue_to_ready_seconds",
    "Time from enqueueing a create job to its VM being ready (ready_when ssh or cloud_init)",
    ["provider", "ready_when"],
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1200, 1800),
)


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMQ_METRICS_", extra="ignore")

    port: int | None = None  # unset: the worker serves no metrics
    addr: str = "127.0.0.1"  # 0.0.0.0 in a container that Prometheus scrapes from outside


def job_changed(job: Job) -> None:
    """A job store transition hook: count jobs as they reach a final state (exactly once each)."""
    if job.state == JobState.running and job.kind == JobKind.create:
        _observe(ENQUEUE_TO_RUNNING.labels(job.provider), job.created_at, job.running_at)
    if not job.final:
        return
    try:
        JOBS_FINISHED.labels(job.provider, job.kind, job.state).inc()
        if job.state == JobState.failed and job.error:
            JOB_ERRORS.labels(job.provider, job.kind, job.error.code).inc()
        if job.state == JobState.ready:
            _observe(ENQUEUE_TO_READY.labels(job.provider, job.ready_when), job.created_at, job.ready_at)
    except Exception:  # noqa: BLE001 - metrics must never break a job
        log.exception("job=%s provider=%s could not record metrics", job.id, job.provider)


def _observe(histogram, start: datetime, end: datetime | None) -> None:
    try:
        histogram.observe(max(((end or utcnow()) - start).total_seconds(), 0.0))
    except Exception:  # noqa: BLE001 - metrics must never break a job
        log.exception("could not record a duration")


@contextmanager
def provider_call(provider: str, method: str) -> Iterator[None]:
    """Count one adapter call, and its error class if it raises."""
    PROVIDER_CALLS.labels(provider, method).inc()
    try:
        yield
    except Exception as exc:
        PROVIDER_ERRORS.labels(provider, method, type(exc).__name__).inc()
        raise


@worker_init.connect
def _serve(**_: object) -> None:
    settings = MetricsSettings()
    if settings.port is None:
        return
    try:
        start_http_server(settings.port, addr=settings.addr)
    except OSError as exc:
        # Said plainly, once: the worker still serves its queue, only without metrics.
        log.error(
            "metrics: port %s on %s is in use or not available (%s); this worker serves no metrics. "
            "Give each worker process on a host its own VMQ_METRICS_PORT",
            settings.port, settings.addr, exc.strerror or exc,
        )  # fmt: skip
        return
    log.info("metrics: serving Prometheus metrics on http://%s:%s/metrics", settings.addr, settings.port)


if job_changed not in TRANSITION_HOOKS:
    TRANSITION_HOOKS.append(job_changed)
