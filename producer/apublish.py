"""Publishing a Celery task message from asyncio: one awaited LPUSH, no thread, no blocking call.

Celery's ``send_task`` blocks on kombu's synchronous Redis transport. This builds the same message
with Celery's own builder (``app.amqp.create_task_message``: headers, body, protocol 2) and lays it
out the way kombu's Redis channel does (``prepare_message`` + ``basic_publish``: the body base64-
encoded, a delivery tag, the delivery info), then pushes it where kombu would: ``send_task`` with a
``queue=`` on a direct exchange publishes to the default exchange with the queue's name as routing
key, which the Redis transport turns into ``LPUSH <queue>`` (priority 0 uses the bare queue key).
``tests/test_async.py`` checks the result against what ``send_task`` itself pushes.

Not sent: Celery's optional ``task-sent`` event (Flower sees the task from ``task-received`` on).
"""

from __future__ import annotations

import base64
import json
import uuid

import redis.asyncio
from celery import Celery
from kombu.serialization import dumps


class AsyncPublisher:
    def __init__(self, celery: Celery, client: redis.asyncio.Redis):
        self.celery = celery
        self.redis = client
        self._serializer = celery.conf.task_serializer
        self._reply_to = celery.thread_oid  # what send_task puts in reply_to (no result backend reads it)

    def message(self, task: str, args: list[object], queue: str, argsrepr: str, task_id: str | None = None) -> str:
        """The JSON text ``send_task(task, args=args, queue=queue, argsrepr=argsrepr, kwargsrepr="{}")``
        would push onto ``queue``."""
        if queue not in self.celery.amqp.queues:  # as send_task does (task_create_missing_queues=False)
            raise KeyError(f"queue {queue!r} is not defined in the Celery configuration")
        task_id = task_id or str(uuid.uuid4())
        headers, properties, body, _ = self.celery.amqp.create_task_message(
            task_id, task, args, {}, reply_to=self._reply_to, argsrepr=argsrepr, kwargsrepr="{}", ignore_result=None
        )
        content_type, content_encoding, data = dumps(body, serializer=self._serializer)
        raw = data.encode() if isinstance(data, str) else data
        properties.update(
            argsrepr=argsrepr,
            kwargsrepr="{}",
            delivery_mode=2,  # persistent, kombu's default for a durable exchange
            delivery_info={"exchange": "", "routing_key": queue},
            priority=0,
            body_encoding="base64",
            delivery_tag=str(uuid.uuid4()),
        )
        envelope = {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        }
        return json.dumps(envelope)

    async def send_task(
        self, task: str, args: list[object], queue: str, argsrepr: str, task_id: str | None = None
    ) -> None:
        """Publish one task message; the client's reconnect policy rides out a short Redis outage."""
        await self.redis.lpush(queue, self.message(task, args, queue, argsrepr, task_id))
