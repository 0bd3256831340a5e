"""The Hetzner adapter through the real hcloud SDK, its HTTP answered by a fake that follows the API spec."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer

from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter, make_ed25519_key
from tests.providers.fakehttp import mocked, serve
from tests.providers.hetzner_fake import (
    BASE_URL,
    FakeHetzner,
    action,
    error,
    finished,
    md5_fingerprint,
    now,
    page,
)
from vmqueue.models import JobState, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
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
from workers.providers.hetzner import SELECTOR_BATCHES, HetznerProvider, batch_label

JOB = "3f2a9c0e5b7d4e1f8a6b2c4d6e8f0a1b"
T0 = 1_796_000_000.0  # 2026-11-30 00:53:20 UTC: the provider's clock in these tests
BATCH_T0 = "202611300053"  # its batch label
SCRIPT = "#!/bin/sh\necho hello > /tmp/hello\n"
FAKE_TOKEN = "fake-" + "hcloud-token"  # not a credential: the fake API accepts anything

# Every status the spec documents for a server, and what the PROVIDERS.md table makes of it.
DOCUMENTED_STATES = {
    "initializing": VMStatus.pending,
    "starting": VMStatus.pending,
    "rebuilding": VMStatus.pending,
    "migrating": VMStatus.pending,
    "running": VMStatus.running,
    "stopping": VMStatus.stopping,
    "off": VMStatus.stopped,
    "deleting": VMStatus.terminating,
    "unknown": VMStatus.unknown,
}


def make_spec(**fields: Any) -> VMSpec:
    base = {"provider": "hetzner", "name": "web-1", "region": "fsn1", "instance_type": "cx22", "image": "ubuntu-24.04"}
    return VMSpec.model_validate({**base, **fields})


@pytest.fixture
def fake() -> Iterator[FakeHetzner]:
    fake = FakeHetzner()
    with mocked(fake, BASE_URL):
        yield fake


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> HetznerProvider:
    monkeypatch.delenv("HCLOUD_ENDPOINT", raising=False)
    provider = HetznerProvider(token=FAKE_TOKEN)
    provider.clock = lambda: T0
    return provider


class TestHetzner(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        """ready_when=cloud_init: the user-data sent, whatever the user's script format, passes cloud-init's schema."""
        for i, script in enumerate(phone_home_scripts().values()):
            provider.create_vm(provider.prepare_spec(make_spec(name=f"web-{i}")), key, script, job_id=f"job-{i}")
        sent = [body["user_data"] for body in fake.calls("POST", "/servers")]
        assert sent == list(phone_home_scripts().values())
        assert_cloud_init_accepts(sent)

    def test_meter_sees_every_request(self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
        """Each request on the wire passes the meter first (the budget's hook), and each answer after it."""
        meter = provider.meter = RecordingMeter()
        fake.fail("POST", "/servers", status=429, body=error("rate_limit_exceeded", "slow down"))
        with pytest.raises(RateLimitedError):
            provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id=JOB)
        vm = provider.create_vm(provider.prepare_spec(make_spec()), key, SCRIPT, job_id=JOB)
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id])
        provider.destroy_vm(vm.instance_id)

        wire = [(method, path) for method, path, _, _ in fake.requests]
        assert meter.requests() == wire and ("POST", "/servers") in wire
        assert 429 in [status for _, _, status, _ in meter.answers]
        assert [(m, t) for m, t, _, _ in meter.answers] == wire

    def test_create_sends_key_script_and_labels(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        spec = make_spec(labels={"team": "infra"}, options={"enable_ipv4": False})
        measured = sent_size("hetzner", None, key, SCRIPT).size
        vm = provider.create_vm(provider.prepare_spec(spec), key, SCRIPT, job_id=JOB)

        [key_body] = fake.calls("POST", "/ssh_keys")
        assert key_body["public_key"] == key.openssh
        [body] = fake.calls("POST", "/servers")
        assert body == {
            "name": "web-1",
            "server_type": "cx22",
            "image": "ubuntu-24.04",
            "location": "fsn1",
            "start_after_create": True,
            "ssh_keys": [next(iter(fake.ssh_keys))],
            "user_data": SCRIPT,
            "labels": {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": JOB, "vmqueue-batch": BATCH_T0},
            "public_net": {"enable_ipv4": False, "enable_ipv6": True},
        }
        assert len(body["user_data"].encode()) == measured  # the bytes the producer checked against 32 KiB
        assert vm.instance_id == str(next(iter(fake.servers)))
        assert (vm.provider, vm.status, vm.provider_status) == ("hetzner", VMStatus.pending, "initializing")
        assert vm.labels == {"team": "infra", "managed-by": "vmqueue", "vmqueue-job": JOB}  # the batch is bookkeeping

    def test_create_reuses_the_projects_key(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        existing = fake.add_ssh_key(key.openssh)
        provider.create_vm(make_spec(), key, job_id=JOB)
        assert fake.calls("POST", "/ssh_keys") == []
        assert fake.calls("POST", "/servers")[0]["ssh_keys"] == [existing["id"]]

    def test_create_key_race_refetches(self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
        # Another job adds the key between our lookup and our POST.
        fake.fail("GET", "/ssh_keys", status=200, body=page("ssh_keys", []), after=True)
        fake.add_ssh_key(key.openssh)
        provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.calls("POST", "/ssh_keys")) == 1
        assert len(fake.ssh_keys) == 1
        assert len(fake.servers) == 1

    @pytest.mark.parametrize(
        ("image", "sent"),
        [
            ("ubuntu-22.04", "ubuntu-22.04"),
            ("debian-12", "debian-12"),
            ("my-snapshot", "my-snapshot"),
            ("123456", 123456),
        ],
    )
    def test_create_resolves_image_alias(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey, image: str, sent: str | int
    ) -> None:
        spec = provider.prepare_spec(make_spec(image=image))
        provider.create_vm(spec, key, job_id=JOB)
        assert fake.calls("POST", "/servers")[0]["image"] == sent

    def test_create_twice_same_job_one_vm(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        first = provider.create_vm(make_spec(), key, job_id=JOB)
        second = provider.create_vm(make_spec(), key, job_id=JOB)
        assert first.instance_id == second.instance_id
        assert len(fake.servers) == 1
        assert len(fake.calls("POST", "/servers")) == 1

    def test_create_name_taken_by_another_job(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        fake.add_server("web-1", labels={"vmqueue-job": "someone-else"})
        with pytest.raises(InvalidSpecError, match="already exists"):
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert fake.calls("POST", "/servers") == []

    def test_create_name_lookup_keeps_to_the_name_asked(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        """A name lookup answering another server (a prefix match, a proxy): not adopted, not an error."""
        other = fake.add_server("web-10", labels={"vmqueue-job": JOB})
        fake.fail("GET", "/servers", status=200, body=page("servers", [other]))
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert vm.instance_id != str(other["id"]) and vm.name == "web-1"
        assert len(fake.calls("POST", "/servers")) == 1

    def test_failover_waits_for_the_previous_placements_server(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        """A late capacity failure deletes the server, and the failover creates the same name elsewhere: while
        the old server is still deleting the name is taken, which is transient (retry), not a foreign server."""
        fake.add_server("web-1", status="deleting", labels={"managed-by": "vmqueue", "vmqueue-job": JOB})
        with pytest.raises(TransientError, match="previous placement is still being deleted"):
            provider.create_vm(make_spec(region="nbg1"), key, job_id=f"{JOB}-p1")
        assert fake.calls("POST", "/servers") == []

    def test_create_lost_answer_one_vm(self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
        # The API creates the server, then the answer never arrives; the job's retry adopts it.
        fake.fail("POST", "/servers", exc=requests.ReadTimeout("read timed out"), after=True)
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, job_id=JOB)
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert list(fake.servers) == [int(vm.instance_id)]
        assert len(fake.calls("POST", "/servers")) == 1

    def test_create_uniqueness_error_adopts(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        # Two deliveries of one job race: both looked the name up before either POST landed.
        theirs = fake.add_server("web-1", labels={"managed-by": "vmqueue", "vmqueue-job": JOB})
        fake.fail("GET", "/servers", status=200, body=page("servers", []))
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert vm.instance_id == str(theirs["id"])
        assert len(fake.servers) == 1
        assert len(fake.calls("POST", "/servers")) == 1

    @pytest.mark.parametrize(("raw", "status"), DOCUMENTED_STATES.items())
    def test_get_maps_every_documented_state(
        self, fake: FakeHetzner, provider: HetznerProvider, raw: str, status: VMStatus
    ) -> None:
        server = fake.add_server("web-1", status=raw)
        vm = provider.get_vm(str(server["id"]))
        assert (vm.status, vm.provider_status) == (status, raw)

    def test_late_capacity_failure_raises_capacity_and_deletes(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        """The POST is accepted, then create_server ends ``error`` (resource_unavailable) and the server stays
        off: the batched read reports it in error, get_vm raises CapacityError once its delete is sent."""
        fake.create_fails_in = {"fsn1": ("resource_unavailable", "server type cx22 is unavailable in fsn1")}
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert vm.status == VMStatus.pending and len(fake.calls("POST", "/servers")) == 1

        batched = provider.get_vms([vm.instance_id])[vm.instance_id]
        assert batched.status == VMStatus.error
        assert (
            batched.provider_status
            == "create_server failed: resource_unavailable: server type cx22 is unavailable in fsn1"
        )
        assert fake.calls("DELETE", f"/servers/{vm.instance_id}") == []
        with pytest.raises(CapacityError) as caught:
            provider.get_vm(vm.instance_id)

        assert caught.value.provider_code == "resource_unavailable"
        assert "unavailable in fsn1" in caught.value.message
        assert fake.servers == {}  # the failover forgets this id: nothing of it may stay
        reads = [q for m, p, q, _ in fake.requests if p == f"/servers/{vm.instance_id}/actions"]
        assert reads and all((q["status"], q["sort"]) == ("error", "id:asc") for q in reads)

    def test_late_other_failure_reads_as_error(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
    ) -> None:
        """A create_server action ending in a non-capacity error: the VM reads in error (the job fails vm_error
        and its cleanup destroys it), through get_vm and get_vms alike; nothing deleted here."""
        fake.create_fails_in = {"fsn1": ("server_error", "internal error while creating the disk")}
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        single = provider.get_vm(vm.instance_id)
        assert single.status == VMStatus.error
        assert single.provider_status == "create_server failed: server_error: internal error while creating the disk"
        assert provider.get_vms([vm.instance_id]) == {vm.instance_id: single}
        assert list(fake.servers) == [int(vm.instance_id)]

    def test_stuck_initializing_reads_the_create_action(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        """Initializing longer than a create takes: one read of the server's error actions, which finds the
        failed create_server; a server that just started initializing costs no such read."""
        young = fake.add_server("web-1", status="initializing", created=now())
        old = fake.add_server("web-2", status="initializing")
        fake.actions[old["id"]] = [finished(action(9001, "create_server", old["id"]), "placement_error", "no host")]

        assert provider.get_vm(str(young["id"])).status == VMStatus.pending
        assert [p for _, p, _, _ in fake.requests] == [f"/servers/{young['id']}"]
        with pytest.raises(CapacityError, match="no host"):
            provider.get_vm(str(old["id"]))
        assert old["id"] not in fake.servers

    def test_off_server_whose_create_succeeded_reads_stopped(
        self, fake: FakeHetzner, provider: HetznerProvider
    ) -> None:
        server = fake.add_server("web-1", status="off")
        fake.actions[server["id"]] = [finished(action(9001, "create_server", server["id"]))]
        vm = provider.get_vm(str(server["id"]))
        assert (vm.status, vm.provider_status) == (VMStatus.stopped, "off")
        assert server["id"] in fake.servers

    def test_get_undocumented_state_is_unknown(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        server = fake.add_server("web-1", status="hibernating")
        assert provider.get_vm(str(server["id"])).status == VMStatus.unknown

    def test_get_public_and_private_ips(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        server = fake.add_server("web-1", private_ipv4="10.0.0.2", labels={"managed-by": "vmqueue"})
        vm = provider.get_vm(str(server["id"]))
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == ("203.0.113.10", "2001:db8:1234::1", "10.0.0.2")
        assert (vm.name, vm.region, vm.instance_type, vm.image) == ("web-1", "fsn1", "cx22", "ubuntu-24.04")
        assert vm.created_at is not None and vm.created_at.year == 2016

    def test_get_without_public_ip(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        server = fake.add_server("web-1", ipv4=None, ipv6=None)
        vm = provider.get_vm(str(server["id"]))
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == (None, None, None)

    @pytest.mark.parametrize("instance_id", ["999999", "not-a-server-id"])
    def test_get_unknown_raises_not_found(self, fake: FakeHetzner, provider: HetznerProvider, instance_id: str) -> None:
        with pytest.raises(NotFoundError):
            provider.get_vm(instance_id)

    def test_destroy(self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
        vm = provider.create_vm(make_spec(), key, job_id=JOB)
        assert provider.destroy_vm(vm.instance_id) is None
        assert fake.servers == {}
        assert len(fake.ssh_keys) == 1  # the shared key stays
        with pytest.raises(NotFoundError):
            provider.get_vm(vm.instance_id)

    def test_destroy_twice(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        server = fake.add_server("web-1")
        provider.destroy_vm(str(server["id"]))
        provider.destroy_vm(str(server["id"]))
        assert len(fake.calls("DELETE", f"/servers/{server['id']}")) == 2

    @pytest.mark.parametrize("instance_id", ["999999", "not-a-server-id"])
    def test_destroy_unknown_id(self, fake: FakeHetzner, provider: HetznerProvider, instance_id: str) -> None:
        assert provider.destroy_vm(instance_id) is None

    @pytest.mark.parametrize(
        ("status", "body", "raised"),
        [
            (401, error("unauthorized", "unable to authenticate"), AuthError),
            (403, error("forbidden", "insufficient permissions for this request"), AuthError),
            (403, error("token_readonly", "the token is read-only"), AuthError),
            (422, error("invalid_input", "invalid input in field 'server_type'", {"fields": []}), InvalidSpecError),
            (400, error("json_error", "invalid JSON"), InvalidSpecError),
            (403, error("resource_limit_exceeded", "server limit exceeded"), QuotaExceededError),
            (412, error("resource_unavailable", "server type cx22 is unavailable in fsn1"), CapacityError),
            (422, error("placement_error", "error during placement"), CapacityError),
            (409, error("conflict", "resource has changed during the request, please retry"), TransientError),
            (423, error("locked", "server is locked by another action"), TransientError),
            (500, error("server_error", "internal error"), TransientError),
            (503, error("unavailable", "service is unavailable"), CapacityError),
            (502, "<html>Bad Gateway</html>", TransientError),
            (418, error("teapot_error", "a brand-new error code"), ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self,
        fake: FakeHetzner,
        provider: HetznerProvider,
        key: SSHPublicKey,
        status: int,
        body: Any,
        raised: type[ProviderError],
    ) -> None:
        fake.fail("POST", "/servers", status=status, body=body)
        with pytest.raises(ProviderError) as info:
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert type(info.value) is raised
        expected_code = body["error"]["code"] if isinstance(body, dict) else str(status)
        assert info.value.provider_code == expected_code
        assert info.value.__cause__ is not None

    @pytest.mark.parametrize("exc", [requests.ConnectionError("connection reset"), requests.ConnectTimeout("slow")])
    def test_network_errors_are_transient(self, fake: FakeHetzner, provider: HetznerProvider, exc: Exception) -> None:
        fake.fail("GET", "/servers/1", exc=exc)
        with pytest.raises(TransientError):
            provider.get_vm("1")

    def test_rate_limited_carries_retry_after(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        reset = int(time.time()) + 30
        headers = {"RateLimit-Limit": "3600", "RateLimit-Remaining": "0", "RateLimit-Reset": str(reset)}
        fake.fail("GET", "/servers/1", status=429, headers=headers, body=error("rate_limit_exceeded", "limit hit"))
        with pytest.raises(RateLimitedError) as info:
            provider.get_vm("1")
        assert info.value.retryable
        assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 30

    @pytest.mark.parametrize(("reset_in_s", "expected"), [(3600, 1.0), (0.4, "reset"), (-5, None)])
    def test_rate_limit_hint_is_one_refill_not_the_full_bucket(
        self, fake: FakeHetzner, provider: HetznerProvider, reset_in_s: float, expected: object
    ) -> None:
        # RateLimit-Reset is when the bucket is full again; it refills one request a second, so an
        # hour away still means "one request in a second" (issue 12, situation 4). A reset in the
        # past is no hint at all: the lifecycle's backoff decides.
        reset = time.time() + reset_in_s
        headers = {"RateLimit-Limit": "3600", "RateLimit-Remaining": "0", "RateLimit-Reset": f"{reset:.3f}"}
        fake.fail("GET", "/servers/1", status=429, headers=headers, body=error("rate_limit_exceeded", "limit hit"))
        with pytest.raises(RateLimitedError) as info:
            provider.get_vm("1")
        if expected == "reset":
            assert 0 < info.value.retry_after_s <= reset_in_s
        else:
            assert info.value.retry_after_s == expected

    def test_missing_credentials_auth_error(self, fake: FakeHetzner, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HCLOUD_TOKEN", raising=False)
        with pytest.raises(AuthError, match="HCLOUD_TOKEN"):
            HetznerProvider().get_vm("1")
        assert fake.requests == []

    def test_rejected_token_names_the_variable(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        fake.fail("GET", "/servers/1", status=401, body=error("unauthorized", "unable to authenticate"))
        with pytest.raises(AuthError, match="HCLOUD_TOKEN"):
            provider.get_vm("1")

    def test_token_and_endpoint_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HCLOUD_TOKEN", FAKE_TOKEN)
        monkeypatch.setenv("HCLOUD_ENDPOINT", "https://hcloud.fake.test/v1")
        fake = FakeHetzner()
        server = fake.add_server("web-1")
        with mocked(fake, "https://hcloud.fake.test/v1") as rsps:
            assert HetznerProvider().get_vm(str(server["id"])).instance_id == str(server["id"])
            assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {FAKE_TOKEN}"

    @pytest.mark.parametrize(
        "fault",
        [
            {"status": 429, "body": error("rate_limit_exceeded", "limit hit")},
            {"status": 409, "body": error("conflict", "resource has changed")},
            {"status": 504, "body": "<html>Gateway Timeout</html>"},
            {"exc": requests.ReadTimeout("read timed out")},
        ],
    )
    def test_sdk_retries_off(
        self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey, fault: dict[str, Any]
    ) -> None:
        # hcloud would retry each of these 5 times, sleeping up to 60 s, re-POSTing the create.
        fake.fail("POST", "/servers", **fault)
        with pytest.raises(ProviderError):
            provider.create_vm(make_spec(), key, job_id=JOB)
        assert len(fake.calls("POST", "/servers")) == 1

    def test_requests_carry_timeouts(self, provider: HetznerProvider) -> None:
        fake = FakeHetzner()
        with mocked(fake, BASE_URL) as rsps:
            provider.list_owned_vms()
            assert rsps.calls[0].request.req_kwargs["timeout"] == (5.0, 30.0)

    def test_get_vms_reads_many_in_few_calls(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        owned = {"managed-by": "vmqueue", "vmqueue-batch": BATCH_T0}  # created by another worker this minute
        running = fake.add_server("web-1", labels=owned, private_ipv4="10.0.0.2")
        booting = fake.add_server("web-2", status="initializing", labels=owned, created=now())
        fake.add_server("their-db")  # not ours: the label filter leaves it out
        ids = [str(running["id"]), str(booting["id"]), "999999"]

        vms = provider.get_vms(ids)

        assert set(vms) == {str(running["id"]), str(booting["id"])}
        assert vms[str(running["id"])].status == VMStatus.running
        assert vms[str(running["id"])].public_ipv4 == "203.0.113.10"
        assert vms[str(booting["id"])].status == VMStatus.pending
        # One list of the recent batches for the servers it never saw; the id no list holds is read once.
        [(method, path, query, _), read] = fake.requests
        assert (method, path, query["sort"]) == ("GET", "/servers", "id:desc")
        assert query["label_selector"].startswith("managed-by=vmqueue,vmqueue-batch in (")
        assert BATCH_T0 in query["label_selector"]
        assert read[:2] == ("GET", "/servers/999999")
        assert provider.get_vms([]) == {} and len(fake.requests) == 2

    def test_get_vms_matches_get_vm(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        server = fake.add_server("web-1", labels={"managed-by": "vmqueue"}, private_ipv4="10.0.0.2")
        batched = provider.get_vms([str(server["id"])])[str(server["id"])]
        single = provider.get_vm(str(server["id"]))
        assert batched == single
        assert (batched.status, batched.public_ipv4, batched.private_ipv4) == (
            VMStatus.running,
            "203.0.113.10",
            "10.0.0.2",
        )

    def test_list_owned_vms(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        ours = fake.add_server("web-1", labels={"managed-by": "vmqueue", "vmqueue-job": JOB})
        fake.add_server("their-db")
        vms = provider.list_owned_vms()
        assert [vm.instance_id for vm in vms] == [str(ours["id"])]
        assert fake.requests[0][2]["label_selector"] == "managed-by=vmqueue"

    def test_list_owned_extras(self, fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
        # Issue 13 (5): nothing this adapter creates beside a VM outlives it (see its docstring).
        provider.create_vm(make_spec(), key, job_id=JOB)
        assert provider.list_owned_extras() == []
        with pytest.raises(InvalidSpecError):
            provider.delete_extra(OwnedResource(provider="hetzner", kind="volume", resource_id="x"))

    def test_lists_follow_every_page(self, fake: FakeHetzner, provider: HetznerProvider) -> None:
        # Issue 13 (6): five servers, two a page: three pages, every one read.
        fake.max_per_page = 2
        ours = {str(fake.add_server(f"web-{n}", labels={"managed-by": "vmqueue"})["id"]) for n in range(5)}
        fake.add_server("their-db")
        assert {vm.instance_id for vm in provider.list_owned_vms()} == ours
        assert [q.get("page", "1") for m, p, q, _ in fake.requests if p == "/servers"] == ["1", "2", "3"]
        assert set(provider.get_vms(sorted(ours))) == ours


def test_fake_fingerprint_matches_ours() -> None:
    key = SSHPublicKey.parse(make_ed25519_key())
    assert md5_fingerprint(key.openssh) == key.md5_fingerprint


@pytest.mark.system
def test_system_create_then_destroy_through_a_worker(
    worker_factory: Any, provisioner: Any, httpserver: HTTPServer, ssh_key: str
) -> None:
    """Producer -> Redis -> a real Hetzner worker subprocess -> hcloud -> a fake API on a local HTTP server."""
    fake = FakeHetzner()
    endpoint = serve(httpserver, fake)
    worker_factory("hetzner", env={"HCLOUD_TOKEN": FAKE_TOKEN, "HCLOUD_ENDPOINT": endpoint, "NO_PROXY": "*"})

    job = provisioner.wait(provisioner.create_vm(make_spec(labels={"team": "infra"}), ssh_key, SCRIPT).id, timeout_s=30)
    assert job.state == JobState.running, job.error
    assert (job.vm.status, job.vm.public_ipv4) == (VMStatus.running, "203.0.113.10")
    [server] = fake.servers.values()
    assert str(server["id"]) == job.instance_id
    assert server["labels"] == {
        "team": "infra",
        "managed-by": "vmqueue",
        "vmqueue-job": job.id,
        "vmqueue-batch": server["labels"]["vmqueue-batch"],
    }
    assert re.fullmatch(r"\d{12}", server["labels"]["vmqueue-batch"])  # the create's UTC minute
    assert [body["user_data"] for body in fake.calls("POST", "/servers")] == [SCRIPT]

    gone = provisioner.wait(provisioner.destroy_vm("hetzner", job.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone, gone.error
    assert fake.servers == {}


@pytest.mark.system
def test_system_late_capacity_failure_fails_over(
    worker_factory: Any, provisioner: Any, httpserver: HTTPServer, ssh_key: str
) -> None:
    """create_server fails after the POST was accepted (resource_unavailable in fsn1): through a real worker the
    job fails over to its fallback location, as a refused POST would, and the failed server is deleted."""
    fake = FakeHetzner()
    fake.create_fails_in = {"fsn1": ("resource_unavailable", "server type cx22 is unavailable in fsn1")}
    endpoint = serve(httpserver, fake)
    worker_factory("hetzner", env={"HCLOUD_TOKEN": FAKE_TOKEN, "HCLOUD_ENDPOINT": endpoint, "NO_PROXY": "*"})

    spec = make_spec(fallbacks=[{"region": "nbg1"}])
    job = provisioner.wait(provisioner.create_vm(spec, ssh_key).id, timeout_s=60)

    assert job.state == JobState.running, job.error
    assert (job.placement, job.vm.region) == (1, "nbg1")
    assert any("no capacity in fsn1" in event.message for event in job.history)
    assert [body["location"] for body in fake.calls("POST", "/servers")] == ["fsn1", "nbg1"]
    [server] = fake.servers.values()
    assert str(server["id"]) == job.instance_id and server["location"]["name"] == "nbg1"


def test_first_attempt_create_costs_one_request(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
) -> None:
    """No lookup by name before a first POST; the project's SSH key is resolved once per process."""
    provider.create_vm(provider.prepare_spec(make_spec(name="web-0")), key, job_id="job-0", first_attempt=True)
    fake.requests.clear()
    vm = provider.create_vm(provider.prepare_spec(make_spec(name="web-1")), key, job_id=JOB, first_attempt=True)
    assert [(m, p) for m, p, _, _ in fake.requests] == [("POST", "/servers")]
    [body] = fake.calls("POST", "/servers")
    assert body["ssh_keys"] == [next(iter(fake.ssh_keys))] and vm.labels["vmqueue-job"] == JOB


def test_first_attempt_on_a_taken_name_still_refuses_a_foreign_server(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
) -> None:
    fake.add_server("web-1", labels={"vmqueue-job": "someone-else"})
    with pytest.raises(InvalidSpecError, match="not this job's"):
        provider.create_vm(provider.prepare_spec(make_spec()), key, job_id=JOB, first_attempt=True)
    assert len(fake.servers) == 1


def test_a_deleted_cached_key_is_looked_up_again(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
) -> None:
    provider.create_vm(provider.prepare_spec(make_spec(name="web-0")), key, job_id="job-0", first_attempt=True)
    fake.ssh_keys.clear()  # someone deleted it in the console
    fake.fail("POST", "/servers", status=422, body=error("invalid_input", "ssh key not found"))
    with pytest.raises(InvalidSpecError):
        provider.create_vm(provider.prepare_spec(make_spec()), key, job_id=JOB, first_attempt=True)
    provider.create_vm(provider.prepare_spec(make_spec()), key, job_id=JOB, first_attempt=True)
    assert len(fake.ssh_keys) == 1


def _stuck_then_fleet_then_new(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey, fleet: int
) -> list[str]:
    """Issue 15's order: one VM still in flight (created two hours ago), then ``fleet`` long-lived vmqueue
    servers (created over the hour after it, half before batch labels existed), then 99 new VMs."""
    provider.clock = lambda: T0 - 7200
    stuck = provider.create_vm(make_spec(name="stuck"), key, job_id="stuck", first_attempt=True).instance_id
    for i in range(fleet):
        labels = {"managed-by": "vmqueue", "vmqueue-job": f"old-{i}"}
        if i % 2:
            labels["vmqueue-batch"] = batch_label(T0 - 7200 + 60 + 60 * (i % 60))
        fake.add_server(f"old-{i}", labels=labels)
    provider.clock = lambda: T0
    new = [
        provider.create_vm(make_spec(name=f"new-{i}"), key, job_id=f"new-{i}", first_attempt=True).instance_id
        for i in range(99)
    ]
    for server in fake.servers.values():  # all still on their way ("initializing" two hours would look failed)
        if server["name"] == "stuck" or server["name"].startswith("new-"):
            server["status"] = "starting"
    fake._booting.clear()
    fake.requests.clear()
    return [stuck, *new]


@pytest.mark.parametrize("fleet", [0, 600])
def test_tick_cost_follows_the_vms_in_flight_not_the_servers_created_since(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey, fleet: int
) -> None:
    """A stuck VM, then long-lived servers, then 99 new VMs: the tick lists the two batches in flight in one
    selector (100 servers, 2 pages), whatever was created in between (newest first down to the stuck VM, it
    was one page per 50 servers created since: 14 here, 102 with 5,000)."""
    in_flight = _stuck_then_fleet_then_new(fake, provider, key, fleet)

    vms = provider.get_vms(in_flight)

    assert set(vms) == set(in_flight)
    assert [(m, p, q["page"]) for m, p, q, _ in fake.requests] == [("GET", "/servers", "1"), ("GET", "/servers", "2")]
    selectors = {q.get("label_selector") for _, _, q, _ in fake.requests}
    assert selectors == {f"managed-by=vmqueue,vmqueue-batch in ({BATCH_T0},{batch_label(T0 - 7200)})"}


def test_tick_of_a_worker_that_created_nothing(fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
    """Another worker (or this one before a restart) created them: its first tick lists the recent batches
    (the 99 new VMs) and reads the stuck one by id, learning its batch; from the next tick, 2 pages."""
    in_flight = _stuck_then_fleet_then_new(fake, provider, key, 600)
    other = HetznerProvider(token=FAKE_TOKEN)
    other.clock = lambda: T0 + 20  # its tick, in the same minute

    assert set(other.get_vms(in_flight)) == set(in_flight)
    assert [p for _, p, _, _ in fake.requests] == ["/servers", "/servers", f"/servers/{in_flight[0]}"]
    fake.requests.clear()
    assert set(other.get_vms(in_flight)) == set(in_flight)
    assert [(p, q["page"]) for _, p, q, _ in fake.requests] == [("/servers", "1"), ("/servers", "2")]


def test_servers_without_a_batch_label_read_by_id(fake: FakeHetzner, provider: HetznerProvider) -> None:
    """Created before batch labels (or by hand with the ownership labels): read by id, and remembered as such;
    one that is gone reads as absent."""
    old = fake.add_server("web-1", labels={"managed-by": "vmqueue", "vmqueue-job": JOB})
    gone = fake.add_server("web-2", labels={"managed-by": "vmqueue", "vmqueue-job": "job-2"})
    del fake.servers[gone["id"]]
    ids = [str(old["id"]), str(gone["id"])]
    assert set(provider.get_vms(ids)) == {str(old["id"])}
    fake.requests.clear()
    assert set(provider.get_vms(ids)) == {str(old["id"])}
    assert sorted(p for _, p, _, _ in fake.requests) == [f"/servers/{old['id']}", f"/servers/{gone['id']}"]


def test_a_lost_create_answer_is_adopted_and_then_listed(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
) -> None:
    fake.fail("POST", "/servers", exc=requests.ReadTimeout("read timed out"), after=True)
    with pytest.raises(TransientError):
        provider.create_vm(make_spec(), key, job_id=JOB, first_attempt=True)
    vm = provider.create_vm(make_spec(), key, job_id=JOB)  # the retry adopts it by name
    fake.requests.clear()
    assert provider.get_vms([vm.instance_id])[vm.instance_id].labels["vmqueue-job"] == JOB
    [(_, path, query, _)] = fake.requests
    assert (path, query["label_selector"]) == ("/servers", f"managed-by=vmqueue,vmqueue-batch in ({BATCH_T0})")


def test_many_batches_take_several_selectors(fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey) -> None:
    """A selector names at most SELECTOR_BATCHES batches (the API documents no length limit): more take more lists."""
    ids = []
    for i in range(SELECTOR_BATCHES + 6):  # a create every five minutes: one batch each
        provider.clock = lambda i=i: T0 - 300 * i
        ids.append(provider.create_vm(make_spec(name=f"web-{i}"), key, job_id=f"job-{i}").instance_id)
    fake._booting.clear()
    fake.requests.clear()
    assert set(provider.get_vms(ids)) == set(ids)
    selectors = dict.fromkeys(q["label_selector"] for _, _, q, _ in fake.requests)
    assert [selector.count(",") for selector in selectors] == [SELECTOR_BATCHES, 6]  # values - 1, + managed-by's


def test_a_batch_mostly_of_other_servers_is_read_by_id(
    fake: FakeHetzner, provider: HetznerProvider, key: SSHPublicKey
) -> None:
    """One VM in flight in a minute that created 200 long-lived servers: one GET, not four pages."""
    vm = provider.create_vm(make_spec(), key, job_id=JOB, first_attempt=True)
    for i in range(200):
        fake.add_server(f"old-{i}", labels={"managed-by": "vmqueue", "vmqueue-batch": BATCH_T0})
    other = f"{JOB}-other"
    second = provider.create_vm(make_spec(name="web-2"), key, job_id=other, first_attempt=True)
    provider.get_vms([vm.instance_id, second.instance_id])  # learns the batch's size: 202 servers
    fake.requests.clear()
    assert set(provider.get_vms([vm.instance_id, second.instance_id])) == {vm.instance_id, second.instance_id}
    assert sorted(p for _, p, _, _ in fake.requests) == sorted(
        f"/servers/{i}" for i in (vm.instance_id, second.instance_id)
    )
