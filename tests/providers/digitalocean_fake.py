"""A small stateful fake of the DigitalOcean API v2; payloads follow digitalocean/openapi's examples.

A droplet appears on POST as ``new`` without networks, is ``active`` with its IPs from the next read (GET or
list), and is gone after DELETE. Names are not unique, like the real API. In a region of
``create_errors_in`` the POST is accepted, then the droplet's ``create`` action ends ``errored`` and the
droplet stays ``new`` (the asynchronous failure); ``GET /v2/droplets/{id}/actions`` lists a droplet's
actions, newest first, in the spec's action shape (all_droplet_actions.yml).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from tests.providers.fakehttp import FakeAPI, Reply
from tests.providers.hetzner_fake import md5_fingerprint, now

BASE_URL = "https://api.digitalocean.com"
CREATED = "2020-07-21T18:37:44Z"
MAX_PER_PAGE = 200  # the API's largest page
RATE_HEADERS = {"ratelimit-limit": "5000", "ratelimit-remaining": "4999", "ratelimit-reset": "1444931833"}


def error(error_id: str, message: str) -> dict[str, Any]:
    return {"id": error_id, "message": message, "request_id": "4851a473-1621-42ea-b2f9-5071c0ea8414"}


def droplet_payload(
    droplet_id: int,
    name: str,
    *,
    status: str = "active",
    region: str = "nyc3",
    size: str = "s-1vcpu-1gb",
    image: str | int = "ubuntu-24-04-x64",
    tags: list[str] | None = None,
    public_ipv4: str | None = "192.241.165.154",
    public_ipv6: str | None = "2604:a880:0:1010::18a:a001",
    private_ipv4: str | None = "10.128.192.124",
    created_at: str = CREATED,
) -> dict[str, Any]:
    v4 = [
        {"ip_address": ip, "netmask": mask, "gateway": gateway, "type": kind}
        for ip, mask, gateway, kind in (
            (private_ipv4, "255.255.0.0", "nil", "private"),
            (public_ipv4, "255.255.255.0", "192.241.165.1", "public"),
        )
        if ip and status != "new"
    ]
    v6 = (
        [{"ip_address": public_ipv6, "netmask": 64, "gateway": "2604:a880:0:1010::1", "type": "public"}]
        if public_ipv6 and status != "new"
        else []
    )
    slug = image if isinstance(image, str) else None
    return {
        "id": droplet_id,
        "name": name,
        "memory": 1024,
        "vcpus": 1,
        "disk": 25,
        "disk_info": [{"type": "local", "size": {"amount": 25, "unit": "gib"}}],
        "locked": False,
        "status": status,
        "kernel": None,
        "created_at": created_at,
        "features": ["private_networking"],
        "backup_ids": [],
        "next_backup_window": None,
        "snapshot_ids": [],
        "image": {
            "id": image if isinstance(image, int) else 63663980,
            "name": "24.04 (LTS) x64" if slug else "my snapshot",
            "distribution": "Ubuntu",
            "slug": slug,
            "public": bool(slug),
            "regions": [region],
            "created_at": "2020-05-15T05:47:50Z",
            "type": "snapshot",
            "min_disk_size": 20,
            "size_gigabytes": 2.36,
            "description": "",
            "tags": [],
            "status": "available",
            "error_message": "",
        },
        "volume_ids": [],
        "size": {
            "slug": size,
            "memory": 1024,
            "vcpus": 1,
            "disk": 25,
            "transfer": 1.0,
            "price_monthly": 5.0,
            "price_hourly": 0.00743999984115362,
            "regions": [region],
            "available": True,
            "description": "Basic",
        },
        "size_slug": size,
        "networks": {"v4": v4, "v6": v6},
        "region": {
            "name": "New York 3",
            "slug": region,
            "features": ["private_networking", "backups", "ipv6", "metadata"],
            "available": True,
            "sizes": [size],
        },
        "tags": tags or [],
        "vpc_uuid": "760e09ef-dc84-11e8-981e-3cfdfeaae000",
    }


def action_payload(action_id: int, droplet_id: int, region: str, status: str, kind: str = "create") -> dict[str, Any]:
    """A droplet action as the Actions API reads it; ``status`` is in-progress, completed or errored."""
    return {
        "id": action_id,
        "status": status,
        "type": kind,
        "started_at": "2020-07-20T19:37:30Z",
        "completed_at": None if status == "in-progress" else "2020-07-20T19:37:45Z",
        "resource_id": droplet_id,
        "resource_type": "droplet",
        "region": {"name": "New York 3", "slug": region, "features": ["private_networking"], "available": True},
        "region_slug": region,
    }


class FakeDigitalOcean(FakeAPI):
    prefix = "/v2"

    def __init__(self) -> None:
        super().__init__()
        self.droplets: dict[int, dict[str, Any]] = {}
        self.ssh_keys: dict[str, dict[str, Any]] = {}  # by fingerprint
        self._ids = itertools.count(3164444)
        self._booting: dict[int, dict[str, Any]] = {}  # id -> the fields it was created with
        self.max_per_page = MAX_PER_PAGE  # lower it to make a list span pages
        self.actions: dict[int, list[dict[str, Any]]] = {}  # droplet id -> its actions, oldest first
        self.create_errors_in: set[str] = set()  # regions where a create is accepted, then its action errors
        self.created_at: str | None = None  # created_at of POSTed droplets; None: the time of the POST

    def add_droplet(self, name: str, **fields: Any) -> dict[str, Any]:
        droplet = droplet_payload(next(self._ids), name, **fields)
        self.droplets[droplet["id"]] = droplet
        return droplet

    def add_ssh_key(self, public_key: str, name: str = "alice") -> dict[str, Any]:
        key = {
            "id": next(self._ids),
            "fingerprint": md5_fingerprint(public_key),
            "public_key": public_key,
            "name": name,
        }
        self.ssh_keys[key["fingerprint"]] = key
        return key

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        if match := re.fullmatch(r"/droplets/(\d+)", path):
            return self._droplet(method, int(match[1]))
        if method == "GET" and (match := re.fullmatch(r"/droplets/(\d+)/actions", path)):
            if int(match[1]) not in self.droplets:
                return 404, RATE_HEADERS, error("not_found", "The resource you were accessing could not be found.")
            found = self.actions.get(int(match[1]), [])[::-1]
            per_page = min(int(query.get("per_page", 20)), self.max_per_page)
            number = int(query.get("page", 1))
            chunk = found[(number - 1) * per_page : number * per_page]
            return 200, RATE_HEADERS, {"actions": chunk, "links": {}, "meta": {"total": len(found)}}
        if (method, path) == ("GET", "/droplets"):
            tag = query.get("tag_name")
            found = [self._read(d["id"]) for d in list(self.droplets.values()) if tag is None or tag in d["tags"]]
            return 200, RATE_HEADERS, self._page(found, query)
        if (method, path) == ("POST", "/droplets"):
            return self._create_droplet(body)
        if match := re.fullmatch(r"/account/keys/([0-9a-f:]+)", path):
            if key := self.ssh_keys.get(match[1]):
                return 200, RATE_HEADERS, {"ssh_key": key}
            return 404, RATE_HEADERS, error("not_found", "The resource you were accessing could not be found.")
        if (method, path) == ("POST", "/account/keys"):
            if md5_fingerprint(body["public_key"]) in self.ssh_keys:
                return 422, RATE_HEADERS, error("unprocessable_entity", "SSH Key is already in use on your account")
            return 201, RATE_HEADERS, {"ssh_key": self.add_ssh_key(body["public_key"], body["name"])}
        return 404, {}, error("not_found", f"no route {method} {path}")

    def _page(self, droplets: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        """One page as the API pages lists: ``page`` and ``per_page`` (default 20, at most the maximum),
        ``links.pages.next``/``last`` while more follow (docs.digitalocean.com, "Links & Pagination")."""
        per_page = min(int(query.get("per_page", 20)), self.max_per_page)
        number = int(query.get("page", 1))
        last = max(1, -(-len(droplets) // per_page))
        pages = {}
        if number < last:
            url = f"{BASE_URL}/v2/droplets?page={{}}&per_page={per_page}"
            pages = {"next": url.format(number + 1), "last": url.format(last)}
        chunk = droplets[(number - 1) * per_page : number * per_page]
        return {"droplets": chunk, "links": {"pages": pages}, "meta": {"total": len(droplets)}}

    def _create_droplet(self, body: dict[str, Any]) -> Reply:
        fields = {
            "region": body["region"],
            "size": body["size"],
            "image": body["image"],
            "tags": body.get("tags", []),
            "public_ipv6": "2604:a880:0:1010::18a:a001" if body.get("ipv6") else None,
        }
        fields["created_at"] = self.created_at or now()
        droplet = self.add_droplet(body["name"], status="new", **fields)
        errored = body["region"] in self.create_errors_in
        if not errored:  # an errored create leaves the droplet new
            self._booting[droplet["id"]] = fields
        create = action_payload(next(self._ids), droplet["id"], body["region"], "errored" if errored else "completed")
        self.actions[droplet["id"]] = [create]
        href = f"{BASE_URL}/v2/actions/{create['id']}"
        links = {"actions": [{"id": create["id"], "rel": "create", "href": href}]}
        return 202, RATE_HEADERS, {"droplet": droplet, "links": links}

    def _droplet(self, method: str, droplet_id: int) -> Reply:
        if droplet_id not in self.droplets:
            return 404, RATE_HEADERS, error("not_found", "The resource you were accessing could not be found.")
        if method == "DELETE":
            del self.droplets[droplet_id]
            self.actions.pop(droplet_id, None)
            return 204, RATE_HEADERS, None
        return 200, RATE_HEADERS, {"droplet": self._read(droplet_id)}

    def _read(self, droplet_id: int) -> dict[str, Any]:
        """A droplet as a read (GET or list) sees it: a booting one is active from its first read."""
        if fields := self._booting.pop(droplet_id, None):
            name = self.droplets[droplet_id]["name"]
            self.droplets[droplet_id] = droplet_payload(droplet_id, name, status="active", **fields)
        return self.droplets[droplet_id]
