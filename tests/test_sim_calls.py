"""The simulated cloud's own cost to the worker it runs in: a create and a page of the batched read are
one Redis round trip each (besides the meter's), and what that saves hides no change of the cloud."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.connection import AbstractConnection

from bench.harness import sim_spec
from bench.probes import Sim
from tests.providers.contract import RecordingMeter
from vmqueue.models import VMInfo, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key
from workers.budget_buckets import BucketStore
from workers.budget_profiles import PROFILES, Profile
from workers.providers.errors import CapacityError, RateLimitedError
from workers.providers.sim import CALLS_KEY, REQUESTS_KEY, SimProvider

KEY = SSHPublicKey.parse(throwaway_public_key())


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Each send to Redis (a command, or a whole pipeline) from this process while the test runs."""
    sent: list[bytes] = []
    send = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: bytes, check_health: bool = True) -> None:
        sent.append(command)
        send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    yield sent


def _create(cloud: SimProvider, i: int, **spec: object) -> VMInfo:
    return cloud.create_vm(VMSpec(**sim_spec(f"vm-{i}", **spec)), KEY, job_id=f"job-{i}")


def test_a_create_and_a_page_of_reads_are_one_round_trip_each(
    redis_client: redis.Redis, round_trips: list[bytes]
) -> None:
    cloud = SimProvider(redis_client)  # the null meter: a worker's meter adds its own round trip
    cloud.get_vms([_create(cloud, 0).instance_id])  # the scripts are loaded on their first use
    round_trips.clear()
    ids = [_create(cloud, i).instance_id for i in range(1, 4)]
    assert len(round_trips) == 3

    round_trips.clear()
    found = cloud.get_vms([*ids, "sim-999"])  # one page of the sim's 1,000
    assert len(round_trips) == 1
    assert sorted(found) == ids and {vm.status for vm in found.values()} == {VMStatus.pending}

    # Counted as before: each call, its requests on the simulated wire, its log entry.
    assert redis_client.hgetall(REQUESTS_KEY) == {"POST create": "4", "GET get_many": "2"}
    assert redis_client.hgetall(CALLS_KEY) == {"create": "4", "get_many": "2"}
    assert [e["kind"] for e in Sim(redis_client).call_log()] == ["create", "get_many", *["create"] * 3, "get_many"]


def test_a_config_change_meets_the_next_create(redis_client: redis.Redis) -> None:
    """A create guesses the config it saw last and checks the guess in its round trip."""
    cloud, sim = SimProvider(redis_client), Sim(redis_client)
    _create(cloud, 0)
    sim.configure(full_regions="sim-1")
    with pytest.raises(CapacityError):
        _create(cloud, 1)
    sim.configure(full_regions="", rate_limit_rate=1.0)
    with pytest.raises(RateLimitedError):
        _create(cloud, 2)
    sim.reset()
    sim.configure(boot_s=0)
    assert _create(cloud, 3).status == VMStatus.running
    assert _create(cloud, 3).instance_id == _create(cloud, 3).instance_id  # the ClientToken
    assert sim.calls() == {"create": 6, "create:capacity": 1, "create:rate_limited": 1}


def test_reads_show_what_changed_since_the_last_read(redis_client: redis.Redis) -> None:
    """The batched read keeps each VM's fixed part parsed; what changes still shows at once."""
    cloud, sim = SimProvider(redis_client), Sim(redis_client)
    sim.configure(boot_s=0)
    vm = _create(cloud, 0)
    first = cloud.get_vms([vm.instance_id])[vm.instance_id]
    assert first.status == VMStatus.running and first.public_ipv4
    first.labels["vmqueue-job"] = "changed by the caller"  # must not reach the next read

    redis_client.hset(f"vmq:sim:vm:{vm.instance_id}", "created_ms", 0)  # aged, as tests/test_sweep.py does
    cloud.destroy_vm(vm.instance_id)
    again = cloud.get_vms([vm.instance_id])[vm.instance_id]
    assert again.status == VMStatus.terminating and again.public_ipv4 is None
    assert again.created_at and again.created_at.year == 1970
    assert again.labels["vmqueue-job"] == "job-0"
    assert again.ssh_port is not None and again.ssh_port == first.ssh_port  # the sim host's sshd

    # A new cloud where the same id is another VM, made by another worker (the session's workers
    # outlive each test's flush).
    redis_client.delete(*redis_client.keys("vmq:sim:*"))
    other = _create(SimProvider(redis_client), 7, region="sim-2")
    assert other.instance_id == vm.instance_id
    read = cloud.get_vms([other.instance_id])[other.instance_id]
    assert (read.name, read.region, read.labels["vmqueue-job"]) == ("vm-7", "sim-2", "job-7")


