"""The Azure adapter's networking: which subnet and NSG a VM joins, the NIC and public IP declared inside
the VM request, the walk from a VM to its addresses, and the deletes of resources made the old way.

A VM PUT (Compute api-version >= 2020-11-01; azure-mgmt-compute 39 sends 2026-04-01) may declare its
network instead of referencing a NIC: ``networkProfile.networkApiVersion`` plus
``networkInterfaceConfigurations``, each with ``ipConfigurations[].publicIPAddressConfiguration``. Compute
then creates the NIC and the public IP with the VM, tagged with each configuration's ``tags``, and with
``deleteOption: Delete`` deletes them with it. Sources: Compute REST API, Virtual Machines - Create Or
Update (``VirtualMachineNetworkInterfaceConfiguration``, ``VirtualMachinePublicIPAddressConfiguration``:
"Resource tags applied to the ... created by this ... Configuration"); azure-rest-api-specs example
``VirtualMachine_Create_WithNetworkInterfaceConfigurationDnsSettings.json`` (2024-07-01), whose answer
names the NIC Compute made in ``networkProfile.networkInterfaces[].id``. Azure chooses those resources'
names (the reference does not define them), so the adapter reads their ids from the VM, never guesses.

Before inline networking, a create made the public IP ``{vm}-pip`` and the NIC ``{vm}-nic`` by PUTs of its
own; a destroy still deletes those two by name, NIC first, once the VM is gone (``delete_named_leftovers``).

A VM's addresses come from its primary NIC (``ipConfigurations[].privateIPAddress`` and the
``publicIPAddress.id`` of the primary one) and that public IP (``ipAddress``): one GET each
(``nic_and_public_ip``), or, for many VMs at once, from the lists of their resource group's NICs and public IPs
(``group_network``), which carry the same resources as those GETs. Sources: Virtual Network REST API,
Network Interfaces - List and Public IP Addresses - List (``GET .../resourceGroups/{rg}/providers/
Microsoft.Network/networkInterfaces`` and ``.../publicIPAddresses``: ``NetworkInterfaceListResult`` and
``PublicIPAddressListResult``, ``value`` plus ``nextLink`` "to get the next set of results"; azure-rest-api-specs
examples ``NetworkInterfaceList.json``, ``PublicIpAddressList.json``, 2024-05-01). ARM publishes no page size
for them: the pages a list took are counted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import suppress
from typing import Any

from vmqueue.models import LABEL_MANAGED_BY, VMSpec
from vmqueue.options import AzureOptions
from workers.providers.errors import InvalidSpecError

NETWORK_DEFAULTS = {"vnet": "vmq-vnet", "subnet": "vmq-subnet", "nsg": "vmq-nsg"}  # create_network's names
NETWORK_API_VERSION = "2022-11-01"  # the Microsoft.Network API Compute uses for what it creates (enum in the SDK)
# The names of the configurations inside the VM request (not of the resources Azure makes from them).
NIC_CONFIG, IP_CONFIG, PIP_CONFIG = "nic", "ipconfig1", "pip"
GETS_PER_VM = 2  # what nic_and_public_ip reads of a VM that has a NIC: its NIC, then its public IP


def subnet_and_nsg(
    network: Any, subscription_id: str | None, spec: VMSpec, opts: AzureOptions, ready: dict[tuple[str, str], Any]
) -> tuple[str, str | None]:
    """The subnet id and NSG id of the options; with create_network, made if missing (never silently).

    ``ready`` maps the (group, vnet) pairs this process already found or made to their NSG id: their
    lookups are not repeated on every create.
    """
    if opts.subnet_id:
        return opts.subnet_id, opts.nsg_id
    vnet, subnet = opts.vnet_name, opts.subnet_name
    if not opts.create_network and not (vnet and subnet):
        raise InvalidSpecError("Azure needs options.subnet_id, or vnet_name and subnet_name, or create_network=true")
    vnet, subnet = vnet or NETWORK_DEFAULTS["vnet"], subnet or NETWORK_DEFAULTS["subnet"]
    rg_path = f"/subscriptions/{subscription_id}/resourceGroups/{opts.resource_group}"
    subnet_id = f"{rg_path}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}"
    if not opts.create_network:
        return subnet_id, opts.nsg_id
    key = (opts.resource_group.lower(), vnet.lower())
    if key not in ready:
        ready[key] = create_network(network, spec, opts, rg_path, vnet, subnet)
    return subnet_id, ready[key]


def create_network(network: Any, spec: VMSpec, opts: AzureOptions, rg_path: str, vnet: str, subnet: str) -> str | None:
    """Resource group, an NSG allowing TCP 22 and the vnet/subnet, each only when missing."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.core.rest import HttpRequest
    from azure.mgmt.network import models as nm

    rg, owned = opts.resource_group, {LABEL_MANAGED_BY: "vmqueue"}
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
            # The subnet carries the NSG too, so a VM of a later process (which finds the vnet) is covered.
            subnets=[
                nm.Subnet(
                    name=subnet,
                    address_prefix="10.0.0.0/24",
                    network_security_group=nm.NetworkSecurityGroup(id=nsg_id) if nsg_id else None,
                )
            ],
        ),
        polling=False,
    )
    return nsg_id


