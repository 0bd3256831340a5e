"""Every live worker marks the provider queues it consumes as served, so a producer can tell a job
that waits behind others from a job that no worker will ever take.

``vmq:served:<provider>`` is refreshed every ``REFRESH_S`` with a ``TTL_S`` expiry by each worker of
that queue; the producer's ``Provisioner.notice`` reads it (one EXISTS) for a job queued too long.
A worker that refuses to start (workers/preflight.py) never marks its queue.
"""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready

from vmqueue import keys
from vmqueue.connection import connect
from vmqueue.settings import get_settings

log = logging.getLogger("vmqueue.worker")

REFRESH_S = 10.0
TTL_S = 30


def mark_served(client, providers: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for provider in providers:
        pipe.set(keys.served_key(provider), "1", ex=TTL_S)
    pipe.execute()


@worker_ready.connect
def _start(sender, **_: object) -> None:
    queues = [q.name for q in sender.task_consumer.queues]
    providers = [q.removeprefix(keys.QUEUE_PREFIX) for q in queues if q.startswith(keys.QUEUE_PREFIX)]
    client = connect(get_settings())

    def refresh() -> None:
        while True:
            try:
                mark_served(client, providers)
            except Exception as exc:  # noqa: BLE001 - must outlive a Redis outage
                log.debug("presence: %s", exc)
            time.sleep(REFRESH_S)

    threading.Thread(target=refresh, name="vmq-presence", daemon=True).start()
