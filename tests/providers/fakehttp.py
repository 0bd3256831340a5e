"""One transport-free fake cloud API, served two ways: ``responses`` in unit tests, a real local HTTP
server (pytest-httpserver) in system tests, where a worker subprocess reaches it through its endpoint env var.

A fake subclasses ``FakeAPI`` and implements ``route``; ``fail`` queues faults for one method and path.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import responses
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

Reply = tuple[int, dict[str, str], Any]


@dataclass
class Fault:
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    exc: Exception | None = None  # raised by the transport instead of an answer
    after: bool = False  # the API acts on the request, then the answer is lost or replaced

    def reply(self) -> Reply:
        if self.exc is not None:
            raise self.exc
        return self.status, self.headers, self.body


class FakeAPI:
    prefix = ""  # the path prefix of the API below its base URL, e.g. "/v1"

    def __init__(self) -> None:
        self.faults: dict[tuple[str, str], list[Fault]] = defaultdict(list)
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []

    def fail(self, method: str, path: str, **fault: Any) -> None:
        self.faults[(method, path)].append(Fault(**fault))

    def calls(self, method: str, path: str) -> list[Any]:
        """Bodies of the requests received for one method and path."""
        return [body for m, p, _, body in self.requests if (m, p) == (method, path)]

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        self.requests.append((method, path, query, body))
        queued = self.faults[(method, path)]
        fault = queued.pop(0) if queued else None
        if fault and not fault.after:
            return fault.reply()
        reply = self.route(method, path, query, body)
        return fault.reply() if fault else reply

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        raise NotImplementedError


@contextmanager
def mocked(fake: FakeAPI, base_url: str) -> Iterator[responses.RequestsMock]:
    """Answer every request below ``base_url`` from ``fake``; ``responses`` refuses any other URL."""
    root = urlsplit(base_url).path

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        url = urlsplit(request.url)
        body = json.loads(request.body) if request.body else None
        status, headers, payload = fake.handle(
            request.method, unquote(url.path).removeprefix(root), dict(parse_qsl(url.query)), body
        )
        return status, headers, "" if payload is None else json.dumps(payload)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for method in ("GET", "POST", "PUT", "DELETE"):
            rsps.add_callback(method, re.compile(re.escape(base_url) + r"/.*"), callback, "application/json")
        yield rsps


def serve(httpserver: HTTPServer, fake: FakeAPI) -> str:
    """Serve ``fake`` on a real local HTTP server; returns the base URL to point a client at."""

    def handler(request: Request) -> Response:
        body = request.get_json(silent=True) if request.data else None
        status, headers, payload = fake.handle(
            request.method, request.path.removeprefix(fake.prefix), dict(request.args), body
        )
        text = "" if payload is None else json.dumps(payload)
        return Response(text, status=status, headers=headers, content_type="application/json")

    httpserver.expect_request(re.compile(".*")).respond_with_handler(handler)
    return httpserver.url_for(fake.prefix)
