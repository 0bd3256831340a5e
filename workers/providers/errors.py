"""One error taxonomy for every provider (DESIGN §4).

Each adapter has one ``_map_error(exc) -> ProviderError`` and wraps its SDK calls in
``map_errors(_map_error)``; retryability comes from the class, never from copied try blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ContextDecorator
from typing import ClassVar


class ProviderError(Exception):
    """An error a provider returned that none of the classes below describes.

    It stays visible with the provider's own code and message, and is not retried.
    """

    code: ClassVar[str] = "provider_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, provider_code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.provider_code = provider_code
        # A wait of zero or less (a reset time already past) is no hint: the caller's backoff decides.
        self.retry_after_s = retry_after_s if retry_after_s is not None and retry_after_s > 0 else None

    def __str__(self) -> str:
        return f"{self.message} [{self.provider_code}]" if self.provider_code else self.message


class AuthError(ProviderError):
    """Credentials missing, invalid or without permission; the message names what to set."""

    code = "auth"


class InvalidSpecError(ProviderError):
    """The provider refused the request itself: unknown region, type or image, bad user-data."""

    code = "invalid_spec"


class NotFoundError(ProviderError):
    """The instance does not exist (destroy: success; right after create: still pending)."""

    code = "not_found"


class QuotaExceededError(ProviderError):
    """An account limit; waiting does not help, raising the limit does."""

    code = "quota_exceeded"


class CapacityError(ProviderError):
    """The provider has no capacity for this type in this place now; another placement may."""

    code = "capacity"


# The ``provider_code`` of a ``RateLimitedError`` raised by vmqueue's own budget before sending
# (workers/budget.py): no request went out, so it is a wait for the budget, not a failed attempt.
OWN_THROTTLE = "vmq_throttle"


class RateLimitedError(ProviderError):
    """Too many API calls; retry after ``retry_after_s`` (or our backoff when the provider names none)."""

    code = "rate_limited"
    retryable = True


class TransientError(ProviderError):
    """5xx, timeouts, connection resets: the same call may succeed later."""

    code = "transient"
    retryable = True


def seconds_until(reset_epoch_s: object) -> float | None:
    """A rate-limit reset given as a unix time, as seconds from now; None when missing, malformed or
    not in the future (a reset at or before now says nothing about when to call again)."""
    try:
        wait = float(reset_epoch_s) - time.time()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return wait if wait > 0 else None


ERROR_CLASSES: tuple[type[ProviderError], ...] = (
    AuthError,
    InvalidSpecError,
    NotFoundError,
    QuotaExceededError,
    CapacityError,
    RateLimitedError,
    TransientError,
    ProviderError,
)


class map_errors(ContextDecorator):  # noqa: N801 - reads as a verb where it is used
    """Translate every non-taxonomy exception through an adapter's ``_map_error``, raised ``from`` it."""

    def __init__(self, map_error: Callable[[Exception], ProviderError]):
        self.map_error = map_error

    def __enter__(self) -> map_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, ProviderError) or not isinstance(exc, Exception):
            return False
        raise self.map_error(exc) from exc
