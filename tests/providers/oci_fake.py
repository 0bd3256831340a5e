"""A small stateful OCI Core/Search API fake, answering wire JSON (camelCase, per the models' attribute_map).

Transport-agnostic: ``handle(method, url, headers, body)`` returns ``(status, headers, body)``, so unit tests
serve it through ``responses`` on oci's vendored requests and the system test through pytest-httpserver.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.providers.fakeapi import Call, FakeAPI, Response

COMPARTMENT = "ocid1.compartment.oc1..aaaaaaaacompartment"
SUBNET = "ocid1.subnet.oc1.phx.aaaaaaaasubnet"
AD = "Uocm:PHX-AD-1"
IMAGE_2204 = "ocid1.image.oc1.phx.aaaaaaaaubuntu2204new"


def signing_config() -> dict[str, str]:
    """An OCI SDK config with a throwaway API signing key made per call; no private key is ever committed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        .decode()
    )
    return {
        "user": "ocid1.user.oc1..aaaaaaaatestuser",
        "tenancy": "ocid1.tenancy.oc1..aaaaaaaatesttenancy",
        "fingerprint": "20:3b:97:13:55:1c:5b:0d:d3:37:d8:50:4e:c5:3a:34",
        "key_content": pem,
        "region": "us-phoenix-1",
    }


@contextmanager
def served(fake: FakeOCI) -> Iterator[FakeOCI]:
    """Every HTTPS request the oci SDK sends (through its vendored requests) answered by ``fake``."""
    import responses
    from oci._vendor.requests.exceptions import ConnectionError as VendoredConnectionError

    with responses.RequestsMock(
        target="oci._vendor.requests.adapters.HTTPAdapter.send", assert_all_requests_are_fired=False
    ) as mock:
        for method in ("GET", "POST", "PUT", "DELETE"):
            mock.add_callback(method, re.compile(r"https://.*"), callback=fake.answer(VendoredConnectionError))
        yield fake


def ocid(kind: str) -> str:
    return f"ocid1.{kind}.oc1.phx.{uuid.uuid4().hex}"


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return (
        status,
        {"opc-request-id": uuid.uuid4().hex, **(headers or {})},
        json.dumps({"code": code, "message": message}),
    )