def _played(monkeypatch: pytest.MonkeyPatch, client: redis.Redis, profile: str) -> SimProvider:
    monkeypatch.setenv("VMQ_SIM_PROFILE", profile)
    cloud = SimProvider(client)
    cloud.meter = RecordingMeter()
    return cloud


def _spent(cloud: SimProvider, creates: int) -> tuple[BucketStore, Profile, tuple[str, str]]:
    """The played budget with ``creates`` creates' requests spent by ``take`` (as the client counts)."""
    store, played = cloud._cloud, cloud.profile
    assert store is not None
    create = played.calls["create"][0]
    for _ in range(creates):
        assert store.take(played.provider, played, *create)[0]
    return store, played, create


@pytest.mark.parametrize("profile", ["gcp", "hetzner", "aws"])
def test_a_played_profile_charges_its_budget_in_the_calls_round_trip(
    monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis, round_trips: list[bytes], profile: str
) -> None:
    """The simulated API's budget of a create's or a page's one request rides in the call's script: a
    fixed window (GCP), a token bucket with headers (Hetzner) or per action (EC2) alike."""
    cloud = _played(monkeypatch, redis_client, profile)
    cloud.get_vms([_create(cloud, 0).instance_id])  # the scripts are loaded on their first use
    round_trips.clear()
    ids = [_create(cloud, i).instance_id for i in range(1, 4)]
    assert len(round_trips) == 3
    round_trips.clear()
    assert sorted(cloud.get_vms(ids)) == sorted(ids)
    assert len(round_trips) == 1
    # Charged as the published buckets count, and answered to the meter with the provider's headers.
    create, read = (PROFILES[profile].calls[kind][0] for kind in ("create", "get_many"))
    assert cloud.meter.requests() == [create, read, create, create, create, read]
    assert [status for *_, status, _ in cloud.meter.answers] == [200] * 6
    store, played = cloud._cloud, cloud.profile
    assert store is not None
    for name, (_, target) in {n: r for r in (create, read) for n in played.classify(*r)}.items():
        bucket = played.buckets[name]
        used = sum(name in played.classify(*r) for r in cloud.meter.requests())
        if bucket.kind == "window":
            assert store.window_stats(profile, played, name, target)[0] == bucket.burst() - used
        else:
            level = store.levels(profile, played, {(name, target if bucket.per_action else ""): 1})
            assert bucket.capacity - used <= next(iter(level.values())) < bucket.capacity - used + 1
    if profile == "hetzner":
        assert int(cloud.meter.answers[-1][3]["RateLimit-Remaining"]) == 3600 - 6


def test_a_request_over_the_played_budget_is_a_429_and_no_call(
    monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> None:
    """GCP's mutations, 1,500 a minute in a fixed window: the 1,501st create is refused with the time
    until the window's reset, counted as a 429, and neither counted as a call nor made."""
    cloud = _played(monkeypatch, redis_client, "gcp")
    store, played, (method, target) = _spent(cloud, 1499)
    _create(cloud, 0)
    calls = dict(redis_client.hgetall(CALLS_KEY))
    with pytest.raises(RateLimitedError) as refused:
        _create(cloud, 1)
    assert 0 < (refused.value.retry_after_s or 0) <= 61  # the fixed window's TTL, in whole seconds
    assert redis_client.hget(REQUESTS_KEY, "429") == "1" and redis_client.hgetall(CALLS_KEY) == calls
    assert redis_client.scard("vmq:sim:vms") == 1
    assert cloud.meter.answers[-1][2] == 429 and float(cloud.meter.answers[-1][3]["Retry-After"]) > 0
    assert not store.take("gcp", played, method, target)[0]  # the same count as the client-side take's


def test_a_request_one_of_two_played_windows_refuses_is_counted_in_neither(
    monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> None:
    """DigitalOcean's moving minute (250) and hour (5,000): tested both before either is hit, as the
    client-side take does."""
    cloud = _played(monkeypatch, redis_client, "digitalocean")
    store, played, (_, target) = _spent(cloud, 249)
    _create(cloud, 0)
    with pytest.raises(RateLimitedError) as refused:
        _create(cloud, 1)
    assert 0 < (refused.value.retry_after_s or 0) <= 60
    assert store.window_stats("digitalocean", played, "minute", target)[0] == 0
    assert store.window_stats("digitalocean", played, "hour", target)[0] == 5000 - 250
    assert cloud.meter.answers[-1][3]["ratelimit-remaining"] == str(5000 - 250)
