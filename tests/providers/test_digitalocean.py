"""The DigitalOcean adapter through the real pydo SDK, its HTTP answered by a fake that follows the API spec."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from pytest_httpserver import HTTPServer

from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter
from tests.providers.digitalocean_fake import BASE_URL, FakeDigitalOcean, action_payload, error
from tests.providers.fakehttp import mocked, serve
from tests.providers.hetzner_fake import now
from vmqueue.models import JobState, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import sent_size
from workers.providers.digitalocean import DigitalOceanProvider, batch_tag
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

JOB = "3f2a9c0e5b7d4e1f8a6b2c4d6e8f0a1b"
SCRIPT = "#cloud-config\nruncmd:\n  - echo hello > /tmp/hello\n"
FAKE_TOKEN = "fake-" + "do-token"  # not a credential: the fake API accepts anything
TOKEN_ENVS = ("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN", "DIGITALOCEAN_ENDPOINT")
T0 = 1_796_000_000.0  # 2026-11-30 00:53:20 UTC: the provider's clock in these tests
BATCH = "vmqueue-batch-202611300053"  # the batch tag of a create sent at T0
OWNED = ["managed-by:vmqueue"]

# Every status the spec documents for a droplet, and what the PROVIDERS.md table makes of it.
DOCUMENTED_STATES = {
    "new": VMStatus.pending,
    "active": VMStatus.running,
    "off": VMStatus.stopped,
    "archive": VMStatus.terminated,
}


def unprocessable(message: str) -> dict[str, Any]:
    return error("unprocessable_entity", message)


def make_spec(**fields: Any) -> VMSpec:
    base = {
        "provider": "digitalocean",
        "name": "web-1",
        "region": "nyc3",
        "instance_type": "s-1vcpu-1gb",
        "image": "ubuntu-24.04",
    }
    return VMSpec.model_validate({**base, **fields})


@pytest.fixture
def fake() -> Iterator[FakeDigitalOcean]:
    fake = FakeDigitalOcean()
    with mocked(fake, f"{BASE_URL}/v2"):
        yield fake


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> DigitalOceanProvider:
    monkeypatch.delenv("DIGITALOCEAN_ENDPOINT", raising=False)
    provider = DigitalOceanProvider(token=FAKE_TOKEN)
    provider.clock = lambda: T0
    return provider


def ticks(fake: FakeDigitalOcean, provider: DigitalOceanProvider, ids: list[str]) -> list[tuple[str, str, str | None]]:
    """The requests one ``get_vms`` (a tick's read) sends: (method, path, tag_name)."""
    fake.requests.clear()
    provider.get_vms(ids)
    return [(m, p, q.get("tag_name")) for m, p, q, _ in fake.requests]


class TestDigitalOcean(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        """ready_when=cloud_init: the user-data sent, whatever the user's script format, passes cloud-init's schema."""
        for i, script in enumerate(phone_home_scripts().values()):
            provider.create_vm(provider.prepare_spec(make_spec(name=f"web-{i}")), key, script, job_id=f"job-{i}")
        sent = [body["user_data"] for body in fake.calls("POST", "/droplets")]
        assert sent == list(phone_home_scripts().values())
        assert_cloud_init_accepts(sent)

    def test_meter_sees_every_request(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        """Each request on the wire passes the meter first (the budget's hook), and each answer after it."""
        meter = provider.meter = RecordingMeter()
        vm = provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id=JOB)
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id])
        provider.destroy_vm(vm.instance_id)

        wire = [(method, f"/v2{path}") for method, path, _, _ in fake.requests]
        assert [(m, unquote(t)) for m, t in meter.requests()] == wire and ("POST", "/v2/droplets") in wire
        assert [(m, unquote(t)) for m, t, _, _ in meter.answers] == wire
        assert any("ratelimit-remaining" in {h.lower() for h in headers} for *_, headers in meter.answers)

    def test_create_sends_key_script_and_labels(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        spec = make_spec(labels={"team": "infra"}, options={"monitoring": True})
        vm = provider.create_vm(provider.prepare_spec(spec), key, SCRIPT, job_id=JOB)

        [key_body] = fake.calls("POST", "/account/keys")
        assert key_body["public_key"] == key.openssh
        [body] = fake.calls("POST", "/droplets")
        assert len(body["user_data"].encode()) == sent_size("digitalocean", None, key, SCRIPT).size
        assert body == {
            "name": "web-1",
            "region": "nyc3",
            "size": "s-1vcpu-1gb",
            "image": "ubuntu-24-04-x64",
            "ssh_keys": [key.md5_fingerprint],
            "user_data": SCRIPT,
            "tags": ["team:infra", "managed-by:vmqueue", f"vmqueue-job:{JOB}", BATCH],
            "ipv6": True,
            "monitoring": True,
        }
        assert vm.instance_id == str(next(iter(fake.droplets)))
        assert (vm.provider, vm.status, vm.provider_status) == ("digitalocean", VMStatus.pending, "new")
        # The batch tag is the adapter's bookkeeping, not a label.
        assert vm.labels == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": JOB}
        # The job's tag was looked up before the POST.
        assert fake.requests[0][:3] == (
            "GET",
            "/droplets",
            {"tag_name": f"vmqueue-job:{JOB}", "per_page": "200", "page": "1"},
        )

    def test_create_reuses_the_accounts_key(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        fake.add_ssh_key(key.openssh)
        provider.create_vm(make_spec(options={"vpc_uuid": "760e09ef-dc84-11e8-981e-3cfdfeaae000"}), key, job_id=JOB)
        assert fake.calls("POST", "/account/keys") == []
        [body] = fake.calls("POST", "/droplets")
        assert body["ssh_keys"] == [key.md5_fingerprint]
        assert body["vpc_uuid"] == "760e09ef-dc84-11e8-981e-3cfdfeaae000"

    def test_create_key_race_uses_fingerprint(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        # Another job adds the key between our lookup and our POST: 422 "already in use".
        fake.add_ssh_key(key.openssh)
        fake.fail("GET", f"/account/keys/{key.md5_fingerprint}", status=404, body=error("not_found", "not found"))
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.calls("POST", "/account/keys")) == 1
        assert fake.calls("POST", "/droplets")[0]["ssh_keys"] == [key.md5_fingerprint]
        assert vm.status == VMStatus.pending

    @pytest.mark.parametrize(
        ("image", "sent"),
        [
            ("ubuntu-22.04", "ubuntu-22-04-x64"),
            ("ubuntu-24.04", "ubuntu-24-04-x64"),
            ("debian-12", "debian-12-x64"),
            ("fedora-39-x64", "fedora-39-x64"),
            ("123456", 123456),
        ],
    )
    def test_create_resolves_image_alias(
        self,
        fake: FakeDigitalOcean,
        provider: DigitalOceanProvider,
        key: SSHPublicKey,
        image: str,
        sent: str | int,
    ) -> None:
        provider.create_vm(provider.prepare_spec(make_spec(image=image)), key, job_id=JOB)
        assert fake.calls("POST", "/droplets")[0]["image"] == sent

    def test_create_twice_same_job_one_vm(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        first = provider.create_vm(make_spec(), key, job_id=JOB)
        second = provider.create_vm(make_spec(), key, job_id=JOB)
        assert first.instance_id == second.instance_id
        assert len(fake.droplets) == 1
        assert len(fake.calls("POST", "/droplets")) == 1

    @pytest.mark.parametrize(
        "fault",
        [
            {"exc": requests.ReadTimeout("read timed out"), "after": True},
            {"status": 500, "body": error("server_error", "Server Error"), "after": True},
            {"status": 503, "body": error("service_unavailable", "Service Unavailable"), "after": True},
        ],
    )
    def test_create_lost_answer_one_vm(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey, fault: dict[str, Any]
    ) -> None:
        # The API creates the droplet, then the answer is lost: the tag lookup finds it, no second POST.
        fake.fail("POST", "/droplets", **fault)
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert list(fake.droplets) == [int(vm.instance_id)]
        assert len(fake.calls("POST", "/droplets")) == 1
        # A redelivered job adopts it too.
        assert provider.create_vm(make_spec(), key, job_id=JOB).instance_id == vm.instance_id
        assert len(fake.calls("POST", "/droplets")) == 1

    def test_create_ambiguous_failure_without_droplet_is_transient(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        # The answer was lost and the tag shows nothing (yet): fail retryably; the retry looks again first.
        fake.fail("POST", "/droplets", exc=requests.ReadTimeout("read timed out"))
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.calls("GET", "/droplets")) == 2
        assert len(fake.calls("POST", "/droplets")) == 1

    def test_create_not_sent_is_transient(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        fake.fail("POST", "/droplets", exc=requests.ConnectionError("connection refused"))
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert fake.droplets == {}
        provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.droplets) == 1

    def test_create_adopts_oldest_of_duplicates(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        tags = ["managed-by:vmqueue", f"vmqueue-job:{JOB}"]
        newer = fake.add_droplet("web-1", tags=tags, created_at="2024-05-01T10:00:05Z")
        older = fake.add_droplet("web-1", tags=tags, created_at="2024-05-01T10:00:00Z")
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert vm.instance_id == str(older["id"])
        assert list(fake.droplets) == [older["id"]]
        assert fake.calls("DELETE", f"/droplets/{newer['id']}") == [None]
        assert fake.calls("POST", "/droplets") == []

    @pytest.mark.parametrize(("raw", "status"), DOCUMENTED_STATES.items())
    def test_get_maps_every_documented_state(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, raw: str, status: VMStatus
    ) -> None:
        droplet = fake.add_droplet("web-1", status=raw)
        vm = provider.get_vm(str(droplet["id"]))
        assert (vm.status, vm.provider_status) == (status, raw)

    def test_late_create_error_raises_capacity_and_destroys(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        """The POST is accepted, then the droplet's create action ends ``errored`` and the droplet stays new:
        the batched read reports it in error, get_vm raises CapacityError once the droplet's delete is sent."""
        fake.create_errors_in = {"nyc3"}
        fake.created_at = "2020-07-21T18:37:44Z"  # read once the action errored, minutes after the POST
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert vm.status == VMStatus.pending and len(fake.calls("POST", "/droplets")) == 1

        batched = provider.get_vms([vm.instance_id])[vm.instance_id]
        assert (batched.status, batched.provider_status) == (VMStatus.error, "create_errored")
        assert fake.calls("DELETE", f"/droplets/{vm.instance_id}") == []
        with pytest.raises(CapacityError) as caught:
            provider.get_vm(vm.instance_id)

        assert caught.value.provider_code == "create_errored"
        assert "nyc3" in caught.value.message
        assert fake.droplets == {}  # the failover forgets this id: nothing of it may stay
        assert len(fake.calls("GET", f"/droplets/{vm.instance_id}/actions")) == 2

    def test_new_droplet_reads_its_actions_only_once_stuck(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider
    ) -> None:
        """A droplet new since moments ago costs one GET; one new for minutes (or off) costs one more, the
        actions list, which decides: completed create -> its status as it is, errored -> CapacityError."""
        young = fake.add_droplet("web-1", status="new", created_at=now())
        stuck = fake.add_droplet("web-2", status="new")
        fake.actions[stuck["id"]] = [action_payload(1, stuck["id"], "nyc3", "in-progress")]
        off = fake.add_droplet("web-3", status="off")
        fake.actions[off["id"]] = [action_payload(2, off["id"], "nyc3", "completed")]

        assert provider.get_vm(str(young["id"])).status == VMStatus.pending
        assert [p for _, p, _, _ in fake.requests] == [f"/droplets/{young['id']}"]
        assert provider.get_vm(str(stuck["id"])).status == VMStatus.pending
        assert provider.get_vm(str(off["id"])).status == VMStatus.stopped
        assert [p for _, p, _, _ in fake.requests][1:] == [
            f"/droplets/{stuck['id']}",
            f"/droplets/{stuck['id']}/actions",
            f"/droplets/{off['id']}",
            f"/droplets/{off['id']}/actions",
        ]
        fake.actions[stuck["id"]] = [action_payload(1, stuck["id"], "nyc3", "errored")]
        with pytest.raises(CapacityError):
            provider.get_vm(str(stuck["id"]))
        assert stuck["id"] not in fake.droplets and off["id"] in fake.droplets

    def test_get_undocumented_state_is_unknown(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        droplet = fake.add_droplet("web-1", status="hibernating")
        assert provider.get_vm(str(droplet["id"])).status == VMStatus.unknown

    def test_get_public_and_private_ips(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        droplet = fake.add_droplet("web-1", tags=["managed-by:vmqueue", "web"])
        vm = provider.get_vm(str(droplet["id"]))
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == (
            "192.241.165.154",
            "2604:a880:0:1010::18a:a001",
            "10.128.192.124",
        )
        assert (vm.name, vm.region, vm.instance_type, vm.image) == ("web-1", "nyc3", "s-1vcpu-1gb", "ubuntu-24-04-x64")
        assert vm.labels == {"managed-by": "vmqueue", "web": ""}
        assert vm.created_at is not None and vm.created_at.year == 2020

    def test_get_without_public_ip(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        # A new droplet has no networks yet; a snapshot image has no slug.
        droplet = fake.add_droplet("web-1", status="new", image=7654321)
        vm = provider.get_vm(str(droplet["id"]))
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4, vm.image) == (None, None, None, "7654321")

    @pytest.mark.parametrize("instance_id", ["999999", "not-a-droplet-id"])
    def test_get_unknown_raises_not_found(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, instance_id: str
    ) -> None:
        with pytest.raises(NotFoundError):
            provider.get_vm(instance_id)

    def test_destroy(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey) -> None:
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert provider.destroy_vm(vm.instance_id) is None
        assert fake.droplets == {}
        assert len(fake.ssh_keys) == 1  # the shared key stays
        with pytest.raises(NotFoundError):
            provider.get_vm(vm.instance_id)

    def test_destroy_twice(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        droplet = fake.add_droplet("web-1")
        provider.destroy_vm(str(droplet["id"]))
        provider.destroy_vm(str(droplet["id"]))
        assert len(fake.calls("DELETE", f"/droplets/{droplet['id']}")) == 2

    @pytest.mark.parametrize("instance_id", ["999999", "not-a-droplet-id"])
    def test_destroy_unknown_id(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, instance_id: str) -> None:
        assert provider.destroy_vm(instance_id) is None

    @pytest.mark.parametrize(
        ("status", "body", "raised"),
        [
            (401, error("unauthorized", "Unable to authenticate you."), AuthError),
            (403, error("forbidden", "You do not have access for the attempted action."), AuthError),
            (400, error("bad_request", "error parsing request body"), InvalidSpecError),
            (422, unprocessable("You specified an invalid size for Droplet creation."), InvalidSpecError),
            (422, unprocessable("creating this/these droplet(s) will exceed your droplet limit"), QuotaExceededError),
            (422, unprocessable("Size is unavailable in this region."), CapacityError),
            (422, unprocessable("Region is not available"), CapacityError),
            (429, error("too_many_requests", "API rate limit exceeded."), RateLimitedError),
            (500, error("server_error", "Unexpected server-side error"), TransientError),
            (503, error("service_unavailable", "Service Unavailable"), TransientError),
            (409, error("conflict", "The request could not be completed due to a conflict."), ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self,
        fake: FakeDigitalOcean,
        provider: DigitalOceanProvider,
        key: SSHPublicKey,
        status: int,
        body: dict[str, Any],
        raised: type[ProviderError],
    ) -> None:
        fake.fail("POST", "/droplets", status=status, body=body)
        with pytest.raises(ProviderError) as info:
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert type(info.value) is raised
        assert info.value.provider_code == body["id"]
        assert body["message"] in info.value.message
        assert info.value.__cause__ is not None

    @pytest.mark.parametrize("exc", [requests.ConnectionError("connection refused"), requests.ReadTimeout("slow")])
    def test_network_errors_are_transient(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, exc: Exception
    ) -> None:
        fake.fail("GET", "/droplets/1", exc=exc)
        with pytest.raises(TransientError):
            provider.get_vm("1")

    @pytest.mark.parametrize(
        ("headers", "low", "high"),
        # A reset is an epoch second: built when the test runs, not when it is collected.
        [({"retry-after": "7"}, 7, 7), ({"ratelimit-reset": 30}, 0.001, 30)],
    )
    def test_rate_limited_carries_retry_after(
        self,
        fake: FakeDigitalOcean,
        provider: DigitalOceanProvider,
        headers: dict[str, object],
        low: float,
        high: float,
    ) -> None:
        if "ratelimit-reset" in headers:
            headers = {"ratelimit-reset": str(int(time.time()) + int(headers["ratelimit-reset"]))}
        limits = {"ratelimit-limit": "5000", "ratelimit-remaining": "0", **headers}
        fake.fail(
            "GET",
            "/droplets/1",
            status=429,
            headers=limits,
            body=error("too_many_requests", "API rate limit exceeded."),
        )
        with pytest.raises(RateLimitedError) as info:
            provider.get_vm("1")
        assert info.value.retryable
        assert info.value.retry_after_s is not None and low <= info.value.retry_after_s <= high

    @pytest.mark.parametrize("reset_ago_s", [0, 5])
    def test_rate_limit_reset_already_past_is_no_hint(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, reset_ago_s: int
    ) -> None:
        # A reset at or before now said "retry at once": six attempts in three seconds (issue 12, 4).
        limits = {
            "ratelimit-limit": "5000",
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(int(time.time()) - reset_ago_s),
        }
        fake.fail("GET", "/droplets/1", status=429, headers=limits, body=error("too_many_requests", "slow down"))
        with pytest.raises(RateLimitedError) as info:
            provider.get_vm("1")
        assert info.value.retry_after_s is None

    def test_missing_credentials_auth_error(self, fake: FakeDigitalOcean, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in TOKEN_ENVS:
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(AuthError, match="DIGITALOCEAN_TOKEN or DIGITALOCEAN_ACCESS_TOKEN"):
            DigitalOceanProvider().get_vm("1")
        assert fake.requests == []

    def test_rejected_token_names_the_variable(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        fake.fail("GET", "/droplets/1", status=401, body=error("unauthorized", "Unable to authenticate you."))
        with pytest.raises(AuthError, match="DIGITALOCEAN_TOKEN"):
            provider.get_vm("1")

    @pytest.mark.parametrize("variable", ["DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN"])
    def test_token_and_endpoint_from_env(self, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
        for name in TOKEN_ENVS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, FAKE_TOKEN)
        monkeypatch.setenv("DIGITALOCEAN_ENDPOINT", "http://do.fake.test")
        fake = FakeDigitalOcean()
        droplet = fake.add_droplet("web-1")
        with mocked(fake, "http://do.fake.test/v2") as rsps:
            assert DigitalOceanProvider().get_vm(str(droplet["id"])).instance_id == str(droplet["id"])
            assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {FAKE_TOKEN}"

    @pytest.mark.parametrize(
        "fault",
        [
            {"status": 429, "headers": {"retry-after": "1"}, "body": error("too_many_requests", "slow down")},
            {"status": 500, "body": error("server_error", "Unexpected server-side error")},
            {"status": 503, "body": error("service_unavailable", "Service Unavailable")},
            {"exc": requests.ReadTimeout("read timed out")},
        ],
    )
    def test_sdk_retries_off(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey, fault: dict[str, Any]
    ) -> None:
        # azure-core's default policy would send this POST up to 4 times.
        fake.fail("POST", "/droplets", **fault)
        with pytest.raises(ProviderError):
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.calls("POST", "/droplets")) == 1

    def test_requests_carry_timeouts(self, provider: DigitalOceanProvider) -> None:
        with mocked(FakeDigitalOcean(), f"{BASE_URL}/v2") as rsps:
            provider.list_owned_vms()
            assert rsps.calls[0].request.req_kwargs["timeout"] == (5, 30)

    def test_get_vms_reads_many_in_few_calls(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        running = provider.create_vm(make_spec(name="web-1"), key, job_id="a")
        booting = provider.create_vm(make_spec(name="web-2"), key, job_id="b")
        fake._booting.pop(int(booting.instance_id))  # still new when read
        fake.add_droplet("their-db", tags=["db", BATCH])  # not ours, in the batch: listed, left out
        ids = [running.instance_id, booting.instance_id, "999999", "not-a-droplet-id"]

        # One list for all of them: the batch of the minute they were created in, at the API's largest page
        # (an id this process never saw and no batch holds is read by id: 999999, gone).
        assert ticks(fake, provider, ids) == [
            ("GET", "/droplets", BATCH),
            ("GET", "/droplets/999999", None),
        ]
        assert fake.requests[0][2]["per_page"] == "200"
        vms = provider.get_vms(ids)
        assert set(vms) == {running.instance_id, booting.instance_id}
        assert vms[running.instance_id].status == VMStatus.running
        assert vms[running.instance_id].public_ipv4 == "192.241.165.154"
        assert vms[booting.instance_id].status == VMStatus.pending
        assert provider.get_vms([]) == {}

    def test_tick_cost_independent_of_long_lived_fleet(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        """Issue 15: a tick reading 100 VMs in flight costs the same with 0 and 1,000 long-lived vmqueue
        droplets (created in earlier minutes, half of them before batch tags existed), in the process that
        created the VMs and in one that never saw them (another worker, or a restart). It was 1 and 6."""
        in_flight = [provider.create_vm(make_spec(name=f"n-{i}"), key, job_id=f"n-{i}").instance_id for i in range(100)]
        costs = {}
        for fleet in (0, 1000):
            for n in range(fleet):  # none the first time
                batch = [batch_tag(T0 - 86_400 - n * 60)] if n % 2 else []
                fake.add_droplet(
                    f"old-{n}", tags=[*OWNED, f"vmqueue-job:old-{n}", *batch], created_at="2026-11-20T10:00:00Z"
                )
            other = DigitalOceanProvider(token=FAKE_TOKEN)
            other.clock = lambda: T0 + 20  # its tick, in the same minute
            costs[fleet] = (len(ticks(fake, provider, in_flight)), len(ticks(fake, other, in_flight)))
            assert set(provider.get_vms(in_flight)) == set(other.get_vms(in_flight)) == set(in_flight)
        assert costs == {0: (1, 1), 1000: (1, 1)}

    def test_get_vms_reads_by_id_when_fewer_than_the_batchs_pages(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        # 450 droplets created in one minute (3 pages), 448 of them running by now: the 2 in flight cost 2 GETs.
        for n in range(448):
            fake.add_droplet(f"done-{n}", tags=[*OWNED, f"vmqueue-job:done-{n}", BATCH])
        in_flight = [provider.create_vm(make_spec(name=f"web-{i}"), key, job_id=f"j{i}").instance_id for i in range(2)]
        assert ticks(fake, provider, in_flight) == [("GET", "/droplets", BATCH)] * 3  # learns 450
        assert ticks(fake, provider, in_flight) == [("GET", f"/droplets/{i}", None) for i in in_flight]
        assert set(provider.get_vms(in_flight)) == set(in_flight)
        # With 3 or more in flight the batch's 3 pages are no dearer.
        third = provider.create_vm(make_spec(name="web-3"), key, job_id="j3").instance_id
        assert len(ticks(fake, provider, [*in_flight, third])) == 3

    def test_get_vms_finds_droplets_of_earlier_minutes(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider
    ) -> None:
        """Droplets another worker created two minutes ago: the current minute's batch, then the ones before,
        until all are found; the next read lists only their batch."""
        earlier = batch_tag(T0 - 120)
        ids = [str(fake.add_droplet(f"web-{n}", tags=[*OWNED, f"vmqueue-job:{n}", earlier])["id"]) for n in range(5)]
        assert ticks(fake, provider, ids) == [
            ("GET", "/droplets", BATCH),
            ("GET", "/droplets", batch_tag(T0 - 60)),
            ("GET", "/droplets", earlier),
        ]
        assert ticks(fake, provider, ids) == [("GET", "/droplets", earlier)]
        assert set(provider.get_vms(ids)) == set(ids)

    def test_get_vms_reads_droplets_without_batch_by_id(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider
    ) -> None:
        """A droplet created before batch tags existed still resolves: the search for it spends less than
        reading it by id would, then it is read by id; from the next read on, by id only."""
        old = [
            str(fake.add_droplet(f"old-{n}", status="new", tags=[*OWNED, f"vmqueue-job:o{n}"], created_at=now())["id"])
            for n in range(3)
        ]
        first = ticks(fake, provider, old)
        assert first == [
            ("GET", "/droplets", BATCH),
            ("GET", "/droplets", batch_tag(T0 - 60)),
            *[("GET", f"/droplets/{i}", None) for i in old],
        ]
        assert ticks(fake, provider, old) == [("GET", f"/droplets/{i}", None) for i in old]
        assert {vm.status for vm in provider.get_vms(old).values()} == {VMStatus.pending}

    def test_get_vms_after_a_lost_create_answer_reads_its_batch(
        self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
    ) -> None:
        """The answer is lost, the job tag finds the droplet: its batch is known from the droplet read."""
        fake.fail("POST", "/droplets", exc=requests.ReadTimeout("read timed out"), after=True)
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        provider.clock = lambda: T0 + 300  # read five minutes later
        assert ticks(fake, provider, [vm.instance_id]) == [("GET", "/droplets", BATCH)]

    def test_get_vms_matches_get_vm(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        droplet = fake.add_droplet("web-1", tags=["managed-by:vmqueue", f"vmqueue-job:{JOB}"])
        batched = provider.get_vms([str(droplet["id"])])[str(droplet["id"])]
        single = provider.get_vm(str(droplet["id"]))
        assert batched == single
        assert (batched.status, batched.public_ipv4, batched.private_ipv4) == (
            VMStatus.running,
            "192.241.165.154",
            "10.128.192.124",
        )

    def test_list_owned_vms(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        ours = fake.add_droplet("web-1", tags=["managed-by:vmqueue", f"vmqueue-job:{JOB}"])
        fake.add_droplet("their-db", tags=["db"])
        vms = provider.list_owned_vms()
        assert [vm.instance_id for vm in vms] == [str(ours["id"])]
        assert [vm.labels["vmqueue-job"] for vm in vms] == [JOB]
        assert fake.requests[0][2]["tag_name"] == "managed-by:vmqueue"

    def test_list_owned_extras(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey) -> None:
        # Issue 13 (5): nothing this adapter creates beside a VM outlives it (see its docstring).
        provider.create_vm(make_spec(), key, job_id=JOB)
        assert provider.list_owned_extras() == []
        with pytest.raises(InvalidSpecError):
            provider.delete_extra(OwnedResource(provider="digitalocean", kind="volume", resource_id="x"))

    def test_lists_follow_every_page(self, fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
        # Issue 13 (6): five droplets, two a page: three pages, every one read.
        fake.max_per_page = 2
        ours = {str(fake.add_droplet(f"web-{n}", tags=["managed-by:vmqueue"])["id"]) for n in range(5)}
        fake.add_droplet("their-db", tags=["db"])
        assert {vm.instance_id for vm in provider.list_owned_vms()} == ours
        assert [q.get("page") for m, p, q, _ in fake.requests if p == "/droplets"] == ["1", "2", "3"]
        assert set(provider.get_vms(sorted(ours))) == ours


@pytest.mark.system
def test_system_create_then_destroy_through_a_worker(
    worker_factory: Any, provisioner: Any, httpserver: HTTPServer, ssh_key: str
) -> None:
    """Producer -> Redis -> a real DigitalOcean worker subprocess -> pydo -> a fake API on a local HTTP server."""
    fake = FakeDigitalOcean()
    endpoint = serve(httpserver, fake).removesuffix("/v2")  # pydo's paths start with /v2
    env = {"DIGITALOCEAN_TOKEN": FAKE_TOKEN, "DIGITALOCEAN_ENDPOINT": endpoint, "NO_PROXY": "*"}
    worker_factory("digitalocean", env=env)

    job = provisioner.wait(provisioner.create_vm(make_spec(labels={"team": "infra"}), ssh_key, SCRIPT).id, timeout_s=30)
    assert job.state == JobState.running, job.error
    assert (job.vm.status, job.vm.public_ipv4) == (VMStatus.running, "192.241.165.154")
    [droplet] = fake.droplets.values()
    assert str(droplet["id"]) == job.instance_id
    assert droplet["tags"][:3] == ["team:infra", "managed-by:vmqueue", f"vmqueue-job:{job.id}"]
    assert droplet["tags"][3].startswith("vmqueue-batch-") and len(droplet["tags"]) == 4
    assert [body["user_data"] for body in fake.calls("POST", "/droplets")] == [SCRIPT]

    gone = provisioner.wait(provisioner.destroy_vm("digitalocean", job.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone, gone.error
    assert fake.droplets == {}


@pytest.mark.system
def test_system_late_create_error_fails_over(
    worker_factory: Any, provisioner: Any, httpserver: HTTPServer, ssh_key: str
) -> None:
    """The create is accepted in nyc3, then its action errors: through a real worker the job fails over to its
    fallback region, as a refused POST would, and the errored droplet is destroyed."""
    fake = FakeDigitalOcean()
    fake.create_errors_in = {"nyc3"}
    fake.created_at = "2020-07-21T18:37:44Z"  # the worker reads the droplet once its action errored
    endpoint = serve(httpserver, fake).removesuffix("/v2")  # pydo's paths start with /v2
    env = {"DIGITALOCEAN_TOKEN": FAKE_TOKEN, "DIGITALOCEAN_ENDPOINT": endpoint, "NO_PROXY": "*"}
    worker_factory("digitalocean", env=env)

    job = provisioner.wait(provisioner.create_vm(make_spec(fallbacks=[{"region": "sfo3"}]), ssh_key).id, timeout_s=60)

    assert job.state == JobState.running, job.error
    assert (job.placement, job.vm.region) == (1, "sfo3")
    assert any("no capacity in nyc3" in event.message for event in job.history)
    assert [body["region"] for body in fake.calls("POST", "/droplets")] == ["nyc3", "sfo3"]
    [droplet] = fake.droplets.values()
    assert str(droplet["id"]) == job.instance_id


def test_first_attempt_create_costs_one_request(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
) -> None:
    """No tag lookup before a first POST; the account's SSH key is checked once per process."""
    provider.create_vm(provider.prepare_spec(make_spec(name="web-0")), key, job_id="job-0", first_attempt=True)
    fake.requests.clear()
    provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id=JOB, first_attempt=True)
    assert [(m, p) for m, p, _, _ in fake.requests] == [("POST", "/droplets")]


def test_first_attempt_lost_answer_is_adopted_on_the_next(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, key: SSHPublicKey
) -> None:
    """A first POST that reached the API but lost its answer: the next attempt (not first) finds its droplet."""
    fake.fail("POST", "/droplets", status=500, after=True)
    vm = provider.create_vm(provider.prepare_spec(make_spec()), key, job_id=JOB, first_attempt=True)
    again = provider.create_vm(provider.prepare_spec(make_spec()), key, job_id=JOB)
    assert again.instance_id == vm.instance_id and len(fake.calls("POST", "/droplets")) == 1
