"""Google Compute Engine through google-cloud-compute; see the protocol in ``base.py`` and PROVIDERS.md "GCP".

Instance ids are ``<project>/<zone>/<name>`` (the tail of the instance's selfLink): a GCE instance is
addressed by all three, and the name is fixed before the insert, so the id is known even when the
insert's answer is lost.

Credentials are Application Default Credentials; the project is ``options.project``, else
``GOOGLE_CLOUD_PROJECT``, else ADC's own. ``VMQ_GCP_ENDPOINT`` overrides the API endpoint; a plain
``http://`` endpoint is taken for an emulator and gets anonymous credentials (as Google's emulators do),
so a real token never travels unencrypted.

Insert errors often arrive after the insert was accepted (quota, ZONE_RESOURCE_POOL_EXHAUSTED): the
instance never appears, or appears and vanishes. ``get_vm`` resolves a 404 through the instance's latest
insert operation (one filtered zoneOperations.list), so a failed insert raises its own error, an insert
still running reads as pending, and only a finished insert whose instance is gone reads as NotFound.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from datetime import datetime
from typing import Any

import google.auth
import requests
from google.api_core.exceptions import GoogleAPICallError
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.exceptions import GoogleAuthError, TransportError
from google.cloud import compute_v1
from requests.adapters import HTTPAdapter

from vmqueue.images import IMAGES
from vmqueue.models import LABEL_JOB, VMInfo, VMSpec, VMStatus
from vmqueue.options import GCPOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import gcp_metadata
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
)
from workers.providers.metering import Metered, mount_metered

CALL_TIMEOUT_S = 30.0
OWNED_FILTER = 'labels.managed-by = "vmqueue"'
LIST_PAGE_SIZE = 500  # the API's largest page
NAME_CHUNK = 50  # names per batched-read filter: keeps the URL short (no limit is published; unverified)
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
# Fixed forever: a new namespace would give every in-flight job a new request_id.
REQUEST_ID_NAMESPACE = uuid.UUID("6f1c1f0e-3a55-4d0e-9a8e-7d3c2b1a0f99")
CREDENTIAL_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run "
    "'gcloud auth application-default login') and GOOGLE_CLOUD_PROJECT"
)

STATUS_MAP: dict[str, VMStatus] = {
    "PROVISIONING": VMStatus.pending,
    "STAGING": VMStatus.pending,
    "PENDING": VMStatus.pending,
    "RUNNING": VMStatus.running,
    "STOPPING": VMStatus.stopping,
    "PENDING_STOP": VMStatus.stopping,
    "SUSPENDING": VMStatus.stopping,
    "DEPROVISIONING": VMStatus.stopping,
    "STOPPED": VMStatus.stopped,
    "SUSPENDED": VMStatus.stopped,
    "TERMINATED": VMStatus.stopped,  # stopped, not deleted: a deleted instance is a 404
    "REPAIRING": VMStatus.unknown,
}

# ``error.errors[].reason`` of an HTTP error; 403 alone covers IAM, rate limits and quota.
REASONS: dict[str, type[ProviderError]] = {
    "rateLimitExceeded": RateLimitedError,
    "userRateLimitExceeded": RateLimitedError,
    "quotaExceeded": QuotaExceededError,
    "forbidden": AuthError,
    "accessNotConfigured": AuthError,
    "insufficientPermissions": AuthError,
    "authError": AuthError,
    "resourceNotReady": TransientError,  # a 400: the resource is busy with another operation
    "backendError": TransientError,
}
HTTP_STATUSES: dict[int, type[ProviderError]] = {
    400: InvalidSpecError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    429: RateLimitedError,
}
# ``error.errors[].code`` of a zone operation that failed after it was accepted.
OPERATION_ERRORS: dict[str, type[ProviderError]] = {
    "QUOTA_EXCEEDED": QuotaExceededError,
    "ZONE_RESOURCE_POOL_EXHAUSTED": CapacityError,
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": CapacityError,
    "RESOURCE_NOT_FOUND": InvalidSpecError,
    "INVALID_FIELD_VALUE": InvalidSpecError,
    "UNSUPPORTED_OPERATION": InvalidSpecError,
    "RATE_LIMIT_EXCEEDED": RateLimitedError,
}


def _map_error(exc: Exception) -> ProviderError:
    if isinstance(exc, requests.ConnectionError | requests.Timeout | TransportError):
        return TransientError(str(exc), provider_code=type(exc).__name__)
    if isinstance(exc, GoogleAuthError):  # DefaultCredentialsError, RefreshError, ...
        return AuthError(f"no usable Google credentials ({exc}): {CREDENTIAL_HINT}", provider_code=type(exc).__name__)
    if not isinstance(exc, GoogleAPICallError):
        return ProviderError(str(exc), provider_code=type(exc).__name__)
    reasons = [e.get("reason") for e in exc.errors or () if isinstance(e, dict)] + [exc.reason]
    reason = next((r for r in reasons if r), None)
    cls = next((REASONS[r] for r in reasons if r in REASONS), None) or HTTP_STATUSES.get(exc.code or 0)
    if cls is None:
        cls = TransientError if (exc.code or 0) >= 500 else ProviderError
    retry_after = exc.response.headers.get("Retry-After", "") if exc.response is not None else ""
    return cls(
        exc.message,
        provider_code=reason or str(exc.code),
        retry_after_s=float(retry_after) if retry_after.isdigit() else None,
    )


def _map_insert_error(exc: Exception) -> ProviderError:
    """An insert's 404 names a missing image, machine type, zone or network: the spec, not the VM."""
    error = _map_error(exc)
    return InvalidSpecError(error.message, provider_code=error.provider_code) if type(error) is NotFoundError else error


