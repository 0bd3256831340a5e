"""Oracle Cloud Infrastructure adapter (see the Provider protocol in ``base.py``).

Credentials: instance principals when ``OCI_AUTH=instance_principal``; else the ``OCI_CLI_*`` variables
when ``OCI_CLI_USER`` is set; else the config file ``OCI_CONFIG_FILE`` (profile ``OCI_CONFIG_PROFILE``).
The instance id is the instance OCID; its region comes from the OCID. ``VMQ_OCI_ENDPOINT`` points every
client at one endpoint (a local fake in system tests). Idempotency: ``opc_retry_token`` from the job id,
and a lookup by display name and the ``vmqueue-job`` tag when the token cannot answer.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, NamedTuple

from vmqueue.images import IMAGES
from vmqueue.models import LABEL_JOB, LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus
from vmqueue.options import OCIOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import oci_metadata
from workers.providers.base import SETTLED_STATUSES
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
from workers.providers.lookups import Lookups
from workers.providers.metering import Metered, mount_metered

ENDPOINT_ENV = "VMQ_OCI_ENDPOINT"
TIMEOUT_S = (10.0, 60.0)  # (connect, read): the threads pool enforces no time limit of its own
CREDENTIAL_VARS = (
    "OCI_CLI_USER, OCI_CLI_TENANCY, OCI_CLI_FINGERPRINT, OCI_CLI_KEY_FILE or OCI_CLI_KEY_CONTENT, OCI_CLI_REGION"
)

# Every lifecycleState of oci/core/models/instance.py.
STATUS_MAP: dict[str, VMStatus] = {
    "PROVISIONING": VMStatus.pending,
    "STARTING": VMStatus.pending,
    "RUNNING": VMStatus.running,
    "STOPPING": VMStatus.stopping,
    "STOPPED": VMStatus.stopped,
    "TERMINATING": VMStatus.terminating,
    "TERMINATED": VMStatus.terminated,
    "CREATING_IMAGE": VMStatus.unknown,
    "MOVING": VMStatus.unknown,
}
GONE_STATES = ("TERMINATING", "TERMINATED")
_OCID = re.compile(r"ocid1\.[\w.-]+")  # nothing in it needs quoting inside a Search query's '...'
SEARCH_CHUNK = 50  # ids per Search query: keeps the query short (no length limit is published; unverified)

_AUTH_CODES = {"NotAuthenticated", "NotAuthorized"}
_SPEC_CODES = {
    "InvalidParameter",
    "MissingParameter",
    "RelatedResourceNotAuthorizedOrNotFound",
    "Conflict",
    "CannotParseRequest",
}
_QUOTA_CODES = {"LimitExceeded", "QuotaExceeded"}
_TRANSIENT_CODES = {"IncorrectState", "LockConflict"}


def _map_error(exc: Exception) -> ProviderError:
    import oci

    if isinstance(exc, oci.exceptions.ServiceError):
        status, code, message = exc.status, exc.code, exc.message or str(exc)
        if status in (401, 403) or code in _AUTH_CODES:
            return AuthError(f"OCI refused the credentials: {message}", provider_code=code)
        if status == 404:
            return NotFoundError(message, provider_code=code)
        if status == 429:
            return RateLimitedError(message, provider_code=code, retry_after_s=_retry_after(exc.headers))
        if code in _QUOTA_CODES:
            return QuotaExceededError(message, provider_code=code)
        # "Out of host capacity." is a 500: read as a 5xx it would be retried at full speed forever.
        if "out of host capacity" in message.lower():
            return CapacityError(message, provider_code=code)
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(message, provider_code=code)
        if code in _SPEC_CODES or status == 400:
            return InvalidSpecError(message, provider_code=code)
        return ProviderError(message, provider_code=code)
    if isinstance(exc, oci.exceptions.ClientError):  # config, key file, passphrase: all client-side
        return AuthError(f"OCI credentials are missing or invalid ({exc}); set {CREDENTIAL_VARS}, or OCI_CONFIG_FILE")
    if isinstance(exc, OSError):  # the vendored requests' connection errors and timeouts
        return TransientError(f"OCI request failed: {exc}", provider_code=type(exc).__name__)
    return ProviderError(str(exc), provider_code=type(exc).__name__)


class _Clients(NamedTuple):
    compute: Any
    network: Any
    search: Any


class OCIProvider(Metered):
    """OCI Compute; see the Provider protocol."""

    name = "oci"

    def __init__(
        self, config: dict[str, Any] | None = None, signer: Any = None, service_endpoint: str | None = None
    ) -> None:
        self._config = config
        self._signer = signer
        self._endpoint = service_endpoint or os.environ.get(ENDPOINT_ENV) or None
        self._clients: dict[str, _Clients] = {}
        self._lock = threading.Lock()
        self._images = Lookups()  # (region, compartment, OS, version, shape) -> newest image OCID

    def _client(self, region: str | None = None) -> _Clients:
        """The clients of one region (default: the config's), made on first use."""
        import oci

        with self._lock, map_errors(_map_error):
            if self._config is None:
                self._config, self._signer = _load_config(self._signer)
            region = region or self._config.get("region") or ""
            if region not in self._clients:
                kwargs: dict[str, Any] = {
                    "retry_strategy": oci.retry.NoneRetryStrategy(),
                    "circuit_breaker_strategy": oci.circuit_breaker.NoCircuitBreakerStrategy(),
                    "timeout": TIMEOUT_S,
                }
                if self._signer is not None:
                    kwargs["signer"] = self._signer
                if self._endpoint:
                    kwargs["service_endpoint"] = self._endpoint
                config = {**self._config, "region": region}
                clients = _Clients(
                    oci.core.ComputeClient(config, **kwargs),
                    oci.core.VirtualNetworkClient(config, **kwargs),
                    oci.resource_search.ResourceSearchClient(config, **kwargs),
                )
                # Every request on the wire is charged to the tenancy's budget (workers/budget.py); OCI
                # sends through its vendored copy of requests.
                # (its https adapter keeps OCI's own transport behaviour; the subclass only wraps send).
                for client in clients:
                    mount_metered(client.base_client.session, oci.base_client.OCIHTTPAdapter, lambda: self.meter)
                self._clients[region] = clients
            return self._clients[region]

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        """Resolve an image alias to the newest platform image OCID of that OS and version (asked once
        per region, compartment, shape and hour: workers/providers/lookups.py)."""
        if spec.image not in IMAGES["oci"]:
            if spec.image.startswith("ocid1.image."):
                return spec
            raise InvalidSpecError(
                f"OCI has no platform image for {spec.image!r}; use {', '.join(IMAGES['oci'])} or an image OCID"
            )
        opts = _options(spec)
        operating_system, version = IMAGES["oci"][spec.image].split(":")

        def lookup() -> str:
            with map_errors(_map_error):
                images = (
                    self._client(spec.region)
                    .compute.list_images(
                        opts.compartment_id,
                        operating_system=operating_system,
                        operating_system_version=version,
                        shape=spec.instance_type,
                        sort_by="TIMECREATED",
                        sort_order="DESC",
                        lifecycle_state="AVAILABLE",
                    )
                    .data
                )
            if not images:
                raise InvalidSpecError(f"no {operating_system} {version} image for shape {spec.instance_type}")
            return images[0].id

        key = (spec.region, opts.compartment_id, operating_system, version, spec.instance_type)
        return spec.model_copy(update={"image": self._images.get(key, lookup)})

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        from oci.core.models import (
            CreateVnicDetails,
            InstanceSourceViaImageDetails,
            LaunchInstanceDetails,
            LaunchInstanceShapeConfigDetails,
        )

        opts = _options(spec)
        metadata = oci_metadata(ssh_key, startup_script)  # what the producer measured against the 32,000 bytes
        shape_config = None
        if opts.ocpus is not None or opts.memory_gb is not None:
            shape_config = LaunchInstanceShapeConfigDetails(ocpus=opts.ocpus, memory_in_gbs=opts.memory_gb)
        details = LaunchInstanceDetails(
            compartment_id=opts.compartment_id,
            availability_domain=opts.availability_domain,
            display_name=spec.name,
            shape=spec.instance_type,
            shape_config=shape_config,
            source_details=InstanceSourceViaImageDetails(image_id=spec.image),
            create_vnic_details=CreateVnicDetails(subnet_id=opts.subnet_id, assign_public_ip=opts.assign_public_ip),
            metadata=metadata,
            freeform_tags=spec.ownership_labels(job_id),
        )
        compute = self._client(spec.region).compute
        try:
            with map_errors(_map_error):
                # The same token for every attempt of this job: OCI answers a repeat with the first instance.
                instance = compute.launch_instance(details, opc_retry_token=f"vmq-create-{job_id}"[:64]).data
        except ProviderError as exc:
            lost = isinstance(exc, TransientError) or exc.provider_code == "InvalidatedRetryToken"
            if not lost or not (found := self._find_job_instance(compute, spec, job_id)):
                raise
            instance = found
        return _info(instance)

    def get_vm(self, instance_id: str) -> VMInfo:
        return self._read(instance_id)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """One Resource Search query per region per ``SEARCH_CHUNK`` ids (``identifier = ... || ...``).

        An OCID names its region but not its compartment, and ``list_instances`` needs the compartment,
        so the tenancy-wide Search is the one call that reads many instances by id. It has no IPs and
        indexes new instances late (a PROVISIONING one may be missing), so it answers only for VMs
        still on their way (pending, stopped...). A VM it shows settled (running, terminated...) or does
        not show at all is read through ``get_instance`` (absent on 404), plus its VNIC (2 calls) when
        RUNNING, so a VM that ends a job's wait reads as ``get_vm`` reads it, IPs included. Calls:
        ⌈M/50⌉ searches per region, plus 1 per VM Search lacks and 3 once per VM as it settles.
        Search shows only what the credentials may inspect; what it misses takes the per-id read,
        so a narrow policy costs calls, never a wrong answer.
        """
        from oci.resource_search.models import StructuredSearchDetails

        by_region: dict[str | None, list[str]] = {}
        for instance_id in dict.fromkeys(instance_ids):
            if _OCID.fullmatch(instance_id):  # anything else cannot go in a query: the per-id read below 404s it
                by_region.setdefault(_region_of(instance_id), []).append(instance_id)
        found: dict[str, VMInfo] = {}
        for region, ids in by_region.items():
            search = self._client(region).search
            for start in range(0, len(ids), SEARCH_CHUNK):
                chunk = ids[start : start + SEARCH_CHUNK]
                terms = " || ".join(f"identifier = '{instance_id}'" for instance_id in chunk)
                query = f"query instance resources where ({terms})"
                with map_errors(_map_error):
                    items = _all_pages(search.search_resources, StructuredSearchDetails(query=query), limit=len(chunk))
                for item in items:
                    vm = _summary_info(item)
                    if item.identifier in chunk and vm.status not in SETTLED_STATUSES:
                        found[item.identifier] = vm
        for instance_id in dict.fromkeys(instance_ids):
            if instance_id not in found:
                try:
                    found[instance_id] = self._read(instance_id, vnic_states=("RUNNING",))
                except NotFoundError:
                    continue
        return found

    def _read(self, instance_id: str, vnic_states: tuple[str, ...] | None = None) -> VMInfo:
        """``get_instance``, then the VNIC (2 calls) in ``vnic_states`` (default: any state but gone)."""
        clients = self._client(_region_of(instance_id))
        with map_errors(_map_error):
            instance = clients.compute.get_instance(instance_id).data
            state = instance.lifecycle_state
            wants_vnic = state not in GONE_STATES if vnic_states is None else state in vnic_states
            vnic = None
            if wants_vnic:
                vnic = self._primary_vnic(clients, instance)
        return _info(instance, vnic)

    def _primary_vnic(self, clients: _Clients, instance: Any) -> Any | None:
        """The instance's primary VNIC (``isPrimary``), where its public and private IPs live.

        ``isPrimary`` is a property of the VNIC, not of its attachment, so the attached VNICs are read
        in the order they were attached (the primary comes with the launch) until the primary turns up:
        one GET for a single-VNIC instance. Attachments of another instance are never taken.
        """
        attachments = _all_pages(
            clients.compute.list_vnic_attachments, compartment_id=instance.compartment_id, instance_id=instance.id
        )
        attached = sorted(
            (a for a in attachments if a.lifecycle_state == "ATTACHED" and a.instance_id == instance.id),
            key=lambda a: (a.time_created is None, a.time_created or 0),
        )
        for attachment in attached:
            vnic = clients.network.get_vnic(attachment.vnic_id).data
            if vnic.is_primary:
                return vnic
        return None  # the primary is not attached yet: no addresses rather than a secondary's

    def destroy_vm(self, instance_id: str) -> None:
        compute = self._client(_region_of(instance_id)).compute
        try:
            with map_errors(_map_error):
                # The boot volume goes with the instance; the VNIC is the instance's own.
                compute.terminate_instance(instance_id, preserve_boot_volume=False)
        except NotFoundError:
            return None
        except TransientError as exc:
            # A repeat on an instance already on its way out answers 409 IncorrectState.
            if exc.provider_code != "IncorrectState" or self.get_vm(instance_id).provider_status not in GONE_STATES:
                raise
        return None

    def list_owned_vms(self) -> list[VMInfo]:
        """Every region-local instance tagged managed-by=vmqueue, across compartments (Resource Search).

        Search indexes new instances with a lag, so one still PROVISIONING may be missing. Every page
        is read (``opc-next-page``).
        """
        from oci.resource_search.models import StructuredSearchDetails

        query = (
            f"query instance resources where (freeformTags.key = '{LABEL_MANAGED_BY}'"
            " && freeformTags.value = 'vmqueue')"
        )
        with map_errors(_map_error):
            found = _all_pages(self._client().search.search_resources, StructuredSearchDetails(query=query))
        return [_summary_info(item) for item in found]

    def _find_job_instance(self, compute: Any, spec: VMSpec, job_id: str) -> Any | None:
        """The live instance this job launched, when the retry token could not tell us."""
        with map_errors(_map_error):
            instances = _all_pages(compute.list_instances, _options(spec).compartment_id, display_name=spec.name)
        mine = [
            i
            for i in instances
            if (i.freeform_tags or {}).get(LABEL_JOB) == job_id and i.lifecycle_state not in GONE_STATES
        ]
        return mine[0] if mine else None

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive an instance:
        the boot volume goes with the instance (``terminate_instance`` with
        ``preserve_boot_volume=False``) and the primary VNIC is the instance's own (OCI Compute API,
        TerminateInstance)."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"oci creates no {resource.kind} beside an instance: nothing to delete")


