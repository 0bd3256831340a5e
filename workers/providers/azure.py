"""Microsoft Azure adapter (see the Provider protocol in ``base.py``).

Credentials: ``DefaultAzureCredential`` (e.g. ``AZURE_TENANT_ID``/``AZURE_CLIENT_ID``/``AZURE_CLIENT_SECRET``)
plus ``AZURE_SUBSCRIPTION_ID``. The instance id is the VM's ARM id without its leading "/", which the
contract's instance-id pattern refuses (both forms are accepted):
``subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>``.
A create is one VM PUT declaring its NIC and Standard static public IP inline (``azure_network``): Azure
makes them with the VM, tagged like it, and deletes them with it, as it does the OS disk ``{vm}-osdisk``.
The VM's name is deterministic and its PUT carries ``If-None-Match: *``, so a second create of a job
adopts the first's VM (by its ``vmqueue-job`` tag) instead of replacing it.
``VMQ_AZURE_ENDPOINT`` replaces the ARM endpoint (a local fake in system tests; plain http allowed there).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import suppress
from typing import Any, NamedTuple

from vmqueue.images import IMAGES
from vmqueue.models import LABEL_JOB, LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus
from vmqueue.options import AzureOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import custom_data
from workers.providers import azure_network
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
# The subscription's read budgets a status read draws on, per minute and region: ARM's reads (25 a second,
# learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling), and Compute's
# "High Cost Get VM" (List, List All: 300) or "Low Cost Get VM" (Get: 8,000; per VM 12, burst 36)
# (learn.microsoft.com/azure/virtual-machines/compute-throttling-limits). Each weighs what is scarcest.
READS_PER_MIN = {"list_page": min(1500, 300), "vm_get": min(1500, 8000)}
COMPUTE_PER_VM_GETS_PER_MIN = 12
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
    # Compute's per-VM "Low Cost Get" budget refills 12 a minute: a VM read on its own is read again
    # no sooner than this (the batched read answers from its last read meanwhile).
    vm_read_gap_s: float = 60.0 / COMPUTE_PER_VM_GETS_PER_MIN
    # A list's page count is trusted this long; then the next batched read lists again (the subscription's
    # VMs come and go), unless its VMs are too few for any list to be cheaper.
    list_measure_ttl_s: float = 600.0

    def __init__(self, credential: Any = None, subscription_id: str | None = None, endpoint: str | None = None) -> None:
        self._credential = credential
        self._subscription_id = subscription_id or os.environ.get(SUBSCRIPTION_ENV) or None
        self._endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
        self._clients: _Clients | None = None
        self._lock = threading.Lock()
        self._networks: dict[tuple[str, str], str | None] = {}  # create_network: (group, vnet) -> NSG id
        self._list_pages: tuple[float, int] | None = None  # (monotonic s, pages) of the last subscription list
        self._group_pages: dict[str, tuple[float, int]] = {}  # group -> (monotonic s, pages) of its network lists
        self._vm_reads: dict[str, tuple[float, VMInfo]] = {}  # instance id -> (monotonic s, VMInfo) read alone

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
        """See the protocol. One request on a first attempt: the VM PUT, its NIC and public IP declared
        inside it (``azure_network``). ``If-None-Match: *`` makes a PUT of a name that exists answer 412:
        the VM is then adopted if this job made it, else the create fails (another job's VM is never
        rewritten). After an earlier attempt (``first_attempt`` false) its VM is looked up first.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError

        opts, name, tags = _options(spec), _resource_name(spec.name, job_id), spec.ownership_labels(job_id)
        rg, clients = opts.resource_group, self._client()
        with map_errors(_map_error):
            subnet_id, nsg_id = azure_network.subnet_and_nsg(
                clients.network, self._subscription_id, spec, opts, self._networks
            )
        if not first_attempt and (existing := self._adopt(rg, name, job_id, missing_ok=True)) is not None:
            return existing
        vm = _vm_model(spec, opts, name, tags, ssh_key, startup_script, subnet_id, nsg_id)
        try:
            with map_errors(_map_error):
                try:
                    created = clients.compute.virtual_machines.begin_create_or_update(
                        rg, name, vm, match_condition=MatchConditions.IfMissing, polling=False
                    ).result()
                except ResourceExistsError as exc:
                    if exc.status_code != 412:
                        raise
                    created = None  # a VM of this name exists: look at it below
        except ProviderError as exc:
            return self._create_failed(rg, name, job_id, exc)
        return _info(created) if created is not None else self._adopt(rg, name, job_id)

    def _create_failed(self, rg: str, name: str, job_id: str, exc: ProviderError) -> VMInfo:
        """A refused VM PUT made nothing (its NIC and public IP are made with the VM, or not at all): the
        provider's own error is raised. A PUT whose answer was lost or a 5xx may still have made the VM:
        ours is adopted. Whether it exists unknown, the create's error is raised (the next attempt looks)."""
        if not exc.retryable:
            raise exc
        try:
            adopted = self._adopt(rg, name, job_id, missing_ok=True)
        except ProviderError as unknown:
            log.warning("azure create of %s failed (%s); its VM could not be read (%s)", name, exc, unknown)
            raise exc from None
        if adopted is None:
            raise exc
        return adopted

    def get_vm(self, instance_id: str) -> VMInfo:
        """See the protocol. A VM whose allocation failed after ARM accepted it (instance view
        ``ProvisioningState/failed/AllocationFailed`` and kin) raises CapacityError, as a refused PUT
        would, once its delete is sent: ARM keeps a failed VM, and the failover that follows forgets
        its id, so the delete (VM, and with it NIC, public IP and OS disk: ``deleteOption``) goes first.
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
            nic, pip = azure_network.nic_and_public_ip(clients.network, vm)
        return vm, _info(vm, nic, pip)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """The VMs of ``instance_ids``, read the cheaper of two ways (``_reads_each_vm``):

        - one subscription-wide list with power states (``statusOnly=true``, 1,000 VMs a page): one
          request per page, however few of the subscription's VMs are asked for;
        - one GET with ``$expand=instanceView`` per VM asked, each VM at most once per ``vm_read_gap_s``
          (Compute's per-VM budget; a VM read more recently is answered from that read).

        Either way the VMs that read settled (running, failed, deleting) get their addresses as ``get_vm``
        reads them (``_settle``: a GET of each one's NIC and public IP, or their resource group's NIC and
        public IP lists when those cost fewer requests), so their VMInfo is ``get_vm``'s, and a running or
        failed one's OS disk gets the VM's tags (one PATCH, ``_tag_os_disk``); each VM settles once, then
        leaves the watch list. A late capacity failure reads as a VM in error (raised, it would sink the
        batch); the tick reads that VM again through ``get_vm``, which fails it over.
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
        if self._reads_each_vm(len(asked)):
            return self._get_each(list(asked.values()))
        self._vm_reads.clear()  # read by the list from now on
        with map_errors(_map_error):
            listed = self._list_all()
        found: dict[str, VMInfo] = {}
        settling: list[tuple[str, Any]] = []
        for vm in listed:
            match = _VM_ID.match(vm.id or "")
            if not match or (instance_id := asked.get((match[1].lower(), match[2].lower()))) is None:
                continue
            found[instance_id] = _info(vm)
            if found[instance_id].status not in SETTLED_STATUSES:
                continue
            if vm.network_profile is None or vm.storage_profile is None:  # a list item without the VM's model
                try:
                    with map_errors(_map_error):
                        vm = self._client().compute.virtual_machines.get(match[1], match[2], expand="instanceView")
                except NotFoundError:
                    del found[instance_id]  # deleted since the list
                    continue
            settling.append((instance_id, vm))
        found.update(self._settle(settling))
        return found

    def _reads_each_vm(self, vms: int) -> bool:
        """True when ``vms`` GETs cost less of the subscription's read budgets than one list of it.

        A list page is a Compute "High Cost Get VM" (300 a minute per subscription and region) and an
        ARM read (1,500 a minute); a VM's GET a "Low Cost Get VM" (8,000 a minute) and an ARM read. Each
        is weighed by the scarcest budget it draws on: a page costs five GETs. The list's pages are those
        the last list counted (``_list_pages``, for ``list_measure_ttl_s``); unmeasured, the list is
        taken for the one page it costs at least, so fewer VMs than one page weighs are read alone, and
        more are listed (which measures the list).
        """
        measured = self._list_pages
        if measured is not None and time.monotonic() - measured[0] >= self.list_measure_ttl_s:
            measured = self._list_pages = None
        pages = measured[1] if measured is not None else 1
        return vms / READS_PER_MIN["vm_get"] < pages / READS_PER_MIN["list_page"]

    def _get_each(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """One GET (with instance view) per VM not read within ``vm_read_gap_s``; absent VMs are left out."""
        compute = self._client().compute
        now, found, reads = time.monotonic(), {}, {}
        settling: list[tuple[str, Any]] = []
        for instance_id in instance_ids:
            last = self._vm_reads.get(instance_id)
            if last is not None and now - last[0] < self.vm_read_gap_s:
                found[instance_id], reads[instance_id] = last[1], last
                continue
            try:
                with map_errors(_map_error):
                    vm = compute.virtual_machines.get(*_parse_id(instance_id), expand="instanceView")
            except NotFoundError:
                continue
            found[instance_id] = _info(vm)
            if found[instance_id].status in SETTLED_STATUSES:
                settling.append((instance_id, vm))
            reads[instance_id] = (now, found[instance_id])
        for instance_id, info in self._settle(settling).items():
            found[instance_id], reads[instance_id] = info, (now, info)
        self._vm_reads = reads  # VMs no longer asked for are forgotten
        return found

    def _settle(self, settling: list[tuple[str, Any]]) -> dict[str, VMInfo]:
        """The VMInfo, addresses included, of each (instance id, VM model with instance view) that read
        settled; a running or failed one's OS disk is tagged (``_settled``).

        A VM's addresses are its primary NIC's and that NIC's public IP's (``azure_network``), read
        the cheaper way in requests, per resource group of the NICs: one GET of each VM's NIC and one of
        its public IP (2 per VM), or the group's NIC list and public IP list (one request per page each,
        whatever the number of VMs). Both are plain ARM reads (25 a second per subscription); Network
        publishes no per-operation budget of its own, so a request weighs one either way. The lists'
        pages are those the group's last lists counted (for ``list_measure_ttl_s``), else one each: one
        VM settling in a group is read by its GETs (2 requests, no fewer than 2 lists), two or more by
        the lists (2 requests while the group's lists take a page each, against 4 and more).
        """
        if not settling:
            return {}
        network = self._client().network
        per_group: dict[str, int] = {}
        for _, vm in settling:
            if (group := azure_network.nic_group(vm)) is not None:
                per_group[group] = per_group.get(group, 0) + 1
        groups = {g for g, vms in per_group.items() if self._group_list_pages(g) < azure_network.GETS_PER_VM * vms}
        listed: dict[str, Any] = {}
        found: dict[str, VMInfo] = {}
        with map_errors(_map_error):
            for group in groups:
                resources, pages = azure_network.group_network(network, group)
                listed.update(resources)
                self._group_pages[group] = (time.monotonic(), max(2, pages))
            for instance_id, vm in settling:
                found[instance_id] = _info(vm, *azure_network.nic_and_public_ip(network, vm, listed, groups))
        for instance_id, vm in settling:
            self._settled(vm, found[instance_id])
        return found

    def _group_list_pages(self, group: str) -> int:
        """Requests the NIC and public IP lists of ``group`` took when last counted, if lately; else 2."""
        measured = self._group_pages.get(group)
        if measured is None or time.monotonic() - measured[0] >= self.list_measure_ttl_s:
            return 2
        return measured[1]

    def _list_all(self) -> list[Any]:
        """Every VM of the subscription with its power state (``statusOnly``), every page (``nextLink``);
        the number of pages is kept as the list's measured cost."""
        pages = self._client().compute.virtual_machines.list_all(status_only="true").by_page()
        vms: list[Any] = []
        count = 0
        for page in pages:
            count += 1
            vms.extend(page)
        self._list_pages = (time.monotonic(), max(1, count))
        return vms

    def _settled(self, vm: Any, info: VMInfo) -> None:
        if info.status in (VMStatus.running, VMStatus.error):
            self._tag_os_disk(vm)

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
        """See the protocol. The VM's delete takes its NIC, public IP and OS disk (``deleteOption``); once
        it is gone, ``{name}-nic`` and ``{name}-pip`` of a create of an earlier version go by name."""
        rg, name = _parse_id(instance_id)
        clients = self._client()
        vms = clients.compute.virtual_machines
        try:
            with map_errors(_map_error):
                vms.begin_delete(rg, name, polling=False).result()  # a missing VM answers 204
                vms.get(rg, name)
            return None  # still deleting: NIC, IP and disk go with it (deleteOption="Delete")
        except NotFoundError:
            pass  # gone, or never made (a half-done create of an earlier version): helpers by name below
        except InvalidSpecError as exc:
            if exc.provider_code != "ResourceGroupNotFound":
                raise
            return None  # the group is gone, and everything in it
        with map_errors(_map_error):
            azure_network.delete_named_leftovers(clients.network, rg, name)
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

    def list_owned_vms(self) -> list[VMInfo]:
        """VMs of the subscription tagged managed-by=vmqueue, with power states (statusOnly), no IPs.

        ARM filters VM lists by scale set only, so the tag filter runs here, over one paged list call.
        """
        with map_errors(_map_error):
            vms = self._list_all()
        return [_info(vm) for vm in vms if (vm.tags or {}).get(LABEL_MANAGED_BY) == "vmqueue"]

    def list_owned_extras(self) -> list[OwnedResource]:
        """The subscription's NICs, public IPs and managed disks tagged managed-by=vmqueue, one paged list
        each (every page: ARM's ``nextLink``), with what uses each: a NIC's VM, a public IP's NIC, a
        disk's VM (``managedBy``). The NIC and public IP a VM PUT declares carry its configurations'
        tags; one its VM's delete left is attached to nothing. Sources: ARM REST Network Interfaces -
        List All, Public IP Addresses - List All, Disks - List.
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


def _vm_model(
    spec: VMSpec,
    opts: AzureOptions,
    name: str,
    tags: dict[str, str],
    ssh_key: SSHPublicKey,
    startup_script: str | None,
    subnet_id: str,
    nsg_id: str | None,
) -> Any:
    """The VM PUT's body: size, image, OS disk, Linux login and script, and its network declared inline."""
    from azure.mgmt.compute import models as cm

    return cm.VirtualMachine(
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
                            path=f"/home/{opts.admin_username}/.ssh/authorized_keys", key_data=ssh_key.openssh
                        )
                    ]
                ),
            ),
        ),
        network_profile=azure_network.inline_network_profile(subnet_id, nsg_id, tags),
    )


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
    ip_config = azure_network.primary(nic.ip_configurations) if nic and nic.ip_configurations else None
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
