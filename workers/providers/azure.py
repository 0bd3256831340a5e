"""Microsoft Azure adapter (see the Provider protocol in ``base.py``).

Credentials: ``DefaultAzureCredential`` (e.g. ``AZURE_TENANT_ID``/``AZURE_CLIENT_ID``/``AZURE_CLIENT_SECRET``)
plus ``AZURE_SUBSCRIPTION_ID``. The instance id is the VM's ARM id without its leading "/", which the
contract's instance-id pattern refuses (both forms are accepted):
``subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>``.
Per VM a Standard static public IP ``{vm}-pip`` and a NIC ``{vm}-nic``; they, the OS disk ``{vm}-osdisk``
and the VM are deterministic names, so a repeated create PUTs the same resources, and the VM PUT carries
``If-None-Match: *`` so a second one adopts the first (by its ``vmqueue-job`` tag) instead of replacing it.
``VMQ_AZURE_ENDPOINT`` replaces the ARM endpoint (a local fake in system tests; plain http allowed there).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, NamedTuple

from vmqueue.images import IMAGES
from vmqueue.models import LABEL_JOB, LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus
from vmqueue.options import AzureOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import custom_data
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
from workers.providers.metering import Metered, azure_hooks

log = logging.getLogger(__name__)

ENDPOINT_ENV = "VMQ_AZURE_ENDPOINT"
SUBSCRIPTION_ENV = "AZURE_SUBSCRIPTION_ID"
CREDENTIAL_VARS = "AZURE_SUBSCRIPTION_ID and AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET"
CLIENT_KWARGS: dict[str, Any] = {"retry_total": 0, "connection_timeout": 10, "read_timeout": 30}
NETWORK_DEFAULTS = {"vnet": "vmq-vnet", "subnet": "vmq-subnet", "nsg": "vmq-nsg"}  # create_network's names
_VM_ID = re.compile(
    r"^/?subscriptions/[^/]+/resourceGroups/([^/]+)/providers/Microsoft\.Compute/virtualMachines/([^/]+)$", re.I
)

# Raw states are the VM's provisioningState and its instanceView "PowerState/..." code. A provisioning
# state other than Succeeded/Updating decides alone; with those two the power state decides (libcloud
# stopped at the first match and called a running VM "updating").
STATUS_MAP: dict[str, VMStatus] = {
    "Creating": VMStatus.pending,
    "Migrating": VMStatus.pending,
    "Succeeded": VMStatus.pending,  # no PowerState yet
    "Updating": VMStatus.pending,  # no PowerState yet
    "Deleting": VMStatus.terminating,
    "Failed": VMStatus.error,
    "PowerState/starting": VMStatus.pending,
    "PowerState/running": VMStatus.running,
    "PowerState/stopping": VMStatus.stopping,
    "PowerState/deallocating": VMStatus.stopping,
    "PowerState/stopped": VMStatus.stopped,  # still billed
    "PowerState/deallocated": VMStatus.stopped,
}

# ARM puts quota and SKU errors in 409s like any conflict: the error code decides, then the status.
ERROR_CODES: dict[str, type[ProviderError]] = {
    "InvalidAuthenticationToken": AuthError,
    "AuthenticationFailed": AuthError,
    "AuthorizationFailed": AuthError,
    "LinkedAuthorizationFailed": AuthError,
    "InvalidParameter": InvalidSpecError,
    "BadRequest": InvalidSpecError,
    "InvalidResourceReference": InvalidSpecError,
    "PlatformImageNotFound": InvalidSpecError,
    "ResourceGroupNotFound": InvalidSpecError,  # the group is an option: the spec is wrong, not the VM gone
    "ResourceNotFound": NotFoundError,
    "NotFound": NotFoundError,
    "OperationNotAllowed": QuotaExceededError,  # e.g. cores quota
    "QuotaExceeded": QuotaExceededError,
    "PublicIPCountLimitReached": QuotaExceededError,
    "SkuNotAvailable": CapacityError,
    "AllocationFailed": CapacityError,
    "ZonalAllocationFailed": CapacityError,
    "OverconstrainedAllocationRequest": CapacityError,
    "OverconstrainedZonalAllocationRequest": CapacityError,
    "TooManyRequests": RateLimitedError,
    "SubscriptionRequestsThrottled": RateLimitedError,
    "NicInUse": TransientError,  # a NIC stays reserved ~180 s after its VM is gone
    "NicReservedForAnotherVm": TransientError,
    "PublicIPAddressCannotBeDeleted": TransientError,  # its NIC is still being deleted
    "InUsePublicIpAddressCannotBeDeleted": TransientError,
    "ReferencedResourceNotProvisioned": TransientError,
    "AnotherOperationInProgress": TransientError,
    "RetryableError": TransientError,
}


def _map_error(exc: Exception) -> ProviderError:
    from azure.core import exceptions as az

    if isinstance(exc, az.ClientAuthenticationError) and not exc.status_code:  # the credential chain itself
        return AuthError(f"no Azure credentials: set {CREDENTIAL_VARS} ({exc.message})")
    if isinstance(exc, az.HttpResponseError):
        status, code = exc.status_code or 0, exc.error.code if exc.error else None
        message = (exc.error.message if exc.error else None) or exc.reason or str(exc)
        cls = ERROR_CODES.get(code or "")
        if cls is RateLimitedError or status == 429:
            retry_after = exc.response.headers.get("Retry-After") if exc.response is not None else None
            return RateLimitedError(message, provider_code=code, retry_after_s=_seconds(retry_after))
        if cls is None:
            if status in (401, 403):
                cls = AuthError
            elif status == 404:
                cls = NotFoundError
            elif status in (400, 422):
                cls = InvalidSpecError
            else:
                cls = TransientError if status >= 500 or status == 408 else ProviderError
        return cls(message, provider_code=code or str(status))
    if isinstance(exc, (az.ServiceRequestError, az.ServiceResponseError)):  # connection errors, timeouts
        return TransientError(f"Azure request failed: {exc}", provider_code=type(exc).__name__)
    return ProviderError(str(exc), provider_code=type(exc).__name__)


class _Clients(NamedTuple):
    compute: Any
    network: Any


class AzureProvider(Metered):
    """Azure Compute + Network; see the Provider protocol."""

    name = "azure"
    # Waits inside one call (seconds): a public IP until provisioned, a failed create's NIC until deleted.
    poll_s: float = 1.0
    provision_wait_s: float = 20.0
    helper_delete_wait_s: float = 60.0

    def __init__(self, credential: Any = None, subscription_id: str | None = None, endpoint: str | None = None) -> None:
        self._credential = credential
        self._subscription_id = subscription_id or os.environ.get(SUBSCRIPTION_ENV) or None
        self._endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        self._clients: _Clients | None = None
        self._lock = threading.Lock()

    def _client(self) -> _Clients:
        from azure.mgmt.compute import ComputeManagementClient
        from azure.mgmt.network import NetworkManagementClient

        with self._lock, map_errors(_map_error):
            if self._clients is None:
                if not self._subscription_id:
                    raise AuthError(f"{SUBSCRIPTION_ENV} is not set: set {CREDENTIAL_VARS}")
                if self._credential is None:
                    from azure.identity import DefaultAzureCredential

                    self._credential = DefaultAzureCredential()
                # Every attempt on the wire is charged to the subscription's budget (workers/budget.py).
                kwargs = {**CLIENT_KWARGS, **azure_hooks(lambda: self.meter)}
                if self._endpoint:
                    kwargs["base_url"] = self._endpoint
                    kwargs["credential_scopes"] = ["https://management.azure.com/.default"]
                    if self._endpoint.startswith("http://"):
                        kwargs["authentication_policy"] = _plain_http_auth(self._credential)
                self._clients = _Clients(
                    ComputeManagementClient(self._credential, self._subscription_id, **kwargs),
                    NetworkManagementClient(self._credential, self._subscription_id, **kwargs),
                )
            return self._clients

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        """Resolve an image alias to its publisher:offer:sku:version URN; a URN passes through."""
        resolved = spec.model_copy(update={"image": IMAGES["azure"].get(spec.image, spec.image)})
        _image_reference(resolved.image)
        return resolved

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError
        from azure.mgmt.compute import models as cm
        from azure.mgmt.network import models as nm

        opts, name, tags = _options(spec), _resource_name(spec.name, job_id), spec.ownership_labels(job_id)
        rg, clients = opts.resource_group, self._client()
        # A VM of this name already: ours (a redelivery) is adopted; another job's must not have its
        # NIC and IP rewritten by our PUTs, so this is decided before any of them.
        subnet_id, nsg_id = self._network(spec, opts)
        existing = self._adopt(rg, name, job_id, missing_ok=True)
        if existing is not None:
            return existing
        vm_sent = False
        try:
            with map_errors(_map_error):
                pip = clients.network.public_ip_addresses.begin_create_or_update(
                    rg,
                    f"{name}-pip",
                    nm.PublicIPAddress(
                        location=spec.region,
                        tags=tags,
                        sku=nm.PublicIPAddressSku(name="Standard"),  # Basic is retired
                        public_ip_allocation_method="Static",
                        public_ip_address_version="IPv4",
                        delete_option="Delete",
                    ),
                    polling=False,
                ).result()
                if pip.provisioning_state != "Succeeded":  # a NIC may only reference a provisioned IP
                    pip = self._provisioned_ip(rg, f"{name}-pip", pip)
                nic = clients.network.network_interfaces.begin_create_or_update(
                    rg,
                    f"{name}-nic",
                    nm.NetworkInterface(
                        location=spec.region,
                        tags=tags,
                        network_security_group=nm.NetworkSecurityGroup(id=nsg_id) if nsg_id else None,
                        ip_configurations=[
                            nm.NetworkInterfaceIPConfiguration(
                                name="ipconfig1",
                                primary=True,
                                subnet=nm.Subnet(id=subnet_id),
                                private_ip_allocation_method="Dynamic",
                                public_ip_address=nm.PublicIPAddress(id=pip.id),
                            )
                        ],
                    ),
                    polling=False,
                ).result()
                vm = cm.VirtualMachine(
                    location=spec.region,
                    tags=tags,
                    hardware_profile=cm.HardwareProfile(vm_size=spec.instance_type),
                    storage_profile=cm.StorageProfile(
                        image_reference=_image_reference(spec.image),
                        os_disk=cm.OSDisk(name=f"{name}-osdisk", create_option="FromImage", delete_option="Delete"),
                    ),
                    os_profile=cm.OSProfile(
                        computer_name=spec.name,  # the hostname, whatever the attempt's resource name
                        admin_username=opts.admin_username,
                        custom_data=custom_data(startup_script),
                        linux_configuration=cm.LinuxConfiguration(
                            disable_password_authentication=True,
                            ssh=cm.SshConfiguration(
                                public_keys=[
                                    cm.SshPublicKey(
                                        path=f"/home/{opts.admin_username}/.ssh/authorized_keys",
                                        key_data=ssh_key.openssh,
                                    )
                                ]
                            ),
                        ),
                    ),
                    network_profile=cm.NetworkProfile(
                        network_interfaces=[
                            cm.NetworkInterfaceReference(id=nic.id, primary=True, delete_option="Delete")
                        ]
                    ),
                )
                vm_sent = True
                try:
                    created = clients.compute.virtual_machines.begin_create_or_update(
                        rg, name, vm, match_condition=MatchConditions.IfMissing, polling=False
                    ).result()
                except ResourceExistsError as exc:
                    if exc.status_code != 412:
                        raise
                    created = None  # another create of this name got there first: look at it below
        except ProviderError as exc:
            return self._create_failed(rg, name, job_id, exc, vm_sent)
        return _info(created) if created is not None else self._adopt(rg, name, job_id)

    def _create_failed(self, rg: str, name: str, job_id: str, exc: ProviderError, vm_sent: bool) -> VMInfo:
        """A create that raises leaves nothing behind, and raises the provider's own error.

        The job may never come back (a refusal for good, or its last retry), and without an instance id
        nothing would delete the NIC and public IP made for it; a retry makes them again. A VM PUT
        whose answer was lost or a 5xx may still have made the VM: ours is adopted rather than left
        without its network. A failed cleanup is logged (the ownership tags let the sweeper find what
        stays) and never replaces the create's error.
        """
        if vm_sent and exc.retryable:
            try:
                if (adopted := self._adopt(rg, name, job_id, missing_ok=True)) is not None:
                    return adopted
            except ProviderError as unknown:
                # Whether the VM exists is unknown: deleting its NIC now could strand it, so keep all.
                log.warning("azure create of %s failed (%s); its VM could not be read (%s)", name, exc, unknown)
                raise exc from None
        try:
            self._delete_helpers(rg, name, wait_s=self.helper_delete_wait_s)
        except ProviderError as cleanup:
            log.warning(
                "azure create of %s failed (%s); its NIC/public IP stay for the sweeper: %s", name, exc, cleanup
            )
        raise exc

    def get_vm(self, instance_id: str) -> VMInfo:
        """See the protocol. A VM whose allocation failed after ARM accepted it (instance view
        ``ProvisioningState/failed/AllocationFailed`` and kin) raises CapacityError, as a refused PUT
        would, once its delete is sent: ARM keeps a failed VM, and the failover that follows forgets
        its id, so the delete (VM, and with it NIC, public IP and OS disk: ``delete_option``) goes first.
        """
        rg, name = _parse_id(instance_id)
        vm, info = self._read(rg, name)
        failure = _capacity_failure(vm)
        if failure is not None:
            with map_errors(_map_error):
                self._client().compute.virtual_machines.begin_delete(rg, name, polling=False).result()
            message = (failure.message or failure.display_status or failure.code).strip()
            raise CapacityError(
                f"Azure could not allocate {name}: {message}", provider_code=failure.code.split("/")[-1]
            )
        return info

    def _read(self, rg: str, name: str) -> tuple[Any, VMInfo]:
        """The VM with its instance view, then its primary NIC and public IP (3 GETs): model and VMInfo."""
        clients = self._client()
        with map_errors(_map_error):
            vm = clients.compute.virtual_machines.get(rg, name, expand="instanceView")
            nic = pip = None
            if vm.provisioning_state != "Deleting" and vm.network_profile and vm.network_profile.network_interfaces:
                # Generic VM -> NIC -> PIP walk (3 GETs), so an adopted VM with other names reads the same.
                ref_nic = _primary(vm.network_profile.network_interfaces)
                nic = _get_or_none(clients.network.network_interfaces.get, ref_nic.id)
                config = _primary(nic.ip_configurations) if nic and nic.ip_configurations else None
                ref = config.public_ip_address if config else None
                pip = _get_or_none(clients.network.public_ip_addresses.get, ref.id) if ref and ref.id else None
        return vm, _info(vm, nic, pip)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """One list of the subscription's VMs with their power states (``statusOnly``, paged), kept to the ids.

        Calls: one per page of the subscription's VMs, plus ``get_vm``'s three GETs (VM, NIC, public
        IP) for each VM the list shows settled (running, failed, deleting), so a VM that ends a job's
        wait reads exactly as ``get_vm`` reads it, IPs included, and one PATCH of the OS disk's tags for
        one running or failed (``_tag_os_disk``); each VM settles once, then leaves the watch list.
        ARM's per-group list cannot carry power states ($expand=instanceView needs a scale set filter),
        hence the subscription-wide list; any VM of the subscription is found, tag or not.
        """
        asked: dict[tuple[str, str], str] = {}  # (group, name), lower-case as ARM compares them -> the caller's id
        for instance_id in instance_ids:
            try:
                rg, name = _parse_id(instance_id)
            except InvalidSpecError:
                continue  # not an ARM id: get_vm says why; here it must not sink the batch
            asked[rg.lower(), name.lower()] = instance_id
        if not asked:
            return {}
        with map_errors(_map_error):
            listed = list(self._client().compute.virtual_machines.list_all(status_only="true"))
        found: dict[str, VMInfo] = {}
        for vm in listed:
            match = _VM_ID.match(vm.id or "")
            if not match or (instance_id := asked.get((match[1].lower(), match[2].lower()))) is None:
                continue
            info = _info(vm)
            if info.status in SETTLED_STATUSES:
                try:
                    # Not get_vm: a late capacity failure reads as a VM in error here (raised, it would
                    # sink the batch); the tick reads that VM again through get_vm, which fails it over.
                    model, info = self._read(*_parse_id(instance_id))
                except NotFoundError:
                    continue  # deleted since the list
                if info.status in (VMStatus.running, VMStatus.error):
                    self._tag_os_disk(model)
            found[instance_id] = info
        return found

    def _tag_os_disk(self, vm: Any) -> None:
        """Give a create's OS disk the VM's tags (ownership included), so the sweeper finds it if it
        outlives its VM (``list_owned_extras``); one Disks - Update (PATCH) per VM.

        The VM PUT cannot tag the disk it makes (azure-mgmt-compute 39: ``OSDisk`` and
        ``ManagedDiskParameters`` have no ``tags``; the REST reference documents no copy of the VM's
        tags), and the disk exists only once the VM reports it (``storageProfile.osDisk.managedDisk.id``),
        so this runs when a create's VM first reads settled in the batched read (running, or failed
        before its delete): once per VM, a VM of ours only. A failure is logged, never the read's.
        Source: Compute REST API, Disks - Update (PATCH, body DiskUpdate with ``tags``).
        """
        from azure.mgmt.compute.models import DiskUpdate

        tags = vm.tags or {}
        os_disk = vm.storage_profile.os_disk if vm.storage_profile else None
        disk_id = os_disk.managed_disk.id if os_disk and os_disk.managed_disk else None
        match = _EXTRA_ID.match(disk_id or "")
        if tags.get(LABEL_MANAGED_BY) != "vmqueue" or not match:
            return
        try:
            with map_errors(_map_error):
                disks = self._client().compute.disks
                disks.begin_update(match[1], match[2], DiskUpdate(tags=tags), polling=False).result()
        except ProviderError as exc:
            log.warning(
                "azure: tagging the OS disk %s of %s failed (%s); the sweeper cannot see it", disk_id, vm.name, exc
            )

    def destroy_vm(self, instance_id: str) -> None:
        rg, name = _parse_id(instance_id)
        clients = self._client()
        vms = clients.compute.virtual_machines
        try:
            with map_errors(_map_error):
                vms.begin_delete(rg, name, polling=False).result()  # a missing VM answers 204
                vms.get(rg, name)
            return None  # still deleting: NIC, IP and disk go with it (delete_option="Delete")
        except NotFoundError:
            pass  # gone, or never made (a half-done create): its helpers go by name below
        except InvalidSpecError as exc:
            if exc.provider_code != "ResourceGroupNotFound":
                raise
            return None  # the group is gone, and everything in it
        self._delete_helpers(rg, name)
        return None

    def _adopt(self, rg: str, name: str, job_id: str, missing_ok: bool = False) -> VMInfo | None:
        """The VM of this name if this job made it; another job's is an error; none: None (if allowed)."""
        try:
            with map_errors(_map_error):
                vm = self._client().compute.virtual_machines.get(rg, name, expand="instanceView")
        except NotFoundError:
            if missing_ok:
                return None
            raise
        if (vm.tags or {}).get(LABEL_JOB) != job_id:
            raise InvalidSpecError(f"a VM named {name!r} already exists in {rg} for another job; pick another name")
        return _info(vm)

    def _delete_helpers(self, rg: str, name: str, wait_s: float = 0.0) -> None:
        """The VM's NIC, then its public IP, by their deterministic names (absent: 204).

        A NIC delete may be accepted (202) and finish later; until it has, ARM refuses the IP's delete
        (400 ``PublicIPAddressCannotBeDeleted``). With ``wait_s`` the NIC is read until it is gone (at
        most that long) before the IP's delete is sent; without, that refusal is raised as transient
        for a caller that retries (a destroy job).
        """
        network = self._client().network
        with map_errors(_map_error):
            network.network_interfaces.begin_delete(rg, f"{name}-nic", polling=False).result()
            nic_gone = lambda: _absent(network.network_interfaces.get, rg, f"{name}-nic")  # noqa: E731
            if wait_s > 0 and not self._wait(nic_gone, wait_s):
                raise TransientError(f"NIC {name}-nic is still being deleted after {wait_s:.0f}s")
            network.public_ip_addresses.begin_delete(rg, f"{name}-pip", polling=False).result()

    def _provisioned_ip(self, rg: str, name: str, pip: Any) -> Any:
        """The public IP once ``Succeeded``, read for at most ``provision_wait_s``; else TransientError."""
        network = self._client().network
        latest = [pip]

        def succeeded() -> bool:
            latest[0] = network.public_ip_addresses.get(rg, name)
            return latest[0].provisioning_state == "Succeeded"

        if not self._wait(succeeded, self.provision_wait_s):
            state = latest[0].provisioning_state
            raise TransientError(f"public IP {name} is {getattr(state, 'value', state)}; create again later")
        return latest[0]

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``done`` every ``poll_s`` until it is true (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    def list_owned_vms(self) -> list[VMInfo]:
        """VMs of the subscription tagged managed-by=vmqueue, with power states (statusOnly), no IPs.

        ARM filters VM lists by scale set only, so the tag filter runs here, over one paged list call.
        """
        with map_errors(_map_error):
            vms = list(self._client().compute.virtual_machines.list_all(status_only="true"))
        return [_info(vm) for vm in vms if (vm.tags or {}).get(LABEL_MANAGED_BY) == "vmqueue"]

    def _network(self, spec: VMSpec, opts: AzureOptions) -> tuple[str, str | None]:
        """The subnet id and NSG id of the options; with create_network, made if missing (never silently)."""
        if opts.subnet_id:
            return opts.subnet_id, opts.nsg_id
        vnet, subnet = opts.vnet_name, opts.subnet_name
        if not opts.create_network and not (vnet and subnet):
            raise InvalidSpecError(
                "Azure needs options.subnet_id, or vnet_name and subnet_name, or create_network=true"
            )
        vnet, subnet = vnet or NETWORK_DEFAULTS["vnet"], subnet or NETWORK_DEFAULTS["subnet"]
        rg_path = f"/subscriptions/{self._subscription_id}/resourceGroups/{opts.resource_group}"
        subnet_id = f"{rg_path}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}"
        if opts.create_network:
            return subnet_id, self._create_network(spec, opts, rg_path, vnet, subnet)
        return subnet_id, opts.nsg_id

    def _create_network(self, spec: VMSpec, opts: AzureOptions, rg_path: str, vnet: str, subnet: str) -> str | None:
        """Resource group, an NSG allowing TCP 22 and the vnet/subnet, each only when missing."""
        from azure.core.exceptions import ResourceNotFoundError
        from azure.core.rest import HttpRequest
        from azure.mgmt.network import models as nm

        network, rg, owned = self._client().network, opts.resource_group, {LABEL_MANAGED_BY: "vmqueue"}
        with map_errors(_map_error):
            group_url = f"{rg_path}?api-version=2022-09-01"
            if network.send_request(HttpRequest("GET", group_url)).status_code == 404:
                body = {"location": spec.region, "tags": owned}
                network.send_request(HttpRequest("PUT", group_url, json=body)).raise_for_status()
            try:
                network.virtual_networks.get(rg, vnet)
                return opts.nsg_id  # the subnet's own NSG, if any, applies
            except ResourceNotFoundError:
                pass
            nsg_id = opts.nsg_id
            if nsg_id is None:
                ssh = nm.SecurityRule(
                    name="ssh",
                    priority=1000,
                    direction="Inbound",
                    access="Allow",
                    protocol="Tcp",
                    source_address_prefix="*",
                    source_port_range="*",
                    destination_address_prefix="*",
                    destination_port_range="22",
                )
                group = nm.NetworkSecurityGroup(location=spec.region, tags=owned, security_rules=[ssh])
                poller = network.network_security_groups.begin_create_or_update(
                    rg, NETWORK_DEFAULTS["nsg"], group, polling=False
                )
                nsg_id = poller.result().id
            network.virtual_networks.begin_create_or_update(
                rg,
                vnet,
                nm.VirtualNetwork(
                    location=spec.region,
                    tags=owned,
                    address_space=nm.AddressSpace(address_prefixes=["10.0.0.0/16"]),
                    subnets=[nm.Subnet(name=subnet, address_prefix="10.0.0.0/24")],
                ),
                polling=False,
            )
        return nsg_id

    def list_owned_extras(self) -> list[OwnedResource]:
        """The subscription's NICs, public IPs and managed disks tagged managed-by=vmqueue, one paged list
        each (every page: ARM's ``nextLink``), with what uses each: a NIC's VM, a public IP's NIC, a
        disk's VM (``managedBy``). A failed create's NIC and IP are attached to nothing. Sources: ARM
        REST Network Interfaces - List All, Public IP Addresses - List All, Disks - List.
        """
        clients, found = self._client(), []
        with map_errors(_map_error):
            for nic in clients.network.network_interfaces.list_all():
                user = nic.virtual_machine.id if nic.virtual_machine else None
                found += _extra("nic", nic, user)
            for pip in clients.network.public_ip_addresses.list_all():
                found += _extra("public_ip", pip, pip.ip_configuration.id if pip.ip_configuration else None)
            for disk in clients.compute.disks.list():
                found += _extra("disk", disk, disk.managed_by, disk.time_created)
        return found

    def delete_extra(self, resource: OwnedResource) -> None:
        """One DELETE by the resource's ARM id (absent: 204). A resource still in use is refused by ARM
        (NicInUse, PublicIPAddressCannotBeDeleted): raised, so a later pass tries again."""
        match = _EXTRA_ID.match(resource.resource_id)
        operations = {"nic": "network_interfaces", "public_ip": "public_ip_addresses", "disk": "disks"}
        if not match or resource.kind not in operations:
            raise InvalidSpecError(f"{resource.resource_id!r} is not an Azure NIC, public IP or disk id")
        clients = self._client()
        client = clients.compute if resource.kind == "disk" else clients.network
        with suppress(NotFoundError), map_errors(_map_error):
            getattr(client, operations[resource.kind]).begin_delete(match[1], match[2], polling=False).result()


def _resource_name(name: str, job_id: str) -> str:
    """The VM's resource name for one create attempt: ``name``, then ``name-p<n>`` for placement n.

    A failed attempt's VM may still be deleting when the next placement is tried (in another location,
    which ARM refuses under the same name), so each placement has resources of its own. Linux VM
    names are at most 64 characters.
    """
    placement = re.search(r"-p(\d+)$", job_id)
    if placement is None:
        return name
    suffix = f"-p{placement[1]}"
    return name[: 64 - len(suffix)].rstrip("-") + suffix


def _capacity_failure(vm: Any) -> Any | None:
    """The instance view's ``ProvisioningState/failed/<code>`` status when its code is a capacity one."""
    statuses = vm.instance_view.statuses or [] if vm.instance_view else []
    for status in statuses:
        code = status.code or ""
        if code.startswith("ProvisioningState/failed/") and ERROR_CODES.get(code.split("/")[-1]) is CapacityError:
            return status
    return None


def _options(spec: VMSpec) -> AzureOptions:
    if not isinstance(spec.options, AzureOptions):
        raise InvalidSpecError("Azure needs options: resource_group and the network (subnet_id or vnet/subnet)")
    return spec.options


def _parse_id(instance_id: str) -> tuple[str, str]:
    match = _VM_ID.match(instance_id)
    if not match:
        raise InvalidSpecError(
            f"{instance_id!r} is not a VM's ARM id "
            "(subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>)"
        )
    return match.group(1), match.group(2)


def _image_reference(urn: str) -> Any:
    from azure.mgmt.compute.models import ImageReference

    parts = urn.split(":")
    if len(parts) != 4 or not all(parts):
        raise InvalidSpecError(f"Azure image {urn!r}: use an alias or a publisher:offer:sku:version URN")
    return ImageReference(publisher=parts[0], offer=parts[1], sku=parts[2], version=parts[3])


def _primary(items: list[Any]) -> Any:
    """The entry ARM marks ``primary`` (a VM's NIC reference, a NIC's IP configuration), whatever the order.

    ARM requires exactly one primary among several; a lone entry may leave ``primary`` unset.
    """
    return next((item for item in items if item.primary), items[0])


def _absent(get: Any, rg: str, name: str) -> bool:
    """True once a GET of the network resource ``name`` answers 404."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        get(rg, name)
    except ResourceNotFoundError:
        return True
    return False


def _get_or_none(get: Any, resource_id: str) -> Any | None:
    """GET a network resource by its ARM id; a missing one is None."""
    from azure.core.exceptions import ResourceNotFoundError

    parts = resource_id.split("/")
    with suppress(ResourceNotFoundError):
        return get(parts[4], parts[-1])
    return None


def _plain_http_auth(credential: Any) -> Any:
    """Bearer auth that also works over http://, for a local fake endpoint only."""
    from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy

    class PlainHttpAuth(ARMChallengeAuthenticationPolicy):
        def on_request(self, request: Any) -> None:
            request.context.options["enforce_https"] = False
            super().on_request(request)

    return PlainHttpAuth(credential, "https://management.azure.com/.default")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _status(provisioning: str | None, power: str | None) -> VMStatus:
    raw = power if provisioning in ("Succeeded", "Updating") and power else provisioning
    return STATUS_MAP.get(raw or "", VMStatus.unknown)


def _info(vm: Any, nic: Any = None, pip: Any = None) -> VMInfo:
    statuses = [s.code or "" for s in (vm.instance_view.statuses or [])] if vm.instance_view else []
    power = next((code for code in statuses if code.startswith("PowerState/")), None)
    failure = next((code for code in statuses if code.startswith("ProvisioningState/failed/")), None)
    image = vm.storage_profile.image_reference if vm.storage_profile else None
    ip_config = _primary(nic.ip_configurations) if nic and nic.ip_configurations else None
    return VMInfo(
        provider="azure",
        instance_id=vm.id.lstrip("/"),  # vmqueue's instance-id pattern refuses a leading "/"
        name=vm.name,
        status=_status(vm.provisioning_state, power),
        provider_status=" ".join(filter(None, (vm.provisioning_state, power, failure))) or None,
        public_ipv4=pip.ip_address if pip and pip.public_ip_address_version != "IPv6" else None,
        public_ipv6=pip.ip_address if pip and pip.public_ip_address_version == "IPv6" else None,
        private_ipv4=ip_config.private_ip_address if ip_config else None,
        region=vm.location,
        instance_type=vm.hardware_profile.vm_size if vm.hardware_profile else None,
        image=":".join(str(p) for p in (image.publisher, image.offer, image.sku, image.version)) if image else None,
        labels=dict(vm.tags or {}),
        created_at=vm.time_created,
    )


_EXTRA_ID = re.compile(r"^/?subscriptions/[^/]+/resourceGroups/([^/]+)/providers/Microsoft\.\w+/\w+/([^/]+)$", re.I)


def _extra(kind: str, resource: Any, user: str | None, created_at: Any = None) -> list[OwnedResource]:
    """``resource`` as an OwnedResource if it carries the ownership tag, else nothing."""
    tags = resource.tags or {}
    if tags.get(LABEL_MANAGED_BY) != "vmqueue":
        return []
    return [
        OwnedResource(
            provider="azure",
            kind=kind,
            resource_id=resource.id,
            name=resource.name,
            labels=tags,
            attached_to=user.lstrip("/") if user else None,
            created_at=created_at,
        )
    ]
