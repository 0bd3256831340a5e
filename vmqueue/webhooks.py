"""Webhooks, the contract both sides share: which changes are sent, which URLs are accepted, the body.

A create, destroy or get request may carry ``callback_url``. When its job reaches a state a caller
cares about (``NOTIFY_STATES``), the workers POST the job to it (workers/webhooks.py), signed as the
Standard Webhooks specification says (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
headers; https://www.standardwebhooks.com/), so a receiver verifies it with an off-the-shelf
library, e.g. ``standardwebhooks.Webhook(secret).verify(body, headers)``.

The body, per the specification's recommended shape::

    {"type": "job.running", "timestamp": "2025-01-01T12:00:00Z", "data": <the Job, as JSON>}

``data`` is the job as ``GET /jobs/{id}`` shows it, less its SSH public key (never a script: the
record holds none).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from vmqueue.models import Job, JobState, utcnow
from vmqueue.settings import Settings

# The states a webhook reports, each once per job (a job reaches each at most once).
NOTIFY_STATES = frozenset(
    {JobState.running, JobState.ready, JobState.failed, JobState.gone, JobState.done, JobState.cancelled}
)
MAX_URL_LENGTH = 2048


class InvalidCallbackURL(ValueError):
    """A ``callback_url`` vmqueue will not call."""


def event_type(state: JobState) -> str:
    return f"job.{state}"


def check_callback_url(url: str, settings: Settings) -> str:
    """``url`` if it may be a callback: https (http only with ``VMQ_WEBHOOK_ALLOW_HTTP``), a host,
    no user or password in it. Raises ``InvalidCallbackURL`` (a ``ValueError``) saying which rule it breaks.

    The address a host name resolves to is checked by the worker at delivery time, on the
    connection it actually makes (workers/webhooks.py): checking it here would prove nothing then.
    """
    if len(url) > MAX_URL_LENGTH:
        raise InvalidCallbackURL(f"callback_url: at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    allowed = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in allowed:
        hint = "" if settings.webhook_allow_http else " (http:// only with VMQ_WEBHOOK_ALLOW_HTTP=true)"
        raise InvalidCallbackURL(f"callback_url: must be an {' or '.join(allowed)}:// URL{hint}")
    if not parts.hostname:
        raise InvalidCallbackURL("callback_url: has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidCallbackURL(
            "callback_url: must not carry a user or password (sign with the webhook secret instead)"
        )
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError as exc:
        raise InvalidCallbackURL(f"callback_url: {exc}") from None
    return url


def payload(job: Job, event: str) -> str:
    """The JSON body of a webhook for ``job``."""
    data = job.model_dump(mode="json", exclude={"ssh_key"})
    return json.dumps({"type": event, "timestamp": utcnow().isoformat(), "data": data}, separators=(",", ":"))
