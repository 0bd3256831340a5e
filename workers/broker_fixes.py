"""A worker must survive a Redis restart; celery 5.7 + kombu 5.7 crash instead. One targeted fix.

When the broker connection drops, celery 5.7's consumer (``on_connection_error_after_connected``)
calls ``Connection.collect()``, which clears the transport's ``client``. Whatever then touches the
old channel has to rebuild its Redis pool and reads ``transport.client.hostname`` from ``None``: an
``AttributeError``, not a connection error, so celery logs "Unrecoverable error" and the worker
process exits. Two such paths crash a worker: closing the channel puts back the messages the worker
holds (``QoS.restore_unacked``; every busy worker holds its scheduled polls), and a task that was
running during the outage acks its message on the old channel once it returns. A Redis restart used
to kill every busy worker. Found by the chaos suite (bench/chaos.py, R2).

The fix turns that case into the connection error it is, which kombu and celery already handle
("Couldn't ack ..." is logged, the channel is dropped). Nothing is lost: the messages stay in
kombu's unacked hash in Redis (persisted with the AOF) and come back through the visibility sweep,
exactly as for a SIGKILLed worker; a step that runs twice is harmless (lease, compare-and-set).
"""

from __future__ import annotations

from functools import wraps
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_original = kombu_redis.Channel._connparams


@wraps(_original)
def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> dict[str, Any]:
    if getattr(self.connection, "client", None) is None:
        raise redis.ConnectionError("the broker connection of this channel was torn down after a connection loss")
    return _original(self, asynchronous=asynchronous)


def apply() -> None:
    """Idempotent; called when the workers' Celery app is built."""
    if kombu_redis.Channel._connparams is not _connparams:
        kombu_redis.Channel._connparams = _connparams
