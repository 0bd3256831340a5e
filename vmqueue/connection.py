"""Redis connections: one place that knows how every part of vmqueue reaches Redis.

The job store, the rate limiter, the sim and the Celery broker (through ``redis_ssl_options``) all
connect with these settings.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vmqueue.settings import Settings

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """rediss:// verifies certificates unless the user opts out (kombu would silently skip the check)."""
    if not settings.redis_url.startswith("rediss://"):
        return None
    try:
        return {"ssl_cert_reqs": _CERT_REQS[settings.redis_ssl_cert_reqs]}
    except KeyError:
        raise ValueError("VMQ_REDIS_SSL_CERT_REQS must be required, optional or none") from None


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
        "health_check_interval": 30,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        **(redis_ssl_options(settings) or {}),
    }


# Reconnect with backoff for about a minute in all (the same budget as a Celery publish retry).
_BACKOFF = {"cap": 2.0, "base": 0.1}
_RETRIES = 20


def connect(settings: Settings) -> redis.Redis:
    """A client that rides out a Redis restart: reconnects with backoff instead of failing at once."""
    retry = Retry(ExponentialBackoff(**_BACKOFF), retries=_RETRIES)
    return redis.Redis.from_url(settings.redis_url, retry=retry, **_options(settings))


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    """``connect`` for asyncio (``redis.asyncio``): the same URL, TLS, timeouts and reconnect policy."""
    retry = redis.asyncio.retry.Retry(ExponentialBackoff(**_BACKOFF), retries=_RETRIES)
    return redis.asyncio.Redis.from_url(settings.redis_url, retry=retry, **_options(settings))
