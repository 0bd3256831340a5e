"""Azure adapter through the real azure-mgmt SDKs; HTTP answered by a stateful ARM fake through ``responses``."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from azure.core.credentials import AccessToken, AccessTokenInfo
from requests.exceptions import ConnectionError as RequestsConnectionError

from tests.providers.azure_fake import MSI_PATH, NSG_ID, RG, RG_PATH, SUB, SUBNET_ID, FakeARM, error
from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter
from tests.providers.contract import parsed_key as key
from tests.providers.fakeapi import serve
from vmqueue.models import JobState, VMSpec, VMStatus
from vmqueue.userdata import sent_size
from workers.providers.azure import AzureProvider, _map_error
from workers.providers.errors import (
    AuthError,
    CapacityError,
    InvalidSpecError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
)

SCRIPT = "#cloud-config\npackages: [nginx]\n"
VM_ID = f"{RG_PATH}/providers/Microsoft.Compute/virtualMachines/web-1".removeprefix("/")
AZURE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET")


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("fake-token", int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, **kwargs: Any) -> AccessTokenInfo:
        return AccessTokenInfo("fake-token", int(time.time()) + 3600)


@pytest.fixture
def fake() -> Iterator[FakeARM]:
    fake = FakeARM()

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for method in ("GET", "PUT", "PATCH", "DELETE", "POST", "HEAD"):
            mock.add_callback(
                method, re.compile(r"https://management\.azure\.com/.*"), callback=fake.answer(RequestsConnectionError)
            )
        yield fake


@pytest.fixture
def provider(fake: FakeARM) -> AzureProvider:
    provider = AzureProvider(credential=FakeCredential(), subscription_id=SUB)
    provider.poll_s = 0.0  # the fake's operations finish after a number of reads, not of seconds
    return provider


def make_spec(image: str = "Canonical:ubuntu-24_04-lts:server:latest", **options: Any) -> VMSpec:
    opts = {"resource_group": RG, "subnet_id": SUBNET_ID, "nsg_id": NSG_ID, "admin_username": "ops"}
    return VMSpec(
        provider="azure",
        name="web-1",
        region="westeurope",
        instance_type="Standard_B1s",
        image=image,
        labels={"team": "infra"},
        options={**opts, **options},
    )


def boot(fake: FakeARM, provisioning: str = "Succeeded", power: str | None = "PowerState/running") -> None:
    vm = fake.vm("web-1")
    vm["properties"]["provisioningState"], vm["_power"] = provisioning, power


def _json(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body)


OWNED = {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": "job-1"}


def nic_of(fake: FakeARM, vm: str = "web-1") -> dict[str, Any]:
    """The NIC Azure made for the VM from its inline configuration (named by Azure: found by the VM's reference)."""
    [ref] = fake.vm(vm)["properties"]["networkProfile"]["networkInterfaces"]
    return fake.get(ref["id"])


def _add_long_lived(fake: FakeARM, count: int) -> None:
    """Up to ``count`` running VMs beside the test's, copies of web-1 (the list shows them; nobody asks)."""
    template = fake.vm("web-1")
    have = sum(r["name"].startswith("old-") for r in fake.resources.values())
    for n in range(have, count):
        vm_id = template["id"].replace("/web-1", f"/old-{n}")
        fake.resources[vm_id.lower()] = {**template, "id": vm_id, "name": f"old-{n}", "_power": "PowerState/running"}


def _create_named(provider: AzureProvider, name: str) -> str:
    return provider.create_vm(make_spec().model_copy(update={"name": name}), key(), job_id=f"job-{name}").instance_id


def _run(fake: FakeARM, name: str) -> None:
    vm = fake.vm(name)
    vm["properties"]["provisioningState"], vm["_power"] = "Succeeded", "PowerState/running"


def pip_of(fake: FakeARM, vm: str = "web-1") -> dict[str, Any]:
    [config] = nic_of(fake, vm)["properties"]["ipConfigurations"]
    return fake.get(config["properties"]["publicIPAddress"]["id"])


class TestAzure(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(self, provider: AzureProvider, fake: FakeARM) -> None:
        """ready_when=cloud_init: the user-data sent, whatever the user's script format, passes cloud-init's schema."""
        for i, script in enumerate(phone_home_scripts().values()):
            provider.create_vm(make_spec().model_copy(update={"name": f"web-{i}"}), key(), script, job_id=f"job-{i}")
        puts = fake.calls_to("PUT", r"/virtualMachines/web-\d$")
        sent = [base64.b64decode(put.body["properties"]["osProfile"]["customData"]).decode() for put in puts]
        assert sent == list(phone_home_scripts().values())
        assert_cloud_init_accepts(sent)

    def test_meter_sees_every_request(self, provider: AzureProvider, fake: FakeARM, key: Any) -> None:
        """Each request on the wire passes the meter first (the budget's hook), and each answer after it."""
        meter = provider.meter = RecordingMeter()
        vm = provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id="job-1")
        boot(fake)
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id])
        provider.destroy_vm(vm.instance_id)

        wire = [(call.method, call.path) for call in fake.calls]
        assert meter.requests() == wire and sum(m == "PUT" for m, _ in wire) == 1
        assert [(m, t) for m, t, _, _ in meter.answers] == wire

    def test_create_sends_key_script_and_labels(self, provider: AzureProvider, fake: FakeARM) -> None:
        ssh_key = key()
        info = provider.create_vm(make_spec(), ssh_key, SCRIPT, job_id="job-1")

        assert (info.instance_id, info.status, info.provider_status) == (VM_ID, VMStatus.pending, "Creating")
        # Not a first attempt: its VM is looked up, then one PUT, the network declared inside it.
        assert [(c.method, c.path) for c in fake.calls] == [("GET", "/" + VM_ID), ("PUT", "/" + VM_ID)]
        put = fake.calls[-1]
        assert put.headers["if-none-match"] == "*"
        vm = put.body["properties"]
        assert put.body["tags"] == OWNED and vm["hardwareProfile"] == {"vmSize": "Standard_B1s"}
        assert base64.b64decode(vm["osProfile"]["customData"]).decode() == SCRIPT
        assert len(base64.b64decode(vm["osProfile"]["customData"])) == sent_size("azure", None, ssh_key, SCRIPT).size
        assert vm["osProfile"]["adminUsername"] == "ops" and vm["osProfile"]["computerName"] == "web-1"
        assert vm["osProfile"]["linuxConfiguration"] == {
            "disablePasswordAuthentication": True,
            "ssh": {"publicKeys": [{"path": "/home/ops/.ssh/authorized_keys", "keyData": ssh_key.openssh}]},
        }
        assert vm["storageProfile"]["osDisk"] == {
            "name": "web-1-osdisk",
            "createOption": "FromImage",
            "deleteOption": "Delete",
        }
        assert vm["networkProfile"] == {
            "networkApiVersion": "2022-11-01",
            "networkInterfaceConfigurations": [
                {
                    "name": "nic",
                    "tags": OWNED,
                    "properties": {
                        "primary": True,
                        "deleteOption": "Delete",
                        "networkSecurityGroup": {"id": NSG_ID},
                        "ipConfigurations": [
                            {
                                "name": "ipconfig1",
                                "properties": {
                                    "primary": True,
                                    "subnet": {"id": SUBNET_ID},
                                    "publicIPAddressConfiguration": {
                                        "name": "pip",
                                        "tags": OWNED,
                                        "sku": {"name": "Standard"},
                                        "properties": {
                                            "deleteOption": "Delete",
                                            "publicIPAllocationMethod": "Static",
                                            "publicIPAddressVersion": "IPv4",
                                        },
                                    },
                                },
                            }
                        ],
                    },
                }
            ],
        }
        # What Azure made with the VM carries its tags (the sweeper's handle) and goes with it.
        assert nic_of(fake)["tags"] == pip_of(fake)["tags"] == OWNED
        assert all(c.query["api-version"] for c in fake.calls)

    def test_create_without_network_options_is_invalid(self, provider: AzureProvider, fake: FakeARM) -> None:
        with pytest.raises(InvalidSpecError, match="subnet_id, or vnet_name and subnet_name, or create_network"):
            provider.create_vm(make_spec(subnet_id=None), key(), job_id="job-1")
        assert not fake.calls

    def test_create_network_only_when_asked_and_missing(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(subnet_id=None, nsg_id=None, create_network=True), key(), job_id="job-1")

        [vnet] = fake.calls_to("PUT", r"/virtualNetworks/vmq-vnet$")
        [made] = vnet.body["properties"]["subnets"]
        assert (made["name"], made["properties"]["addressPrefix"]) == ("vmq-subnet", "10.0.0.0/24")
        [nsg] = fake.calls_to("PUT", r"/networkSecurityGroups/vmq-nsg$")
        [rule] = nsg.body["properties"]["securityRules"]
        assert (rule["properties"]["destinationPortRange"], rule["properties"]["access"]) == ("22", "Allow")
        assert vnet.body["properties"]["subnets"][0]["properties"]["networkSecurityGroup"] == {
            "id": f"{RG_PATH}/providers/Microsoft.Network/networkSecurityGroups/vmq-nsg"
        }  # so a VM of another process, which finds the vnet, is covered too
        [put] = fake.calls_to("PUT", r"/virtualMachines/")
        [nic] = put.body["properties"]["networkProfile"]["networkInterfaceConfigurations"]
        assert nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"].endswith(
            "/virtualNetworks/vmq-vnet/subnets/vmq-subnet"
        )
        fake.calls.clear()
        provider.create_vm(make_spec(subnet_id=None, nsg_id=None, create_network=True), key(), job_id="job-1")
        assert not fake.calls_to("PUT", r"/virtualNetworks/|/networkSecurityGroups/")  # exists: left alone
        assert not fake.calls_to("GET", r"/virtualNetworks/|/resourceGroups/vmq-rg$")  # found once per process

    def test_create_resolves_image_alias(self, provider: AzureProvider, fake: FakeARM) -> None:
        assert provider.prepare_spec(make_spec(image="ubuntu-22.04")).image == (
            "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2:latest"
        )
        spec = provider.prepare_spec(make_spec(image="debian-12"))
        provider.create_vm(spec, key(), job_id="job-1")
        [put] = fake.calls_to("PUT", r"/virtualMachines/")
        assert put.body["properties"]["storageProfile"]["imageReference"] == {
            "publisher": "Debian",
            "offer": "debian-12",
            "sku": "12-gen2",
            "version": "latest",
        }
        native = "Canonical:0001-com-ubuntu-server-jammy:22_04-lts:22.04.202601150"
        assert provider.prepare_spec(make_spec(image=native)).image == native
        with pytest.raises(InvalidSpecError, match="publisher:offer:sku:version"):
            provider.prepare_spec(make_spec(image="ubuntu"))

    def test_create_twice_same_job_one_vm(self, provider: AzureProvider, fake: FakeARM) -> None:
        first = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")
        second = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")

        assert first.instance_id == second.instance_id == VM_ID
        assert [c.query.get("$expand") for c in fake.calls_to("GET", r"/virtualMachines/")] == ["instanceView"] * 2
        assert len([r for r in fake.resources.values() if r["type"] == "Microsoft.Compute/virtualMachines"]) == 1
        puts = len(fake.calls_to("PUT", ""))
        with pytest.raises(InvalidSpecError, match="another job"):
            provider.create_vm(make_spec(), key(), job_id="job-2")
        assert len(fake.calls_to("PUT", "")) == puts  # another job's NIC and IP were not touched

    def test_create_lost_answer_one_vm(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.drop.append("PUT /virtualMachines/web-1")  # ARM accepts the VM, the answer is lost

        info = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")  # read back and adopted
        again = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")  # a redelivery

        assert info.instance_id == again.instance_id == VM_ID
        assert len([r for r in fake.resources.values() if r["type"] == "Microsoft.Compute/virtualMachines"]) == 1

    def test_first_attempt_create_costs_one_request(self, provider: AzureProvider, fake: FakeARM) -> None:
        """No lookup before a first attempt's PUT (no create of the job was ever sent); NIC and public IP
        inside it. The answer names the NIC Azure made; the public IP reads through it (VM, NIC, IP)."""
        info = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1", first_attempt=True)

        assert [(c.method, c.path) for c in fake.calls] == [("PUT", "/" + VM_ID)]
        assert info.instance_id == VM_ID and info.labels["vmqueue-job"] == "job-1"
        boot(fake)
        fake.calls.clear()
        assert provider.get_vm(VM_ID).public_ipv4 == "20.61.15.7"
        nic, pip = nic_of(fake), pip_of(fake)
        assert [c.path for c in fake.calls] == ["/" + VM_ID, nic["id"], pip["id"]]

    def test_first_attempt_on_a_taken_name_still_refuses_a_foreign_vm(self, provider: AzureProvider, fake: FakeARM):
        provider.create_vm(make_spec(), key(), job_id="job-1", first_attempt=True)
        fake.calls.clear()
        with pytest.raises(InvalidSpecError, match="another job"):
            provider.create_vm(make_spec(), key(), job_id="job-2", first_attempt=True)
        assert [(c.method, c.headers.get("if-none-match")) for c in fake.calls] == [("PUT", "*"), ("GET", None)]
        assert fake.vm("web-1")["tags"]["vmqueue-job"] == "job-1"  # the PUT changed nothing (412)

    def test_first_attempt_lost_answer_is_adopted(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.drop.append("PUT /virtualMachines/web-1")  # ARM makes the VM, its NIC and IP; the answer is lost

        info = provider.create_vm(make_spec(), key(), job_id="job-1", first_attempt=True)

        assert info.instance_id == VM_ID
        assert [c.method for c in fake.calls] == ["PUT", "GET"]  # read back once, adopted
        assert sum(r["type"] == "Microsoft.Compute/virtualMachines" for r in fake.resources.values()) == 1

    @pytest.mark.parametrize(
        ("provisioning", "power", "expected"),
        [
            ("Creating", None, VMStatus.pending),
            ("Creating", "PowerState/starting", VMStatus.pending),
            ("Migrating", "PowerState/running", VMStatus.pending),
            ("Succeeded", None, VMStatus.pending),
            ("Succeeded", "PowerState/starting", VMStatus.pending),
            ("Succeeded", "PowerState/running", VMStatus.running),
            ("Updating", "PowerState/running", VMStatus.running),
            ("Succeeded", "PowerState/stopping", VMStatus.stopping),
            ("Succeeded", "PowerState/deallocating", VMStatus.stopping),
            ("Updating", "PowerState/stopped", VMStatus.stopped),
            ("Succeeded", "PowerState/deallocated", VMStatus.stopped),
            ("Deleting", "PowerState/running", VMStatus.terminating),
            ("Failed", "PowerState/running", VMStatus.error),
            ("Canceled", None, VMStatus.unknown),
            ("Succeeded", "PowerState/unknown", VMStatus.unknown),
        ],
    )
    def test_get_maps_every_documented_state(
        self, provider: AzureProvider, fake: FakeARM, provisioning: str, power: str | None, expected: VMStatus
    ) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake, provisioning, power)

        info = provider.get_vm(VM_ID)

        assert info.status is expected
        assert info.provider_status == " ".join(filter(None, (provisioning, power)))

    def test_get_failed_names_the_failure(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake, "Failed", None)
        fake.vm("web-1")["_failure"] = "OSProvisioningTimedOut"

        info = provider.get_vm(VM_ID)

        assert info.status is VMStatus.error
        assert info.provider_status == "Failed ProvisioningState/failed/OSProvisioningTimedOut"
        assert not fake.calls_to("DELETE", "")  # not a capacity failure: the job's cleanup decides

    def test_late_allocation_failure_is_capacity_and_leaves_nothing(
        self, provider: AzureProvider, fake: FakeARM
    ) -> None:
        """The VM PUT is accepted, the instance view later says AllocationFailed: CapacityError from get_vm
        (the lifecycle fails over on it) once the VM's delete is sent; the batched read reports it in error."""
        fake.allocation_fails_in = {"westeurope"}
        assert provider.create_vm(make_spec(), key(), job_id="job-1").status is VMStatus.pending

        batch = provider.get_vms([VM_ID])
        assert batch[VM_ID].status is VMStatus.error and not fake.calls_to("DELETE", "")
        with pytest.raises(CapacityError) as caught:
            provider.get_vm(VM_ID)

        assert caught.value.provider_code == "AllocationFailed"
        assert list(fake.resources) == [RG_PATH.lower()]  # VM, NIC and public IP went together
        # The next placement has resources of its own, whatever is left of this one.
        other = make_spec().model_copy(update={"region": "northeurope"})
        vm = provider.create_vm(other, key(), job_id="job-1-p1")
        assert vm.instance_id == VM_ID + "-p1" and vm.region == "northeurope"
        [put] = fake.calls_to("PUT", r"/virtualMachines/web-1-p1$")
        assert put.body["properties"]["osProfile"]["computerName"] == "web-1"

    def test_get_public_and_private_ips(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake)
        fake.calls.clear()

        info = provider.get_vm(VM_ID)

        assert (info.status, info.public_ipv4, info.private_ipv4, info.public_ipv6) == (
            VMStatus.running,
            "20.61.15.7",
            "10.0.0.4",
            None,
        )
        assert (info.region, info.instance_type, info.image) == (
            "westeurope",
            "Standard_B1s",
            "Canonical:ubuntu-24_04-lts:server:latest",
        )
        assert info.labels == OWNED and info.created_at is not None
        assert [c.path for c in fake.calls_to("GET", "")] == ["/" + VM_ID, nic_of(fake)["id"], pip_of(fake)["id"]]

    def test_get_multi_nic_reads_the_primary(self, provider: AzureProvider, fake: FakeARM) -> None:
        """Two NICs, the first reference the private-only one (primary false): the primary NIC's addresses."""
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake)
        nic_path = f"{RG_PATH}/providers/Microsoft.Network/networkInterfaces/"
        primary = nic_of(fake)
        second = {
            **primary,
            "id": nic_path + "web-1-nic2",
            "name": "web-1-nic2",
            "properties": {
                "provisioningState": "Succeeded",
                "primary": False,
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "id": nic_path + "web-1-nic2/ipConfigurations/ipconfig1",
                        "properties": {"primary": True, "privateIPAddress": "10.0.1.9", "subnet": {"id": SUBNET_ID}},
                    }
                ],
            },
        }
        fake.resources[second["id"].lower()] = second
        # The primary NIC holds a secondary IP configuration first, without a public IP.
        [config] = primary["properties"]["ipConfigurations"]
        config["properties"]["primary"] = True
        extra = {"name": "ipconfig2", "properties": {"primary": False, "privateIPAddress": "10.0.0.99"}}
        primary["properties"]["ipConfigurations"] = [extra, config]
        refs = fake.vm("web-1")["properties"]["networkProfile"]["networkInterfaces"]
        refs[0]["properties"]["primary"] = True
        refs.insert(0, {"id": second["id"], "properties": {"primary": False}})

        info = provider.get_vm(VM_ID)

        assert (info.public_ipv4, info.private_ipv4) == ("20.61.15.7", "10.0.0.4")

    def test_get_without_public_ip(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        nic = nic_of(fake)
        del nic["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]

        info = provider.get_vm(VM_ID)

        assert info.public_ipv4 is None and info.private_ipv4 == "10.0.0.4"
        assert not fake.calls_to("GET", r"/publicIPAddresses/")

    def test_get_unknown_raises_not_found(self, provider: AzureProvider) -> None:
        with pytest.raises(NotFoundError) as caught:
            provider.get_vm(VM_ID)
        assert caught.value.provider_code == "ResourceNotFound"
        with pytest.raises(InvalidSpecError, match="ARM id"):
            provider.get_vm("web-1")

    def test_destroy(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        fake.calls.clear()

        assert provider.destroy_vm(VM_ID) is None

        assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in fake.calls if c.method != "PUT"] == [
            ("DELETE", "web-1"),
            ("GET", "web-1"),
            ("DELETE", "web-1-nic"),
            ("DELETE", "web-1-pip"),
        ]
        assert list(fake.resources) == [RG_PATH.lower()]  # nothing of the VM is left

    def test_destroy_while_deleting_leaves_helpers_to_the_vm(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        fake.slow_delete = True

        assert provider.destroy_vm(VM_ID) is None

        assert not fake.calls_to("DELETE", r"-nic$|-pip$")  # they go with the VM (delete_option="Delete")
        assert provider.get_vm(VM_ID).status is VMStatus.terminating

    def test_destroy_half_done_create(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.fail(
            "PUT",
            r"/virtualMachines/",
            error(
                409,
                "OperationNotAllowed",
                "Operation could not be completed as it results in exceeding approved standardBSFamily Cores quota.",
            ),
        )
        with pytest.raises(QuotaExceededError):
            provider.create_vm(make_spec(), key(), job_id="job-1")
        # Refused for good: nothing was made (the NIC and public IP come with the VM or not at all).
        assert list(fake.resources) == [RG_PATH.lower()]

        provider.destroy_vm(VM_ID)

        assert list(fake.resources) == [RG_PATH.lower()]

    def test_vm_put_500_every_attempt_leaves_nothing(self, provider: AzureProvider, fake: FakeARM) -> None:
        """Each attempt whose VM PUT answers 500 looks for its VM (none) and leaves nothing: the last one may
        be the job's last."""
        for _ in range(3):
            fake.fail("PUT", r"/virtualMachines/", error(500, "InternalServerError", "try later"))
            with pytest.raises(TransientError) as caught:
                provider.create_vm(make_spec(), key(), job_id="job-1")
            assert caught.value.provider_code == "InternalServerError"
            assert list(fake.resources) == [RG_PATH.lower()]
        provider.create_vm(make_spec(), key(), job_id="job-1")  # the retry makes them
        assert len(fake.resources) == 5  # group, VM and the OS disk, NIC and public IP it made

    def test_refused_create_leaves_nothing_and_keeps_its_code(self, provider: AzureProvider, fake: FakeARM) -> None:
        """A refused VM PUT made nothing (its NIC and public IP are made with the VM or not at all): one
        request, nothing to clean up, and the error raised is the provider's own."""
        quota = "Operation could not be completed as it results in exceeding approved standardBSFamily Cores quota."
        fake.fail("PUT", r"/virtualMachines/", error(409, "OperationNotAllowed", quota))

        with pytest.raises(QuotaExceededError) as caught:
            provider.create_vm(make_spec(), key(), job_id="job-1", first_attempt=True)

        assert (caught.value.provider_code, caught.value.message) == ("OperationNotAllowed", quota)
        assert [c.method for c in fake.calls] == ["PUT"] and list(fake.resources) == [RG_PATH.lower()]

    def test_a_vm_made_the_old_way_reads_and_goes_with_its_named_nic_and_ip(
        self, provider: AzureProvider, fake: FakeARM
    ) -> None:
        """A VM an earlier vmqueue made with its own PUTs of ``web-1-pip`` and ``web-1-nic`` (here detached
        on delete): read through the same walk, and destroyed NIC first, then the IP it freed."""
        base = f"https://management.azure.com{RG_PATH}/providers"
        pip_id = f"{RG_PATH}/providers/Microsoft.Network/publicIPAddresses/web-1-pip"
        nic_id = f"{RG_PATH}/providers/Microsoft.Network/networkInterfaces/web-1-nic"
        fake.handle("PUT", f"{base}/Microsoft.Network/publicIPAddresses/web-1-pip", {}, _json(
            {"location": "westeurope", "tags": OWNED, "sku": {"name": "Standard"}, "properties": {}}
        ))  # fmt: skip
        ip_config = {
            "name": "ipconfig1",
            "properties": {"subnet": {"id": SUBNET_ID}, "publicIPAddress": {"id": pip_id}},
        }
        fake.handle("PUT", f"{base}/Microsoft.Network/networkInterfaces/web-1-nic", {}, _json(
            {"location": "westeurope", "tags": OWNED, "properties": {"ipConfigurations": [ip_config]}}
        ))  # fmt: skip
        vm = {
            "location": "westeurope",
            "tags": OWNED,
            "properties": {
                "hardwareProfile": {"vmSize": "Standard_B1s"},
                "storageProfile": {"osDisk": {"name": "web-1-osdisk", "createOption": "FromImage"}},
                "osProfile": {"computerName": "web-1", "adminUsername": "ops"},
                "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {"primary": True}}]},
            },
        }
        fake.handle("PUT", f"https://management.azure.com/{VM_ID}", {}, _json(vm))
        boot(fake)
        assert provider.get_vm(VM_ID).public_ipv4 == "20.61.15.7"
        fake.calls.clear()

        provider.destroy_vm(VM_ID)

        assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in fake.calls] == [
            ("DELETE", "web-1"),
            ("GET", "web-1"),
            ("DELETE", "web-1-nic"),
            ("DELETE", "web-1-pip"),
        ]
        assert fake.get(nic_id) is None and fake.get(pip_id) is None

    def test_destroy_twice(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        provider.destroy_vm(VM_ID)

        assert provider.destroy_vm(VM_ID) is None
        assert list(fake.resources) == [RG_PATH.lower()]

    def test_destroy_unknown_id(self, provider: AzureProvider, fake: FakeARM) -> None:
        assert provider.destroy_vm(VM_ID.replace("web-1", "nope")) is None
        assert len(fake.calls_to("DELETE", "")) == 3  # VM 204, then NIC and IP by name, absent: 204
        gone_group = VM_ID.replace(RG, "deleted-rg")
        assert provider.destroy_vm(gone_group) is None

    def test_destroy_nic_still_reserved_is_transient(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.fail(
            "DELETE", r"/networkInterfaces/", error(400, "NicReservedForAnotherVm", "Nic is reserved for another VM.")
        )
        with pytest.raises(TransientError) as caught:
            provider.destroy_vm(VM_ID)
        assert caught.value.provider_code == "NicReservedForAnotherVm"

    @pytest.mark.parametrize(
        ("status", "code", "expected"),
        [
            (401, "InvalidAuthenticationToken", AuthError),
            (403, "AuthorizationFailed", AuthError),
            (400, "InvalidParameter", InvalidSpecError),
            (400, "BadRequest", InvalidSpecError),
            (404, "ResourceGroupNotFound", InvalidSpecError),
            (400, "PlatformImageNotFound", InvalidSpecError),
            (409, "OperationNotAllowed", QuotaExceededError),
            (409, "QuotaExceeded", QuotaExceededError),
            (409, "SkuNotAvailable", CapacityError),
            (409, "AllocationFailed", CapacityError),
            (409, "ZonalAllocationFailed", CapacityError),
            (500, "InternalServerError", TransientError),
            (503, "ServiceUnavailable", TransientError),
            (409, "Conflict", ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self, provider: AzureProvider, fake: FakeARM, status: int, code: str, expected: type
    ) -> None:
        fake.fail("PUT", r"/virtualMachines/", error(status, code, f"{code}: details"))

        with pytest.raises(ProviderError) as caught:
            provider.create_vm(make_spec(), key(), job_id="job-1")

        assert type(caught.value) is expected
        assert (caught.value.provider_code, caught.value.message) == (code, f"{code}: details")

    def test_async_allocation_failure_is_capacity(self, fake: FakeARM) -> None:
        from azure.mgmt.compute import ComputeManagementClient
        from azure.mgmt.compute.models import VirtualMachine

        op = (
            "https://management.azure.com/subscriptions/x/providers/Microsoft.Compute/locations/westeurope/operations/1"
        )
        fake.fail(
            "PUT",
            r"/virtualMachines/",
            (201, {"Azure-AsyncOperation": op}, '{"properties": {"provisioningState": "Creating"}}'),
        )
        fake.fail(
            "GET",
            r"/operations/1$",
            (200, {}, '{"status": "Failed", "error": {"code": "AllocationFailed", "message": "Allocation failed."}}'),
        )
        client = ComputeManagementClient(FakeCredential(), SUB, retry_total=0)
        with pytest.raises(Exception) as caught:  # the SDK's own poller, which the adapter never uses
            client.virtual_machines.begin_create_or_update(
                RG, "web-1", VirtualMachine(location="westeurope"), polling_interval=0
            ).result()

        mapped = _map_error(caught.value)
        assert (
            caught.value.status_code == 200
            and type(mapped) is CapacityError
            and mapped.provider_code == "AllocationFailed"
        )

    def test_connection_error_is_transient(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.drop.append("GET /virtualMachines/")
        with pytest.raises(TransientError):
            provider.get_vm(VM_ID)

    def test_rate_limited_carries_retry_after(self, provider: AzureProvider, fake: FakeARM) -> None:
        fake.fail(
            "GET", r"/virtualMachines/", error(429, "TooManyRequests", "Too many requests", {"Retry-After": "17"})
        )

        with pytest.raises(RateLimitedError) as caught:
            provider.get_vm(VM_ID)

        assert caught.value.retry_after_s == 17.0 and caught.value.provider_code == "TooManyRequests"

    def test_missing_credentials_auth_error(self, monkeypatch: pytest.MonkeyPatch, fake: FakeARM) -> None:
        for var in AZURE_ENV:
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(AuthError, match="AZURE_SUBSCRIPTION_ID.*AZURE_TENANT_ID.*AZURE_CLIENT_SECRET"):
            AzureProvider().get_vm(VM_ID)

        monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUB)
        monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential")  # no IMDS or CLI probes offline
        with pytest.raises(AuthError, match="AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET"):
            AzureProvider().get_vm(VM_ID)
        assert not fake.calls

    @pytest.mark.parametrize(("status", "code"), [(429, "TooManyRequests"), (500, "InternalServerError")])
    def test_sdk_retries_off(self, provider: AzureProvider, fake: FakeARM, status: int, code: str) -> None:
        for _ in range(3):
            fake.fail("GET", r"/virtualMachines/", error(status, code, "no", {"Retry-After": "0"}))

        with pytest.raises(ProviderError):
            provider.get_vm(VM_ID)

        assert len(fake.calls) == 1

    def test_get_vms_reads_many_in_few_calls(self, provider: AzureProvider, fake: FakeARM) -> None:
        for n in (1, 2, 3):
            provider.create_vm(make_spec().model_copy(update={"name": f"web-{n}"}), key(), job_id=f"job-{n}")
        boot(fake)  # web-1 runs, web-2 is still Creating
        provider.destroy_vm(VM_ID.replace("web-1", "web-3"))
        ids = [VM_ID.replace("web-1", f"web-{n}") for n in (1, 2, 3, 7, 8, 9)]  # 6: more than a page weighs
        fake.calls.clear()

        vms = provider.get_vms(ids)

        assert set(vms) == set(ids[:2])
        assert (vms[ids[0]].status, vms[ids[0]].public_ipv4, vms[ids[0]].private_ipv4) == (
            VMStatus.running,
            "20.61.15.7",
            "10.0.0.4",
        )
        assert (vms[ids[1]].status, vms[ids[1]].public_ipv4) == (VMStatus.pending, None)
        # One list for all six ids (the VM's model with its power state), then a GET of the NIC and one of
        # the public IP of the one VM that settled (it ran: one VM, cheaper than its group's two lists),
        # and one PATCH giving its OS disk the VM's tags (the VM PUT could not).
        assert [c.path for c in fake.calls][0] == f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines"
        assert fake.calls[0].query["statusOnly"] == "true"
        assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in fake.calls[1:]] == [
            ("GET", nic_of(fake)["name"]),
            ("GET", pip_of(fake)["name"]),
            ("PATCH", "web-1-osdisk"),
        ]
        assert (
            fake.calls[-1].body == {"tags": fake.vm("web-1")["tags"]}
            and OWNED.items() <= fake.vm("web-1")["tags"].items()
        )

    def test_get_vms_many_settling_read_their_addresses_from_the_group_lists(
        self, provider: AzureProvider, fake: FakeARM
    ) -> None:
        """Issue 15: 50 VMs settling in one tick cost their group's NIC and public IP lists (every page,
        ``nextLink``), not 2 GETs each (3 with the VM's own before); the addresses are each VM's own."""
        fake.max_page = 20  # 50 NICs and 49 public IPs: three pages each
        names = [f"web-{n}" for n in range(50)]
        ids = [_create_named(provider, name) for name in names]
        for n, name in enumerate(names):
            _run(fake, name)
            [config] = nic_of(fake, name)["properties"]["ipConfigurations"]
            config["properties"]["privateIPAddress"] = f"10.0.0.{n + 4}"
            pip_of(fake, name)["properties"]["ipAddress"] = f"20.61.16.{n}"
        [config] = nic_of(fake, "web-7")["properties"]["ipConfigurations"]
        del fake.resources[config["properties"].pop("publicIPAddress")["id"].lower()]  # web-7 has none
        fake.calls.clear()

        vms = provider.get_vms(ids)

        group = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network"
        reads = [(c.path, c.query.get("$skiptoken")) for c in fake.calls_to("GET", "")]
        assert reads == [
            *[(f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines", t) for t in (None, "20", "40")],
            *[(f"{group}/networkInterfaces", t) for t in (None, "20", "40")],
            *[(f"{group}/publicIPAddresses", t) for t in (None, "20", "40")],
        ]  # 9 requests for 50 VMs: 3 + the lists' pages (per-VM reads: 100 GETs, 150 before)
        assert len(fake.calls_to("PATCH", r"/disks/")) == 50  # each OS disk tagged once, as before
        for n, (name, vm_id) in enumerate(zip(names, ids, strict=True)):
            public = None if name == "web-7" else f"20.61.16.{n}"
            assert (vms[vm_id].status, vms[vm_id].public_ipv4, vms[vm_id].private_ipv4) == (
                VMStatus.running,
                public,
                f"10.0.0.{n + 4}",
            )
        for vm_id in (ids[0], ids[7], ids[49]):
            assert vms[vm_id] == provider.get_vm(vm_id)  # what the per-VM reads give

    def test_settling_vms_read_the_cheaper_way_by_count_and_measured_pages(
        self, provider: AzureProvider, fake: FakeARM
    ) -> None:
        """One VM settling costs its NIC's and IP's GETs (2, no more than the two lists); two cost the
        lists (2 against 4); once a group's lists are counted dear (many NICs), two VMs are read alone."""
        ids = [_create_named(provider, f"web-{n}") for n in range(5)]
        provider.vm_read_gap_s = 0.0

        def settle(*names: str) -> list[str]:
            for name in names:
                _run(fake, name)
            fake.calls.clear()
            asked = [vm_id for vm_id in ids if vm_id.rsplit("/", 1)[-1] in names]
            read = provider.get_vms(asked)
            assert {read[vm_id].public_ipv4 for vm_id in asked} == {"20.61.15.7"}
            return [c.path.rsplit("/", 1)[-1] for c in fake.calls_to("GET", "")]

        nic, pip = nic_of(fake, "web-0")["name"], pip_of(fake, "web-0")["name"]
        assert settle("web-0") == ["web-0", nic, pip]
        assert settle("web-1", "web-2") == ["web-1", "web-2", "networkInterfaces", "publicIPAddresses"]
        fake.max_page = 1  # one item a page
        template = nic_of(fake, "web-0")
        for n in range(3):  # NICs of other VMs in the group: the lists grow, not the VMs settling
            fake.resources[f"{template['id']}-x{n}".lower()] = {**template, "id": f"{template['id']}-x{n}"}
        assert settle("web-1", "web-2").count("networkInterfaces") == 8  # counted: 8 + 5 pages
        names = settle("web-3", "web-4")
        assert "networkInterfaces" not in names and len(names) == 2 + 2 * 2  # 4 GETs < 13 pages

    def test_get_vms_reads_the_vm_a_list_shows_without_its_model(
        self, provider: AzureProvider, fake: FakeARM, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A list item carrying the power state alone (no ``networkProfile``/``storageProfile``): the VM's
        own GET gives its model, then the addresses and the OS disk's tags as from a full item."""
        ids = [_create_named(provider, f"web-{n}") for n in range(6)]
        for n in range(6):
            _run(fake, f"web-{n}")
        route = fake.route

        def status_only(call: Any) -> Any:
            status, headers, body = route(call)
            if call.path.endswith("/providers/Microsoft.Compute/virtualMachines"):
                page = json.loads(body)
                for vm in page["value"]:
                    kept = ("provisioningState", "instanceView")
                    vm["properties"] = {k: v for k, v in vm["properties"].items() if k in kept}
                body = json.dumps(page)
            return status, headers, body

        monkeypatch.setattr(fake, "route", status_only)
        fake.calls.clear()

        vms = provider.get_vms(ids)

        assert {(vm.status, vm.public_ipv4, vm.private_ipv4) for vm in vms.values()} == {
            (VMStatus.running, "20.61.15.7", "10.0.0.4")
        }
        reads = [c.path.rsplit("/", 1)[-1] for c in fake.calls_to("GET", "")]
        assert reads == ["virtualMachines", *[f"web-{n}" for n in range(6)], "networkInterfaces", "publicIPAddresses"]
        assert len(fake.calls_to("PATCH", r"/disks/web-\d-osdisk$")) == 6

    def test_get_vms_matches_get_vm(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake)
        batched = provider.get_vms([VM_ID.upper()])[VM_ID.upper()]  # ARM compares names case-blind
        single = provider.get_vm(VM_ID)
        assert batched == single
        assert (batched.status, batched.public_ipv4, batched.private_ipv4) == (
            VMStatus.running,
            "20.61.15.7",
            "10.0.0.4",
        )

    def test_get_vms_cost_grows_with_vms_in_flight_not_the_subscription(
        self, provider: AzureProvider, fake: FakeARM
    ) -> None:
        """A VM's GET costs a fifth of a list page (Compute's High Cost Get): fewer VMs in flight than one
        page weighs are read one GET each from the first read on, however big the subscription."""
        fake.max_page = 2
        in_flight = [provider.create_vm(make_spec(), key(), job_id="job-1").instance_id]
        provider.vm_read_gap_s = 0.0  # read again at every call (the gap is covered below)
        for long_lived in (10, 40):
            _add_long_lived(fake, long_lived)
            fake.calls.clear()
            for _ in range(2):
                assert set(provider.get_vms(in_flight)) == set(in_flight)
            assert [(c.method, c.query.get("$expand")) for c in fake.calls] == [("GET", "instanceView")] * 2

    def test_get_vms_measures_the_list_then_reads_the_cheaper_way(self, provider: AzureProvider, fake: FakeARM):
        """Six VMs in flight weigh more than one page: the first read lists, counting the pages (23: 46 VMs,
        2 a page); six GETs weigh less than 23 pages, so the next reads are GETs, until the count is old."""
        fake.max_page = 2
        specs = [make_spec().model_copy(update={"name": f"web-{n}"}) for n in range(6)]
        in_flight = [provider.create_vm(spec, key(), job_id=f"job-{n}").instance_id for n, spec in enumerate(specs)]
        _add_long_lived(fake, 40)
        provider.vm_read_gap_s = 0.0

        def cost() -> list[str]:
            fake.calls.clear()
            assert set(provider.get_vms(in_flight)) == set(in_flight)
            return [c.path.rsplit("/", 1)[-1] for c in fake.calls]

        assert cost() == ["virtualMachines"] * 23
        assert cost() == [vm_id.rsplit("/", 1)[-1] for vm_id in in_flight]
        provider.list_measure_ttl_s = 0.0  # the count is old: listed (and counted) again
        assert cost() == ["virtualMachines"] * 23

    def test_get_vms_lists_when_the_list_is_cheaper(self, provider: AzureProvider, fake: FakeARM) -> None:
        ids = [
            provider.create_vm(
                make_spec().model_copy(update={"name": f"web-{n}"}), key(), job_id=f"job-{n}"
            ).instance_id
            for n in range(5)
        ]
        for _ in range(2):
            fake.calls.clear()
            assert set(provider.get_vms(ids)) == set(ids)
            assert [c.path for c in fake.calls] == [f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines"]

    def test_get_vms_reads_a_vm_alone_at_most_once_per_gap(self, provider: AzureProvider, fake: FakeARM) -> None:
        """Compute meters GETs per VM (12 a minute): a VM read alone is not read again within the gap."""
        vm_id = provider.create_vm(make_spec(), key(), job_id="job-1").instance_id
        provider.vm_read_gap_s = 3600.0
        fake.calls.clear()
        first = provider.get_vms([vm_id])
        again = provider.get_vms([vm_id])
        assert first == again and len(fake.calls) == 1
        provider.vm_read_gap_s = 0.0
        boot(fake)
        assert provider.get_vms([vm_id])[vm_id].status is VMStatus.running

    def test_list_owned_vms(self, provider: AzureProvider, fake: FakeARM) -> None:
        provider.create_vm(make_spec(), key(), job_id="job-1")
        boot(fake)
        stranger = {**fake.vm("web-1"), "id": "/" + VM_ID.replace("web-1", "other"), "name": "other", "tags": {}}
        fake.resources[stranger["id"].lower()] = stranger

        owned = provider.list_owned_vms()

        assert [(vm.instance_id, vm.status) for vm in owned] == [(VM_ID, VMStatus.running)]
        [call] = fake.calls_to("GET", r"/virtualMachines$")
        assert call.path == f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines"
        assert call.query["statusOnly"] == "true"

    def test_lists_follow_every_page(self, provider: AzureProvider, fake: FakeARM) -> None:
        # Issue 13 (6): five VMs, two a page: three pages (nextLink), every one read.
        fake.max_page = 2
        specs = [make_spec().model_copy(update={"name": f"web-{n}"}) for n in range(5)]
        ours = {provider.create_vm(spec, key(), job_id=f"job-{n}").instance_id for n, spec in enumerate(specs)}
        for n in range(5):
            vm = fake.vm(f"web-{n}")
            vm["properties"]["provisioningState"], vm["_power"] = "Succeeded", "PowerState/running"
        assert {vm.instance_id for vm in provider.list_owned_vms()} == ours
        pages = fake.calls_to("GET", r"/virtualMachines$")
        assert [c.query.get("$skiptoken") for c in pages] == [None, "2", "4"]
        assert all(c.query["statusOnly"] == "true" for c in pages)
        assert set(provider.get_vms(sorted(ours))) == ours

    def test_list_owned_extras(self, provider: AzureProvider, fake: FakeARM) -> None:
        # Issue 13 (5): a failed create's NIC and public IP (and a tagged disk) are found, attached
        # to nothing; a running VM's NIC and IP are found attached; an untagged NIC is not ours.
        provider.create_vm(make_spec(), key(), job_id="job-1")
        lost = {"managed-by": "vmqueue", "vmqueue-job": "job-9"}
        network = f"https://management.azure.com{RG_PATH}/providers/Microsoft.Network"
        pips = f"{RG_PATH}/providers/Microsoft.Network/publicIPAddresses"
        for n in range(4):  # with the VM's own NIC: five NICs, two a page
            fake.handle(
                "PUT", f"{network}/publicIPAddresses/lost-{n}-pip", {}, _json({"location": "westeurope", "tags": lost})
            )
            nic = {
                "location": "westeurope",
                "tags": lost if n else {},
                "properties": {
                    "ipConfigurations": [
                        {"name": "ipconfig1", "properties": {"publicIPAddress": {"id": f"{pips}/lost-{n}-pip"}}}
                    ]
                },
            }
            fake.handle("PUT", f"{network}/networkInterfaces/lost-{n}-nic", {}, _json(nic))
        disk_id = f"{RG_PATH}/providers/Microsoft.Compute/disks/lost-osdisk"
        fake.resources[disk_id.lower()] = {
            "id": disk_id, "name": "lost-osdisk", "type": "Microsoft.Compute/disks", "location": "westeurope",
            "tags": lost, "managedBy": None, "properties": {"timeCreated": "2026-01-15T10:00:00+00:00"},
        }  # fmt: skip
        fake.max_page = 2

        extras = {(r.kind, r.name): r for r in provider.list_owned_extras()}

        vm_id = VM_ID
        nic, pip = nic_of(fake)["name"], pip_of(fake)["name"]  # made with the VM, tagged like it
        assert extras[("nic", nic)].attached_to == vm_id and extras[("nic", nic)].labels == OWNED
        assert extras[("public_ip", pip)].attached_to and extras[("nic", "lost-1-nic")].attached_to is None
        assert ("nic", "lost-0-nic") not in extras  # no ownership tag: not ours
        assert extras[("disk", "lost-osdisk")].attached_to is None and extras[("disk", "lost-osdisk")].created_at
        assert {r.labels["vmqueue-job"] for k, r in extras.items() if k[1].startswith("lost")} == {"job-9"}
        assert len(fake.calls_to("GET", r"/networkInterfaces$")) == 3  # five NICs, two a page

        assert extras[("public_ip", "lost-1-pip")].attached_to.endswith("lost-1-nic/ipConfigurations/ipconfig1")
        with pytest.raises(ProviderError):  # in use by its NIC: refused, a later pass tries again
            provider.delete_extra(extras[("public_ip", "lost-1-pip")])
        provider.delete_extra(extras[("nic", "lost-1-nic")])
        provider.delete_extra(extras[("nic", "lost-1-nic")])  # already gone: success
        provider.delete_extra(extras[("public_ip", "lost-1-pip")])  # free once its NIC is gone
        provider.delete_extra(extras[("disk", "lost-osdisk")])
        assert fake.get(f"{RG_PATH}/providers/Microsoft.Network/networkInterfaces/lost-1-nic") is None
        assert fake.get(f"{RG_PATH}/providers/Microsoft.Network/publicIPAddresses/lost-1-pip") is None
        assert fake.get(disk_id) is None
        with pytest.raises(ProviderError):  # still in use by the VM: refused, a later pass tries again
            provider.delete_extra(extras[("nic", nic)])

    def test_local_http_endpoint(self, fake: FakeARM, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VMQ_AZURE_ENDPOINT", "http://127.0.0.1:9")
        with responses.RequestsMock() as mock:
            mock.get(
                re.compile(r"http://127\.0\.0\.1:9/subscriptions/.*"),
                status=404,
                json={"error": {"code": "ResourceNotFound", "message": "gone"}},
            )
            with pytest.raises(NotFoundError):
                AzureProvider(credential=FakeCredential(), subscription_id=SUB).get_vm(VM_ID)
            assert mock.calls[0].request.headers["Authorization"] == "Bearer fake-token"


def start_worker(worker_factory: Any, httpserver: Any, fake: FakeARM) -> None:
    """A real Azure worker subprocess on ``fake`` served over local HTTP; it authenticates through
    DefaultAzureCredential's App Service managed identity, served by the fake."""
    endpoint = serve(httpserver, fake)
    env = {
        "VMQ_AZURE_ENDPOINT": endpoint,
        "AZURE_SUBSCRIPTION_ID": SUB,
        "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        "IDENTITY_ENDPOINT": endpoint + MSI_PATH,
        "IDENTITY_HEADER": "fake-identity-header",
        "NO_PROXY": "*",
    }
    worker_factory("azure", env={**env, **{var: "" for var in AZURE_ENV[1:]}})


@pytest.mark.system
def test_system_create_then_destroy_through_a_worker(
    worker_factory: Any, provisioner: Any, httpserver: Any, ssh_key: str
) -> None:
    """Producer -> Redis -> a real Azure worker subprocess -> azure-mgmt -> the ARM fake on a local HTTP server.

    The worker authenticates through DefaultAzureCredential's App Service managed identity, served by the fake.
    """
    fake = FakeARM(polls_to_run=1)
    start_worker(worker_factory, httpserver, fake)

    spec = make_spec(image="ubuntu-24.04")
    job = provisioner.wait(provisioner.create_vm(spec, ssh_key, SCRIPT).id, timeout_s=30)
    assert job.state == JobState.running, job.error
    assert (job.instance_id, job.vm.status, job.vm.public_ipv4) == (VM_ID, VMStatus.running, "20.61.15.7")
    assert fake.vm("web-1")["tags"] == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": job.id}
    # The OS disk the VM PUT made carries the VM's tags once the worker saw the VM run (issue 13 (5)).
    assert fake.get(f"{RG_PATH}/providers/Microsoft.Compute/disks/web-1-osdisk")["tags"] == fake.vm("web-1")["tags"]
    [put] = fake.calls_to("PUT", r"/virtualMachines/web-1$")
    assert base64.b64decode(put.body["properties"]["osProfile"]["customData"]).decode() == SCRIPT
    assert put.headers["authorization"] == "Bearer fake-token"

    gone = provisioner.wait(provisioner.destroy_vm("azure", job.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone, gone.error
    assert list(fake.resources) == [RG_PATH.lower()]  # VM, NIC, public IP, OS disk: nothing left


@pytest.mark.system
def test_system_late_allocation_failure_fails_over(
    worker_factory: Any, provisioner: Any, httpserver: Any, ssh_key: str
) -> None:
    """A VM accepted, then failed with AllocationFailed: the job fails over to the next placement through a
    real worker, as a refused PUT would, and nothing of the first attempt is left."""
    fake = FakeARM(polls_to_run=1, allocation_fails_in={"Standard_B1s"})
    start_worker(worker_factory, httpserver, fake)

    fallback = {"region": "westeurope", "instance_type": "Standard_B2s"}
    spec = VMSpec.model_validate({**make_spec().model_dump(), "fallbacks": [fallback]})
    job = provisioner.wait(provisioner.create_vm(spec, ssh_key).id, timeout_s=60)

    assert job.state == JobState.running, job.error
    assert (job.placement, job.instance_id, job.vm.instance_type) == (1, VM_ID + "-p1", "Standard_B2s")
    assert any("no capacity" in event.message for event in job.history)
    names = sorted(r["name"] for r in fake.resources.values() if r["type"] != "resourceGroups")
    made = [nic_of(fake, "web-1-p1")["name"], pip_of(fake, "web-1-p1")["name"]]  # with the VM, named by Azure
    assert names == sorted(["web-1-p1", "web-1-p1-osdisk", *made])


def test_the_sweeper_removes_what_a_failed_create_left(provider: AzureProvider, fake: FakeARM, redis_client, settings):
    # Issue 13 (5), issue 15: the VM Azure accepted fails late (AllocationFailed) and its delete leaves
    # the NIC and public IP it made behind. list_owned_vms cannot see them; they carry the tags the VM
    # request gave them, so the sweeper finds them and removes both.
    from datetime import UTC, datetime, timedelta

    from vmqueue import keys
    from vmqueue.jobstore import JobStore
    from vmqueue.models import Job, JobError, JobKind
    from vmqueue.sweep import StoreEpoch, SweepRequest
    from workers.sweeper import Sweeper

    fake.allocation_fails_in, fake.network_outlives_vm = {"westeurope"}, True
    provider.create_vm(make_spec(), key(), job_id="job-1", first_attempt=True)
    nic_id, pip_id = nic_of(fake)["id"], pip_of(fake)["id"]
    with pytest.raises(CapacityError):
        provider.get_vm(VM_ID)  # the failed VM's delete is sent; its NIC and IP stay, detached
    assert fake.get(nic_id)["tags"] == fake.get(pip_id)["tags"] == OWNED
    store = JobStore(redis_client, settings)
    error_ = JobError(code="capacity", message="AllocationFailed")
    store.add(Job(id="job-1", kind=JobKind.create, provider="azure", state=JobState.failed, error=error_))
    born = datetime.now(UTC) - timedelta(days=30)
    redis_client.set(keys.EPOCH_KEY, StoreEpoch(born_at=born).model_dump_json())
    sweeper = Sweeper(store, provider, lambda call, *args: call(*args))

    def sweep() -> dict[str, str]:
        report = sweeper.run(SweepRequest(provider="azure", delay_s=0, max_destroy_share=1))
        assert report.listed == 0 and report.error is None
        return {o.kind: str(o.action) for o in report.orphans}

    assert sweep() == {"nic": "reported"}  # the IP is still in use by the NIC
    assert sweep() == {"nic": "destroyed"}
    assert sweep() == {"public_ip": "reported"}
    assert sweep() == {"public_ip": "destroyed"}
    assert sweep() == {}
    left = [r["name"] for r in fake.resources.values() if r["type"].startswith("Microsoft.Network/")]
    assert left == []


def test_the_sweeper_removes_a_failed_creates_os_disk_and_keeps_a_live_vms(
    provider: AzureProvider, fake: FakeARM, redis_client, settings
):
    # Issue 13 (5): the OS disk a VM PUT makes has no tags (the request cannot set them). web-1 runs;
    # db-1 fails late (AllocationFailed) and its delete leaves its disk. Both VMs are read settled
    # once, as a create's batched read does: each disk gets its VM's tags, so the sweeper lists both,
    # keeps web-1's (attached to a live VM) and removes db-1's (attached to nothing, its job failed).
    from datetime import UTC, datetime, timedelta

    from vmqueue import keys
    from vmqueue.jobstore import JobStore
    from vmqueue.models import Job, JobError, JobKind
    from vmqueue.sweep import StoreEpoch, SweepRequest
    from workers.sweeper import Sweeper

    fake.allocation_fails_in, fake.os_disk_outlives_vm = {"Standard_B2s"}, True
    provider.create_vm(make_spec(), key(), job_id="job-1")
    failing = make_spec().model_copy(update={"name": "db-1", "instance_type": "Standard_B2s"})
    provider.create_vm(failing, key(), job_id="job-2")
    boot(fake)
    db_id = VM_ID.replace("web-1", "db-1")
    batch = provider.get_vms([VM_ID, db_id])
    assert (batch[VM_ID].status, batch[db_id].status) == (VMStatus.running, VMStatus.error)
    with pytest.raises(CapacityError):
        provider.get_vm(db_id)  # the VM's delete is sent; its disk stays behind, detached
    disks = f"{RG_PATH}/providers/Microsoft.Compute/disks"
    assert fake.get(f"{disks}/db-1-osdisk")["managedBy"] is None

    store = JobStore(redis_client, settings)
    store.add(Job(id="job-1", kind=JobKind.create, provider="azure", state=JobState.running, instance_id=VM_ID))
    error_ = JobError(code="capacity", message="AllocationFailed")
    store.add(Job(id="job-2", kind=JobKind.create, provider="azure", state=JobState.failed, error=error_))
    redis_client.set(keys.EPOCH_KEY, StoreEpoch(born_at=datetime.now(UTC) - timedelta(days=30)).model_dump_json())
    sweeper = Sweeper(store, provider, lambda call, *args: call(*args))

    def sweep() -> dict[str, str]:
        report = sweeper.run(SweepRequest(provider="azure", delay_s=0, max_destroy_share=1))
        assert report.error is None and report.listed == 1  # web-1, owned by its running job
        return {o.name or o.instance_id: str(o.action) for o in report.orphans}

    listed = {(r.kind, r.name): r.attached_to for r in provider.list_owned_extras()}
    assert listed[("disk", "web-1-osdisk")] == VM_ID and listed[("disk", "db-1-osdisk")] is None
    assert sweep() == {"db-1-osdisk": "reported"}
    assert sweep() == {"db-1-osdisk": "destroyed"}
    assert sweep() == {}
    assert fake.get(f"{disks}/db-1-osdisk") is None
    assert fake.get(f"{disks}/web-1-osdisk")["managedBy"] == "/" + VM_ID
