"""The one Celery configuration every process that touches the broker uses (DESIGN §6).

Producer, workers and Flower all build their app here: kombu restores unacked messages with
*its own* visibility timeout, so a process with a shorter one would steal the others' messages.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from vmqueue import broker
from vmqueue.connection import broker_transport_options, redis_ssl_options
from vmqueue.keys import WEBHOOK_QUEUE, queue_name
from vmqueue.models import PROVIDERS
from vmqueue.settings import Settings, get_settings


def provider_queues() -> list[Queue]:
    # Each queue gets its own exchange and routing key: a bare Queue("x") inherited another
    # queue's binding in kombu 5.7.
    names = [queue_name(p) for p in PROVIDERS] + [WEBHOOK_QUEUE]
    return [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu 5.7 scans for unacked messages every interval*throttle s (~100 s by default);
        # a scan every interval brings a SIGKILLed worker's jobs back promptly.
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "health_check_interval": 25,
        **broker_transport_options(settings),
    }
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport,
        "broker_use_ssl": redis_ssl_options(settings),
        "broker_connection_retry_on_startup": True,
        # A producer rides out a Redis restart (about a minute) instead of failing the enqueue.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 30,
            "interval_start": 0.1,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # The job store is the source of truth; no result backend holds anything.
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_eta_task_limit": settings.eta_task_limit,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_queues": provider_queues(),
        "task_create_missing_queues": False,
        "task_default_queue": queue_name("sim"),
        "task_default_exchange": queue_name("sim"),
        "task_default_routing_key": queue_name("sim"),
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }


def make_celery(settings: Settings | None = None, main: str = "vmqueue") -> Celery:
    broker.install()  # kombu's Redis transports with one client per channel (vmqueue/broker.py)
    app = Celery(main)
    app.conf.update(celery_config(settings or get_settings()))
    return app
