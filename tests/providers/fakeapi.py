"""The transport-free core of the OCI and Azure fakes, served by ``responses`` or by a real local HTTP server.

Unlike ``fakehttp.FakeAPI`` it hands the fake the request headers (``opc-retry-token``, ``If-None-Match``)
and can lose an answer after acting on the request (the lost-answer case).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

Response = tuple[int, dict[str, str], str]


class Call(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]  # lower-case names


@dataclass
class FakeAPI:
    calls: list[Call] = field(default_factory=list)
    faults: list[tuple[str, str, Response]] = field(default_factory=list)  # served before the fake's logic
    drop: list[str] = field(default_factory=list)  # "METHOD url-regex": act, then the answer is lost
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, method: str, path_regex: str, response: Response) -> None:
        self.faults.append((method, path_regex, response))

    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.search(path_regex, c.path)]

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes | str | None) -> Response:
        with self.lock:
            parts = urlsplit(url)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            lower = {k.lower(): v for k, v in headers.items()}
            call = Call(method, unquote(parts.path), query, json.loads(body) if body else None, lower)
            self.calls.append(call)
            for fault in self.faults:
                if fault[0] == method and re.search(fault[1], call.path):
                    self.faults.remove(fault)
                    return fault[2]
            return self.route(call)

    def route(self, call: Call) -> Response:
        raise NotImplementedError

    def answer(self, lost: type[Exception]) -> Callable[[Any], Response]:
        """A ``responses`` callback; a request matching ``drop`` is acted on, then ``lost`` is raised."""

        def callback(request: Any) -> Response:
            response = self.handle(request.method, request.url, dict(request.headers), request.body)
            for rule in list(self.drop):
                method, url = rule.split(" ", 1)
                if method == request.method and re.search(url, request.url):
                    self.drop.remove(rule)
                    raise lost("Connection reset by peer")
            return response

        return callback


def serve(httpserver: Any, fake: FakeAPI) -> str:
    """Serve ``fake`` on a pytest-httpserver; returns its base URL."""
    from werkzeug import Request
    from werkzeug import Response as WerkzeugResponse

    def handler(request: Request) -> WerkzeugResponse:
        status, headers, body = fake.handle(request.method, request.url, dict(request.headers), request.get_data())
        return WerkzeugResponse(body, status=status, headers=headers, content_type="application/json")

    httpserver.expect_request(re.compile(".*")).respond_with_handler(handler)
    return httpserver.url_for("").rstrip("/")
