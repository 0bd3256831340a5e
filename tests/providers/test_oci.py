"""OCI adapter through the real oci SDK; HTTP answered by a stateful fake on the SDK's vendored requests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter
from tests.providers.contract import parsed_key as key
from tests.providers.fakeapi import serve
from tests.providers.oci_fake import AD, COMPARTMENT, IMAGE_2204, SUBNET, FakeOCI, error, served, signing_config
from vmqueue.models import JobState, VMSpec, VMStatus
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import sent_size
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
from workers.providers.oci import STATUS_MAP, OCIProvider

SCRIPT = "#!/bin/sh\necho hello > /tmp/hello\n"
OCI_ENV = ("OCI_CLI_USER", "OCI_CLI_TENANCY", "OCI_CLI_FINGERPRINT", "OCI_CLI_KEY_FILE", "OCI_CLI_KEY_CONTENT")


@pytest.fixture(scope="session")
def config() -> dict[str, str]:
    return signing_config()


@pytest.fixture
def fake() -> Iterator[FakeOCI]:
    with served(FakeOCI()) as fake:
        yield fake


@pytest.fixture
def provider(config: dict[str, str], fake: FakeOCI) -> OCIProvider:
    return OCIProvider(config=config)


def make_spec(image: str = IMAGE_2204, **options: Any) -> VMSpec:
    opts = {"compartment_id": COMPARTMENT, "subnet_id": SUBNET, "availability_domain": AD, "ocpus": 2, "memory_gb": 16}
    return VMSpec(
        provider="oci",
        name="web-1",
        region="us-phoenix-1",
        instance_type="VM.Standard.E4.Flex",
        image=image,
        labels={"team": "infra"},
        options={**opts, **options},
    )


class TestOCI(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(self, provider: OCIProvider, fake: FakeOCI) -> None:
        """ready_when=cloud_init: the user-data sent, whatever the user's script format, passes cloud-init's schema."""
        for i, script in enumerate(phone_home_scripts().values()):
            provider.create_vm(make_spec().model_copy(update={"name": f"web-{i}"}), key(), script, job_id=f"job-{i}")
        calls = fake.calls_to("POST", r"/20160918/instances$")
        sent = [base64.b64decode(call.body["metadata"]["user_data"]).decode() for call in calls]
        assert sent == list(phone_home_scripts().values())
        assert_cloud_init_accepts(sent)

    def test_meter_sees_every_request(self, provider: OCIProvider, fake: FakeOCI, key: Any) -> None:
        """Each request on the wire passes the meter first (the budget's hook), and each answer after it."""
        meter = provider.meter = RecordingMeter()
        vm = provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id="job-1")
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id])
        provider.destroy_vm(vm.instance_id)

        wire = [(call.method, call.path) for call in fake.calls]
        assert meter.requests() == wire and len(wire) >= 4
        assert [(m, t) for m, t, _, _ in meter.answers] == wire

    def test_create_sends_key_script_and_labels(self, provider: OCIProvider, fake: FakeOCI) -> None:
        ssh_key = key()
        info = provider.create_vm(make_spec(), ssh_key, SCRIPT, job_id="job-1")

        assert info.status is VMStatus.pending and info.provider_status == "PROVISIONING"
        assert info.instance_id.startswith("ocid1.instance.oc1.phx.")
        [call] = fake.calls_to("POST", r"/20160918/instances$")
        body = call.body
        assert call.headers["opc-retry-token"] == "vmq-create-job-1"
        assert body["metadata"]["ssh_authorized_keys"] == ssh_key.openssh
        assert base64.b64decode(body["metadata"]["user_data"]).decode() == SCRIPT
        # The metadata as sent is what the producer measured against OCI's 32,000 bytes (vmqueue.userdata).
        assert len(json.dumps(body["metadata"]).encode()) == sent_size("oci", None, ssh_key, SCRIPT).size
        assert body["freeformTags"] == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": "job-1"}
        assert body["shape"] == "VM.Standard.E4.Flex"
        assert body["shapeConfig"] == {"ocpus": 2.0, "memoryInGBs": 16.0}
        assert body["sourceDetails"] == {"sourceType": "image", "imageId": IMAGE_2204}
        assert body["createVnicDetails"] == {"subnetId": SUBNET, "assignPublicIp": True}
        assert (body["compartmentId"], body["availabilityDomain"], body["displayName"]) == (COMPARTMENT, AD, "web-1")

    def test_create_at_a_fallback_sends_its_own_ad_and_subnet(self, provider: OCIProvider, fake: FakeOCI) -> None:
        """A fallback to Ashburn launches with Ashburn's AD and subnet, not Phoenix's (and AD failover in place)."""
        ashburn = {"subnet_id": "ocid1.subnet.oc1.iad.aaaaashburn", "availability_domain": "Uocm:US-ASHBURN-AD-1"}
        fallbacks = [
            {"options": {"availability_domain": "Uocm:PHX-AD-2"}},
            {"region": "us-ashburn-1", "options": ashburn},
        ]
        spec = VMSpec.model_validate({**make_spec().model_dump(), "fallbacks": fallbacks})

        provider.create_vm(spec.at_placement(1), key(), job_id="job-1-p1")
        provider.create_vm(spec.at_placement(2), key(), job_id="job-1-p2")

        first, second = (c.body for c in fake.calls_to("POST", r"/20160918/instances$"))
        assert (first["availabilityDomain"], first["createVnicDetails"]["subnetId"]) == ("Uocm:PHX-AD-2", SUBNET)
        assert (second["availabilityDomain"], second["createVnicDetails"]["subnetId"]) == (
            ashburn["availability_domain"],
            ashburn["subnet_id"],
        )
        assert "us-ashburn-1" in provider._clients  # sent to Ashburn's endpoint

    def test_create_without_script_sends_no_user_data(self, provider: OCIProvider, fake: FakeOCI) -> None:
        provider.create_vm(make_spec(assign_public_ip=False), key(), job_id="job-1")
        [call] = fake.calls_to("POST", r"/instances$")
        assert "user_data" not in call.body["metadata"]
        assert call.body["createVnicDetails"]["assignPublicIp"] is False

    def test_create_resolves_image_alias(self, provider: OCIProvider, fake: FakeOCI) -> None:
        prepared = provider.prepare_spec(make_spec(image="ubuntu-22.04"))

        assert prepared.image == IMAGE_2204  # the newest of the listed images
        [call] = fake.calls_to("GET", r"/images$")
        assert call.query == {
            "compartmentId": COMPARTMENT,
            "operatingSystem": "Canonical Ubuntu",
            "operatingSystemVersion": "22.04",
            "shape": "VM.Standard.E4.Flex",
            "sortBy": "TIMECREATED",
            "sortOrder": "DESC",
            "lifecycleState": "AVAILABLE",
        }
        assert (
            provider.prepare_spec(make_spec(image="ocid1.image.oc1.phx.native")).image == "ocid1.image.oc1.phx.native"
        )
        with pytest.raises(InvalidSpecError, match="no Canonical Ubuntu 24.04 image"):
            provider.prepare_spec(make_spec(image="ubuntu-24.04"))
        with pytest.raises(InvalidSpecError, match="no platform image"):
            provider.prepare_spec(make_spec(image="my-custom-image"))

    def test_image_alias_is_looked_up_once_per_region_and_shape(self, provider: OCIProvider, fake: FakeOCI) -> None:
        spec = make_spec(image="ubuntu-22.04")
        images = {provider.prepare_spec(spec.model_copy(update={"name": f"web-{i}"})).image for i in range(3)}
        assert images == {IMAGE_2204}
        assert len(fake.calls_to("GET", r"/images$")) == 1
        with pytest.raises(InvalidSpecError):  # a failed lookup is not kept: each attempt asks again
            provider.prepare_spec(make_spec(image="ubuntu-24.04"))
        with pytest.raises(InvalidSpecError):
            provider.prepare_spec(make_spec(image="ubuntu-24.04"))
        assert len(fake.calls_to("GET", r"/images$")) == 3

    def test_create_twice_same_job_one_vm(self, provider: OCIProvider, fake: FakeOCI) -> None:
        first = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")
        second = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")

        assert first.instance_id == second.instance_id and len(fake.instances) == 1
        tokens = {call.headers["opc-retry-token"] for call in fake.calls_to("POST", r"/instances$")}
        assert tokens == {"vmq-create-job-1"}

    def test_create_lost_answer_one_vm(self, provider: OCIProvider, fake: FakeOCI) -> None:
        fake.drop.append("POST /20160918/instances$")  # OCI launches, the answer is lost on the way back

        info = provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1")

        [instance_id] = fake.instances
        assert info.instance_id == instance_id
        [lookup] = fake.calls_to("GET", r"/instances$")  # found by display name and job tag
        assert lookup.query == {"compartmentId": COMPARTMENT, "displayName": "web-1"}

    def test_create_invalidated_token_adopts_by_tag(self, provider: OCIProvider, fake: FakeOCI) -> None:
        first = provider.create_vm(make_spec(), key(), job_id="job-1")
        other = provider.create_vm(make_spec(), key(), job_id="job-2")  # same display name, another job
        fake.fail("POST", r"/instances$", error(409, "InvalidatedRetryToken", "The retry token was invalidated."))

        assert provider.create_vm(make_spec(), key(), job_id="job-1").instance_id == first.instance_id
        fake.instances[first.instance_id]["lifecycleState"] = "TERMINATED"
        fake.fail("POST", r"/instances$", error(409, "InvalidatedRetryToken", "The retry token was invalidated."))
        with pytest.raises(ProviderError) as caught:
            provider.create_vm(make_spec(), key(), job_id="job-1")
        assert caught.value.provider_code == "InvalidatedRetryToken" and len(fake.instances) == 2
        assert other.instance_id in fake.instances

    @pytest.mark.parametrize("raw", [*STATUS_MAP, "SOMETHING_NEW"])
    def test_get_maps_every_documented_state(self, provider: OCIProvider, fake: FakeOCI, raw: str) -> None:
        created = provider.create_vm(make_spec(), key(), job_id="job-1")
        fake.instances[created.instance_id]["lifecycleState"] = raw

        info = provider.get_vm(created.instance_id)

        assert info.status is STATUS_MAP.get(raw, VMStatus.unknown)
        assert info.provider_status == (raw if raw in STATUS_MAP else "UNKNOWN_ENUM_VALUE")  # the SDK's word for it
        assert info.labels["vmqueue-job"] == "job-1" and info.image == IMAGE_2204 and info.name == "web-1"

    def test_get_public_and_private_ips(self, provider: OCIProvider, fake: FakeOCI) -> None:
        created = provider.create_vm(make_spec(), key(), job_id="job-1")
        [vnic] = fake.vnics.values()
        vnic["ipv6Addresses"] = ["2603:c020:4000:1234::10"]
        fake.attachments.insert(
            0,
            {
                **fake.attachments[0],
                "id": "ocid1.vnicattachment.oc1.phx.old",
                "lifecycleState": "DETACHED",
                "vnicId": "gone",
            },
        )

        info = provider.get_vm(created.instance_id)

        assert (info.public_ipv4, info.private_ipv4, info.public_ipv6) == (
            "203.0.113.10",
            "10.0.0.12",
            "2603:c020:4000:1234::10",
        )
        [attachments] = fake.calls_to("GET", r"/vnicAttachments$")
        assert attachments.query == {"compartmentId": COMPARTMENT, "instanceId": created.instance_id}
        assert fake.calls_to("GET", r"/vnics/")[0].path.endswith(vnic["id"])

    @pytest.mark.parametrize("attached_at", ["2026-01-15T10:05:00.000Z", "2026-01-15T09:00:00.000Z"])
    def test_get_multi_vnic_reads_the_primary(self, provider: OCIProvider, fake: FakeOCI, attached_at: str) -> None:
        """A secondary VNIC (no public IP, isPrimary false) listed before the primary: the primary's IPs."""
        created = provider.create_vm(make_spec(), key(), job_id="job-1")
        instance = fake.instances[created.instance_id]
        fake.attach(instance, None, primary=False, private_ip="10.0.1.40", time_created=attached_at, listed_first=True)
        other = {**instance, "id": "ocid1.instance.oc1.phx.someoneelse"}
        fake.fail(  # an answer holding another instance's attachment first: never taken
            "GET",
            r"/vnicAttachments$",
            (200, {}, json.dumps([{**fake.attachments[0], "instanceId": other["id"]}, *fake.attachments])),
        )

        info = provider.get_vm(created.instance_id)

        assert (info.public_ipv4, info.private_ipv4) == ("203.0.113.10", "10.0.0.12")

    def test_get_without_public_ip(self, provider: OCIProvider, fake: FakeOCI) -> None:
        fake.public_ip = None
        created = provider.create_vm(make_spec(assign_public_ip=False), key(), job_id="job-1")

        info = provider.get_vm(created.instance_id)

        assert info.public_ipv4 is None and info.public_ipv6 is None and info.private_ipv4 == "10.0.0.12"

    def test_get_unknown_raises_not_found(self, provider: OCIProvider) -> None:
        with pytest.raises(NotFoundError) as caught:
            provider.get_vm("ocid1.instance.oc1.phx.doesnotexist")
        assert caught.value.provider_code == "NotAuthorizedOrNotFound"

    def test_destroy(self, provider: OCIProvider, fake: FakeOCI) -> None:
        created = provider.create_vm(make_spec(), key(), job_id="job-1")

        assert provider.destroy_vm(created.instance_id) is None

        [call] = fake.calls_to("DELETE", r"/instances/")
        assert call.path.endswith(created.instance_id) and call.query == {"preserveBootVolume": "false"}
        assert fake.instances[created.instance_id]["lifecycleState"] == "TERMINATED"
        assert provider.get_vm(created.instance_id).status is VMStatus.terminated

    def test_destroy_twice(self, provider: OCIProvider, fake: FakeOCI) -> None:
        created = provider.create_vm(make_spec(), key(), job_id="job-1")
        provider.destroy_vm(created.instance_id)

        assert provider.destroy_vm(created.instance_id) is None  # 409 IncorrectState, and the VM is TERMINATED

    def test_destroy_unknown_id(self, provider: OCIProvider, fake: FakeOCI) -> None:
        assert provider.destroy_vm("ocid1.instance.oc1.phx.doesnotexist") is None
        assert len(fake.calls_to("DELETE", r"/instances/")) == 1

    @pytest.mark.parametrize(
        ("status", "code", "message", "expected"),
        [
            (
                401,
                "NotAuthenticated",
                "The required information to complete authentication was not provided.",
                AuthError,
            ),
            (403, "NotAuthorized", "Not authorized.", AuthError),
            (400, "InvalidParameter", "Invalid shape: VM.Nope", InvalidSpecError),
            (400, "MissingParameter", "Missing availabilityDomain", InvalidSpecError),
            (400, "RelatedResourceNotAuthorizedOrNotFound", "subnet not found", InvalidSpecError),
            (409, "Conflict", "Conflict", InvalidSpecError),
            (400, "LimitExceeded", "Service limit standard-e4-core-count exceeded", QuotaExceededError),
            (400, "QuotaExceeded", "Compartment quota exceeded", QuotaExceededError),
            (500, "InternalError", "Out of host capacity.", CapacityError),
            (409, "IncorrectState", "Resource is in an incorrect state", TransientError),
            (409, "LockConflict", "Lock conflict", TransientError),
            (500, "InternalServerError", "Internal error", TransientError),
            (503, "ServiceUnavailable", "Service unavailable", TransientError),
            (412, "NoEtagMatch", "The etag does not match", ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self, provider: OCIProvider, fake: FakeOCI, status: int, code: str, message: str, expected: type
    ) -> None:
        fake.fail("POST", r"/instances$", error(status, code, message))

        with pytest.raises(ProviderError) as caught:
            provider.create_vm(make_spec(), key(), job_id="job-1")

        assert type(caught.value) is expected
        assert caught.value.provider_code == code and caught.value.message.endswith(message)
        assert not fake.instances

    def test_connection_error_is_transient(self, provider: OCIProvider, fake: FakeOCI) -> None:
        fake.drop.append("GET /instances/")
        with pytest.raises(TransientError):
            provider.get_vm("ocid1.instance.oc1.phx.whatever")

    def test_rate_limited_carries_retry_after(self, provider: OCIProvider, fake: FakeOCI) -> None:
        fake.fail("GET", r"/instances/", error(429, "TooManyRequests", "Too many requests", {"Retry-After": "7"}))

        with pytest.raises(RateLimitedError) as caught:
            provider.get_vm("ocid1.instance.oc1.phx.whatever")

        assert caught.value.retry_after_s == 7.0 and caught.value.retryable

    def test_missing_credentials_auth_error(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
        for var in (*OCI_ENV, "OCI_AUTH", "OCI_CLI_REGION"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("OCI_CONFIG_FILE", str(tmp_path / "missing-config"))
        with pytest.raises(AuthError, match="OCI_CLI_USER.*OCI_CLI_KEY_CONTENT.*OCI_CONFIG_FILE"):
            OCIProvider().get_vm("ocid1.instance.oc1.phx.whatever")

        monkeypatch.setenv("OCI_CLI_USER", "ocid1.user.oc1..aaaaaaaatestuser")  # the rest is missing
        with pytest.raises(AuthError, match="OCI_CLI_FINGERPRINT"):
            OCIProvider().get_vm("ocid1.instance.oc1.phx.whatever")

    def test_credentials_from_env(self, monkeypatch: pytest.MonkeyPatch, config: dict[str, str], fake: FakeOCI) -> None:
        env = dict(zip(OCI_ENV, (config["user"], config["tenancy"], config["fingerprint"]), strict=False))
        for var, value in {
            **env,
            "OCI_CLI_KEY_CONTENT": config["key_content"],
            "OCI_CLI_REGION": "us-phoenix-1",
        }.items():
            monkeypatch.setenv(var, value)

        with pytest.raises(NotFoundError):
            OCIProvider().get_vm("ocid1.instance.oc1.phx.whatever")
        [call] = fake.calls
        assert 'keyId="ocid1.tenancy' in call.headers["authorization"]  # the request was signed

    @pytest.mark.parametrize(("status", "code"), [(429, "TooManyRequests"), (500, "InternalServerError")])
    def test_sdk_retries_off(self, provider: OCIProvider, fake: FakeOCI, status: int, code: str) -> None:
        fake.fail("GET", r"/instances/", error(status, code, "no"))
        fake.fail("GET", r"/instances/", error(status, code, "no"))

        with pytest.raises(ProviderError):
            provider.get_vm("ocid1.instance.oc1.phx.whatever")

        assert len(fake.calls) == 1

    def test_get_vms_reads_many_in_few_calls(self, provider: OCIProvider, fake: FakeOCI) -> None:
        running, booting, hidden, gone = (
            provider.create_vm(
                make_spec().model_copy(update={"name": f"web-{n}"}), key(), job_id=f"job-{n}"
            ).instance_id
            for n in (1, 2, 3, 4)
        )
        fake.instances[running]["lifecycleState"] = "RUNNING"
        fake.unindexed.add(hidden)  # launched a moment ago: Search does not show it yet
        del fake.instances[gone]
        unknown = gone.replace(gone[-6:], "abcdef")
        fake.calls.clear()

        vms = provider.get_vms([running, booting, hidden, gone, unknown])

        assert set(vms) == {running, booting, hidden}
        assert (vms[running].status, vms[running].public_ipv4, vms[running].private_ipv4) == (
            VMStatus.running,
            "203.0.113.10",
            "10.0.0.12",
        )
        assert (vms[booting].status, vms[hidden].status) == (VMStatus.pending, VMStatus.pending)
        # One search for all five ids; then get_instance for each it lacks or shows settled, and the
        # VNIC (attachments, VNIC) for the running one alone.
        [search] = fake.calls_to("POST", r"/resources$")
        assert search.body["query"].count("identifier = ") == 5
        read = sorted(c.path.rsplit("/", 1)[-1] for c in fake.calls_to("GET", r"/instances/"))
        assert read == sorted([running, hidden, gone, unknown])
        assert len(fake.calls_to("GET", r"/vnicAttachments$")) == len(fake.calls_to("GET", r"/vnics/")) == 1
        assert len(fake.calls) == 1 + 4 + 2

    def test_get_vms_matches_get_vm(self, provider: OCIProvider, fake: FakeOCI) -> None:
        vm_id = provider.create_vm(make_spec(), key(), job_id="job-1").instance_id
        fake.instances[vm_id]["lifecycleState"] = "RUNNING"
        batched = provider.get_vms([vm_id])[vm_id]
        single = provider.get_vm(vm_id)
        assert batched == single
        assert (batched.status, batched.public_ipv4, batched.private_ipv4) == (
            VMStatus.running,
            "203.0.113.10",
            "10.0.0.12",
        )

    def test_list_owned_vms(self, provider: OCIProvider, fake: FakeOCI) -> None:
        mine = provider.create_vm(make_spec(), key(), job_id="job-1")
        fake.launch({**json.loads(json.dumps(fake.instances[mine.instance_id])), "freeformTags": {}}, None)

        owned = provider.list_owned_vms()

        assert [vm.instance_id for vm in owned] == [mine.instance_id]
        assert owned[0].status is VMStatus.pending and owned[0].labels["vmqueue-job"] == "job-1"
        [call] = fake.calls_to("POST", r"/resources$")
        body = call.body
        assert body["type"] == "Structured" and "freeformTags.key = 'managed-by'" in body["query"]

    def test_list_owned_extras(self, provider: OCIProvider, fake: FakeOCI) -> None:
        # Issue 13 (5): nothing this adapter creates beside a VM outlives it (see its docstring).
        provider.create_vm(make_spec(), key(), job_id="job-1")
        assert provider.list_owned_extras() == []
        with pytest.raises(InvalidSpecError):
            provider.delete_extra(OwnedResource(provider="oci", kind="volume", resource_id="x"))

    def test_lists_follow_every_page(self, provider: OCIProvider, fake: FakeOCI) -> None:
        # Issue 13 (6): five instances, two a page: three Search pages (opc-next-page), every one read.
        fake.max_page = 2
        ours = {provider.create_vm(make_spec(), key(), job_id=f"job-{n}").instance_id for n in range(5)}
        assert {vm.instance_id for vm in provider.list_owned_vms()} == ours
        assert [c.query.get("page") for c in fake.calls_to("POST", r"/resources$")] == [None, "2", "4"]
        assert set(provider.get_vms(sorted(ours))) == ours


@pytest.mark.system
def test_system_create_then_destroy_through_a_worker(
    worker_factory: Any, provisioner: Any, httpserver: Any, ssh_key: str, config: dict[str, str]
) -> None:
    """Producer -> Redis -> a real OCI worker subprocess -> oci SDK -> the fake on a local HTTP server."""
    fake = FakeOCI(polls_to_run=1)
    env = {
        "VMQ_OCI_ENDPOINT": serve(httpserver, fake),
        "OCI_CLI_USER": config["user"],
        "OCI_CLI_TENANCY": config["tenancy"],
        "OCI_CLI_FINGERPRINT": config["fingerprint"],
        "OCI_CLI_KEY_CONTENT": config["key_content"],
        "OCI_CLI_REGION": config["region"],
        "OCI_AUTH": "",
        "NO_PROXY": "*",
    }
    worker_factory("oci", env=env)

    job = provisioner.wait(provisioner.create_vm(make_spec(image="ubuntu-22.04"), ssh_key, SCRIPT).id, timeout_s=30)
    assert job.state == JobState.running, job.error
    assert (job.vm.status, job.vm.public_ipv4, job.vm.image) == (VMStatus.running, "203.0.113.10", IMAGE_2204)
    [instance] = fake.instances.values()
    assert instance["id"] == job.instance_id
    assert instance["freeformTags"] == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": job.id}
    assert base64.b64decode(instance["metadata"]["user_data"]).decode() == SCRIPT
    assert {c.headers["opc-retry-token"] for c in fake.calls_to("POST", r"/instances$")} == {f"vmq-create-{job.id}"}

    gone = provisioner.wait(provisioner.destroy_vm("oci", job.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone, gone.error
    assert instance["lifecycleState"] == "TERMINATED"


def test_first_attempt_create_costs_one_request(provider: OCIProvider, fake: FakeOCI) -> None:
    provider.create_vm(make_spec(), key(), SCRIPT, job_id="job-1", first_attempt=True)
    assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in fake.calls] == [("POST", "instances")]
