"""How an adapter's SDK transport reports each HTTP request to the worker's API budget.

An adapter holds a ``meter`` (``NULL_METER`` until the worker sets one: workers/budget.py) and, when it
builds its SDK client, installs the hook its SDK offers so that every request on the wire, retries and
pages included, passes ``meter.before`` (which may sleep, or raise ``RateLimitedError``) and every
answer ``meter.after`` (whose headers may say how much budget is left):

- requests sessions (hcloud, google-cloud-compute's REST transport, OCI's vendored requests):
  ``metered_adapter`` mounts an ``HTTPAdapter`` whose ``send`` wraps the real one;
- azure-core pipelines (pydo, the Azure management clients): ``azure_hooks`` gives the
  ``raw_request_hook``/``raw_response_hook`` of azure-core's ``CustomHookPolicy``, which runs once
  per attempt, after the retry policy;
- botocore: ``meter_botocore`` registers on ``before-sign`` (once per attempt) and ``needs-retry``.

Adapters import this module, never the budget: they stay free of Redis and the worker around them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit


class Meter(Protocol):
    def before(self, method: str, target: str, scope: str = "") -> None:
        """Called before a request goes out; may wait for budget or raise ``RateLimitedError``."""
        ...

    def after(self, method: str, target: str, status: int, headers: Mapping[str, str], scope: str = "") -> None:
        """Called with every answer (status and headers), refused ones included."""
        ...


class NullMeter:
    def before(self, method: str, target: str, scope: str = "") -> None:
        return None

    def after(self, method: str, target: str, status: int, headers: Mapping[str, str], scope: str = "") -> None:
        return None


NULL_METER: Meter = NullMeter()


class Metered:
    """Mixin for adapters: the ``meter`` the transport hooks read at each request (set after construction)."""

    meter: Meter = NULL_METER
    # The published profile this adapter spends (workers/budget_profiles.py); the sim may play another's.
    budget_profile: str | None = None


def target_of(url: str, strip: str = "") -> str:
    """A request's target: its URL path without the query, less a prefix (an API version root)."""
    path = urlsplit(url).path
    return path[len(strip) :] if strip and path.startswith(strip) else path


def metered_adapter(adapter_cls: type, meter: Callable[[], Meter], strip: str = "") -> Any:
    """An instance of a subclass of ``adapter_cls`` (a requests ``HTTPAdapter``) that meters ``send``.

    ``adapter_cls`` is passed in because OCI vendors its own copy of requests.
    """

    class MeteredAdapter(adapter_cls):  # type: ignore[misc, valid-type]
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            target = target_of(request.url, strip)
            meter().before(request.method, target)
            response = super().send(request, *args, **kwargs)
            meter().after(request.method, target, response.status_code, response.headers)
            return response

    return MeteredAdapter()


def mount_metered(session: Any, adapter_cls: type, meter: Callable[[], Meter], strip: str = "") -> None:
    """Meter every request ``session`` sends (both schemes: tests serve plain http)."""
    for scheme in ("https://", "http://"):
        session.mount(scheme, metered_adapter(adapter_cls, meter, strip))


def azure_hooks(meter: Callable[[], Meter], strip: str = "") -> dict[str, Callable[[Any], None]]:
    """Client kwargs for azure-core's ``CustomHookPolicy``: one call per attempt of every request."""

    def on_request(pipeline_request: Any) -> None:
        http = pipeline_request.http_request
        meter().before(http.method, target_of(http.url, strip))

    def on_response(pipeline_response: Any) -> None:
        http, answer = pipeline_response.http_request, pipeline_response.http_response
        meter().after(http.method, target_of(http.url, strip), answer.status_code, answer.headers)

    return {"raw_request_hook": on_request, "raw_response_hook": on_response}


def meter_botocore(client: Any, meter: Callable[[], Meter], scope: str) -> None:
    """Meter each attempt of every operation of a boto3 client as ``<service>:<Operation>`` in ``scope``."""
    service = client.meta.service_model.service_name

    def before_sign(operation_name: str = "", **_: Any) -> None:
        meter().before("POST", f"{service}:{operation_name}", scope)

    def needs_retry(response: Any = None, operation: Any = None, **_: Any) -> None:
        if response is not None and operation is not None:
            http, _parsed = response
            meter().after("POST", f"{service}:{operation.name}", http.status_code, http.headers, scope)

    events = client.meta.events
    events.register(f"before-sign.{client.meta.service_model.service_id.hyphenize()}", before_sign)
    events.register(f"needs-retry.{client.meta.service_model.service_id.hyphenize()}", needs_retry)
