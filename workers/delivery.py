"""One webhook delivery attempt: signed per Standard Webhooks, sent only to an allowed address.

Needs the ``webhooks`` extra (standardwebhooks, httpcore); only the webhook workers import it.
workers/webhooks.py has the dispatch, the retries and the record of each attempt.

- Signed as Standard Webhooks says, with the ``standardwebhooks`` package under
  ``VMQ_WEBHOOK_SECRET``; no secret, no delivery (the attempt is recorded ``refused``).
- Backoff (``backoff_s``): full jitter on ``VMQ_WEBHOOK_RETRY_BASE_S`` doubling per attempt up to
  ``VMQ_WEBHOOK_RETRY_MAX_S``; a receiver's Retry-After within that bound is honoured.
- No SSRF: the URL must be https (unless ``VMQ_WEBHOOK_ALLOW_HTTP``); the host is resolved once,
  every address it resolves to must be global (not loopback, private, link-local, CGNAT, reserved,
  multicast; unless ``VMQ_WEBHOOK_ALLOW_PRIVATE``), and the connection is made to the address that
  was checked, whose peer address is checked again once connected (no second DNS answer can slip
  in). Redirects are not followed. TLS is verified against the URL's host name.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
from standardwebhooks.webhooks import Webhook

from vmqueue.models import Job, WebhookDelivery
from vmqueue.settings import Settings
from vmqueue.webhooks import InvalidCallbackURL, check_callback_url, payload

USER_AGENT = "vmqueue-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024  # read (and drop) at most this much of a receiver's answer


class AddressRefused(Exception):
    """The callback's host resolves to an address deliveries may not go to."""


def allowed_address(address: str, allow_private: bool) -> bool:
    """Whether a webhook may connect to ``address`` (an IPv4 or IPv6 literal)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is no part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if allow_private:
        return not ip.is_unspecified and not ip.is_multicast
    return ip.is_global and not ip.is_multicast


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to addresses that pass ``allowed_address``.

    httpcore hands the URL's host to ``connect_tcp`` and later uses it for TLS (SNI and certificate
    check), so resolving here and connecting to the checked IP keeps TLS on the host name while the
    TCP connection goes exactly where the check said.
    """

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = [a for a in addresses if not allowed_address(a, self.allow_private)]
        if refused:  # one bad answer refuses the host: a rebinding name may give either
            raise AddressRefused(f"{host} resolves to {', '.join(refused)}, not a public address")
        last: Exception | None = None
        for address in addresses:
            try:
                stream = super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
                continue
            peer = stream.get_extra_info("socket").getpeername()[0]
            if peer != address or not allowed_address(peer, self.allow_private):
                stream.close()
                raise AddressRefused(f"connected to {peer}, not the address checked ({address})")
            return stream
        raise last or httpcore.ConnectError(f"{host} has no address")


class Deliverer:
    """One delivery attempt of one webhook; no retry logic (the task has it)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self.signer = Webhook(secret) if secret else None
        self.timeout = {name: settings.webhook_timeout_s for name in ("connect", "read", "write", "pool")}
        self.pool = httpcore.ConnectionPool(
            network_backend=GuardedBackend(settings.webhook_allow_private), max_connections=64, retries=0
        )

    def headers(self, message_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
        """The Standard Webhooks headers of one message: id, timestamp (s), ``v1,<base64 HMAC-SHA256>``."""
        if self.signer is None:
            raise RuntimeError("VMQ_WEBHOOK_SECRET is not set: webhooks cannot be signed")
        now = now or datetime.now(UTC)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(message_id, now, body),
        }

    def deliver(self, job: Job, event: str, attempt: int) -> tuple[WebhookDelivery, float | None]:
        """POST the webhook once; the attempt as recorded, and a Retry-After (s) the receiver gave."""
        started = time.monotonic()
        record = WebhookDelivery(event=event, attempt=attempt, outcome="retrying")
        retry_after: float | None = None
        try:
            url = check_callback_url(job.callback_url or "", self.settings)
            body = payload(job, event)
            headers = {
                **self.headers(message_id(job.id, event), body),
                "content-type": "application/json",
                "user-agent": USER_AGENT,
            }
            with self.pool.stream(
                "POST", url, headers=list(headers.items()), content=body.encode(), extensions={"timeout": self.timeout}
            ) as answer:
                read = 0
                for chunk in answer.iter_stream():  # drain a little, so the connection can be reused
                    read += len(chunk)
                    if read >= MAX_RESPONSE_BYTES:
                        break
            record.status_code = answer.status
            if 200 <= answer.status < 300:
                record.outcome = "delivered"
            else:
                record.error = f"HTTP {answer.status}"
                retry_after = _retry_after(dict(answer.headers))
        except (AddressRefused, InvalidCallbackURL, RuntimeError) as exc:
            record.outcome, record.error = "refused", str(exc)
        except httpcore.TimeoutException as exc:
            record.error = f"timeout after {self.settings.webhook_timeout_s:g}s ({type(exc).__name__})"
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.duration_ms = round((time.monotonic() - started) * 1000, 1)
        return record, retry_after


def message_id(job_id: str, event: str) -> str:
    """The ``webhook-id``: one per job and event, the same on every attempt (receivers dedupe by it)."""
    return f"msg_{job_id}_{event}"


def backoff_s(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Wait before attempt ``attempt + 1``: full jitter on base * 2^(attempt-1), capped; a Retry-After
    within the cap wins (a later one is capped: countdowns stay far below the visibility timeout)."""
    cap = settings.webhook_retry_max_s
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap)
    return random.uniform(0, min(cap, settings.webhook_retry_base_s * 2 ** (attempt - 1)))


def _retry_after(headers: dict[bytes, bytes]) -> float | None:
    value = next((v.decode() for k, v in headers.items() if k.lower() == b"retry-after"), None)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
