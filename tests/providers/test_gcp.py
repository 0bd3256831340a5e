"""GCP adapter through the real google-cloud-compute REST transport, served by ``responses``.

Stateful cases go through ``FakeCompute`` (gcp_fake.py); error cases answer with Google's JSON error
bodies directly. Credentials are ``AnonymousCredentials``; nothing leaves the process.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlparse

import pytest
import requests
import responses
from google.auth.compute_engine import _metadata
from google.auth.credentials import AnonymousCredentials, Credentials

from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter
from tests.providers.gcp_fake import FakeCompute, api_error, serve_with_responses
from vmqueue.models import VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import sent_size
from workers.providers import gcp
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
from workers.providers.gcp import REQUEST_ID_NAMESPACE, STATUS_MAP, GCPProvider

PROJECT, ZONE = "example-project", "europe-west1-b"
API = f"https://compute.googleapis.com/compute/v1/projects/{PROJECT}/zones/{ZONE}"
SCRIPT = "#!/bin/sh\necho hello > /tmp/hello\n"
ID = f"{PROJECT}/{ZONE}/web-1"


@pytest.fixture(autouse=True)
def no_ambient_google(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "VMQ_GCP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)  # never probe the metadata server


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def fake(rsps: responses.RequestsMock) -> FakeCompute:
    compute = FakeCompute()
    serve_with_responses(compute, rsps)
    return compute


class FakeToken(Credentials):
    """Credentials that refresh to an obviously fake bearer token, as google-auth does on a 401."""

    def refresh(self, request: Any) -> None:
        self.token = "fake-" + "token"


@pytest.fixture
def provider() -> GCPProvider:
    return GCPProvider(FakeToken(), project=PROJECT)


def make_spec(
    image: str = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64", **update: Any
) -> VMSpec:
    fields = {"provider": "gcp", "name": "web-1", "region": ZONE, "instance_type": "e2-small", "image": image}
    return VMSpec(**{**fields, "labels": {"team": "infra"}, **update})


def sent(rsps: responses.RequestsMock, method: str) -> list[tuple[dict[str, str], Any]]:
    """(query, JSON body) of each ``method`` request the SDK sent."""
    calls = [c.request for c in rsps.calls if c.request.method == method]
    return [(dict(parse_qsl(urlparse(r.url).query)), json.loads(r.body) if r.body else None) for r in calls]


def answer_error(rsps: responses.RequestsMock, method: str, url: str, status: int, reason: str, **headers: str) -> None:
    rsps.add(method, url, json=api_error(status, reason, f"{reason}: the API says no"), status=status, headers=headers)


class TestGCP(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        """ready_when=cloud_init: the user-data sent, whatever the user's script format, passes cloud-init's schema."""
        for i, script in enumerate(phone_home_scripts().values()):
            provider.create_vm(make_spec(name=f"web-{i}"), key, script, job_id=f"job-{i}")
        user_data = [
            {item["key"]: item["value"] for item in body["metadata"]["items"]}["user-data"]
            for _, body in sent(rsps, "POST")
            if body and "metadata" in body
        ]
        assert user_data == list(phone_home_scripts().values())
        assert_cloud_init_accepts(user_data)

    def test_meter_sees_every_request(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        """Each request on the wire passes the meter first (the budget's hook), and each answer after it."""
        meter = provider.meter = RecordingMeter()
        vm = provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id="job-1")
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id, f"{PROJECT}/{ZONE}/never-made"])
        provider.destroy_vm(vm.instance_id)

        wire = [(c.request.method, urlparse(c.request.url).path) for c in rsps.calls]
        assert meter.requests() == wire and len(wire) >= 5
        assert [(m, t) for m, t, _, _ in meter.answers] == wire

    def test_create_sends_key_script_and_labels(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        vm = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert (vm.instance_id, vm.status, vm.region) == (ID, VMStatus.pending, ZONE)
        [(query, body)] = sent(rsps, "POST")
        assert query["requestId"] == str(uuid.uuid5(REQUEST_ID_NAMESPACE, "job-1:create"))
        assert body["name"] == "web-1" and body["machineType"] == f"zones/{ZONE}/machineTypes/e2-small"
        metadata = {item["key"]: item["value"] for item in body["metadata"]["items"]}
        assert metadata == {"ssh-keys": f"vmq:{key.openssh}", "user-data": SCRIPT}
        assert len(metadata["user-data"].encode()) == sent_size("gcp", None, key, SCRIPT).size  # what was measured
        assert body["labels"] == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": "job-1"}
        [disk] = body["disks"]
        assert disk["boot"] and disk["autoDelete"]
        assert disk["initializeParams"]["sourceImage"].endswith("/family/ubuntu-2404-lts-amd64")
        [nic] = body["networkInterfaces"]
        assert nic["network"] == "global/networks/default"
        assert nic["accessConfigs"] == [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
        assert rsps.calls[0].request.req_kwargs["timeout"] == 30.0

    def test_create_debian_uses_startup_script(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        debian = provider.prepare_spec(make_spec(image="debian-12"))
        provider.create_vm(debian, key, SCRIPT, job_id="job-1")
        [(_, body)] = sent(rsps, "POST")
        assert {i["key"] for i in body["metadata"]["items"]} == {"ssh-keys", "startup-script"}
        with pytest.raises(InvalidSpecError, match="cloud-init"):
            provider.create_vm(debian, key, "#cloud-config\npackages: [nginx]\n", job_id="job-2")
        assert len(sent(rsps, "POST")) == 1

    def test_create_resolves_image_alias(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        spec = provider.prepare_spec(make_spec(image="ubuntu-22.04"))
        assert spec.image == "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"
        native = "projects/my-images/global/images/golden-2025-01"
        assert provider.prepare_spec(make_spec(image=native)).image == native
        provider.create_vm(spec, key, None, job_id="job-1")
        [(_, body)] = sent(rsps, "POST")
        assert body["disks"][0]["initializeParams"]["sourceImage"] == spec.image

    def test_create_twice_same_job_one_vm(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        first = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        again = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert first.instance_id == again.instance_id and len(fake.instances) == 1
        [(q1, b1), (q2, b2)] = sent(rsps, "POST")
        assert (q1, b1) == (q2, b2)  # the identical request, requestId included
        fake.by_request_id.clear()  # past GCP's dedup window: the name is the guard, 409 is adopted
        adopted = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert adopted.instance_id == ID and adopted.labels["vmqueue-job"] == "job-1" and len(fake.instances) == 1
        with pytest.raises(InvalidSpecError, match="not this job's"):
            provider.create_vm(make_spec(), key, SCRIPT, job_id="job-2")

    def test_create_lost_answer_one_vm(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        def insert_then_drop_connection(request: Any) -> tuple[int, dict, str]:
            url = urlparse(request.url)
            fake.handle("POST", url.path, dict(parse_qsl(url.query)), json.loads(request.body))
            raise requests.ConnectionError("Connection reset by peer")

        rsps.add_callback("POST", f"{API}/instances", callback=insert_then_drop_connection)
        rsps.registered().insert(0, rsps.registered().pop())  # ahead of the fake's own routes
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        rsps.remove("POST", f"{API}/instances")
        assert len(fake.instances) == 1
        vm = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert vm.instance_id == ID and list(fake.instances) == [(PROJECT, ZONE, "web-1")]

    @pytest.mark.parametrize(("raw", "expected"), [*STATUS_MAP.items(), ("SOMETHING_NEW", VMStatus.unknown)])
    def test_get_maps_every_documented_state(
        self, provider: GCPProvider, fake: FakeCompute, raw: str, expected: VMStatus
    ) -> None:
        fake.boot = False
        fake.add_instance(PROJECT, ZONE, "web-1", status=raw)
        vm = provider.get_vm(ID)
        assert (vm.status, vm.provider_status, vm.instance_id, vm.region) == (expected, raw, ID, ZONE)

    @pytest.mark.parametrize(
        ("failure", "expected"),
        [("ZONE_RESOURCE_POOL_EXHAUSTED", CapacityError), ("QUOTA_EXCEEDED", QuotaExceededError)],
    )
    def test_get_after_failed_insert_raises_operation_error(
        self,
        provider: GCPProvider,
        fake: FakeCompute,
        rsps: responses.RequestsMock,
        key: SSHPublicKey,
        failure: str,
        expected: type,
    ) -> None:
        fake.fail_inserts = failure
        assert provider.create_vm(make_spec(), key, None, job_id="job-1").status == VMStatus.pending
        with pytest.raises(expected) as err:
            provider.get_vm(ID)
        assert err.value.provider_code == failure
        [(query, _)] = sent(rsps, "GET")[1:]
        assert query["filter"] == f"(operationType eq insert) (targetLink eq .*/zones/{ZONE}/instances/web-1)"

    def test_insert_lookup_keeps_to_its_own_target(self, provider: GCPProvider, rsps: responses.RequestsMock) -> None:
        """web-1 is gone (404) and the operations list answers another instance's failed insert (web-10, as a
        looser filter or a proxy might): that failure is not web-1's, so web-1 reads as not found, while the
        same answer read for web-10 is web-10's capacity failure."""
        other = FakeCompute()
        other.fail_inserts = "ZONE_RESOURCE_POOL_EXHAUSTED"
        other.handle("POST", f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances", {}, {"name": "web-10"})
        [failed] = other.operations
        listed = {
            "kind": "compute#operationList",
            "id": f"projects/{PROJECT}/zones/{ZONE}/operations",
            "items": [failed],
        }
        for name in ("web-1", "web-10"):
            answer_error(rsps, "GET", f"{API}/instances/{name}", 404, "notFound")
            rsps.add("GET", f"{API}/operations", json=listed)

        with pytest.raises(NotFoundError):
            provider.get_vm(ID)
        with pytest.raises(CapacityError) as err:
            provider.get_vm(f"{PROJECT}/{ZONE}/web-10")
        assert err.value.provider_code == "ZONE_RESOURCE_POOL_EXHAUSTED"
        asked = [
            parse_qsl(urlparse(c.request.url).query)
            for c in rsps.calls
            if c.request.url.split("?")[0].endswith("/operations")
        ]
        assert [dict(q)["filter"] for q in asked] == [
            f"(operationType eq insert) (targetLink eq .*/zones/{ZONE}/instances/{name})"
            for name in ("web-1", "web-10")
        ]

    def test_get_while_insert_runs_is_pending(
        self, provider: GCPProvider, fake: FakeCompute, key: SSHPublicKey
    ) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        fake.instances.clear()  # not yet visible to reads
        fake.operations[-1]["status"] = "RUNNING"
        vm = provider.get_vm(ID)
        assert (vm.status, vm.provider_status) == (VMStatus.pending, "insert RUNNING")

    def test_get_public_and_private_ips(self, provider: GCPProvider, fake: FakeCompute, key: SSHPublicKey) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        while (vm := provider.get_vm(ID)).status != VMStatus.running:  # PROVISIONING, STAGING, RUNNING
            assert vm.public_ipv4 is None
        assert vm.public_ipv4 and vm.public_ipv4.startswith("34.118.") and vm.private_ipv4 == "10.128.0.2"
        assert vm.labels["vmqueue-job"] == "job-1" and vm.instance_type == "e2-small" and vm.created_at
        nic = fake.instances[PROJECT, ZONE, "web-1"]["networkInterfaces"][0]
        nic["ipv6AccessConfigs"] = [
            {"type": "DIRECT_IPV6", "externalIpv6": "2600:1900:4000:1::", "externalIpv6PrefixLength": 96}
        ]
        assert provider.get_vm(ID).public_ipv6 == "2600:1900:4000:1::"

    def test_get_multi_nic_reads_nic0(self, provider: GCPProvider, fake: FakeCompute) -> None:
        """nic1 (private only, another subnet) listed before nic0: nic0's addresses."""
        nic0 = {
            "name": "nic0",
            "networkIP": "10.128.0.2",
            "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT", "natIP": "34.118.1.10"}],
        }
        nic1 = {
            "name": "nic1",
            "networkIP": "10.9.0.5",
            "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT", "natIP": "35.1.1.1"}],
            "ipv6AccessConfigs": [{"type": "DIRECT_IPV6", "externalIpv6": "2600:1900:4000:9::"}],
        }
        fake.add_instance(PROJECT, ZONE, "web-1", networkInterfaces=[nic1, nic0])

        vm = provider.get_vm(ID)

        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == ("34.118.1.10", None, "10.128.0.2")

    def test_get_without_public_ip(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        provider.create_vm(make_spec(options={"external_ip": False}), key, None, job_id="job-1")
        [(_, body)] = sent(rsps, "POST")
        assert "accessConfigs" not in body["networkInterfaces"][0]
        fake.boot = True
        while (vm := provider.get_vm(ID)).status != VMStatus.running:
            pass
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == (None, None, "10.128.0.2")

    def test_get_unknown_raises_not_found(self, provider: GCPProvider, fake: FakeCompute) -> None:
        with pytest.raises(NotFoundError) as err:
            provider.get_vm(ID)
        assert err.value.provider_code == "notFound"
        with pytest.raises(InvalidSpecError, match="<project>/<zone>/<name>"):
            provider.get_vm("web-1")

    def test_destroy(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert provider.destroy_vm(ID) is None
        [(query, body)] = sent(rsps, "DELETE")
        assert body is None and "requestId" not in query
        with pytest.raises(NotFoundError):  # the insert finished: a 404 now means gone
            provider.get_vm(ID)

    def test_destroy_twice(self, provider: GCPProvider, fake: FakeCompute, key: SSHPublicKey) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        provider.destroy_vm(ID)
        assert provider.destroy_vm(ID) is None

    def test_destroy_unknown_id(self, provider: GCPProvider, fake: FakeCompute) -> None:
        assert provider.destroy_vm(f"{PROJECT}/{ZONE}/never-was") is None

    @pytest.mark.parametrize(
        ("status", "reason", "expected"),
        [
            (401, "authError", AuthError),
            (403, "forbidden", AuthError),
            (403, "accessNotConfigured", AuthError),
            (403, "quotaExceeded", QuotaExceededError),
            (403, "rateLimitExceeded", RateLimitedError),
            (429, "rateLimitExceeded", RateLimitedError),
            (400, "invalid", InvalidSpecError),
            (404, "notFound", InvalidSpecError),  # on insert: the image or machine type
            (400, "resourceNotReady", TransientError),
            (500, "backendError", TransientError),
            (503, "somethingNew", TransientError),
            (409, "resourceInUseByAnotherResource", ProviderError),
            (412, "conditionNotMet", ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self,
        provider: GCPProvider,
        rsps: responses.RequestsMock,
        key: SSHPublicKey,
        status: int,
        reason: str,
        expected: type,
    ) -> None:
        answer_error(rsps, "POST", f"{API}/instances", status, reason)
        with pytest.raises(ProviderError) as err:
            provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert type(err.value) is expected
        assert err.value.provider_code == reason and err.value.message.endswith(f"{reason}: the API says no")

    def test_connection_error_is_transient(self, provider: GCPProvider, rsps: responses.RequestsMock) -> None:
        rsps.add("GET", f"{API}/instances/web-1", body=requests.ConnectionError("Connection refused"))
        with pytest.raises(TransientError):
            provider.get_vm(ID)

    def test_rate_limited_carries_retry_after(self, provider: GCPProvider, rsps: responses.RequestsMock) -> None:
        answer_error(rsps, "GET", f"{API}/instances/web-1", 429, "rateLimitExceeded", **{"Retry-After": "12"})
        with pytest.raises(RateLimitedError) as err:
            provider.get_vm(ID)
        assert err.value.retry_after_s == 12.0 and err.value.retryable
        answer_error(rsps, "DELETE", f"{API}/instances/web-1", 403, "rateLimitExceeded")
        with pytest.raises(RateLimitedError) as err:
            provider.destroy_vm(ID)
        assert err.value.retry_after_s is None

    def test_missing_credentials_auth_error(self, rsps: responses.RequestsMock) -> None:
        with pytest.raises(AuthError, match="GOOGLE_APPLICATION_CREDENTIALS") as err:
            GCPProvider().get_vm(ID)
        assert "GOOGLE_CLOUD_PROJECT" in str(err.value) and err.value.provider_code == "DefaultCredentialsError"
        with pytest.raises(AuthError, match="GOOGLE_CLOUD_PROJECT"):
            GCPProvider(AnonymousCredentials()).list_owned_vms()
        assert len(rsps.calls) == 0

    @pytest.mark.parametrize(("method", "status"), [("GET", 503), ("POST", 503), ("GET", 500)])
    def test_sdk_retries_off(
        self, provider: GCPProvider, rsps: responses.RequestsMock, key: SSHPublicKey, method: str, status: int
    ) -> None:
        # The SDK's default for get retries ServiceUnavailable for 600 s; ours sends once.
        url = f"{API}/instances" if method == "POST" else f"{API}/instances/web-1"
        answer_error(rsps, method, url, status, "backendError")
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, None, job_id="job-1") if method == "POST" else provider.get_vm(ID)
        assert len(rsps.calls) == 1

    def test_get_vms_reads_many_in_few_calls(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        fake.boot = False
        owned = {"managed-by": "vmqueue"}
        nic = {"name": "nic0", "networkIP": "10.128.0.9", "accessConfigs": [{"type": "ONE_TO_ONE_NAT"}]}
        nic["accessConfigs"][0]["natIP"] = "34.118.0.9"
        fake.add_instance(PROJECT, ZONE, "web-1", labels=owned, networkInterfaces=[nic])
        fake.add_instance(PROJECT, ZONE, "web-2", status="STAGING", labels=owned)
        fake.add_instance(PROJECT, "us-central1-a", "web-3", labels=owned)
        fake.fail_inserts = "ZONE_RESOURCE_POOL_EXHAUSTED"  # accepted, then failed: it never appears
        failed = provider.create_vm(make_spec(name="web-4"), key, None, job_id="job-4").instance_id
        ids = [ID, f"{PROJECT}/{ZONE}/web-2", f"{PROJECT}/us-central1-a/web-3", failed, f"{PROJECT}/{ZONE}/gone"]
        rsps.calls.reset()

        vms = provider.get_vms(ids)

        assert set(vms) == set(ids[:4])
        assert (vms[ID].status, vms[ID].public_ipv4, vms[ID].private_ipv4) == (
            VMStatus.running,
            "34.118.0.9",
            "10.128.0.9",
        )
        assert [vms[i].status for i in ids[1:4]] == [VMStatus.pending, VMStatus.running, VMStatus.error]
        assert "ZONE_RESOURCE_POOL_EXHAUSTED" in (vms[failed].provider_status or "")
        # One aggregated list covers both zones; each id it lacks costs a GET and an operations list.
        paths = [urlparse(c.request.url).path.rsplit("/", 2)[-2:] for c in rsps.calls]
        assert paths[0] == ["aggregated", "instances"] and len(paths) == 5
        unlisted = [["instances", "gone"], ["instances", "web-4"], [ZONE, "operations"], [ZONE, "operations"]]
        assert sorted(paths[1:]) == sorted(unlisted)
        [(query, _)] = sent(rsps, "GET")[:1]
        # Filtered to the names asked, so the cost follows the VMs in flight, not the project's fleet.
        assert query["filter"] == " OR ".join(f'(name = "{n}")' for n in ["gone", "web-1", "web-2", "web-3", "web-4"])

    def test_get_vms_matches_get_vm(self, provider: GCPProvider, fake: FakeCompute, key: SSHPublicKey) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        while provider.get_vm(ID).status != VMStatus.running:  # PROVISIONING, STAGING, RUNNING
            pass
        batched = provider.get_vms([ID])[ID]
        single = provider.get_vm(ID)
        assert batched == single
        assert batched.status == VMStatus.running and batched.public_ipv4 and batched.private_ipv4

    def test_list_owned_vms(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        provider.create_vm(make_spec(name="web-2", region="us-central1-a"), key, None, job_id="job-2")
        fake.add_instance(PROJECT, ZONE, "not-ours", labels={"team": "infra"})
        vms = provider.list_owned_vms()
        assert sorted(vm.instance_id for vm in vms) == [ID, f"{PROJECT}/us-central1-a/web-2"]
        [(query, _)] = sent(rsps, "GET")
        assert query["filter"] == 'labels.managed-by = "vmqueue"'

    def test_list_owned_extras(
        self, provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
    ) -> None:
        # Issue 13 (5): nothing this adapter creates beside a VM outlives it (see its docstring).
        provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert provider.list_owned_extras() == []
        with pytest.raises(InvalidSpecError):
            provider.delete_extra(OwnedResource(provider="gcp", kind="volume", resource_id="x"))

    def test_lists_follow_every_page(
        self,
        provider: GCPProvider,
        fake: FakeCompute,
        rsps: responses.RequestsMock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Issue 13 (6): five instances over two zones, two a page (maxResults): three pages, every one read.
        monkeypatch.setattr(gcp, "LIST_PAGE_SIZE", 2)
        for n in range(5):
            fake.add_instance(PROJECT, ("us-central1-a", ZONE)[n % 2], f"web-{n}", labels={"managed-by": "vmqueue"})
        fake.add_instance(PROJECT, ZONE, "not-ours", labels={"team": "infra"})
        ours = {vm.instance_id for vm in provider.list_owned_vms()}
        assert len(ours) == 5
        assert [q.get("pageToken") for q, _ in sent(rsps, "GET")] == [None, "2", "4"]
        assert set(provider.get_vms(sorted(ours))) == ours

    def test_project_from_environment_and_endpoint(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-project")
        monkeypatch.setenv("VMQ_GCP_ENDPOINT", "http://127.0.0.1:9")
        provider = GCPProvider()
        assert provider._default_project() == "env-project"
        assert isinstance(provider._adc(), AnonymousCredentials)  # a plain-http emulator gets no real token


@pytest.mark.system
def test_system_create_destroy_and_failed_insert_through_a_worker(
    worker_factory: Any, provisioner: Any, ssh_key: str, httpserver: Any
) -> None:
    """Producer -> Redis -> a real Celery worker whose SDK talks to FakeCompute at VMQ_GCP_ENDPOINT."""
    from tests.providers.gcp_fake import werkzeug_handler
    from vmqueue.models import JobState

    fake = FakeCompute()
    httpserver.expect_request(re.compile(r"^/compute/v1/.*")).respond_with_handler(werkzeug_handler(fake))
    endpoint = f"http://{httpserver.host}:{httpserver.port}"
    worker_factory("gcp", {"VMQ_GCP_ENDPOINT": endpoint, "GOOGLE_CLOUD_PROJECT": PROJECT})

    job = provisioner.wait(provisioner.create_vm(make_spec(image="ubuntu-24.04"), ssh_key, SCRIPT).id, timeout_s=60)
    assert job.state == JobState.running, job.error
    assert job.instance_id == ID and job.vm.public_ipv4 and job.vm.labels["vmqueue-job"] == job.id
    [instance] = fake.instances.values()
    assert {i["key"]: i["value"] for i in instance["metadata"]["items"]}["user-data"] == SCRIPT

    gone = provisioner.wait(provisioner.destroy_vm("gcp", job.instance_id).id, timeout_s=60)
    assert gone.state == JobState.gone, gone.error
    assert fake.instances == {}

    fake.fail_inserts = "ZONE_RESOURCE_POOL_EXHAUSTED"  # accepted, then failed in the zone operation
    failed = provisioner.wait(provisioner.create_vm(make_spec(name="web-2"), ssh_key).id, timeout_s=60)
    assert failed.state == JobState.failed and failed.error.code == "capacity", failed.error


def test_first_attempt_create_costs_one_request(
    provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock, key: SSHPublicKey
) -> None:
    provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id="job-1", first_attempt=True)
    assert [c.request.method for c in rsps.calls] == ["POST"]


def test_get_vms_cost_grows_with_vms_in_flight_not_the_fleet(
    provider: GCPProvider, fake: FakeCompute, rsps: responses.RequestsMock
) -> None:
    for i in range(1200):  # long-lived: three pages of 500 unfiltered
        fake.add_instance(PROJECT, ZONE, f"old-{i}", labels={"managed-by": "vmqueue"})
    in_flight = []
    for i in range(60):
        fake.add_instance(PROJECT, ZONE, f"new-{i}", status="STAGING", labels={"managed-by": "vmqueue"})
        in_flight.append(f"{PROJECT}/{ZONE}/new-{i}")
    rsps.calls.reset()
    assert set(provider.get_vms(in_flight)) == set(in_flight)
    assert len(rsps.calls) == 2  # 60 names, 50 a filter
