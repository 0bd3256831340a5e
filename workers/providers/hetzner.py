"""Hetzner Cloud servers through hcloud-python (pinned 2.27.0); see the Provider protocol in base.py.

Exactly one server per job: server names are unique per project, so the server is named ``spec.name``
and a server of that name carrying the job's ``vmqueue-job`` label is adopted instead of created twice
(PROVIDERS.md, Hetzner recipe).

Status reads that cost what is in flight, not the fleet: every server also carries the label of the UTC minute
its create was sent (``vmqueue-batch=<YYYYMMDDHHMM>``, set by the create request itself), and the tick lists
only the batches of the servers it waits for, many batches in one label selector
(``vmqueue-batch in (b1,b2,...)``), or reads them one by one where that is fewer requests (``get_vms``).
The registry imports this module only in a Hetzner worker.
"""

from __future__ import annotations

import ipaddress
import math
import os
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from hcloud import APIException, Client
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer, Server, ServerCreatePublicNetwork
from hcloud.ssh_keys import BoundSSHKey, SSHKey
from requests.adapters import HTTPAdapter

from vmqueue.models import LABEL_JOB, LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus, job_id_of
from vmqueue.options import HetznerOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from workers.providers.base import resolve_alias
from workers.providers.batches import BATCH_LOOKBACK, BATCH_S, KNOWN_MAX, batch_minute, forget_oldest
from workers.providers.errors import (
    AuthError,
    CapacityError,
    InvalidSpecError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
    map_errors,
    seconds_until,
)
from workers.providers.metering import Metered, mount_metered

TOKEN_ENV = "HCLOUD_TOKEN"
ENDPOINT_ENV = "HCLOUD_ENDPOINT"  # e.g. a local fake API in system tests
DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"
ACTIONS_PAGE_SIZE = 5  # a failed create_server heads its server's error actions; a few spare
TIMEOUT_S = (5.0, 30.0)  # (connect, read): hcloud's default waits forever, and the threads pool has no time limit
PAGE_SIZE = 50  # the API's maximum per_page (API reference, "Pagination")

# The batch label: one value per UTC minute of creates. A label value is at most 63 characters, empty or
# alphanumerics with ``-_.`` between (API reference, "Labels"): twelve digits are one. A selector
# ``k in (v1,v2,...)`` matches any of the values (API reference, "Label Selector"), so one list names many
# batches; the API documents no length limit for ``label_selector``, so a list names at most
# ``SELECTOR_BATCHES`` of them (about 1 KiB of URL) and more batches take more lists.
LABEL_BATCH = "vmqueue-batch"
BATCH_AHEAD = 1  # and forward: a creating worker's clock may run ahead of the ticking one's
SELECTOR_BATCHES = 64

# Every documented ``server.status`` (spec: GET /servers ``status`` enum).
STATUS_MAP: dict[str, VMStatus] = {
    "initializing": VMStatus.pending,
    "starting": VMStatus.pending,
    "rebuilding": VMStatus.pending,
    "migrating": VMStatus.pending,
    "running": VMStatus.running,
    "stopping": VMStatus.stopping,
    "off": VMStatus.stopped,
    "deleting": VMStatus.terminating,
    "unknown": VMStatus.unknown,
}

# A server whose create went well leaves ``initializing`` within seconds; one still there after this long,
# or ``off`` (a create that failed leaves the server off), may have a failed ``create_server`` action, read
# then and only then, so a healthy boot costs no extra call.
CREATE_STUCK_S = 60.0

