"""The kombu transports every vmqueue process uses: kombu's Redis transports, one client per channel.

kombu's Redis channel builds a new redis-py client for every publish to a fanout exchange (each
Celery task event), every acknowledgement and every prefetch bookkeeping step
(``Channel.conn_or_acquire``). redis-py 7 fills about 80 response callbacks into a case-insensitive
dict per client, which made client construction the largest single CPU cost of a worker's intake
(about four clients per create job, measured with yappi on ``bench/inflight.py``). A redis-py client
over a connection pool is thread-safe (every command borrows a connection from the pool), so a
channel can keep one for its synchronous commands; the blocking ``BRPOP`` client (``asynchronous``)
stays kombu's own.

kombu finds a URL's transport by its scheme in its registry, ``kombu.transport.TRANSPORT_ALIASES``;
``install()`` (called by vmqueue/celery_config.py, which every producer, worker and Flower process
imports) points ``redis``, ``rediss`` and ``sentinel`` at the subclasses below. Naming the transport
in ``broker_transport`` instead would turn the URL every tool derives from the connection
(``Connection.as_uri``: Flower's broker page, the worker banner) into a module path.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES, _transport_cache
from kombu.transport import redis as kombu_redis


class _OneClient:
    """A channel whose synchronous commands share one redis-py client over the channel's pool."""

    _vmq_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._vmq_client
        # The pool is rebuilt after a disconnect (kombu sets it to None): follow it.
        if client is None or client.connection_pool is not self.pool:  # type: ignore[attr-defined]
            client = self._vmq_client = super()._create_client()  # type: ignore[misc]
        return client


class Channel(_OneClient, kombu_redis.Channel):
    pass


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make kombu's ``redis``, ``rediss`` and ``sentinel`` URLs use these transports in this process."""
    ours = {
        "redis": f"{__name__}:Transport",
        "rediss": f"{__name__}:Transport",
        "sentinel": f"{__name__}:SentinelTransport",
    }
    TRANSPORT_ALIASES.update(ours)
    for alias in ours:  # kombu keeps each alias's class once resolved: forget one resolved before this
        _transport_cache.pop(alias, None)