def inline_network_profile(subnet_id: str, nsg_id: str | None, tags: dict[str, str]) -> Any:
    """The VM's network declared in its own request: one NIC with one IP configuration and a Standard
    static IPv4 public IP, both tagged like the VM (ownership included, so the sweeper finds them if
    they ever outlive it) and deleted with it (``deleteOption: Delete``)."""
    from azure.mgmt.compute import models as cm

    public_ip = cm.VirtualMachinePublicIPAddressConfiguration(
        name=PIP_CONFIG,
        tags=tags,
        sku=cm.PublicIPAddressSku(name="Standard"),  # Basic is retired
        delete_option="Delete",
        public_ip_allocation_method="Static",
        public_ip_address_version="IPv4",
    )
    nic = cm.VirtualMachineNetworkInterfaceConfiguration(
        name=NIC_CONFIG,
        tags=tags,
        primary=True,
        delete_option="Delete",
        network_security_group=cm.SubResource(id=nsg_id) if nsg_id else None,
        ip_configurations=[
            cm.VirtualMachineNetworkInterfaceIPConfiguration(
                name=IP_CONFIG,
                primary=True,
                subnet=cm.SubResource(id=subnet_id),
                public_ip_address_configuration=public_ip,
            )
        ],
    )
    return cm.NetworkProfile(network_api_version=NETWORK_API_VERSION, network_interface_configurations=[nic])


def nic_and_public_ip(
    network: Any, vm: Any, listed: Mapping[str, Any] | None = None, groups: Collection[str] = ()
) -> tuple[Any, Any]:
    """The VM's primary NIC and that NIC's primary public IP (None where absent): 2 GETs at most.

    A generic walk by the ids ARM reports (VM -> NIC -> public IP), so a VM whose NIC Azure named, or one
    made the old way, or one adopted, reads the same. ``listed``: the NICs and public IPs of the resource
    groups ``groups`` (lower-case names) by lower-case id (``group_network``); a resource in one of those
    groups is taken from it (missing: None, as a GET's 404 would be), one elsewhere is read by its GET.
    """
    group = nic_group(vm)
    if group is None:
        return None, None
    refs = vm.network_profile.network_interfaces
    nic = _find(network.network_interfaces.get, primary(refs).id, listed, groups)
    config = primary(nic.ip_configurations) if nic and nic.ip_configurations else None
    ref = config.public_ip_address if config else None
    pip = _find(network.public_ip_addresses.get, ref.id, listed, groups) if ref and ref.id else None
    return nic, pip


def nic_group(vm: Any) -> str | None:
    """The resource group (lower-case) of the VM's primary NIC; None when there are no addresses to read
    (no NIC reference, or the VM is deleting)."""
    refs = vm.network_profile.network_interfaces if vm.network_profile else None
    if vm.provisioning_state == "Deleting" or not refs or not primary(refs).id:
        return None
    return _group_of(primary(refs).id)


def group_network(network: Any, group: str) -> tuple[dict[str, Any], int]:
    """Every NIC and public IP of the resource group ``group`` by lower-case ARM id, from Network Interfaces
    - List and Public IP Addresses - List (every page: the SDK's pager follows ``nextLink``), and the
    number of pages (requests) the two lists took."""
    from azure.core.exceptions import ResourceNotFoundError

    found: dict[str, Any] = {}
    pages = 0
    for operations in (network.network_interfaces, network.public_ip_addresses):
        with suppress(ResourceNotFoundError):  # the group is gone: nothing in it (as each GET would say)
            for page in operations.list(group).by_page():
                pages += 1
                found.update((item.id.lower(), item) for item in page if item.id)
    return found, pages


def delete_named_leftovers(network: Any, rg: str, name: str) -> None:
    """The NIC ``{name}-nic``, then the public IP ``{name}-pip`` a create of an earlier version made by
    their own PUTs (absent: 204, so one of today's VMs costs two answered DELETEs).

    A NIC delete may be accepted (202) and finish later; until it has, ARM refuses the IP's delete (400
    ``PublicIPAddressCannotBeDeleted``), raised as transient for the destroy job to retry.
    """
    network.network_interfaces.begin_delete(rg, f"{name}-nic", polling=False).result()
    network.public_ip_addresses.begin_delete(rg, f"{name}-pip", polling=False).result()


def primary(items: list[Any]) -> Any:
    """The entry ARM marks ``primary`` (a VM's NIC reference, a NIC's IP configuration), whatever the order.

    ARM requires exactly one primary among several; a lone entry may leave ``primary`` unset.
    """
    return next((item for item in items if item.primary), items[0])


def _find(get: Any, resource_id: str, listed: Mapping[str, Any] | None, groups: Collection[str]) -> Any | None:
    """The resource of ``resource_id`` from ``listed`` if its group was listed, else by its GET."""
    if listed is not None and _group_of(resource_id) in groups:
        return listed.get(resource_id.lower())
    return _get_or_none(get, resource_id)


def _group_of(resource_id: str) -> str:
    """The lower-case resource group of an ARM id (``/subscriptions/<s>/resourceGroups/<rg>/...``)."""
    return resource_id.split("/")[4].lower()


def _get_or_none(get: Any, resource_id: str) -> Any | None:
    """GET a network resource by its ARM id; a missing one is None."""
    from azure.core.exceptions import ResourceNotFoundError

    parts = resource_id.split("/")
    with suppress(ResourceNotFoundError):
        return get(parts[4], parts[-1])
    return None