# API error codes (hcloud-go hcloud/error.go); ``uniqueness_error`` on create is adopted before it gets here.
ERROR_CODES: dict[str, type[ProviderError]] = {
    "unauthorized": AuthError,
    "token_readonly": AuthError,
    "forbidden": AuthError,
    "invalid_input": InvalidSpecError,
    "json_error": InvalidSpecError,
    "unsupported_error": InvalidSpecError,
    "protected": InvalidSpecError,
    "uniqueness_error": InvalidSpecError,
    "not_found": NotFoundError,
    "resource_limit_exceeded": QuotaExceededError,
    "resource_unavailable": CapacityError,
    "placement_error": CapacityError,
    "maintenance": CapacityError,
    "unavailable": CapacityError,
    "rate_limit_exceeded": RateLimitedError,
    "conflict": TransientError,
    "locked": TransientError,
    "server_error": TransientError,
    "service_error": TransientError,
    "timeout": TransientError,
    "bad_gateway": TransientError,
}
# For answers without the API's JSON error body (a proxy's 502 page): hcloud then keeps only the status.
HTTP_STATUSES: dict[int, type[ProviderError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    429: RateLimitedError,
}


class CreateFailure(NamedTuple):
    """The ``error`` of a ``create_server`` action that ended ``error`` (spec: Action.error)."""

    code: str  # an API error code (``ERROR_CODES``)
    message: str


# hcloud drops response headers; a session hook keeps RateLimit-Reset of this thread's last answer.
_last_answer = threading.local()


def _map_error(exc: Exception) -> ProviderError:
    if isinstance(exc, APIException):
        if isinstance(exc.code, int):
            cls = HTTP_STATUSES.get(exc.code, TransientError if exc.code >= 500 else ProviderError)
        else:
            cls = ERROR_CODES.get(exc.code, ProviderError)
        message = f"Hetzner: {exc.message}"
        if cls is AuthError:
            message += f"; set {TOKEN_ENV} to a read/write API token of the project"
        retry_after_s = (
            _next_request_s(getattr(_last_answer, "rate_limit_reset", None)) if cls is RateLimitedError else None
        )
        return cls(message, provider_code=str(exc.code), retry_after_s=retry_after_s)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return TransientError(f"Hetzner API unreachable: {exc}", provider_code=type(exc).__name__)
    return ProviderError(f"Hetzner: {type(exc).__name__}: {exc}")


class HetznerProvider(Metered):
    """Hetzner Cloud; see the Provider protocol. Credentials: ``HCLOUD_TOKEN`` (one token = one project)."""

    name = "hetzner"
    clock = time.time  # when a create is sent: its batch (tests fix it)

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
        self._token = token or os.environ.get(TOKEN_ENV)
        self._endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self._sdk: Client | None = None
        self._ssh_keys: dict[str, int] = {}  # MD5 fingerprint -> the project's SSH key id
        # What the reads know of each server this process created or read: its batch, or None (it has none,
        # being older than batch labels, or it was gone): read by id. Threads share it (creates, the tick).
        self._batch_of: dict[int, str | None] = {}
        self._batch_sizes: dict[str, int] = {}  # batch -> servers its last full list held (+ creates since)
        self._lock = threading.Lock()

    def _client(self) -> Client:
        if self._sdk is None:
            if not self._token:
                raise AuthError(f"no Hetzner credentials: set {TOKEN_ENV} to an API token of the project")
            client = Client(self._token, api_endpoint=self._endpoint, timeout=TIMEOUT_S, application_name="vmqueue")
            # Private in hcloud 2.27.0 (pinned): its retries re-POST a create after a read timeout; ours decide.
            client._client._retry_max_retries = 0
            client._client._session.hooks["response"].append(_remember_rate_limit)
            # Every request on the wire is charged to the project's budget (workers/budget.py).
            mount_metered(client._client._session, HTTPAdapter, lambda: self.meter, urlsplit(self._endpoint).path)
            self._sdk = client
        return self._sdk

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        return resolve_alias(self.name, spec)

    @map_errors(_map_error)
    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        # A first attempt sent nothing before: no server of this job can exist, so no lookup by name
        # (a taken name still answers uniqueness_error below). The prelude costs nothing once the
        # project's SSH key is known: one POST per create.
        if not first_attempt and (adopted := self._adopt(spec.name, job_id)):
            return adopted
        options = spec.options if isinstance(spec.options, HetznerOptions) else HetznerOptions()
        fingerprint = ssh_key.md5_fingerprint
        batch = batch_label(self.clock())
        try:
            response = self._client().servers.create(
                name=spec.name,
                server_type=ServerType(name=spec.instance_type),
                image=Image(id=int(spec.image)) if spec.image.isdigit() else Image(name=spec.image),
                location=Location(name=spec.region),
                ssh_keys=[self._ssh_key(ssh_key)],
                user_data=startup_script,
                labels={**spec.ownership_labels(job_id), LABEL_BATCH: batch},
                public_net=ServerCreatePublicNetwork(enable_ipv4=options.enable_ipv4, enable_ipv6=options.enable_ipv6),
            )
        except APIException as exc:
            # The name is taken: by this job's earlier POST whose answer was lost, or by someone else.
            if exc.code == "uniqueness_error" and (adopted := self._adopt(spec.name, job_id)):
                return adopted
            # A cached key someone deleted from the project since: the next attempt looks it up again.
            self._ssh_keys.pop(fingerprint, None)
            raise
        self._learn(response.server.id, batch, created=True)
        return _vm_info(response.server)

    @map_errors(_map_error)
    def get_vm(self, instance_id: str) -> VMInfo:
        """See the protocol. A server whose ``create_server`` action ended ``error`` after the POST was
        accepted (the API's asynchronous failure) reads by that error's code: a capacity one
        (``resource_unavailable``, ``placement_error``, ...; ``ERROR_CODES``) raises CapacityError once the
        server's delete is sent, as a refused POST would (the failover that follows forgets this id);
        any other reads as ``VMStatus.error`` with the code in ``provider_status``, for the job's cleanup.

        Calls: one GET; one more (the server's actions filtered to ``status=error``) only while the server
        looks stuck (``off``, or ``initializing`` for over ``CREATE_STUCK_S``); one DELETE on a capacity failure.
        """
        server = self._client().servers.get_by_id(_server_id(instance_id))
        self._learn(server.id, _batch_of(server.labels))
        failure = self._create_failure(server)
        if failure is not None and ERROR_CODES.get(failure.code) is CapacityError:
            self.destroy_vm(instance_id)
            raise CapacityError(
                f"Hetzner could not create server {server.name}: {failure.message}", provider_code=failure.code
            )
        return _vm_info(server, failure)

    @map_errors(_map_error)
    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """See the protocol. Lists the batches of the servers asked for (``managed-by=vmqueue,vmqueue-batch in
        (...)``, 50 a page, newest first), or reads servers one by one (GET /servers/{id}) where that is fewer
        requests: a batch holds the servers created in one minute, so the cost follows the VMs in flight and
        the creates of their minutes, never the long-lived servers of other minutes, however old the oldest
        VM in flight is. All batches listed share one selector, hence its pages: a stuck VM's batch and the
        new VMs' batch cost ⌈(their servers)/50⌉ together.

        Which batches are listed: those whose servers asked for, per request of their pages, make listing them
        cheaper than reading them by id (``_choose``). Servers this process never created or read (another
        worker created them, or this one restarted): the batches of the last ``BATCH_LOOKBACK`` minutes join
        the selector when there are two or more such servers or a list is sent anyway (values cost nothing,
        only the servers listed do). A list stops at the page that reaches below every server still sought
        (ids grow with time; ``sort=id:desc``), or once its remaining pages cost as much as reading the
        servers still sought by id. What remains (created before batch labels existed, before the lookback,
        or gone) is read by id, and every server's batch is remembered for the next read.
        """
        wanted = {int(i) for i in instance_ids if i.isdigit()}  # another id is no server: absent
        if not wanted:
            return {}
        with self._lock:
            known = {i: self._batch_of[i] for i in wanted if i in self._batch_of}
        groups: dict[str, set[int]] = {}
        for server_id, batch in known.items():
            if batch is not None:
                groups.setdefault(batch, set()).add(server_id)
        listed = self._choose(groups)
        unknown = wanted - known.keys()
        if unknown and (listed or len(unknown) > 1):
            now = self.clock()
            listed |= {batch_label(now - back * BATCH_S) for back in range(-BATCH_AHEAD, BATCH_LOOKBACK)}
        sought = unknown | {i for batch in listed for i in groups.get(batch, ())}
        found: dict[int, dict[str, Any]] = {}
        ordered = sorted(listed, reverse=True)
        for first in range(0, len(ordered), SELECTOR_BATCHES):
            if not sought - found.keys():
                break
            found |= self._list_batches(ordered[first : first + SELECTOR_BATCHES], sought - found.keys())
        for server_id in sorted(wanted - found.keys()):
            if raw := self._read(server_id):
                found[server_id] = raw
        client, vms = self._client(), {}
        for server_id, raw in found.items():
            # A failed create reads as a server in error here (raised, it would sink the whole batch);
            # the tick reads such a server again through get_vm, which fails it over.
            server = BoundServer(client.servers, raw)
            vms[str(server_id)] = _vm_info(server, self._create_failure(server))
        return vms

    def destroy_vm(self, instance_id: str) -> None:
        with suppress(NotFoundError), map_errors(_map_error):
            self._client().servers.delete(Server(id=_server_id(instance_id)))

    @map_errors(_map_error)
    def list_owned_vms(self) -> list[VMInfo]:
        servers = self._client().servers.get_all(label_selector=f"{LABEL_MANAGED_BY}=vmqueue")
        return [_vm_info(server) for server in servers]

    def _create_failure(self, server: BoundServer) -> CreateFailure | None:
        """The error of the server's failed ``create_server`` action, read only while the server looks stuck.

        One call: GET /servers/{id}/actions?status=error&sort=id:asc (docs.hetzner.cloud, "List Actions
        for a Server"); a server's create action is its first, so it heads the list when it failed.
        """
        if not _looks_stuck(server):
            return None
        failed = self._client().servers.get_actions_list(
            Server(id=server.id), status=["error"], sort=["id:asc"], per_page=ACTIONS_PAGE_SIZE
        )
        for action in failed.actions:
            if action.command == "create_server":
                error = action.error or {}
                return CreateFailure(
                    code=error.get("code") or "create_server_failed",
                    message=error.get("message") or "the create_server action ended in error",
                )
        return None

    def _choose(self, groups: dict[str, set[int]]) -> set[str]:
        """The batches worth listing: the densest first (servers asked for per server listed), as many as
        make ⌈listed/50⌉ pages plus the other servers read by id the fewest requests (a tie lists)."""
        with self._lock:
            sizes = {batch: max(self._batch_sizes.get(batch, 0), len(ids)) for batch, ids in groups.items()}
        ranked = sorted(groups, key=lambda batch: (-len(groups[batch]) / sizes[batch], batch))
        best, best_cost, listed_size, by_id = 0, sum(map(len, groups.values())), 0, sum(map(len, groups.values()))
        for count, batch in enumerate(ranked, start=1):
            listed_size += sizes[batch]
            by_id -= len(groups[batch])
            if (cost := math.ceil(listed_size / PAGE_SIZE) + by_id) <= best_cost:
                best, best_cost = count, cost
        return set(ranked[:best])

    def _list_batches(self, batches: list[str], sought: set[int]) -> dict[int, dict[str, Any]]:
        """The servers of ``sought`` among those of ``batches`` (one label selector, newest first), remembered.

        Pages until nothing sought can be on a later page: every server sought is found, or newer than the
        page's oldest (``sort=id:desc``), or the pages left are as many as the servers still sought (reading
        those by id costs no more).
        """
        client, found, page, seen = self._client(), {}, 1, dict.fromkeys(batches, 0)
        selector = f"{LABEL_MANAGED_BY}=vmqueue,{LABEL_BATCH} in ({','.join(batches)})"
        while True:
            # hcloud 2.27's get_list has no ``sort``; the API's GET /servers does (docs.hetzner.cloud).
            params = {"label_selector": selector, "sort": "id:desc", "per_page": PAGE_SIZE, "page": page}
            answer = client._client.request(method="GET", url="/servers", params=params)
            servers = answer.get("servers") or []
            for raw in servers:
                batch = _batch_of(raw.get("labels"))
                self._learn(raw["id"], batch)
                seen[batch or ""] = seen.get(batch or "", 0) + 1
                if raw["id"] in sought:
                    found[raw["id"]] = raw
            pagination = (answer.get("meta") or {}).get("pagination") or {}
            oldest_listed = min((raw["id"] for raw in servers), default=0)
            findable = [i for i in sought - found.keys() if i < oldest_listed]
            last_page, next_page = pagination.get("last_page"), pagination.get("next_page")
            if not next_page:
                with self._lock:  # the whole list was read: each batch's size is known
                    self._batch_sizes.update({b: n for b, n in seen.items() if b in batches})
                    forget_oldest(self._batch_sizes, BATCH_LOOKBACK * 4)
                return found
            if not findable or (last_page is not None and last_page - page >= len(findable)):
                # Stopped early: a batch still holding servers sought may hold every server not read.
                unread = max(0, (pagination.get("total_entries") or 0) - sum(seen.values()))
                with self._lock:
                    for server_id in findable:
                        if (batch := self._batch_of.get(server_id)) in seen:
                            self._batch_sizes[batch] = max(self._batch_sizes.get(batch, 0), seen[batch] + unread)
                return found
            page = next_page

    def _read(self, server_id: int) -> dict[str, Any] | None:
        """One server by id (GET /servers/{id}), remembered; None when it is gone."""
        try:
            raw = self._client()._client.request(method="GET", url=f"/servers/{server_id}")["server"]
        except APIException as exc:
            if exc.code != "not_found" and exc.code != 404:
                raise
            self._learn(server_id, None)
            return None
        self._learn(server_id, _batch_of(raw.get("labels")))
        return raw

    def _learn(self, server_id: int, batch: str | None, *, created: bool = False) -> None:
        with self._lock:
            self._batch_of.pop(server_id, None)  # re-inserted: the newest, forgotten last
            self._batch_of[server_id] = batch
            forget_oldest(self._batch_of, KNOWN_MAX)
            if created and batch is not None:
                self._batch_sizes[batch] = self._batch_sizes.get(batch, 0) + 1
                forget_oldest(self._batch_sizes, BATCH_LOOKBACK * 4)

    def _adopt(self, name: str, job_id: str) -> VMInfo | None:
        """The server named ``name`` if this job created it; a foreign server of that name is an error."""
        server = self._client().servers.get_by_name(name)
        if server is None or server.name != name:  # only the server asked for, whatever the answer held
            return None
        self._learn(server.id, _batch_of(server.labels))
        label = (server.labels or {}).get(LABEL_JOB)
        if label is not None and label != job_id and job_id_of(label) == job_id_of(job_id):
            # The server of this job's previous placement, deleted after its create failed late: the name
            # frees up once the delete_server action ends, so a later attempt of this create succeeds.
            raise TransientError(
                f"Hetzner: server {name!r} of this job's previous placement is still being deleted",
                provider_code="uniqueness_error",
            )
        if label != job_id:
            raise InvalidSpecError(
                f"Hetzner: a server named {name!r} already exists in the project and is not this job's; "
                "server names are unique per project, pick another name",
                provider_code="uniqueness_error",
            )
        return _vm_info(server)

    def _ssh_key(self, key: SSHPublicKey) -> SSHKey:
        """The project's key with this fingerprint, added once and shared by every job (never deleted).

        Resolved once per fingerprint per process (one token is one project): later creates name the
        key by id and send no lookup.
        """
        if (key_id := self._ssh_keys.get(key.md5_fingerprint)) is not None:
            return SSHKey(id=key_id)
        found = self._find_or_add_key(key)
        self._ssh_keys[key.md5_fingerprint] = found.id
        return found

    def _find_or_add_key(self, key: SSHPublicKey) -> BoundSSHKey:
        keys = self._client().ssh_keys
        if found := keys.get_by_fingerprint(key.md5_fingerprint):
            return found
        try:
            return keys.create(
                name=f"vmqueue-{key.md5_fingerprint.replace(':', '')}",
                public_key=key.openssh,
                labels={LABEL_MANAGED_BY: "vmqueue"},
            )
        except APIException as exc:
            # Another job added the same key since our lookup.
            if exc.code == "uniqueness_error" and (found := keys.get_by_fingerprint(key.md5_fingerprint)):
                return found
            raise

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive a server:
        a server's primary IPs are created with it and deleted with it
        (``auto_delete``; Hetzner Cloud API, "Create a Server", ``public_net``), and the SSH key is one
        per fingerprint, shared by every job and kept on purpose."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"hetzner creates no {resource.kind} beside a server: nothing to delete")


def batch_label(at_s: float) -> str:
    """The batch label value of a create sent at ``at_s`` (epoch seconds): its UTC minute, ``YYYYMMDDHHMM``."""
    return batch_minute(at_s)


def _batch_of(labels: dict[str, str] | None) -> str | None:
    return (labels or {}).get(LABEL_BATCH)


def _server_id(instance_id: str) -> int:
    if not instance_id.isdigit():
        raise NotFoundError(f"Hetzner: {instance_id!r} is not a server id", provider_code="not_found")
    return int(instance_id)


def _looks_stuck(server: BoundServer) -> bool:
    """Off, or initializing for longer than a healthy create takes: how a failed create leaves a server."""
    if server.status == "off":
        return True
    created = server.created
    if server.status != "initializing" or created is None:
        return False
    return (datetime.now(UTC) - created).total_seconds() > CREATE_STUCK_S


def _vm_info(server: BoundServer, create_failure: CreateFailure | None = None) -> VMInfo:
    """The server as VMInfo; a failed create (its action's error) reads as ``error`` whatever the status."""
    net = server.public_net
    failed = f"create_server failed: {create_failure.code}: {create_failure.message}" if create_failure else None
    return VMInfo(
        provider="hetzner",
        instance_id=str(server.id),
        name=server.name,
        status=VMStatus.error if create_failure else STATUS_MAP.get(server.status or "", VMStatus.unknown),
        provider_status=failed or server.status,
        public_ipv4=net.ipv4.ip if net and net.ipv4 else None,
        # Hetzner assigns a /64; the server answers on its ::1 (what `hcloud server ip -6` prints).
        public_ipv6=str(ipaddress.ip_network(net.ipv6.ip)[1]) if net and net.ipv6 else None,
        private_ipv4=server.private_net[0].ip if server.private_net else None,
        region=server.location.name if server.location else None,
        instance_type=server.server_type.name if server.server_type else None,
        image=(server.image.name or str(server.image.id)) if server.image else None,
        # The batch label is the adapter's bookkeeping, not one of the VM's labels.
        labels={k: v for k, v in (server.labels or {}).items() if k != LABEL_BATCH},
        created_at=server.created,
    )


def _remember_rate_limit(response: requests.Response, *args: object, **kwargs: object) -> None:
    _last_answer.rate_limit_reset = response.headers.get("RateLimit-Reset")


# Hetzner's bucket refills one request a second; ``RateLimit-Reset`` is when it is *full* again
# (https://docs.hetzner.cloud/#rate-limiting), which after a burst can be an hour away.
REFILL_S = 1.0


def _next_request_s(reset: str | None) -> float | None:
    """When one request is allowed again after a 429: one refill interval, or sooner if the bucket is
    full sooner; None when ``RateLimit-Reset`` is missing, malformed or past (the caller's backoff decides)."""
    until_full = seconds_until(reset)
    return None if until_full is None else min(until_full, REFILL_S)
