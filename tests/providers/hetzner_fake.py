"""A small stateful fake of the Hetzner Cloud API; payloads follow the spec (docs.hetzner.cloud, cloud.spec).

A server appears on POST as ``initializing``, is ``running`` from the next read (GET or list), and is gone after DELETE.
Names are unique per project (409 ``uniqueness_error``), like the real API. In a location of
``create_fails_in`` the POST is accepted, then the server's ``create_server`` action ends ``error`` with the
given error code and the server stays ``off`` (the asynchronous failure); ``GET /servers/{id}/actions``
lists a server's actions, filtered by ``status`` and sorted by ``id``/``id:asc``/``id:desc`` as the spec says.
``GET /servers`` filters by ``name`` and by the spec's whole label selector language (``k in (v1,v2)`` included).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from datetime import UTC, datetime
from typing import Any

from tests.providers.fakehttp import FakeAPI, Reply

BASE_URL = "https://api.hetzner.cloud/v1"
CREATED = "2016-01-30T23:50:00Z"


def error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def now() -> str:
    """The current time as the API writes timestamps (ISO 8601, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def md5_fingerprint(public_key: str) -> str:
    digest = hashlib.md5(base64.b64decode(public_key.split()[1])).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


def action(action_id: int, command: str, server_id: int) -> dict[str, Any]:
    return {
        "id": action_id,
        "command": command,
        "status": "running",
        "progress": 0,
        "started": CREATED,
        "finished": None,
        "resources": [{"id": server_id, "type": "server"}],
        "error": None,
    }


def finished(running: dict[str, Any], error_code: str | None = None, message: str = "") -> dict[str, Any]:
    """``running`` as it reads once it ended: ``success``, or ``error`` with the spec's ``{code, message}``."""
    ended = {**running, "progress": 100, "finished": "2016-01-30T23:55:00Z", "status": "success"}
    if error_code:
        ended.update(status="error", error={"code": error_code, "message": message})
    return ended


def server_payload(
    server_id: int,
    name: str,
    *,
    status: str = "running",
    server_type: str = "cx22",
    image: str = "ubuntu-24.04",
    location: str = "fsn1",
    labels: dict[str, str] | None = None,
    ipv4: str | None = "203.0.113.10",
    ipv6: str | None = "2001:db8:1234::/64",
    private_ipv4: str | None = None,
    created: str = CREATED,
) -> dict[str, Any]:
    return {
        "id": server_id,
        "name": name,
        "status": status,
        "created": created,
        "public_net": {
            "ipv4": {"id": server_id + 1000, "ip": ipv4, "blocked": False, "dns_ptr": "static.example.com"}
            if ipv4
            else None,
            "ipv6": {"id": server_id + 2000, "ip": ipv6, "blocked": False, "dns_ptr": []} if ipv6 else None,
            "floating_ips": [],
            "firewalls": [],
        },
        "private_net": [{"network": 4711, "ip": private_ipv4, "alias_ips": [], "mac_address": "86:00:ff:2a:7d:e1"}]
        if private_ipv4
        else [],
        "server_type": {
            "id": 1,
            "name": server_type,
            "description": server_type.upper(),
            "cores": 2,
            "memory": 4,
            "disk": 40,
            "deprecated": False,
            "prices": [],
            "storage_type": "local",
            "cpu_type": "shared",
            "architecture": "x86",
        },
        "location": {
            "id": 1,
            "name": location,
            "description": "Falkenstein DC Park 1",
            "country": "DE",
            "city": "Falkenstein",
            "latitude": 50.47612,
            "longitude": 12.370071,
            "network_zone": "eu-central",
        },
        "image": {
            "id": 4711,
            "type": "system",
            "status": "available",
            "name": image,
            "description": image,
            "image_size": None,
            "disk_size": 5,
            "created": CREATED,
            "created_from": None,
            "bound_to": None,
            "os_flavor": "ubuntu",
            "os_version": "24.04",
            "rapid_deploy": True,
            "protection": {"delete": False},
            "deprecated": None,
            "deleted": None,
            "labels": {},
            "architecture": "x86",
        },
        "iso": None,
        "rescue_enabled": False,
        "locked": False,
        "backup_window": None,
        "outgoing_traffic": 0,
        "ingoing_traffic": 0,
        "included_traffic": 21990232555520,
        "protection": {"delete": False, "rebuild": False},
        "labels": labels or {},
        "volumes": [],
        "load_balancers": [],
        "primary_disk_size": 40,
        "placement_group": None,
    }


MAX_PER_PAGE = 50  # the API's maximum per_page (docs.hetzner.cloud, "Pagination")


def page(key: str, items: list[dict[str, Any]], query: dict[str, str] | None = None, cap: int = MAX_PER_PAGE) -> dict:
    """One page of a list, as the API pages it: ``page`` and ``per_page`` (at most ``cap``) from the query."""
    query = query or {}
    per_page = min(int(query.get("per_page", 25)), cap)
    number = int(query.get("page", 1))
    last = max(1, -(-len(items) // per_page))
    pagination = {
        "page": number,
        "per_page": per_page,
        "previous_page": number - 1 if number > 1 else None,
        "next_page": number + 1 if number < last else None,
        "last_page": last,
        "total_entries": len(items),
    }
    return {key: items[(number - 1) * per_page : number * per_page], "meta": {"pagination": pagination}}


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    """The API's label selector language (spec: "Label Selector"): comma-joined terms, each ``k=v``/``k==v``,
    ``k!=v``, ``k``, ``!k``, ``k in (v1,v2)`` or ``k notin (v1,v2)``; a server matches when every term does."""
    return all(_term_matches(labels, term) for term in _terms(selector or ""))


def _terms(selector: str) -> list[str]:
    """The selector split at the commas that join terms (not those inside an ``in (...)`` list)."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [term.strip() for term in [*terms, current] if term.strip()]


def _term_matches(labels: dict[str, str], term: str) -> bool:
    if match := re.fullmatch(r"(\S+)\s+(in|notin)\s*\(([^)]*)\)", term):
        key, operator, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
        return (labels.get(key) in values) == (operator == "in")
    if match := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term):
        key, operator, value = match.groups()
        return (labels.get(key) == value) == (operator != "!=")
    if term.startswith("!"):
        return term[1:] not in labels
    return term in labels


class FakeHetzner(FakeAPI):
    prefix = "/v1"

    def __init__(self) -> None:
        super().__init__()
        self.servers: dict[int, dict[str, Any]] = {}
        self.ssh_keys: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(4201)
        self._booting: set[int] = set()
        self._failing: set[int] = set()  # booting servers whose create_server failed: off from the next read
        self.max_per_page = MAX_PER_PAGE  # lower it to make a list span pages
        self.actions: dict[int, list[dict[str, Any]]] = {}  # server id -> its actions, as they read now
        self.create_fails_in: dict[str, tuple[str, str]] = {}  # location -> (error code, message)

    def add_server(self, name: str, **fields: Any) -> dict[str, Any]:
        server = server_payload(next(self._ids), name, **fields)
        self.servers[server["id"]] = server
        return server

    def add_ssh_key(self, public_key: str, name: str = "alice") -> dict[str, Any]:
        key_id = next(self._ids)
        self.ssh_keys[key_id] = {
            "id": key_id,
            "name": name,
            "fingerprint": md5_fingerprint(public_key),
            "public_key": public_key,
            "labels": {},
            "created": CREATED,
        }
        return self.ssh_keys[key_id]

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        if match := re.fullmatch(r"/servers/(\d+)", path):
            return self._server(method, int(match[1]))
        if method == "GET" and (match := re.fullmatch(r"/servers/(\d+)/actions", path)):
            return self._server_actions(int(match[1]), query)
        if (method, path) == ("GET", "/servers"):
            found = [
                s
                for s in self.servers.values()
                if query.get("name", s["name"]) == s["name"] and _matches(s["labels"], query.get("label_selector"))
            ]
            if query.get("sort") == "id:desc":  # the only sort vmqueue sends
                found.sort(key=lambda s: -s["id"])
            listed = page("servers", found, query, self.max_per_page)
            listed["servers"] = [self._read(s["id"]) for s in listed["servers"]]
            return 200, {}, listed
        if (method, path) == ("POST", "/servers"):
            return self._create_server(body)
        if (method, path) == ("GET", "/ssh_keys"):
            fingerprint = query.get("fingerprint")
            return (
                200,
                {},
                page(
                    "ssh_keys",
                    [k for k in self.ssh_keys.values() if fingerprint in (None, k["fingerprint"])],
                    query,
                    self.max_per_page,
                ),
            )
        if (method, path) == ("POST", "/ssh_keys"):
            fingerprint = md5_fingerprint(body["public_key"])
            if any(k["fingerprint"] == fingerprint or k["name"] == body["name"] for k in self.ssh_keys.values()):
                return 409, {}, error("uniqueness_error", "SSH key with the same fingerprint already exists")
            key = self.add_ssh_key(body["public_key"], body["name"])
            key["labels"] = body.get("labels", {})
            return 201, {}, {"ssh_key": key}
        return 404, {}, error("not_found", f"no route {method} {path}")

    def _create_server(self, body: dict[str, Any]) -> Reply:
        if any(s["name"] == body["name"] for s in self.servers.values()):
            return 409, {}, error("uniqueness_error", "server name is already used", {"fields": [{"name": "name"}]})
        image = body["image"]
        server = self.add_server(
            body["name"],
            status="initializing",
            server_type=body["server_type"],
            image=image if isinstance(image, str) else f"snapshot-{image}",
            location=body.get("location", "fsn1"),
            labels=body.get("labels", {}),
            ipv4="203.0.113.10" if body.get("public_net", {}).get("enable_ipv4", True) else None,
            ipv6="2001:db8:1234::/64" if body.get("public_net", {}).get("enable_ipv6", True) else None,
            created=now(),
        )
        create = action(next(self._ids), "create_server", server["id"])
        start = action(next(self._ids), "start_server", server["id"])
        self._booting.add(server["id"])
        if failure := self.create_fails_in.get(server["location"]["name"]):
            self._failing.add(server["id"])
            self.actions[server["id"]] = [finished(create, *failure), finished(start, *failure)]
        else:
            self.actions[server["id"]] = [finished(create), finished(start)]
        return 201, {}, {"server": server, "action": create, "next_actions": [start], "root_password": None}

    def _server_actions(self, server_id: int, query: dict[str, str]) -> Reply:
        if server_id not in self.servers:
            return 404, {}, error("not_found", f"server with ID '{server_id}' not found")
        found = [a for a in self.actions.get(server_id, []) if query.get("status", a["status"]) == a["status"]]
        found.sort(key=lambda a: a["id"], reverse=query.get("sort") == "id:desc")
        return 200, {}, page("actions", found, query, self.max_per_page)

    def _server(self, method: str, server_id: int) -> Reply:
        if server_id not in self.servers:
            return 404, {}, error("not_found", f"server with ID '{server_id}' not found")
        if method == "DELETE":
            del self.servers[server_id]
            self.actions.pop(server_id, None)
            return 200, {}, {"action": action(next(self._ids), "delete_server", server_id)}
        return 200, {}, {"server": self._read(server_id)}

    def _read(self, server_id: int) -> dict[str, Any]:
        """A read (GET or list) sees a booting server running, or off if its create failed."""
        if server_id in self._booting:
            self._booting.discard(server_id)
            self.servers[server_id]["status"] = "off" if server_id in self._failing else "running"
        return self.servers[server_id]
