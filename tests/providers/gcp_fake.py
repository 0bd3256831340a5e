"""A small stateful Compute Engine v1 REST fake: instances, zone operations, aggregated list.

Payloads follow compute.v1.json (discovery document) and libcloud's gce fixtures. The core is
transport-neutral (``handle``), served by ``responses`` in unit tests and pytest-httpserver in the
system test. Behaviour it keeps from the real API: requestId dedup (a repeat returns the first
operation), 409 ``alreadyExists`` on a taken name, insert operations that fail after the insert was
accepted, a 404 once deleted, and instances that boot PROVISIONING -> STAGING -> RUNNING over reads
(GET or aggregated list).
"""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlparse

BASE = "https://www.googleapis.com/compute/v1"
BOOT_STEPS = ("PROVISIONING", "STAGING", "RUNNING")
FAILURE_MESSAGES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": "The zone '{zone}' does not have enough resources available to fulfill the "
    "request. Try a different zone, or try again later.",
    "QUOTA_EXCEEDED": "Quota 'CPUS' exceeded.  Limit: 24.0 in region {zone}.",
}
FAILURE_STATUS = {"ZONE_RESOURCE_POOL_EXHAUSTED": (503, "SERVICE UNAVAILABLE"), "QUOTA_EXCEEDED": (403, "FORBIDDEN")}


def api_error(code: int, reason: str, message: str) -> dict[str, Any]:
    """Google's JSON error body."""
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }


class FakeCompute:
    def __init__(self, *, boot: bool = True):
        self.boot = boot  # False: instances keep the status a test gives them
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.operations: list[dict[str, Any]] = []
        self.by_request_id: dict[str, dict[str, Any]] = {}
        self.fail_inserts: str | None = None  # an operation error code, e.g. ZONE_RESOURCE_POOL_EXHAUSTED
        self._clock = datetime(2025, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        routes = (
            ("POST", r"/compute/v1/projects/([^/]+)/zones/([^/]+)/instances", self._insert),
            ("GET", r"/compute/v1/projects/([^/]+)/zones/([^/]+)/instances/([^/]+)", self._get),
            ("DELETE", r"/compute/v1/projects/([^/]+)/zones/([^/]+)/instances/([^/]+)", self._delete),
            ("GET", r"/compute/v1/projects/([^/]+)/zones/([^/]+)/operations", self._list_operations),
            ("GET", r"/compute/v1/projects/([^/]+)/aggregated/instances", self._aggregated),
        )
        with self._lock:
            for verb, pattern, route in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    return route(*match.groups(), query=query, body=body)
        return 404, api_error(404, "notFound", f"no route {method} {path}")

    def add_instance(self, project: str, zone: str, name: str, status: str = "RUNNING", **fields: Any) -> None:
        """Seed an instance as GET returns it."""
        self.instances[project, zone, name] = {**self._instance(project, zone, name, {}), "status": status, **fields}

    # --- routes ---

    def _insert(self, project: str, zone: str, *, query: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        request_id = query.get("requestId")
        if request_id in self.by_request_id:
            return 200, self.by_request_id[request_id]
        name = body["name"]
        if (project, zone, name) in self.instances:
            message = f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists"
            return 409, api_error(409, "alreadyExists", message)
        op = self._operation(project, zone, name, "insert")
        if self.fail_inserts:
            # Accepted, then failed: the answer says RUNNING, a later read of the operation the error.
            code, (status, status_message) = self.fail_inserts, FAILURE_STATUS.get(self.fail_inserts, (500, "ERROR"))
            message = FAILURE_MESSAGES.get(code, code).format(zone=zone)
            op.update(status="DONE", httpErrorStatusCode=status, httpErrorMessage=status_message)
            op["error"] = {"errors": [{"code": code, "message": message}]}
            answer = {**op, "status": "RUNNING"}
            answer.pop("error")
        else:
            self.instances[project, zone, name] = self._instance(project, zone, name, body)
            answer = {**op, "status": "RUNNING"}
        if request_id:
            self.by_request_id[request_id] = answer
        return 200, answer

    def _get(self, project: str, zone: str, name: str, **_: Any) -> tuple[int, dict[str, Any]]:
        instance = self.instances.get((project, zone, name))
        if instance is None:
            return 404, self._not_found(project, zone, name)
        return 200, self._read(instance)

    def _read(self, instance: dict[str, Any]) -> dict[str, Any]:
        """An instance as a read (GET or list) sees it: each read moves a booting one a step on."""
        if self.boot and instance["status"] in BOOT_STEPS[:-1]:
            instance["status"] = BOOT_STEPS[BOOT_STEPS.index(instance["status"]) + 1]
            if instance["status"] == "RUNNING":
                for n, nic in enumerate(instance["networkInterfaces"]):
                    for config in nic.get("accessConfigs", []):
                        config["natIP"] = f"34.118.{len(self.instances)}.{n + 10}"
        return instance

    def _delete(self, project: str, zone: str, name: str, **_: Any) -> tuple[int, dict[str, Any]]:
        if self.instances.pop((project, zone, name), None) is None:
            return 404, self._not_found(project, zone, name)
        return 200, {**self._operation(project, zone, name, "delete"), "status": "RUNNING"}

    def _list_operations(self, project: str, zone: str, *, query: dict[str, str], **_: Any) -> tuple[int, dict]:
        # The regex filter syntax: "(field eq regex) (field ne regex)", each matching the whole field.
        terms = re.findall(r"\((\w+) (eq|ne) ([^)]*)\)", query.get("filter", ""))
        ops = [
            op
            for op in self.operations
            if op["zone"].endswith(f"/projects/{project}/zones/{zone}")
            and all(
                (re.fullmatch(rx.strip("'\""), str(op.get(f, ""))) is not None) == (o == "eq") for f, o, rx in terms
            )
        ]
        if query.get("orderBy") == "creationTimestamp desc":
            ops.sort(key=lambda op: op["creationTimestamp"], reverse=True)
        ops = ops[: int(query.get("maxResults", 500))]
        return 200, {"kind": "compute#operationList", "id": f"projects/{project}/zones/{zone}/operations", "items": ops}

    def _aggregated(self, project: str, *, query: dict[str, str], **_: Any) -> tuple[int, dict[str, Any]]:
        wanted = dict(re.findall(r'labels\.(\S+) = "([^"]*)"', query.get("filter", "")))
        # "(name = "a") OR (name = "b")": any of the names (the form vmqueue's batched read sends).
        names = set(re.findall(r'(?<![.\w])name = "([^"]*)"', query.get("filter", "")))
        matching = [
            (zone, instance)
            for (p, zone, name), instance in self.instances.items()
            if p == project
            and all(instance.get("labels", {}).get(k) == v for k, v in wanted.items())
            and (not names or name in names)
        ]
        # Paged as the API pages it: at most maxResults (default and largest 500) a page, the rest
        # behind nextPageToken (here the offset of the next page).
        start = int(query.get("pageToken") or 0)
        end = start + min(int(query.get("maxResults", 500)), 500)
        items: dict[str, dict[str, list]] = {}
        for zone, instance in matching[start:end]:
            items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(self._read(instance))
        answer = {"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances"}
        if end < len(matching):
            answer["nextPageToken"] = str(end)
        return 200, {**answer, "items": items}

    # --- payloads ---

    def _now(self) -> str:
        self._clock += timedelta(seconds=1)
        return self._clock.isoformat(timespec="milliseconds")

    def _operation(self, project: str, zone: str, name: str, kind: str) -> dict[str, Any]:
        n = len(self.operations) + 1
        op = {
            "kind": "compute#operation",
            "id": str(7000000000000000000 + n),
            "name": f"operation-{1735689600000 + n}-{kind}-{n:04d}",
            "zone": f"{BASE}/projects/{project}/zones/{zone}",
            "operationType": kind,
            "targetLink": f"{BASE}/projects/{project}/zones/{zone}/instances/{name}",
            "targetId": str(5000000000000000000 + n),
            "status": "DONE",
            "user": "vmq@example-project.iam.gserviceaccount.com",
            "progress": 100,
            "insertTime": self._now(),
            "creationTimestamp": self._clock.isoformat(timespec="milliseconds"),
            "selfLink": f"{BASE}/projects/{project}/zones/{zone}/operations/operation-{n}",
        }
        self.operations.append(op)
        return op

    def _instance(self, project: str, zone: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        n = len(self.instances) + 1
        nics = [
            {
                **{k: v for k, v in nic.items() if k != "accessConfigs"},
                "kind": "compute#networkInterface",
                "name": f"nic{i}",
                "network": f"{BASE}/projects/{project}/{nic.get('network', 'global/networks/default')}",
                "networkIP": f"10.128.0.{n + 1}",
                "accessConfigs": [{**c, "kind": "compute#accessConfig"} for c in nic.get("accessConfigs", [])],
            }
            for i, nic in enumerate(body.get("networkInterfaces", [{}]))
        ]
        disks = [
            {
                "kind": "compute#attachedDisk",
                "type": "PERSISTENT",
                "mode": "READ_WRITE",
                "source": f"{BASE}/projects/{project}/zones/{zone}/disks/{name}",
                "deviceName": "persistent-disk-0",
                "index": 0,
                "boot": True,
                "autoDelete": disk.get("autoDelete", False),
            }
            for disk in body.get("disks", [])
        ]
        return {
            "kind": "compute#instance",
            "id": str(4000000000000000000 + n),
            "creationTimestamp": self._now(),
            "name": name,
            "machineType": f"{BASE}/projects/{project}/{body.get('machineType', f'zones/{zone}/machineTypes/e2')}",
            "status": "PROVISIONING",
            "zone": f"{BASE}/projects/{project}/zones/{zone}",
            "networkInterfaces": nics,
            "disks": disks,
            "metadata": {
                "kind": "compute#metadata",
                "fingerprint": "AbCdEf0123=",
                "items": body.get("metadata", {}).get("items", []),
            },
            "labels": body.get("labels", {}),
            "labelFingerprint": "42WmSpB8rSM=",
            "selfLink": f"{BASE}/projects/{project}/zones/{zone}/instances/{name}",
        }

    @staticmethod
    def _not_found(project: str, zone: str, name: str) -> dict[str, Any]:
        return api_error(
            404, "notFound", f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found"
        )


def serve_with_responses(fake: FakeCompute, rsps: Any, host: str = "https://compute.googleapis.com") -> None:
    """Route every Compute request the SDK sends through ``rsps`` (a ``responses.RequestsMock``) to ``fake``."""

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        url = urlparse(request.url)
        body = json.loads(request.body) if request.body else None
        status, payload = fake.handle(request.method, url.path, dict(parse_qsl(url.query)), body)
        return status, {"Content-Type": "application/json"}, json.dumps(payload)

    for method in ("GET", "POST", "DELETE"):
        rsps.add_callback(method, re.compile(re.escape(host) + r"/compute/v1/.*"), callback=callback)


def werkzeug_handler(fake: FakeCompute) -> Any:
    """A pytest-httpserver handler serving ``fake``."""
    from werkzeug import Response

    def handler(request: Any) -> Response:
        status, payload = fake.handle(
            request.method, request.path, request.args.to_dict(), request.get_json(silent=True)
        )
        return Response(json.dumps(payload), status, content_type="application/json")

    return handler
