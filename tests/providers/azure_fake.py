"""A small stateful ARM fake (Compute VMs and their OS disks, Network public IPs/NICs/vnets/NSGs, resource groups).

Payloads follow azure-rest-api-specs examples (VirtualMachine_Create_WithSshAuthentication.json,
VirtualMachine_Create_WithNetworkInterfaceConfigurationDnsSettings.json, VirtualMachine_Get_InstanceView.json,
PublicIpAddressGet.json). Transport-agnostic like ``oci_fake``:
``handle(method, url, headers, body)`` returns ``(status, headers, body)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from tests.providers.fakeapi import Call, FakeAPI, Response

SUB = "00000000-0000-0000-0000-000000000001"
RG = "vmq-rg"
RG_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}"
SUBNET_ID = f"{RG_PATH}/providers/Microsoft.Network/virtualNetworks/vnet1/subnets/default"
MSI_PATH = "/msi/token"
NSG_ID = f"{RG_PATH}/providers/Microsoft.Network/networkSecurityGroups/ssh-nsg"

_RESOURCE = re.compile(
    r"^(/subscriptions/[^/]+/resourceGroups/[^/]+)(?:/providers/(Microsoft\.\w+/\w+)/([^/]+))?$", re.I
)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return (
        status,
        {"x-ms-request-id": uuid.uuid4().hex, **(headers or {})},
        json.dumps({"error": {"code": code, "message": message}}),
    )


@dataclass
class FakeARM(FakeAPI):
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # lower-case ARM id -> resource
    slow_delete: bool = False  # a deleted VM stays "Deleting" instead of going at once
    polls_to_run: int | None = None  # GETs a Creating VM answers before Succeeded + running; None: stays
    ip_updating_reads: int | None = 0  # GETs a new public IP answers "Updating" before "Succeeded"; None: stays
    nic_delete_reads: int = 0  # a NIC DELETE is accepted (202) and the NIC stays "Deleting" for this many GETs
    allocation_fails_in: set[str] = field(default_factory=set)  # locations or sizes whose VMs fail late (Allocation)
    max_page: int = 1000  # the most items one list page holds (lower it to make lists span pages)
    os_disk_outlives_vm: bool = False  # a VM delete leaves its OS disk (its delete failed), detached
    network_outlives_vm: bool = False  # a VM delete leaves its NICs and public IPs (their deletes failed), detached

    def __post_init__(self) -> None:
        self.resources[RG_PATH.lower()] = {
            "id": RG_PATH,
            "name": RG,
            "type": "resourceGroups",
            "location": "westeurope",
        }

    def get(self, resource_id: str) -> dict[str, Any] | None:
        return self.resources.get(resource_id.lower())

    def vm(self, name: str) -> dict[str, Any]:
        return self.resources[f"{RG_PATH}/providers/Microsoft.Compute/virtualMachines/{name}".lower()]

    def route(self, call: Call) -> Response:
        if call.path == MSI_PATH:  # App Service managed identity, the credential the system test's worker uses
            expires_on = str(int(time.time()) + 3600)
            token = {"access_token": "fake-token", "expires_on": expires_on, "token_type": "Bearer"}
            return _ok({**token, "resource": call.query.get("resource"), "client_id": str(uuid.uuid4())})
        if call.method == "GET" and call.path.endswith("/providers/Microsoft.Compute/virtualMachines"):
            vms = [
                self._view(r, True) for r in self.resources.values() if r["type"] == "Microsoft.Compute/virtualMachines"
            ]
            return self._paged(call, vms)
        if call.method == "GET" and (
            listed := re.fullmatch(r"/subscriptions/[^/]+/providers/(Microsoft\.\w+/\w+)", call.path)
        ):
            kind = listed[1].lower()  # a subscription-wide list: NICs, public IPs, disks
            return self._paged(call, [self._listed(r) for r in self.resources.values() if r["type"].lower() == kind])
        if call.method == "GET" and (
            listed := re.fullmatch(
                r"(/subscriptions/[^/]+/resourceGroups/[^/]+)/providers/(Microsoft\.\w+/\w+)", call.path
            )
        ):
            group, kind = listed[1].lower(), listed[2].lower()  # a resource group's list: its NICs, public IPs
            if group not in self.resources:
                return error(
                    404, "ResourceGroupNotFound", f"Resource group '{group.split('/')[-1]}' could not be found."
                )
            items = [
                r for key, r in self.resources.items() if key.startswith(group + "/") and r["type"].lower() == kind
            ]
            return self._paged(call, [self._listed(r) for r in items])
        match = _RESOURCE.match(call.path)
        if not match:
            return error(404, "InvalidResourceType", f"no route {call.method} {call.path}")
        group, rtype, name = match.groups()
        if rtype is None:
            return self._group(call, call.path)
        if group.lower() not in self.resources:
            return error(404, "ResourceGroupNotFound", f"Resource group '{group.split('/')[-1]}' could not be found.")
        key, resource = call.path.lower(), self.resources.get(call.path.lower())
        if call.method == "GET":
            if resource is not None and "_reads_left" in resource:
                resource = self._progress(key, resource)
            if resource is None:
                return error(
                    404, "ResourceNotFound", f"The Resource '{rtype}/{name}' under resource group was not found."
                )
            return _ok(self._view(resource, call.query.get("$expand") == "instanceView"))
        if call.method == "DELETE":
            return self._delete(key, resource)
        if call.method == "PUT":
            if resource is not None and call.headers.get("if-none-match") == "*":
                return error(412, "PreconditionFailed", "The resource already exists (If-None-Match: *).")
            return self._put(call, rtype, name, resource)
        if call.method == "PATCH" and rtype.lower() == "microsoft.compute/disks":
            # Disks - Update: the body is a DiskUpdate; ``tags`` given replace the disk's tags.
            if resource is None:
                return error(
                    404, "ResourceNotFound", f"The Resource '{rtype}/{name}' under resource group was not found."
                )
            if "tags" in call.body:
                resource["tags"] = dict(call.body["tags"] or {})
            return _ok(self._view(resource, False))
        return error(405, "MethodNotAllowed", call.method)

    def _paged(self, call: Call, items: list[dict[str, Any]]) -> Response:
        """One page of a list as ARM pages it: ``value`` and, while more follow, ``nextLink`` (the same
        query with a ``$skiptoken``), which the SDK's pager requests as it is."""
        start = int(call.query.get("$skiptoken") or 0)
        end = start + self.max_page
        page: dict[str, Any] = {"value": items[start:end]}
        if end < len(items):
            query = {k: v for k, v in call.query.items() if k != "$skiptoken"}
            page["nextLink"] = f"{call.path}?{urlencode({**query, '$skiptoken': end})}"
        return _ok(page)

    def _listed(self, resource: dict[str, Any]) -> dict[str, Any]:
        """A resource as a list shows it; a public IP names the NIC IP configuration that uses it."""
        view = self._view(resource, False)
        if resource["type"] == "Microsoft.Network/publicIPAddresses":
            for nic in self.resources.values():
                for config in (
                    nic["properties"].get("ipConfigurations", []) if nic["type"].endswith("Interfaces") else []
                ):
                    if config["properties"].get("publicIPAddress", {}).get("id", "").lower() == resource["id"].lower():
                        view["properties"] = {**view["properties"], "ipConfiguration": {"id": config["id"]}}
        return view

    def _group(self, call: Call, path: str) -> Response:
        if call.method == "PUT":
            self.resources[path.lower()] = {
                "id": path,
                "name": path.split("/")[-1],
                "type": "resourceGroups",
                **call.body,
            }
        found = self.resources.get(path.lower())
        if found is None:
            return error(404, "ResourceGroupNotFound", "Resource group could not be found.")
        return _ok(found)

    def _put(self, call: Call, rtype: str, name: str, existing: dict[str, Any] | None) -> Response:
        properties = copy.deepcopy(call.body.get("properties", {}))  # call.body stays as sent
        resource = {
            "id": call.path,
            "name": name,
            "type": rtype,
            "location": call.body["location"],
            "tags": call.body.get("tags", {}),
            **({"sku": call.body["sku"]} if "sku" in call.body else {}),
            "properties": {**properties, "provisioningState": "Succeeded"},
        }
        props = resource["properties"]
        if rtype == "Microsoft.Network/publicIPAddresses":
            props |= {"ipAddress": "20.61.15.7", "resourceGuid": str(uuid.uuid4()), "idleTimeoutInMinutes": 4}
            if existing is None and self.ip_updating_reads != 0:
                props["provisioningState"] = "Updating"
                resource["_reads_left"] = self.ip_updating_reads  # None: never done
        elif rtype == "Microsoft.Network/networkInterfaces":
            for i, config in enumerate(props.get("ipConfigurations", [])):
                config["id"] = f"{call.path}/ipConfigurations/{config['name']}"
                config["properties"] |= {"privateIPAddress": f"10.0.0.{4 + i}", "provisioningState": "Succeeded"}
        elif rtype == "Microsoft.Compute/virtualMachines":
            props["osProfile"] = {
                k: v for k, v in properties["osProfile"].items() if k != "customData"
            }  # never returned
            props |= {
                "provisioningState": "Creating",
                "vmId": str(uuid.uuid4()),
                "timeCreated": "2026-01-15T10:00:00+00:00",
            }
            props["storageProfile"]["osDisk"] |= {"osType": "Linux", "caching": "ReadWrite"}
            self._os_disk(call, props["storageProfile"]["osDisk"])
            network = props["networkProfile"]
            configs = network.pop("networkInterfaceConfigurations", None)
            if configs is not None and not network.get("networkApiVersion"):
                return error(
                    400, "InvalidParameter", "networkApiVersion is required with networkInterfaceConfigurations."
                )
            for ref in network.get("networkInterfaces", []):
                if self.get(ref["id"]) is None:
                    return error(
                        400, "InvalidResourceReference", f"Resource {ref['id']} referenced by resource was not found."
                    )
            for ref in network.get("networkInterfaces", []):
                self.get(ref["id"])["properties"]["virtualMachine"] = {"id": call.path}
            if configs is not None:
                network["networkInterfaces"] = [self._inline_nic(call, name, config) for config in configs]
            resource["_power"] = None
            size = props.get("hardwareProfile", {}).get("vmSize")
            if {call.body["location"], size} & self.allocation_fails_in:
                resource["_failure"] = "AllocationFailed"  # accepted now, failed on a later read
        if existing and rtype != "Microsoft.Compute/virtualMachines":
            resource["properties"] = {**existing["properties"], **props}
        self.resources[call.path.lower()] = resource
        return (
            201 if existing is None else 200,
            {"Azure-AsyncOperation": "https://management.azure.com/op"},
            json.dumps(self._view(resource, False)),
        )

    def _inline_nic(self, call: Call, vm_name: str, config: dict[str, Any]) -> dict[str, Any]:
        """The NIC (and public IP) Compute makes from one of the VM request's ``networkInterfaceConfigurations``
        (Virtual Machines - Create Or Update, api-version >= 2020-11-01), tagged with the configuration's
        ``tags``; returns the VM's reference to it, as the documented answer shows
        (VirtualMachine_Create_WithNetworkInterfaceConfigurationDnsSettings.json: ``networkInterfaces``
        with the NIC's id and ``primary``). The reference does not say how Azure names them: the fake
        makes up names (a digest of the VM's id) that nobody can guess, so the adapter must read the ids.
        """
        group = call.path.split("/providers/", 1)[0]
        digest = hashlib.sha1(call.path.lower().encode()).hexdigest()[:6]
        nic_id = f"{group}/providers/Microsoft.Network/networkInterfaces/{vm_name}-{config['name']}-{digest}"
        props = config.get("properties", {})
        ip_configs = []
        for i, ip_config in enumerate(props.get("ipConfigurations", [])):
            ip_props = ip_config.get("properties", {})
            made = {
                "primary": ip_props.get("primary", False),
                "privateIPAddress": f"10.0.0.{4 + i}",
                "privateIPAllocationMethod": "Dynamic",
                "subnet": ip_props["subnet"],
                "provisioningState": "Succeeded",
            }
            if (pip := ip_props.get("publicIPAddressConfiguration")) is not None:
                pip_name = f"{vm_name}-{config['name']}-{ip_config['name']}-{pip['name']}-{digest}"
                pip_id = f"{group}/providers/Microsoft.Network/publicIPAddresses/{pip_name}"
                pip_props = pip.get("properties", {})
                self.resources[pip_id.lower()] = {
                    "id": pip_id,
                    "name": pip_name,
                    "type": "Microsoft.Network/publicIPAddresses",
                    "location": call.body["location"],
                    "tags": dict(pip.get("tags") or {}),
                    "sku": pip.get("sku") or {"name": "Standard"},
                    "properties": {
                        "publicIPAllocationMethod": pip_props.get("publicIPAllocationMethod", "Static"),
                        "publicIPAddressVersion": pip_props.get("publicIPAddressVersion", "IPv4"),
                        "ipAddress": "20.61.15.7",
                        "provisioningState": "Succeeded",
                        "idleTimeoutInMinutes": 4,
                    },
                    "_delete_with_vm": pip_props.get("deleteOption") == "Delete",
                }
                made["publicIPAddress"] = {"id": pip_id}
            ip_configs.append(
                {"name": ip_config["name"], "id": f"{nic_id}/ipConfigurations/{ip_config['name']}", "properties": made}
            )
        nic_props: dict[str, Any] = {
            "primary": props.get("primary", False),
            "ipConfigurations": ip_configs,
            "virtualMachine": {"id": call.path},
            "provisioningState": "Succeeded",
        }
        if props.get("networkSecurityGroup"):
            nic_props["networkSecurityGroup"] = props["networkSecurityGroup"]
        self.resources[nic_id.lower()] = {
            "id": nic_id,
            "name": nic_id.rsplit("/", 1)[-1],
            "type": "Microsoft.Network/networkInterfaces",
            "location": call.body["location"],
            "tags": dict(config.get("tags") or {}),
            "properties": nic_props,
            "_delete_with_vm": props.get("deleteOption") == "Delete",
        }
        return {"id": nic_id, "properties": {"primary": props.get("primary", False)}}

    def _os_disk(self, call: Call, os_disk: dict[str, Any]) -> None:
        """The managed OS disk a VM PUT creates (``createOption: FromImage``), named as the request says.

        The request cannot tag it (OSDisk and ManagedDiskParameters have no ``tags``) and the REST
        reference documents no copy of the VM's tags, so it has none; ``managedBy`` names the VM.
        """
        group = call.path.split("/providers/", 1)[0]
        disk_id = f"{group}/providers/Microsoft.Compute/disks/{os_disk['name']}"
        os_disk["managedDisk"] = {"storageAccountType": "Standard_LRS", **os_disk.get("managedDisk", {}), "id": disk_id}
        self.resources.setdefault(
            disk_id.lower(),
            {
                "id": disk_id,
                "name": os_disk["name"],
                "type": "Microsoft.Compute/disks",
                "location": call.body["location"],
                "tags": {},
                "managedBy": call.path,
                "sku": {"name": "Standard_LRS", "tier": "Standard"},
                "properties": {
                    "osType": "Linux",
                    "creationData": {"createOption": "FromImage"},
                    "diskSizeGB": 30,
                    "diskState": "Attached",
                    "timeCreated": "2026-01-15T10:00:00+00:00",
                    "provisioningState": "Succeeded",
                },
            },
        )

    def _delete(self, key: str, resource: dict[str, Any] | None) -> Response:
        if resource is None:
            return 204, {}, ""
        props = resource["properties"]
        if resource["type"] == "Microsoft.Network/networkInterfaces" and props.get("virtualMachine"):
            if self.get(props["virtualMachine"]["id"]):
                return error(400, "NicInUse", "Network Interface is used by existing resource.")
        if resource["type"] == "Microsoft.Network/networkInterfaces" and self.nic_delete_reads:
            props["provisioningState"], resource["_reads_left"] = "Deleting", self.nic_delete_reads
            return 202, {"Location": "https://management.azure.com/op"}, ""
        if resource["type"] == "Microsoft.Network/publicIPAddresses":
            for nic in self.resources.values():
                for config in (
                    nic["properties"].get("ipConfigurations", []) if nic["type"].endswith("Interfaces") else []
                ):
                    if config["properties"].get("publicIPAddress", {}).get("id", "").lower() == key:
                        return error(400, "PublicIPAddressCannotBeDeleted", "Public IP address is in use.")
        if resource["type"] == "Microsoft.Compute/virtualMachines":
            if self.slow_delete:
                props["provisioningState"] = "Deleting"
                return 202, {"Azure-AsyncOperation": "https://management.azure.com/op"}, ""
            del self.resources[key]
            self._cascade(resource)
            return 200, {}, ""
        del self.resources[key]
        return 200, {}, ""

    def _progress(self, key: str, resource: dict[str, Any]) -> dict[str, Any] | None:
        """One read of a resource whose operation is still running: a deleting NIC goes, an IP provisions."""
        left = resource["_reads_left"]
        if left is not None and left <= 0:
            del resource["_reads_left"]
            if resource["properties"]["provisioningState"] == "Deleting":
                del self.resources[key]
                return None
            resource["properties"]["provisioningState"] = "Succeeded"
        elif left is not None:
            resource["_reads_left"] = left - 1
        return resource

    def _cascade(self, vm: dict[str, Any]) -> None:
        """What delete_option="Delete" removes with the VM: its OS disk, its NICs and their public IPs."""
        os_disk = vm["properties"]["storageProfile"]["osDisk"]
        disk = self.resources.get(os_disk.get("managedDisk", {}).get("id", "").lower())
        if disk is not None:
            if os_disk.get("deleteOption") == "Delete" and not self.os_disk_outlives_vm:
                del self.resources[disk["id"].lower()]
            else:  # detached, as ARM leaves a disk whose VM is gone
                disk["managedBy"], disk["properties"]["diskState"] = None, "Unattached"
        for ref in vm["properties"]["networkProfile"]["networkInterfaces"]:
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                continue
            with_vm = nic.get("_delete_with_vm") or ref.get("properties", {}).get("deleteOption") == "Delete"
            if not with_vm or self.network_outlives_vm:
                nic["properties"].pop("virtualMachine", None)  # detached, as ARM leaves a NIC whose VM is gone
                continue
            del self.resources[ref["id"].lower()]
            for config in nic["properties"].get("ipConfigurations", []):
                pip_id = config["properties"].get("publicIPAddress", {}).get("id", "").lower()
                pip = self.resources.get(pip_id, {})
                if pip.get("_delete_with_vm") or pip.get("properties", {}).get("deleteOption") == "Delete":
                    del self.resources[pip_id]

    def _view(self, resource: dict[str, Any], instance_view: bool) -> dict[str, Any]:
        view = {k: v for k, v in resource.items() if not k.startswith("_")}
        if resource["type"] != "Microsoft.Compute/virtualMachines" or not instance_view:
            return view
        props = resource["properties"]
        if props["provisioningState"] == "Creating" and self.polls_to_run is not None:
            resource["_polls"] = resource.get("_polls", 0) + 1
            if resource["_polls"] > self.polls_to_run:
                props["provisioningState"], resource["_power"] = "Succeeded", "PowerState/running"
        if resource.get("_failure") and props["provisioningState"] == "Creating":
            props["provisioningState"] = "Failed"
        statuses = [{"code": f"ProvisioningState/{props['provisioningState'].lower()}", "level": "Info"}]
        if resource.get("_failure"):
            statuses = [{"code": f"ProvisioningState/failed/{resource['_failure']}", "level": "Error"}]
        if resource["_power"]:
            statuses.append({"code": resource["_power"], "level": "Info", "displayStatus": resource["_power"]})
        view["properties"] = {**props, "instanceView": {"computerName": resource["name"], "statuses": statuses}}
        return view


def _ok(payload: Any) -> Response:
    return 200, {"x-ms-request-id": uuid.uuid4().hex}, json.dumps(payload)