def _all_pages(list_call: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Every item of an OCI list or search call: ``oci.pagination`` passes each ``opc-next-page``
    token back as ``page`` until none comes (one call per page)."""
    from oci.pagination import list_call_get_all_results

    return list_call_get_all_results(list_call, *args, **kwargs).data


def _load_config(signer: Any) -> tuple[dict[str, Any], Any]:
    import oci

    if os.environ.get("OCI_AUTH") == "instance_principal":
        signer = signer or oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
        return {"region": os.environ.get("OCI_CLI_REGION") or signer.region}, signer
    if os.environ.get("OCI_CLI_USER"):
        env = {
            "user": "OCI_CLI_USER",
            "tenancy": "OCI_CLI_TENANCY",
            "fingerprint": "OCI_CLI_FINGERPRINT",
            "key_file": "OCI_CLI_KEY_FILE",
            "key_content": "OCI_CLI_KEY_CONTENT",
            "region": "OCI_CLI_REGION",
        }
        config = {key: os.environ[var] for key, var in env.items() if os.environ.get(var)}
    else:
        try:
            config = oci.config.from_file(
                os.environ.get("OCI_CONFIG_FILE", oci.config.DEFAULT_LOCATION),
                os.environ.get("OCI_CONFIG_PROFILE", "DEFAULT"),
            )
        except oci.exceptions.ClientError as exc:
            raise AuthError(f"no OCI credentials ({exc}); set {CREDENTIAL_VARS}, or OCI_CONFIG_FILE") from exc
    oci.config.validate_config(config, signer=signer)
    return config, signer


def _options(spec: VMSpec) -> OCIOptions:
    if not isinstance(spec.options, OCIOptions):
        raise InvalidSpecError("OCI needs options: compartment_id, subnet_id, availability_domain")
    return spec.options


def _region_of(ocid: str) -> str | None:
    """``ocid1.instance.oc1.phx.<id>`` -> ``us-phoenix-1``; None (the config's region) if it has none."""
    import oci

    parts = ocid.split(".")
    if len(parts) < 5 or not parts[3]:
        return None
    return oci.regions.REGIONS_SHORT_NAMES.get(parts[3], parts[3])


def _retry_after(headers: Any) -> float | None:
    try:
        return float((headers or {}).get("retry-after"))
    except (TypeError, ValueError):
        return None


def _summary_info(item: Any) -> VMInfo:
    """What a Resource Search summary tells of an instance: state, name, tags; no IPs, shape or image."""
    return VMInfo(
        provider="oci",
        instance_id=item.identifier,
        name=item.display_name,
        status=STATUS_MAP.get(item.lifecycle_state, VMStatus.unknown),
        provider_status=item.lifecycle_state,
        labels=item.freeform_tags or {},
        created_at=item.time_created,
    )


def _info(instance: Any, vnic: Any = None) -> VMInfo:
    return VMInfo(
        provider="oci",
        instance_id=instance.id,
        name=instance.display_name,
        status=STATUS_MAP.get(instance.lifecycle_state, VMStatus.unknown),
        provider_status=instance.lifecycle_state,
        public_ipv4=vnic.public_ip if vnic else None,
        public_ipv6=(vnic.ipv6_addresses or [None])[0] if vnic else None,
        private_ipv4=vnic.private_ip if vnic else None,
        region=instance.region,
        instance_type=instance.shape,
        image=getattr(instance.source_details, "image_id", None) or instance.image_id,
        labels=instance.freeform_tags or {},
        created_at=instance.time_created,
    )
