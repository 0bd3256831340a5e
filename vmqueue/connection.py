"""Redis connections: one place that knows how every part of vmqueue reaches Redis.

The job store, the rate limiter, the sim, the sweeper, the web API and the Celery broker (through
``broker_transport_options``) all connect with these settings. ``REDIS_URL`` is either one Redis
(``redis://`` or ``rediss://``) or a Sentinel-managed one, written the way Celery's Redis transport
reads it: ``sentinel://[:password@]host1:26379[/db];sentinel://host2:26379;...`` with the master's
name in ``VMQ_REDIS_MASTER_NAME``. The password in the URL is the master's; a password of the
sentinels themselves comes from ``VMQ_REDIS_SENTINEL_PASSWORD``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vmqueue.settings import Settings

# What a Redis client meets while Redis is away or changing hands, and treats like a lost connection
# (reconnect, retry with backoff) instead of a bug: a replica promoted or a primary demoted answers
# READONLY to writes, a failover in progress MASTERDOWN or TRYAGAIN, a restarting server LOADING.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # BusyLoadingError (LOADING) is one
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
)

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """rediss:// verifies certificates unless the user opts out (kombu would silently skip the check)."""
    if not settings.redis_url.startswith("rediss://"):
        return None
    try:
        return {"ssl_cert_reqs": _CERT_REQS[settings.redis_ssl_cert_reqs]}
    except KeyError:
        raise ValueError("VMQ_REDIS_SSL_CERT_REQS must be required, optional or none") from None


SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A ``sentinel://`` REDIS_URL, parsed: where the sentinels are and what the master needs."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``sentinel://[:pw@]h1:26379[/db];sentinel://h2:26379`` -> the sentinels and the master's db/auth.

    Raises ValueError naming the part that is wrong (a missing host, a port that is no number, a
    non-sentinel part among sentinel ones).
    """
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme != SENTINEL_SCHEME:
            raise ValueError(f"REDIS_URL: {part.split('@')[-1]!r} is not a sentinel:// address; list only sentinels")
        try:
            port = parsed.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"REDIS_URL: the port of {parsed.netloc.split('@')[-1]!r} is not a number") from None
        if not parsed.hostname:
            raise ValueError("REDIS_URL: a sentinel:// address without a host")
        sentinels.append((parsed.hostname, port))
        # Like kombu, the first part that carries them gives the master's db and credentials.
        if parsed.path.strip("/") and not db:
            db = int(parsed.path.strip("/"))
        if parsed.password and password is None:
            username, password = (unquote(parsed.username) if parsed.username else None), unquote(parsed.password)
    if not sentinels:
        raise ValueError("REDIS_URL: no sentinel address in a sentinel:// URL")
    return SentinelTarget(sentinels, db, username, password)


# Reconnect with backoff for about a minute in all (the same budget as a Celery publish retry).
_BACKOFF = {"cap": 2.0, "base": 0.1}
_RETRIES = 20


def _retry_options(patient: bool = True, retry_class: type = Retry) -> dict[str, Any]:
    # A restart or a failover: reconnect with backoff instead of failing at once. With Sentinel a
    # ConnectionError makes the pool ask the sentinels for the master again, and a READONLY answer
    # from a demoted master becomes a ConnectionError (redis-py's SentinelManagedConnection), so the
    # same retry rides out a failover.
    if not patient:
        return {"socket_connect_timeout": 1, "socket_timeout": 2, "retry": retry_class(ExponentialBackoff(), retries=0)}
    return {
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
        "health_check_interval": 30,
        "retry": retry_class(ExponentialBackoff(**_BACKOFF), retries=_RETRIES),
        "retry_on_error": list(REDIS_UNAVAILABLE),
    }


class _MasterConnection(redis.sentinel.SentinelManagedConnection):
    """A master connection that asks the sentinels where the master is on every reconnect.

    redis-py 7 reconnects a dropped connection inside a command's retry through
    ``connect_check_health``, which reuses the address of the last connect: after a failover every
    retry went to the dead master until the retries ran out. Asking the sentinels first makes the
    retry reach the new master (tests/test_sentinel.py, a command in flight during the kill).
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _AsyncMasterConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """``_MasterConnection`` for ``redis.asyncio``."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        return await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options for the sentinels themselves (not the master)."""
    options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 2}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def connect(settings: Settings, *, patient: bool = True) -> redis.Redis:
    """A client of the master that rides out a restart or a Sentinel failover (see ``_retry_options``).

    ``patient=False``: no retries and 1-2 s timeouts, for a quick "does Redis answer" check.
    """
    if is_sentinel_url(settings.redis_url):
        target = parse_sentinel_url(settings.redis_url)
        sentinel = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs(settings))
        return sentinel.master_for(
            settings.redis_master_name,
            connection_class=_MasterConnection,
            decode_responses=True,
            db=target.db,
            username=target.username,
            password=target.password,
            **_retry_options(patient),
        )
    return redis.Redis.from_url(
        settings.redis_url, decode_responses=True, **_retry_options(patient), **(redis_ssl_options(settings) or {})
    )


