"""DigitalOcean droplets through pydo (0.44.0); see the Provider protocol in base.py.

Exactly one droplet per job: the API has no idempotency key and names are not unique, so every droplet
carries the tag ``vmqueue-job:<id>``, looked up before any POST and after any failure that may have
followed a POST the API received; a droplet found is adopted, never created again (PROVIDERS.md, DO recipe).

Status reads that cost what is in flight, not the fleet: every droplet also carries the tag of the minute
its create was sent (``vmqueue-batch-<YYYYMMDDHHMM>``, UTC), and the tick lists only the batches of the
droplets it waits for, or reads them one by one where that is fewer requests (``get_vms``).
The registry imports this module only in a DigitalOcean worker.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.policies import AzureKeyCredentialPolicy, RetryPolicy
from pydo import Client

from vmqueue.models import LABEL_JOB, LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus
from vmqueue.options import DigitalOceanOptions
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
from workers.providers.metering import Metered, azure_hooks

TOKEN_ENVS = ("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN")  # Terraform's order
ENDPOINT_ENV = "DIGITALOCEAN_ENDPOINT"  # e.g. a local fake API in system tests
DEFAULT_ENDPOINT = "https://api.digitalocean.com"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 30  # azure-core's transport waits 300 s by default
PAGE_SIZE = 200  # the API's maximum
CREATE_ERRORED = "create_errored"  # provider_code (and provider_status) of a droplet whose create action errored

# The batch tag: one per UTC minute of creates. Tag names allow letters, digits, colons, dashes and
# underscores, up to 255 characters (API reference, "Create a New Tag"), and a droplet create makes the
# tags it names (droplet_create.yml: "Tag names can either be existing or new tags"). No colon: a user label
# always becomes ``key:value``, so none can look like a batch tag.
BATCH_PREFIX = "vmqueue-batch-"

# Every documented ``droplet.status`` (droplet.yml enum); ``archive`` is a destroyed droplet (libcloud).
STATUS_MAP: dict[str, VMStatus] = {
    "new": VMStatus.pending,
    "active": VMStatus.running,
    "off": VMStatus.stopped,
    "archive": VMStatus.terminated,
}

# A droplet whose create goes well is ``active`` within a minute or so; one still ``new`` after this long, or
# ``off``/``archive`` (where a failed create may leave it), may have a create action that ended ``errored``,
# read then and only then, so a healthy boot costs no extra call.
CREATE_STUCK_S = 90.0

HTTP_STATUSES: dict[int, type[ProviderError]] = {
    400: InvalidSpecError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    422: InvalidSpecError,
    429: RateLimitedError,
}
# Quota and capacity share 422 with invalid input; only the message tells them apart.
MESSAGES_422: tuple[tuple[str, type[ProviderError]], ...] = (
    ("droplet limit", QuotaExceededError),
    ("is unavailable", CapacityError),
    ("not available", CapacityError),
)


def _map_error(exc: Exception) -> ProviderError:
    if isinstance(exc, HttpResponseError) and exc.status_code:
        status, body = exc.status_code, _error_body(exc)
        message = f"DigitalOcean: {body.get('message') or exc.reason}"
        cls = HTTP_STATUSES.get(status, TransientError if status >= 500 else ProviderError)
        if status == 422:
            cls = next((c for text, c in MESSAGES_422 if text in message.lower()), cls)
        if cls is AuthError:
            message += f"; set {' or '.join(TOKEN_ENVS)} to an API token with droplet and ssh_key scopes"
        retry_after_s = _retry_after_s(exc.response.headers) if cls is RateLimitedError else None
        return cls(message, provider_code=body.get("id") or str(status), retry_after_s=retry_after_s)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return TransientError(f"DigitalOcean API unreachable: {exc}", provider_code=type(exc).__name__)
    return ProviderError(f"DigitalOcean: {type(exc).__name__}: {exc}")


class DigitalOceanProvider(Metered):
    """DigitalOcean; see the Provider protocol. Credentials: ``DIGITALOCEAN_TOKEN`` (or ``..._ACCESS_TOKEN``)."""

    name = "digitalocean"
    clock = time.time  # when a create is sent: its batch (tests fix it)

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
        self._token = token or next(filter(None, map(os.environ.get, TOKEN_ENVS)), None)
        self._endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self._sdk: Client | None = None
        self._ssh_keys: set[str] = set()  # MD5 fingerprints known to be on the account
        # What the reads know of each droplet this process created or read: its batch tag, or None (it has
        # none, being older than batch tags, or it was gone): read by id. Threads share it (creates, the tick).
        self._batch_of: dict[str, str | None] = {}
        self._batch_sizes: dict[str, int] = {}  # batch tag -> droplets its last list held (+ creates since)
        self._lock = threading.Lock()

    def _client(self) -> Client:
        if self._sdk is None:
            if not self._token:
                raise AuthError(f"no DigitalOcean credentials: set {' or '.join(TOKEN_ENVS)} to an API token")
            self._sdk = Client(
                self._token,
                endpoint=self._endpoint,
                # azure-core's default retries a POST on 5xx and 429; ours decide, and never re-POST blindly.
                retry_policy=RetryPolicy.no_retries(),
                connection_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                # pydo's bearer-token policy refuses http://, which a local fake API (system tests) serves.
                authentication_policy=AzureKeyCredentialPolicy(
                    AzureKeyCredential(self._token), "Authorization", prefix="Bearer"
                ),
                # Every attempt on the wire is charged to the token's budget (workers/budget.py).
                **azure_hooks(lambda: self.meter),
            )
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
        # A first attempt sent nothing before: no droplet of this job can exist, so no lookup by tag.
        if not first_attempt and (adopted := self._adopt(job_id)):
            return adopted
        options = spec.options if isinstance(spec.options, DigitalOceanOptions) else DigitalOceanOptions()
        batch = batch_tag(self.clock())
        body: dict[str, Any] = {
            "name": spec.name,
            "region": spec.region,
            "size": spec.instance_type,
            "image": int(spec.image) if spec.image.isdigit() else spec.image,
            "ssh_keys": [self._ssh_key(ssh_key)],
            "tags": [*(f"{key}:{value}" for key, value in spec.ownership_labels(job_id).items()), batch],
            "ipv6": options.ipv6,
            "monitoring": options.monitoring,
        }
        if startup_script is not None:
            body["user_data"] = startup_script
        if options.vpc_uuid:
            body["vpc_uuid"] = options.vpc_uuid
        try:
            droplet = self._client().droplets.create(body=body)["droplet"]
        except (ServiceResponseError, HttpResponseError) as exc:
            # The request reached the API: a 5xx or a lost answer may still have made the droplet.
            if isinstance(exc, ServiceResponseError) or (exc.status_code or 500) >= 500:
                if adopted := self._adopt(job_id):
                    return adopted
            # A cached key someone deleted from the account since: the next attempt looks it up again.
            self._ssh_keys.discard(ssh_key.md5_fingerprint)
            raise
        self._learn(str(droplet["id"]), batch, created=True)
        return _vm_info(droplet)

    @map_errors(_map_error)
    def get_vm(self, instance_id: str) -> VMInfo:
        """See the protocol. A droplet whose ``create`` action ended ``errored`` after the POST was accepted
        raises CapacityError once its delete is sent, as a refused POST would (the failover that follows
        forgets this id). The action carries no reason (the Actions API has no error field); the request
        itself passed the API's checks, which answer 422 at once, so what failed is building the droplet in
        that region, and another placement may succeed.

        Calls: one GET; one more (the droplet's actions) only while the droplet looks stuck (``new`` for over
        ``CREATE_STUCK_S``, or ``off``/``archive``); one DELETE when its create errored.
        """
        status, body = self._client().droplets.get(_droplet_id(instance_id), cls=_with_status)
        if status == 404:  # pydo returns a 404's error body instead of raising
            raise NotFoundError(f"DigitalOcean: no droplet {instance_id}", provider_code=body.get("id"))
        droplet = body["droplet"]
        self._learn(str(droplet["id"]), _batch_tag_of(droplet))
        if self._create_errored(droplet):
            self.destroy_vm(instance_id)
            raise CapacityError(
                f"DigitalOcean could not create droplet {droplet.get('name')} in "
                f"{(droplet.get('region') or {}).get('slug')}: its create action errored",
                provider_code=CREATE_ERRORED,
            )
        return _vm_info(droplet)

    @map_errors(_map_error)
    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """See the protocol. Reads the batches (one tag-filtered list each, 200 a page) of the droplets asked
        for, or the droplets one by one (GET /v2/droplets/{id}) where that is fewer requests than the
        batch's pages: a batch holds the droplets created in one minute, so the cost follows the VMs in
        flight and the creates of their minutes, never the long-lived fleet of older batches.

        A droplet this process did not create or read before (another worker created it, or this one
        restarted): the batches from the current minute back (at most ``BATCH_LOOKBACK``) are listed while
        the lists so far plus the next cost fewer requests than reading the droplets still unfound by id;
        what remains (created before batch tags existed, by a worker whose clock is ahead, or gone) is read
        by id, and every droplet's batch is remembered for the next read. Calls, per batch of droplets
        seen before: min(its pages, its droplets asked for); for n droplets never seen, at most 2n - 1
        (usually one list: the current minute's).
        """
        wanted = {i for i in instance_ids if i.isdigit()}  # another id is no droplet: absent
        if not wanted:
            return {}
        with self._lock:
            known = {i: self._batch_of[i] for i in wanted if i in self._batch_of}
        groups: dict[str, set[str]] = {}
        for instance_id, batch in known.items():
            if batch is not None:
                groups.setdefault(batch, set()).add(instance_id)
        by_id = {i for i, batch in known.items() if batch is None}
        found: dict[str, dict[str, Any]] = {}
        listed: set[str] = set()
        for batch, ids in sorted(groups.items()):
            if len(ids) < self._list_cost(batch, len(ids)):
                by_id |= ids  # fewer GETs than pages of the batch
            else:
                found |= self._list_batch(batch, wanted)
                listed.add(batch)
        unknown, now, spent = wanted - known.keys(), self.clock(), 0
        for back in range(BATCH_LOOKBACK):
            unknown -= found.keys()
            batch = batch_tag(now - back * BATCH_S)
            if not unknown:
                break
            if batch in listed:
                continue
            cost = self._list_cost(batch, 0)
            if spent + cost >= len(unknown):
                break  # the search never spends more than reading the rest by id would
            found |= self._list_batch(batch, wanted)
            listed.add(batch)
            spent += cost
        for instance_id in sorted(by_id | (unknown - found.keys())):
            if droplet := self._read(instance_id):
                found[instance_id] = droplet
        vms = {}
        for instance_id, droplet in found.items():
            vm = _vm_info(droplet)
            if self._create_errored(droplet):
                # In error here (raised, it would sink the whole batch); the tick reads such a droplet again
                # through get_vm, which fails it over.
                vm = vm.model_copy(update={"status": VMStatus.error, "provider_status": CREATE_ERRORED})
            vms[instance_id] = vm
        return vms

    def destroy_vm(self, instance_id: str) -> None:
        # A 404 comes back from pydo as an error body, not an exception: already gone is success either way.
        with suppress(NotFoundError), map_errors(_map_error):
            self._client().droplets.destroy(_droplet_id(instance_id))

    @map_errors(_map_error)
    def list_owned_vms(self) -> list[VMInfo]:
        return [_vm_info(droplet) for droplet in self._list(f"{LABEL_MANAGED_BY}:vmqueue")]

    def _create_errored(self, droplet: dict[str, Any]) -> bool:
        """Whether the droplet's ``create`` action ended ``errored``; read only while the droplet looks stuck.

        One call: GET /v2/droplets/{id}/actions (the API filters it by nothing; ``type`` and ``status`` are
        read from the answer, docs.digitalocean.com "List Actions for a Droplet"). One page of 200 is
        enough: a droplet whose create errored has no later actions to push it off the page.
        """
        if not _looks_stuck(droplet):
            return False
        status, body = self._client().droplet_actions.list(droplet["id"], per_page=PAGE_SIZE, cls=_with_status)
        if status == 404:  # gone since it was read
            return False
        return any(a.get("type") == "create" and a.get("status") == "errored" for a in body.get("actions") or [])

    def _adopt(self, job_id: str) -> VMInfo | None:
        """The job's droplet if it exists; duplicates (from outside this adapter) are destroyed, oldest kept."""
        found = sorted(self._list(f"{LABEL_JOB}:{job_id}"), key=lambda d: (d["created_at"], d["id"]))
        if not found:
            return None
        for duplicate in found[1:]:
            self.destroy_vm(str(duplicate["id"]))
        self._learn(str(found[0]["id"]), _batch_tag_of(found[0]))
        return _vm_info(found[0])

    def _list_batch(self, batch: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """One batch's droplets (every page), remembered; returns those of ``wanted``."""
        droplets = self._list(batch)
        with self._lock:
            self._batch_sizes[batch] = len(droplets)
            forget_oldest(self._batch_sizes, BATCH_LOOKBACK * 4)
        for droplet in droplets:
            self._learn(str(droplet["id"]), batch)
        return {str(d["id"]): d for d in droplets if str(d["id"]) in wanted}

    def _list_cost(self, batch: str, at_least: int) -> int:
        """Requests a list of ``batch`` takes: its pages as last listed (or created into), at least one."""
        with self._lock:
            size = max(self._batch_sizes.get(batch, 0), at_least)
        return max(1, math.ceil(size / PAGE_SIZE))

    def _read(self, instance_id: str) -> dict[str, Any] | None:
        """One droplet by id (GET /v2/droplets/{id}), remembered; None when it is gone."""
        status, body = self._client().droplets.get(int(instance_id), cls=_with_status)
        if status == 404:  # pydo returns a 404's error body instead of raising
            self._learn(instance_id, None)
            return None
        self._learn(instance_id, _batch_tag_of(body["droplet"]))
        return body["droplet"]

    def _learn(self, instance_id: str, batch: str | None, *, created: bool = False) -> None:
        with self._lock:
            self._batch_of.pop(instance_id, None)  # re-inserted: the newest, forgotten last
            self._batch_of[instance_id] = batch
            forget_oldest(self._batch_of, KNOWN_MAX)
            if created and batch in self._batch_sizes:
                self._batch_sizes[batch] += 1

    def _list(self, tag: str) -> list[dict[str, Any]]:
        droplets, page = [], 1
        while True:
            answer = self._client().droplets.list(tag_name=tag, per_page=PAGE_SIZE, page=page)
            droplets += answer["droplets"]
            if not answer.get("links", {}).get("pages", {}).get("next"):
                return droplets
            page += 1

    def _ssh_key(self, key: SSHPublicKey) -> str:
        """The key's MD5 fingerprint, which droplet creation accepts; the key is added once, shared by every job.

        Checked once per fingerprint per process (one token is one account); later creates send no lookup.
        """
        if key.md5_fingerprint in self._ssh_keys:
            return key.md5_fingerprint
        keys = self._client().ssh_keys
        status, _ = keys.get(key.md5_fingerprint, cls=_with_status)
        if status == 404:
            try:
                keys.create(body={"name": f"vmqueue-{key.md5_fingerprint.replace(':', '')}", "public_key": key.openssh})
            except HttpResponseError as exc:
                # Another job added the same key since our lookup.
                if exc.status_code != 422 or "already in use" not in str(_error_body(exc).get("message")):
                    raise
        self._ssh_keys.add(key.md5_fingerprint)
        return key.md5_fingerprint

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive a droplet:
        a droplet's addresses and disk are the droplet's own, gone with it
        (DigitalOcean API, "Delete an Existing Droplet"), and the SSH key is one per fingerprint, shared
        by every job and kept on purpose."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"digitalocean creates no {resource.kind} beside a droplet: nothing to delete")


def batch_tag(at_s: float) -> str:
    """The batch tag of a create sent at ``at_s`` (epoch seconds): its UTC minute, ``vmqueue-batch-YYYYMMDDHHMM``."""
    return BATCH_PREFIX + batch_minute(at_s)


def _batch_tag_of(droplet: dict[str, Any]) -> str | None:
    return next((tag for tag in droplet.get("tags") or [] if tag.startswith(BATCH_PREFIX)), None)


def _droplet_id(instance_id: str) -> int:
    if not instance_id.isdigit():
        raise NotFoundError(f"DigitalOcean: {instance_id!r} is not a droplet id", provider_code="not_found")
    return int(instance_id)


def _looks_stuck(droplet: dict[str, Any]) -> bool:
    """``off``/``archive``, or ``new`` for longer than a healthy create takes: how a failed create leaves it."""
    status = droplet.get("status")
    if status in ("off", "archive"):
        return True
    if status != "new" or not droplet.get("created_at"):
        return False
    created = datetime.fromisoformat(droplet["created_at"].replace("Z", "+00:00"))
    return (datetime.now(UTC) - created).total_seconds() > CREATE_STUCK_S


def _vm_info(droplet: dict[str, Any]) -> VMInfo:
    networks = droplet.get("networks") or {}
    return VMInfo(
        provider="digitalocean",
        instance_id=str(droplet["id"]),
        name=droplet.get("name"),
        status=STATUS_MAP.get(droplet.get("status", ""), VMStatus.unknown),
        provider_status=droplet.get("status"),
        public_ipv4=_address(networks.get("v4"), "public"),
        public_ipv6=_address(networks.get("v6"), "public"),
        private_ipv4=_address(networks.get("v4"), "private"),
        region=(droplet.get("region") or {}).get("slug"),
        instance_type=droplet.get("size_slug"),
        image=_image_name(droplet.get("image") or {}),
        # Tags are flat ("vmqueue-job:<id>"); a tag without a colon reads as a label with an empty value.
        # The batch tag is the adapter's bookkeeping, not a label.
        labels=dict(tag.partition(":")[::2] for tag in droplet.get("tags") or [] if not tag.startswith(BATCH_PREFIX)),
        created_at=droplet.get("created_at"),
    )


def _address(entries: list[dict[str, Any]] | None, kind: str) -> str | None:
    return next((entry["ip_address"] for entry in entries or [] if entry.get("type") == kind), None)


def _image_name(image: dict[str, Any]) -> str | None:
    # Snapshots and custom images have no slug.
    return image.get("slug") or (str(image["id"]) if "id" in image else None)


def _with_status(pipeline_response: Any, deserialized: Any, headers: Any) -> tuple[int, dict[str, Any]]:
    """pydo's ``cls=`` hook: the HTTP status beside the body, since pydo answers some 404s without raising."""
    return pipeline_response.http_response.status_code, deserialized or {}


def _error_body(exc: HttpResponseError) -> dict[str, Any]:
    """The API's ``{"id", "message"}``; pydo leaves ``exc.error`` empty."""
    try:
        body = exc.response.json() if exc.response is not None else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after_s(headers: Any) -> float | None:
    """``Retry-After`` (seconds, sent on bursts), else the ``ratelimit-reset`` unix time of the hourly
    limit; a reset already past is no hint (None: the caller's backoff decides)."""
    with suppress(TypeError, ValueError, KeyError):
        return float(headers["retry-after"])
    with suppress(TypeError, KeyError):
        return seconds_until(headers["ratelimit-reset"])
    return None