class GCPProvider(Metered):
    """Compute Engine instances; see the ``Provider`` protocol."""

    name = "gcp"

    def __init__(
        self,
        credentials: Credentials | None = None,
        *,
        project: str | None = None,
        api_endpoint: str | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ):
        self._credentials = credentials
        self._project = project or os.getenv("GOOGLE_CLOUD_PROJECT")
        self.api_endpoint = api_endpoint or os.getenv("VMQ_GCP_ENDPOINT")
        self.timeout_s = timeout_s
        self._clients: dict[type, Any] = {}
        self._lock = threading.Lock()

    def _client(self, client_cls: type) -> Any:
        """One REST client per class, made on first use: the constructor resolves credentials."""
        with self._lock, map_errors(_map_error):
            if client_cls not in self._clients:
                options = {"api_endpoint": self.api_endpoint} if self.api_endpoint else None
                client = client_cls(credentials=self._adc(), client_options=options, transport="rest")
                # Every request on the wire is charged to the project's budget (workers/budget.py); the
                # REST transport's AuthorizedSession is a requests session.
                mount_metered(client._transport._session, HTTPAdapter, lambda: self.meter)
                self._clients[client_cls] = client
            return self._clients[client_cls]

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        """Aliases are public image families: the family, not today's image, is the fixed parameter."""
        family = IMAGES["gcp"].get(spec.image)
        return spec.model_copy(update={"image": family}) if family else spec

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        opts = spec.options if isinstance(spec.options, GCPOptions) else GCPOptions()
        project, zone = opts.project or self._default_project(), spec.region
        labels = {key: _label_value(value) for key, value in spec.ownership_labels(job_id).items()}
        try:
            metadata = gcp_metadata(opts.ssh_user, ssh_key, startup_script, spec.image)
        except ValueError as exc:
            raise InvalidSpecError(str(exc)) from None
        nat = [compute_v1.AccessConfig(type_="ONE_TO_ONE_NAT", name="External NAT")] if opts.external_ip else []
        instance = compute_v1.Instance(
            name=spec.name,
            machine_type=f"zones/{zone}/machineTypes/{spec.instance_type}",
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,  # the boot disk goes with the VM
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=spec.image, disk_size_gb=opts.disk_size_gb
                    ),
                )
            ],
            network_interfaces=[
                compute_v1.NetworkInterface(network=opts.network, subnetwork=opts.subnetwork, access_configs=nat)
            ],
            metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in metadata.items()]),
            labels=labels,
        )
        instance_id = f"{project}/{zone}/{spec.name}"
        request = compute_v1.InsertInstanceRequest(
            project=project,
            zone=zone,
            instance_resource=instance,
            request_id=str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{job_id}:create")),
        )
        try:
            with map_errors(_map_insert_error):
                op = self._client(compute_v1.InstancesClient).insert_unary(
                    request=request, retry=None, timeout=self.timeout_s
                )
        except ProviderError as exc:
            if exc.provider_code != "alreadyExists":
                raise
            return self._adopt(instance_id, labels[LABEL_JOB])
        if op.error.errors:
            raise _operation_error(op)
        return VMInfo(
            provider="gcp",
            instance_id=instance_id,
            name=spec.name,
            status=VMStatus.pending,
            region=zone,
            instance_type=spec.instance_type,
            image=spec.image,
            labels=labels,
        )

    def get_vm(self, instance_id: str) -> VMInfo:
        vm = self._read(instance_id)
        if isinstance(vm, ProviderError):
            raise vm
        return vm

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """An aggregated list per project filtered to the asked names (every zone at once), kept to ``instance_ids``.

        Calls: one per project per ``NAME_CHUNK`` ids asked, however many instances the project holds
        (the filter is ``(name = "a") OR (name = "b") ...``; an instance of that name in another zone is
        listed and left out), plus two (a GET, an operations list) for each asked id the list lacks.
        Those go through ``get_vm``'s read because on GCP "not listed" is not "not found": an insert
        may still run (pending) or have failed after it was accepted (quota,
        ZONE_RESOURCE_POOL_EXHAUSTED). A failed insert reads as a VM in ``error`` whose provider_status
        names the operation's error, rather than raising it: raised, it would fail the read of every
        other VM in the batch, tick after tick. Only an insert that succeeded and whose instance is
        gone reads as absent.
        """
        by_project: dict[str, set[str]] = {}
        for instance_id in instance_ids:
            try:
                by_project.setdefault(_split_id(instance_id)[0], set()).add(instance_id)
            except InvalidSpecError:
                continue  # not a GCP id: get_vm says why; here it must not sink the batch
        found: dict[str, VMInfo] = {}
        for project, asked in by_project.items():
            names = sorted({_split_id(instance_id)[2] for instance_id in asked})
            for start in range(0, len(names), NAME_CHUNK):
                terms = " OR ".join(f'(name = "{name}")' for name in names[start : start + NAME_CHUNK])
                request = compute_v1.AggregatedListInstancesRequest(
                    project=project, filter=terms, max_results=LIST_PAGE_SIZE
                )
                with map_errors(_map_error):
                    pages = self._client(compute_v1.InstancesClient).aggregated_list(
                        request=request, retry=None, timeout=self.timeout_s
                    )
                    for _zone, scoped in pages:
                        for instance in scoped.instances:
                            vm = _vm_info(project, instance)
                            if vm.instance_id in asked:
                                found[vm.instance_id] = vm
            for instance_id in asked - found.keys():
                try:
                    vm = self._read(instance_id)
                except NotFoundError:
                    continue
                found[instance_id] = vm if isinstance(vm, VMInfo) else _failed_insert(instance_id, vm)
        return found

    def _read(self, instance_id: str) -> VMInfo | ProviderError:
        """``get_vm``'s read; an insert that failed after it was accepted is returned (its error), not raised."""
        project, zone, name = _split_id(instance_id)
        try:
            with map_errors(_map_error):
                instance = self._client(compute_v1.InstancesClient).get(
                    project=project, zone=zone, instance=name, retry=None, timeout=self.timeout_s
                )
        except NotFoundError as exc:
            op = self._last_insert(project, zone, name)
            if op is None or (op.status == compute_v1.Operation.Status.DONE and not op.error.errors):
                raise
            if op.error.errors:
                failure = _operation_error(op)
                failure.__cause__ = exc  # as ``raise ... from exc`` would, for get_vm's caller
                return failure
            return VMInfo(
                provider="gcp",
                instance_id=instance_id,
                name=name,
                status=VMStatus.pending,
                provider_status=f"insert {op.status.name}",
                region=zone,
            )
        return _vm_info(project, instance)

    def destroy_vm(self, instance_id: str) -> None:
        """Delete; the boot disk goes with it (auto_delete). Unknown or gone: success.

        No request_id: names are reused after a delete, and a fixed id would make GCP ignore the
        delete of a later VM of the same name as a duplicate.
        """
        project, zone, name = _split_id(instance_id)
        try:
            with map_errors(_map_error):
                self._client(compute_v1.InstancesClient).delete_unary(
                    project=project, zone=zone, instance=name, retry=None, timeout=self.timeout_s
                )
        except NotFoundError:
            return None

    def list_owned_vms(self) -> list[VMInfo]:
        """One filtered aggregated list (paged) over every zone of the default project."""
        project = self._default_project()
        request = compute_v1.AggregatedListInstancesRequest(
            project=project, filter=OWNED_FILTER, max_results=LIST_PAGE_SIZE
        )
        with map_errors(_map_error):
            pages = self._client(compute_v1.InstancesClient).aggregated_list(
                request=request, retry=None, timeout=self.timeout_s
            )
            return [_vm_info(project, instance) for _zone, scoped in pages for instance in scoped.instances]

    def _adc(self) -> Credentials:
        if self._credentials is None:
            if (self.api_endpoint or "").startswith("http://"):
                self._credentials = AnonymousCredentials()
            else:
                self._credentials, adc_project = google.auth.default(scopes=SCOPES)
                self._project = self._project or adc_project
        return self._credentials

    def _default_project(self) -> str:
        self._client(compute_v1.InstancesClient)  # resolves ADC, which may name the project
        if not self._project:
            raise AuthError(f"no Google Cloud project: set options.project or GOOGLE_CLOUD_PROJECT ({CREDENTIAL_HINT})")
        return self._project

    def _adopt(self, instance_id: str, job_label: str) -> VMInfo:
        """409 on insert: the name is taken. Ours if it carries this job's label (a lost answer)."""
        vm = self.get_vm(instance_id)
        if vm.labels.get(LABEL_JOB) != job_label:
            raise InvalidSpecError(
                f"an instance {instance_id} already exists and is not this job's; choose another name",
                provider_code="alreadyExists",
            )
        return vm

    def _last_insert(self, project: str, zone: str, name: str) -> compute_v1.Operation | None:
        request = compute_v1.ListZoneOperationsRequest(
            project=project,
            zone=zone,
            filter=f"(operationType eq insert) (targetLink eq .*/zones/{zone}/instances/{name})",
            order_by="creationTimestamp desc",
            max_results=1,
        )
        with map_errors(_map_error):
            pages = self._client(compute_v1.ZoneOperationsClient).list(
                request=request, retry=None, timeout=self.timeout_s
            )
            # Only this instance's insert: the answer is kept to the target asked for, whatever the filter matched.
            target = f"/zones/{zone}/instances/{name}"
            return next((op for op in pages if op.target_link.endswith(target)), None)

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive an instance:
        the boot disk is created with ``autoDelete`` and the external IP is
        ephemeral, both gone with the instance (Compute Engine API, instances.insert: ``disks[].autoDelete``,
        ``accessConfigs`` without ``natIP``)."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"gcp creates no {resource.kind} beside an instance: nothing to delete")