@dataclass
class FakeOCI(FakeAPI):
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    vnics: dict[str, dict[str, Any]] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    public_ip: str | None = "203.0.113.10"
    polls_to_run: int | None = None  # reads a PROVISIONING instance answers before RUNNING; None: stays
    unindexed: set[str] = field(default_factory=set)  # instance ids Resource Search does not find (yet)
    max_page: int = 1000  # the most items one list or search page holds (lower it to make lists span pages)

    def route(self, call: Call) -> Response:
        method, path, query, data = call.method, call.path, call.query, call.body
        ok = lambda payload, status=200: (status, {"opc-request-id": "r", "etag": "e"}, json.dumps(payload))  # noqa: E731
        if method == "POST" and path.endswith("/instances"):
            return ok(self.launch(data, call.headers.get("opc-retry-token")))
        if method == "GET" and path.endswith("/instances"):
            return self.paged(
                [
                    i
                    for i in self.instances.values()
                    if i["compartmentId"] == query.get("compartmentId")
                    and i["displayName"] == query.get("displayName", i["displayName"])
                ],
                query,
            )
        if m := re.search(r"/instances/([^/]+)$", path):
            instance = self.instances.get(m.group(1))
            if instance is None:
                return error(404, "NotAuthorizedOrNotFound", "Authorization failed or requested resource not found.")
            if method == "GET":
                return ok({k: v for k, v in self._read(instance).items() if not k.startswith("_")})
            if method == "DELETE":
                if instance["lifecycleState"] == "TERMINATED":
                    return error(409, "IncorrectState", "Instance is already terminated.")
                instance["lifecycleState"] = "TERMINATED"
                return 204, {"opc-request-id": "r"}, ""
        if method == "GET" and path.endswith("/vnicAttachments"):
            return self.paged([a for a in self.attachments if a["instanceId"] == query.get("instanceId")], query)
        if method == "GET" and (m := re.search(r"/vnics/([^/]+)$", path)):
            return ok(self.vnics[m.group(1)])
        if method == "GET" and path.endswith("/images"):
            return ok(images(query))
        if method == "POST" and path.endswith("/resources"):
            return self.paged([summary(i) for i in self.search(data["query"])], query, wrap="items")
        return error(404, "NotFound", f"no route {method} {path}")

    def paged(self, items: list[dict[str, Any]], query: dict[str, str], wrap: str | None = None) -> Response:
        """One page as OCI pages lists: at most ``limit`` (and ``max_page``) items from the ``page`` token,
        and an ``opc-next-page`` header while more follow (docs.oracle.com, "List Pagination")."""
        start = int(query.get("page") or 0)
        end = start + min(int(query.get("limit") or self.max_page), self.max_page)
        headers = {"opc-request-id": "r", **({"opc-next-page": str(end)} if end < len(items) else {})}
        chunk = items[start:end]
        return 200, headers, json.dumps({wrap: chunk} if wrap else chunk)

    def search(self, query: str) -> list[dict[str, Any]]:
        """Structured Search: ``identifier = '...'`` terms pick instances by OCID, else the ones with a
        managed-by tag (list_owned_vms' query). Instances in ``unindexed`` are not found, as Search
        indexes new instances late."""
        wanted = re.findall(r"identifier = '([^']+)'", query)
        found = [self._read(i) for i in self.instances.values() if i["id"] not in self.unindexed]
        if wanted:
            return [i for i in found if i["id"] in wanted]
        return [i for i in found if i["freeformTags"].get("managed-by")]

    def _read(self, instance: dict[str, Any]) -> dict[str, Any]:
        """An instance as a read (GET or Search) sees it: with ``polls_to_run``, PROVISIONING ends after that many."""
        if instance["lifecycleState"] == "PROVISIONING" and self.polls_to_run is not None:
            instance["_polls"] = instance.get("_polls", 0) + 1
            if instance["_polls"] > self.polls_to_run:
                instance["lifecycleState"] = "RUNNING"
        return instance

    def launch(self, details: dict[str, Any], token: str | None) -> dict[str, Any]:
        if token in self.tokens:  # OCI answers a repeated retry token with the first result
            return self.instances[self.tokens[token]]
        instance = {
            "id": ocid("instance"),
            "availabilityDomain": details["availabilityDomain"],
            "compartmentId": details["compartmentId"],
            "displayName": details["displayName"],
            "faultDomain": "FAULT-DOMAIN-1",
            "freeformTags": details.get("freeformTags", {}),
            "definedTags": {},
            "imageId": details["sourceDetails"]["imageId"],
            "sourceDetails": {"sourceType": "image", "imageId": details["sourceDetails"]["imageId"]},
            "lifecycleState": "PROVISIONING",
            "metadata": details.get("metadata", {}),
            "region": "phx",
            "shape": details["shape"],
            "shapeConfig": {
                "ocpus": details.get("shapeConfig", {}).get("ocpus", 1.0),
                "memoryInGBs": details.get("shapeConfig", {}).get("memoryInGBs", 16.0),
            },
            "timeCreated": "2026-01-15T10:00:00.000Z",
        }
        self.instances[instance["id"]] = instance
        if token:
            self.tokens[token] = instance["id"]
        self.attach(instance, self.public_ip)
        return instance

    def attach(
        self,
        instance: dict[str, Any],
        public_ip: str | None,
        ipv6: list[str] | None = None,
        *,
        primary: bool = True,
        private_ip: str = "10.0.0.12",
        time_created: str | None = None,
        listed_first: bool = False,
    ) -> None:
        """Attach a VNIC; a secondary one (``primary=False``) may be listed before the primary."""
        vnic_id = ocid("vnic")
        self.vnics[vnic_id] = {
            "id": vnic_id,
            "availabilityDomain": instance["availabilityDomain"],
            "compartmentId": instance["compartmentId"],
            "displayName": instance["displayName"],
            "isPrimary": primary,
            "lifecycleState": "AVAILABLE",
            "macAddress": "02:00:17:00:00:01",
            "privateIp": private_ip,
            "publicIp": public_ip,
            "ipv6Addresses": ipv6 or [],
            "subnetId": SUBNET,
            "timeCreated": instance["timeCreated"],
        }
        attachment = {
            "id": ocid("vnicattachment"),
            "availabilityDomain": instance["availabilityDomain"],
            "compartmentId": instance["compartmentId"],
            "instanceId": instance["id"],
            "lifecycleState": "ATTACHED",
            "nicIndex": 0,
            "subnetId": SUBNET,
            "timeCreated": time_created or instance["timeCreated"],
            "vnicId": vnic_id,
        }
        self.attachments.insert(0 if listed_first else len(self.attachments), attachment)


def images(query: dict[str, str]) -> list[dict[str, Any]]:
    """Platform images of an OS/version, newest first as sortBy=TIMECREATED&sortOrder=DESC asks."""
    if (query.get("operatingSystem"), query.get("operatingSystemVersion")) != ("Canonical Ubuntu", "22.04"):
        return []
    base = {"compartmentId": None, "createImageAllowed": True, "lifecycleState": "AVAILABLE", "launchMode": "NATIVE"}
    base |= {"operatingSystem": "Canonical Ubuntu", "operatingSystemVersion": "22.04", "sizeInMBs": 47694}
    return [
        {
            **base,
            "id": IMAGE_2204,
            "displayName": "Canonical-Ubuntu-22.04-2026.01.10-0",
            "timeCreated": "2026-01-12T00:00:00.000Z",
        },
        {
            **base,
            "id": "ocid1.image.oc1.phx.aaaaold",
            "displayName": "Canonical-Ubuntu-22.04-2025.10.01-0",
            "timeCreated": "2025-10-02T00:00:00.000Z",
        },
    ]


def summary(instance: dict[str, Any]) -> dict[str, Any]:
    keys = ("compartmentId", "timeCreated", "displayName", "availabilityDomain", "lifecycleState", "freeformTags")
    return {"resourceType": "Instance", "identifier": instance["id"], **{k: instance[k] for k in keys}}
