"""The Celery app of the workers: ``celery -A workers.app worker -Q vmq.<provider>``.

Built from the one shared configuration (vmqueue/celery_config.py); the threads pool suits the
I/O-bound provider calls, and a poll waiting for its countdown holds no thread.
"""

from __future__ import annotations

from vmqueue.celery_config import make_celery
from vmqueue.settings import get_settings
from workers import broker_fixes

broker_fixes.apply()  # a Redis restart must not kill the worker (celery/kombu 5.7; see the module)

settings = get_settings()
app = make_celery(settings, main="vmqueue")
app.conf.update(worker_pool="threads", worker_concurrency=settings.worker_concurrency)
# Tasks (job steps, webhook deliveries), then signal handlers (metrics, log context, presence,
# Flower's job events, the preflight at start).
app.conf.include = [
    "workers.tasks",
    "workers.webhooks",
    "workers.metrics",
    "workers.logctx",
    "workers.presence",
    "workers.jobevents",
    "workers.preflight",
]