def _split_id(instance_id: str) -> tuple[str, str, str]:
    parts = instance_id.split("/")
    if len(parts) != 3 or not all(parts):
        raise InvalidSpecError(f"GCP instance id {instance_id!r} is not '<project>/<zone>/<name>'")
    return parts[0], parts[1], parts[2]


def _label_value(value: str) -> str:
    """GCP label values: at most 63 of lowercase letters, digits, '_' and '-'."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def _operation_error(op: compute_v1.Operation) -> ProviderError:
    codes = [error.code for error in op.error.errors]
    cls = next((OPERATION_ERRORS[code] for code in codes if code in OPERATION_ERRORS), ProviderError)
    message = "; ".join(error.message for error in op.error.errors) or op.http_error_message
    return cls(f"operation {op.name} failed: {message}", provider_code=codes[0] if codes else None)


def _failed_insert(instance_id: str, failure: ProviderError) -> VMInfo:
    """A VM whose insert failed after it was accepted: in error, the operation's error as its raw status."""
    _, zone, name = _split_id(instance_id)
    return VMInfo(
        provider="gcp",
        instance_id=instance_id,
        name=name,
        status=VMStatus.error,
        provider_status=f"insert failed: {failure}",
        region=zone,
    )


def _vm_info(project: str, instance: compute_v1.Instance) -> VMInfo:
    zone = instance.zone.rsplit("/", 1)[-1]
    # The primary interface is nic0 (GCE names interfaces nic0, nic1, ... in creation order); the list's
    # order is not promised, and a secondary's address is not where SSH reaches the VM.
    nics = [n for n in instance.network_interfaces if n.name == "nic0"] or list(instance.network_interfaces)[:1]
    return VMInfo(
        provider="gcp",
        instance_id=f"{project}/{zone}/{instance.name}",
        name=instance.name,
        status=STATUS_MAP.get(instance.status, VMStatus.unknown),
        provider_status=instance.status,
        public_ipv4=next((a.nat_i_p for n in nics for a in n.access_configs if a.nat_i_p), None),
        public_ipv6=next((a.external_ipv6 for n in nics for a in n.ipv6_access_configs if a.external_ipv6), None),
        private_ipv4=next((n.network_i_p for n in nics if n.network_i_p), None),
        region=zone,
        instance_type=instance.machine_type.rsplit("/", 1)[-1] or None,
        labels=dict(instance.labels),
        created_at=datetime.fromisoformat(instance.creation_timestamp) if instance.creation_timestamp else None,
    )