def answers(settings: Settings) -> bool:
    """True when the Redis (the master, with Sentinel) answers a PING within about two seconds."""
    try:
        return bool(connect(settings, patient=False).ping())
    except (redis.RedisError, OSError):
        return False


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    """``connect`` for asyncio (``redis.asyncio``): the same URL, Sentinel, TLS, timeouts and reconnects."""
    options = _retry_options(retry_class=redis.asyncio.retry.Retry)
    if is_sentinel_url(settings.redis_url):
        target = parse_sentinel_url(settings.redis_url)
        sentinel = redis.asyncio.sentinel.Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs(settings))
        return sentinel.master_for(
            settings.redis_master_name,
            connection_class=_AsyncMasterConnection,
            decode_responses=True,
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        )
    return redis.asyncio.Redis.from_url(
        settings.redis_url, decode_responses=True, **options, **(redis_ssl_options(settings) or {})
    )


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's Redis transport needs beyond the URL: with Sentinel, the master's name."""
    if not is_sentinel_url(settings.redis_url):
        return {}
    parse_sentinel_url(settings.redis_url)  # a bad URL fails here, with its reason, not deep in kombu
    return {"master_name": settings.redis_master_name, "sentinel_kwargs": sentinel_kwargs(settings)}


def limits_storage_uri(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The ``limits`` storage URI and options for the shared rate limits, on the same Redis."""
    options: dict[str, Any] = {}
    if not is_sentinel_url(settings.redis_url):
        if settings.redis_url.startswith("rediss://"):
            options["ssl_cert_reqs"] = settings.redis_ssl_cert_reqs
        return settings.redis_url, options
    target = parse_sentinel_url(settings.redis_url)
    hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
    options.update(sentinel_kwargs=sentinel_kwargs(settings), db=target.db, use_replicas=False)
    if target.password:
        options["password"] = target.password
    return f"redis+sentinel://{hosts}/{settings.redis_master_name}", options


class RedisUnavailable(redis.ConnectionError):
    """Redis does not answer at the configured URL. The message is one line that names the URL
    (password hidden) and says what to do; a ``redis.ConnectionError``, so handlers of that catch it."""


def redacted_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log); each of a Sentinel list's."""
    if ";" in url:
        return ";".join(redacted_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis(settings: Settings) -> None:
    """One PING without retries (``connect(patient=False)``: answered within about two seconds), else
    ``RedisUnavailable``. The job store's client rides out a restart by retrying for about half a
    minute; a producer asks this first so that a Redis that is simply not there is said at once."""
    client = connect(settings, patient=False)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise _unavailable(settings, exc) from None
    finally:
        client.close()


async def check_redis_async(settings: Settings) -> None:
    """``check_redis`` for asyncio: the same PING, timeouts and message, awaited."""
    options = _retry_options(patient=False, retry_class=redis.asyncio.retry.Retry)
    if is_sentinel_url(settings.redis_url):
        target = parse_sentinel_url(settings.redis_url)
        sentinel = redis.asyncio.sentinel.Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs(settings))
        client = sentinel.master_for(
            settings.redis_master_name, db=target.db, username=target.username, password=target.password, **options
        )
    else:
        client = redis.asyncio.Redis.from_url(settings.redis_url, **options, **(redis_ssl_options(settings) or {}))
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        raise _unavailable(settings, exc) from None
    finally:
        await client.aclose()


def _unavailable(settings: Settings, exc: BaseException) -> RedisUnavailable:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    url = redacted_url(settings.redis_url)
    return RedisUnavailable(f"cannot reach Redis at {url} ({reason}): start it, or point REDIS_URL at yours")
