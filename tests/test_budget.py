"""The API budget (workers/budget.py) on a real Redis: buckets per action class, debt-ordered waits,
windows, header corrections, overrides, the create schedule, and every adapter's meter wiring."""

from __future__ import annotations

import time

import pytest
import redis

from vmqueue import keys
from vmqueue.models import JobState
from vmqueue.settings import SETTLING_TICK_S, Settings
from workers import budget_buckets
from workers.budget import PACING_MARGIN_S, READ_YIELD_GRACE_S, Budget
from workers.budget_profiles import (
    AWS,
    AZURE,
    DIGITALOCEAN,
    GCP,
    HETZNER,
    PROFILES,
    SETTLING_SURPLUS_SPEND_S,
    Bucket,
    parse_bucket,
)
from workers.providers.errors import RateLimitedError


@pytest.fixture
def budget(redis_url: str, redis_client: redis.Redis) -> Budget:
    return Budget(Settings(redis_url=redis_url), redis_client, max_wait_s=2.0)


def settings_with(redis_url: str, **fields: object) -> Settings:
    return Settings(redis_url=redis_url, **fields)


def test_every_profile_names_its_sources_and_classifies_its_calls() -> None:
    for profile in PROFILES.values():
        for name, bucket in profile.buckets.items():
            assert bucket.source, f"{profile.provider}.{name} has no source"
        for requests in profile.calls.values():
            for method, target in requests:
                assert set(profile.classify(method, target)) <= set(profile.buckets)


def test_ec2_meters_each_action_in_its_own_bucket() -> None:
    assert AWS.classify("POST", "ec2:RunInstances") == ("run_instances",)
    assert AWS.classify("POST", "ec2:DescribeInstances") == ("non_mutating",)
    assert AWS.classify("POST", "ec2:TerminateInstances") == ("mutating",)
    assert AZURE.classify("PUT", "/x") == ("writes",) and AZURE.classify("DELETE", "/x") == ("deletes",)
    assert GCP.classify("GET", "/compute/v1/projects/p/aggregated/instances") == ("lists",)
    assert GCP.classify("GET", "/compute/v1/projects/p/zones/z/operations") == ("operation_reads",)
    assert DIGITALOCEAN.classify("GET", "/v2/droplets") == ("minute", "hour")


def test_a_bucket_refuses_past_its_burst_and_other_actions_go_on(budget: Budget) -> None:
    """RunInstances bursts 5, less our cushion (TOKEN_MARGIN_S of refill: half a token): the fifth waits
    for it, the sixth for a refill token; a Describe goes on at once."""
    budget.max_wait_s = 0.0
    for _ in range(4):
        assert budget.take("aws", AWS, "POST", "ec2:RunInstances", "eu-central-1")[0]
    charged, wait, _ = budget.take("aws", AWS, "POST", "ec2:RunInstances", "eu-central-1")
    assert not charged and 0.2 < wait <= 0.25  # 2 tokens a second: half a token
    assert budget.take("aws", AWS, "POST", "ec2:DescribeInstances", "eu-central-1")[0]
    assert budget.take("aws", AWS, "POST", "ec2:RunInstances", "us-east-1")[0]  # per region


def test_waiters_reserve_tokens_in_order_at_the_refill_rate(budget: Budget, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short bucket goes into debt: each waiter reserves the next token, due one refill interval
    after the one before (the clock stands still here, so the reservations are exact). Each also
    waits for the cushion (a quarter second of refill, at most half the rest of the burst)."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    profile = budget.profile("aws", "aws")
    profile = type(profile)(**{**profile.__dict__, "buckets": {**profile.buckets, "run_instances": Bucket(2, 10.0)}})
    tries = [budget.take("aws", profile, "POST", "ec2:RunInstances", "r", max_wait_s=2.0) for _ in range(8)]
    assert all(charged for charged, _, _ in tries)
    # One at once, one when half a token more is back, then one every 0.1 s: never two in one interval.
    assert [wait for _, wait, _ in tries] == pytest.approx([0, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65])


def test_a_wait_past_the_limit_raises_and_charges_nothing(budget: Budget) -> None:
    for _ in range(5):
        budget.acquire("aws", "POST", "ec2:RunInstances", "r")
    budget.max_wait_s = 0.2
    for _ in range(3):
        with pytest.raises(RateLimitedError) as raised:
            budget.acquire("aws", "POST", "ec2:RunInstances", "r")
        assert raised.value.provider_code == "vmq_throttle" and raised.value.retry_after_s > 0.2
    time.sleep(0.5)  # one token back: the refused tries took none
    budget.max_wait_s = 0.0
    assert budget.take("aws", AWS, "POST", "ec2:RunInstances", "r")[0]


def test_windows_count_requests_of_both_windows(redis_url: str, redis_client: redis.Redis) -> None:
    budget = Budget(settings_with(redis_url, budget={"digitalocean.minute": "3/minute"}), redis_client, max_wait_s=0)
    profile = budget.profile("digitalocean")
    for _ in range(3):
        assert budget.take("digitalocean", profile, "GET", "/v2/droplets")[0]
    charged, wait, _ = budget.take("digitalocean", profile, "GET", "/v2/droplets")
    assert not charged and 50 < wait <= 61  # the minute and our margin (WINDOW_MARGIN_S)


def test_overrides_replace_one_bucket_and_bad_ones_name_the_buckets(redis_url: str, redis_client: redis.Redis) -> None:
    budget = Budget(settings_with(redis_url, budget={"aws.run_instances": "50@10/s"}), redis_client)
    profile = budget.profile("aws")
    assert profile.buckets["run_instances"] == Bucket(50, 10.0, source="override")
    assert profile.buckets["non_mutating"] == AWS.buckets["non_mutating"]
    with pytest.raises(ValueError, match="aws.run_instances"):
        Budget(settings_with(redis_url, budget={"aws.runinstances": "5@2/s"}), redis_client).profile("aws")
    with pytest.raises(ValueError, match="<capacity>@<refill>/s"):
        parse_bucket("lots")


@pytest.mark.parametrize("fixed", [False, True], ids=["moving", "fixed"])
def test_a_window_slot_is_reused_only_after_the_provider_freed_it(
    budget: Budget, redis_client: redis.Redis, fixed: bool
) -> None:
    """The provider counts each request a latency after us, and latencies vary: a window slot we free
    must not go to a request that reaches the provider before the one that held it expired there
    (DigitalOcean's 429s at each minute's turn, moving or fixed window alike)."""
    from workers.budget_buckets import BucketStore
    from workers.budget_profiles import Profile

    profile = Profile(
        provider="p",
        buckets={"w": Bucket(window="2/second", fixed=fixed, source="test")},
        classify=lambda method, target: ("w",),
        calls={},
        page_size=1,
    )
    provider = BucketStore(budget.settings, redis_client, prefix="test:cloud:", overrides=False)
    refused = 0
    for slow in (True, False, False, False):  # the first lingers on its way; the rest arrive at once
        budget.acquire("p", "GET", "/x", profile=profile)  # waits while our window is full
        if slow:
            time.sleep(0.5)
        refused += not provider.take("p", profile, "GET", "/x")[0]
    assert refused == 0


def test_a_token_goes_only_when_the_provider_surely_has_it_too(budget: Budget, redis_client: redis.Redis) -> None:
    """The provider's bucket counts each request a latency after ours; when an earlier request took
    longer on its way than the next, its bucket has refilled less than ours (EC2's RunInstances 429s
    when creates went out at exactly the refill rate)."""
    from workers.budget_buckets import BucketStore
    from workers.budget_profiles import Profile

    profile = Profile(
        provider="p",
        buckets={"b": Bucket(2, 2.0, source="test")},
        classify=lambda method, target: ("b",),
        calls={},
        page_size=1,
    )
    provider = BucketStore(budget.settings, redis_client, prefix="test:cloud:", overrides=False)
    refused = 0
    for slow in (True, True, False, False):  # the first two linger on their way; the rest arrive at once
        budget.acquire("p", "GET", "/x", profile=profile)  # waits for its token
        if slow:
            time.sleep(0.2)
        refused += not provider.take("p", profile, "GET", "/x")[0]
    assert refused == 0


def test_vmq_rate_limit_caps_every_request_of_the_provider(redis_url: str, redis_client: redis.Redis) -> None:
    budget = Budget(settings_with(redis_url, rate_limit={"aws": "2/minute"}), redis_client, max_wait_s=0)
    profile = budget.profile("aws")
    assert budget.take("aws", profile, "POST", "ec2:RunInstances")[0]
    assert budget.take("aws", profile, "POST", "ec2:DescribeInstances")[0]
    assert not budget.take("aws", profile, "POST", "ec2:DescribeInstances")[0]


def test_hetzner_headers_pace_before_a_429(budget: Budget) -> None:
    """Another client of the project spent the budget: RateLimit-Remaining says 0, so we wait for the refill."""
    budget.max_wait_s = 0.0
    profile = budget.profile("hetzner")
    assert budget.take("hetzner", profile, "GET", "/servers")[0]
    budget.observe("hetzner", profile, "GET", "/servers", {"RateLimit-Limit": "3600", "RateLimit-Remaining": "0"})
    charged, wait, _ = budget.take("hetzner", profile, "GET", "/servers")
    assert not charged and 0.9 < wait <= 1.25  # one token a second, and the cushion
    # A header never raises our own model: remaining 3600 after we spent one leaves 3599 at most.
    time.sleep(1.0)
    budget.observe("hetzner", profile, "GET", "/servers", {"RateLimit-Remaining": "3600"})
    assert budget.take("hetzner", profile, "GET", "/servers")[2] < 3600


def test_digitalocean_hour_header_blocks_until_its_reset(budget: Budget) -> None:
    budget.max_wait_s = 0.0
    profile = budget.profile("digitalocean")
    reset = time.time() + 30
    headers = {"ratelimit-limit": "5000", "ratelimit-remaining": "0", "ratelimit-reset": str(int(reset))}
    budget.observe("digitalocean", profile, "GET", "/v2/droplets", headers)
    charged, wait, _ = budget.take("digitalocean", profile, "POST", "/v2/droplets")
    assert not charged and 25 < wait <= 32  # until the reset (whole seconds), and our margin


def test_azure_subscription_and_compute_headers(budget: Budget) -> None:
    budget.max_wait_s = 0.0
    profile = budget.profile("azure")
    headers = {
        "x-ms-ratelimit-remaining-subscription-writes": "0",
        "x-ms-ratelimit-remaining-resource": "Microsoft.Compute/LowCostGet3Min;0,Microsoft.Compute/LowCostGet30Min;900",
    }
    found = budget.observe("azure", profile, "GET", "/x", headers)
    compute = {"Microsoft.Compute/LowCostGet3Min", "Microsoft.Compute/LowCostGet30Min"}
    assert {o.bucket for o in found} == {"writes", *compute}
    assert not budget.take("azure", profile, "PUT", "/vm")[0]  # writes: 10 a second back
    charged, wait, _ = budget.take("azure", profile, "GET", "/vm")  # Compute's 3-minute read policy is spent
    assert not charged and 170 < wait <= 181  # its window, and our margin
    assert budget.take("azure", profile, "DELETE", "/vm")[0]


def test_create_schedule_gives_each_job_one_slot_at_the_create_rate(budget: Budget) -> None:
    """EC2 creates: 5 at once, then one every 0.5 s; a job asking again keeps its slot."""
    delays = [budget.create_delay("aws", f"job-{i}") for i in range(8)]
    assert delays[:5] == [0.0] * 5
    assert delays[5:] == pytest.approx([0.5, 1.0, 1.5], abs=0.05)
    assert budget.create_delay("aws", "job-7") == pytest.approx(1.5, abs=0.05)
    # Hetzner's creates share the project bucket with the tick's reads: they leave the reads their share.
    assert HETZNER.create_pace() == (1.0, 3600.0)


def test_create_schedule_fills_each_window_a_burst_at_a_time(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window allows its amount at once: creates go in bursts of it (less the reads' share), one
    window length plus the margin apart, instead of a token-bucket pace that overran the window (and
    bounced DigitalOcean's creates off it as throttled retries). The clock stands still here."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    budget = Budget(settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}), redis_client)
    delays = [budget.create_delay("digitalocean", f"job-{i}") for i in range(50)]
    # 20 a minute, all of it (the reads yield to creates booked later: read_yield_s): 20 now, 20
    # after 61 s, then the rest.
    assert delays[:20] == [0.0] * 20
    assert delays[20:40] == pytest.approx([61.0] * 20, abs=0.1)
    assert delays[40:] == pytest.approx([122.0] * 10, abs=0.1)
    assert budget.create_delay("digitalocean", "job-20") == pytest.approx(61.0, abs=0.1)
    # With the reads' yield turned off, the creates leave them a tenth of each window: 18 now, 18 later.
    redis_client.flushdb()
    keeps = Budget(
        settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}, read_yield_max_s=0), redis_client
    )
    delays = [keeps.create_delay("digitalocean", f"job-{i}") for i in range(40)]
    assert delays[:18] == [0.0] * 18
    assert delays[18:36] == pytest.approx([61.0] * 18, abs=0.1)
    assert delays[36:] == pytest.approx([122.0] * 4, abs=0.1)


def test_reads_yield_to_creates_booked_into_later_windows(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: 1,000 DigitalOcean creates fill four minutes exactly; reads among them pushed creates
    into a fifth (276 s for a 240 s floor). While creates are booked into later windows of a window they
    share with the batched read, the read waits for them, at most ``read_yield_max_s`` at a time; then
    it waits for room in the window rather than being refused. Buckets the read does not share with
    creates (AWS, GCP) or token buckets (Hetzner, where a read costs a create 1 s, not a window) never wait."""
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    settings = settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}, read_yield_max_s=100)
    budget = Budget(settings, redis_client)
    assert budget.read_yield_s("digitalocean") == 0.0  # no create booked
    for i in range(60):
        budget.create_delay("digitalocean", f"job-{i}")  # windows at +0, +61 and +122 s, each filled
    assert budget.read_yield_s("digitalocean") == pytest.approx(100.0)  # until the cap (the last slot: +122 s)
    clock[0] += 99.0
    assert budget.read_yield_s("digitalocean") == pytest.approx(1.0)
    clock[0] += 1.0
    assert budget.read_yield_s("digitalocean") == 0.0  # the cap: one read goes
    # and a new wait starts, to the last slot (and a grace for its countdown to arrive)
    assert budget.read_yield_s("digitalocean") == pytest.approx(22.0 + READ_YIELD_GRACE_S)
    for name in ("aws", "gcp", "hetzner", "azure", "oci"):
        for i in range(50):
            budget.create_delay(name, f"job-{i}")
        assert budget.read_yield_s(name) == 0.0, name

    # The last creates are out and fill the window: the read waits for it instead of a 429.
    redis_client.flushdb()
    clock[0] = 2_000_000.0
    for _ in range(20):
        budget.acquire("digitalocean", "POST", "/v2/droplets")
    assert budget.read_yield_s("digitalocean") == pytest.approx(61.0 + PACING_MARGIN_S, abs=0.01)
    off = settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}, read_yield_max_s=0)
    assert Budget(off, redis_client).read_yield_s("digitalocean") == 0.0


def test_a_refused_create_comes_back_at_the_end_of_the_create_schedule(
    budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create refused by the client's budget (it came late, in a bunch) takes a new slot after the
    creates scheduled meanwhile instead of landing on theirs (a cascade of throttled retries under a
    starved worker). Other requests come back when their bucket has room."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    delays = [budget.create_delay("aws", f"job-{i}") for i in range(20)]  # 5 at once, then 2 a second
    assert delays[-1] == pytest.approx(7.5)
    budget.max_wait_s = 0.0
    for _ in range(4):
        budget.acquire("aws", "POST", "ec2:RunInstances", "r")
    with pytest.raises(RateLimitedError) as refused:
        budget.acquire("aws", "POST", "ec2:RunInstances", "r")
    assert refused.value.retry_after_s == pytest.approx(8.0)
    for _ in range(95):
        budget.acquire("aws", "POST", "ec2:DescribeInstances", "r")
    with pytest.raises(RateLimitedError) as refused:
        budget.acquire("aws", "POST", "ec2:DescribeInstances", "r")
    assert refused.value.retry_after_s < 1.0


def test_metered_registry_sets_each_adapter_meter_once(budget: Budget) -> None:
    from workers.providers.sim import SimProvider

    sim = SimProvider(redis_client=budget.redis)
    get = budget.metered(lambda name: sim)
    meter = get("sim").meter
    assert meter.provider == "sim" and get("sim").meter is meter


def _sim(monkeypatch: pytest.MonkeyPatch, client: redis.Redis, profile: str):
    from workers.providers.sim import SimProvider

    monkeypatch.setenv("VMQ_SIM_PROFILE", profile)
    monkeypatch.setenv("VMQ_SIM_BOOT_S", "0")
    return SimProvider(redis_client=client)


def _create(sim, i: int):
    from vmqueue.models import VMSpec
    from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key

    spec = VMSpec(provider="sim", name=f"vm-{i}", region="sim-1", instance_type="small", image="ubuntu-24.04")
    return sim.create_vm(spec, SSHPublicKey.parse(throwaway_public_key()), job_id=f"job-{i}")


def test_sim_plays_a_profile_requests_per_call_and_pages(monkeypatch: pytest.MonkeyPatch, redis_client) -> None:
    from tests.providers.contract import RecordingMeter

    azure = _sim(monkeypatch, redis_client, "azure")
    azure.meter = meter = RecordingMeter()
    _create(azure, 0)
    assert [m for m, _ in meter.requests()] == ["PUT"]  # the VM, its NIC and public IP declared inside it
    assert "x-ms-ratelimit-remaining-subscription-writes" in meter.answers[-1][3]

    hetzner = _sim(monkeypatch, redis_client, "hetzner")
    hetzner.meter = meter = RecordingMeter()
    ids = [_create(hetzner, i).instance_id for i in range(1, 121)]
    meter.sent.clear()
    hetzner.get_vms(ids)
    assert meter.requests() == [("GET", "/servers")] * 3  # 50 a page
    assert int(meter.answers[-1][3]["RateLimit-Remaining"]) < 3600


def test_sim_meters_azure_settle_reads_as_the_adapter_sends_them(monkeypatch: pytest.MonkeyPatch, redis_client) -> None:
    """Issue 15: one VM seen settled costs its NIC's and public IP's GETs; several in one read cost the
    group's NIC and public IP lists once (a page each for up to 1,000), not 3 GETs each."""
    from bench.budget import floor_s
    from tests.providers.contract import RecordingMeter

    azure = _sim(monkeypatch, redis_client, "azure")  # boot 0: a VM reads running at once
    ids = [_create(azure, i).instance_id for i in range(50)]
    azure.meter = meter = RecordingMeter()
    assert len(azure.get_vms(ids[:1])) == 1
    vm_list = ("GET", "/providers/Microsoft.Compute/virtualMachines")
    assert meter.requests() == [vm_list, ("GET", "/networkInterfaces/{nic}"), ("GET", "/publicIPAddresses/{pip}")]
    meter.sent.clear()
    assert len(azure.get_vms(ids[1:])) == 49
    group = "/resourceGroups/{rg}/providers/Microsoft.Network"
    assert meter.requests() == [vm_list, ("GET", f"{group}/networkInterfaces"), ("GET", f"{group}/publicIPAddresses")]
    assert len(AZURE.settle_requests(50, 2500)) == 6  # three pages of the group, still fewer than 100 GETs
    # The floor: 1,000 creates at 10 writes a second past a burst of 200 (80 s); the reads are the list and
    # the group's two lists (3,001 reads before: 110 s). The bound: the last create's VM boots 30 s later.
    assert floor_s(AZURE, 1000, 30.0) == (80.0, 110.0)


def test_sim_refuses_over_budget_and_a_metered_client_never_meets_a_429(
    monkeypatch: pytest.MonkeyPatch, redis_client, redis_url: str
) -> None:
    from workers.providers.sim import REQUESTS_KEY

    sim = _sim(monkeypatch, redis_client, "aws")  # RunInstances: 5 at once, then 2 a second
    for i in range(5):
        _create(sim, i)
    with pytest.raises(RateLimitedError) as refused:
        _create(sim, 5)
    assert refused.value.retry_after_s and redis_client.hget(REQUESTS_KEY, "429") == "1"

    redis_client.delete(*redis_client.keys("vmq:sim:cloud:*"))
    sim.meter = Budget(Settings(redis_url=redis_url), redis_client).meter("sim", "aws")
    for i in range(10, 18):  # the client's own budget makes the last three wait for their tokens
        _create(sim, i)
    assert redis_client.hget(REQUESTS_KEY, "429") == "1"


def test_tick_interval_keeps_reads_within_the_read_budget(redis_url: str, redis_client: redis.Redis) -> None:
    """A 1 s tick spent 60 of DigitalOcean's 250 requests a minute on reads (the budget bench's 429s)."""
    budget = Budget(Settings(redis_url=redis_url), redis_client)
    # Spent past half its burst, DigitalOcean's 5,000/hour gives reads a tenth: one read of up to 200
    # droplets every 7.2 s, five pages per 36 s.
    hour_half = {("minute", ""): 125.0, ("hour", ""): 2500.0}
    assert DIGITALOCEAN.read_interval_s(100, 0.1, hour_half) == pytest.approx(7.2)
    assert DIGITALOCEAN.read_interval_s(1000, 0.1, hour_half) == pytest.approx(36.0)
    # Full, the part above half is spent at a hundredth a second: the minute binds (0.417 + 1.25 a second).
    assert DIGITALOCEAN.read_interval_s(100, 0.1, {("minute", ""): 250.0, ("hour", ""): 5000.0}) == pytest.approx(0.6)
    # Hetzner's full 3,600: 0.1 + 18 a second, a read of 1,000 servers (20 pages) every 1.1 s.
    assert HETZNER.read_interval_s(1000, 0.1, {("project", ""): 3600.0}) == pytest.approx(20 / 18.1)
    # EC2 meters DescribeInstances on its own (20/s): 2.5 s for five pages on the share alone.
    assert AWS.read_interval_s(1000, 0.1) == pytest.approx(2.5)
    # While VMs settle the part above half goes ten times as fast: Hetzner after 1,000 creates (2,600
    # left, 800 above half) read 1,000 servers every 2.4 s and saw the last booted ones 3 s late.
    after_creates = {("project", ""): 2600.0}
    assert HETZNER.read_interval_s(1000, 0.5, after_creates) == pytest.approx(20 / 8.5)
    assert HETZNER.read_interval_s(1000, 0.5, after_creates, SETTLING_SURPLUS_SPEND_S) == pytest.approx(20 / 80.5)
    # ... and never below half the burst: a bucket at half reads at the share, settling or not.
    at_half = {("project", ""): 1800.0}
    assert HETZNER.read_interval_s(1000, 0.5, at_half, SETTLING_SURPLUS_SPEND_S) == pytest.approx(40.0)

    # The budget reads the levels from Redis: a fresh Hetzner bucket ticks at the 1 s bound ...
    assert budget.tick_interval_s("hetzner", watched=120) == pytest.approx(1.0)
    # ... one spent below half falls back to the share: 50 a page, 3 pages per 30 s. The count is the
    # watch list's when the caller's is smaller (the worker's tick timer asks for one VM).
    budget.max_wait_s = 0.0
    for _ in range(1900):
        budget.take("hetzner", budget.profile("hetzner"), "GET", "/servers")
    redis_client.hset(keys.watch_key("hetzner"), mapping={f"vm-{i}": "job 0" for i in range(120)})
    spent = Budget(Settings(redis_url=redis_url), redis_client)
    # No create waits for a slot: the reads may spend half the refill, 3 pages per 6 s.
    assert spent.tick_interval_s("hetzner") == pytest.approx(6.0, rel=0.01)
    # Creates booked past the bucket's burst wait for their slots: the reads keep to a tenth.
    for i in range(4000):
        if spent.create_delay("hetzner", f"job-{i}") > 0:
            break
    spent = Budget(Settings(redis_url=redis_url), redis_client)
    assert spent.tick_interval_s("hetzner") == pytest.approx(30.0, rel=0.01)
    # The sim playing a profile paces like it (its own buckets, fresh, no create waiting: half the
    # rate); its own generous budget: 1 s.
    assert spent.tick_interval_s("sim", "digitalocean", watched=1000) == pytest.approx(5 / (0.5 * 250 / 60 + 1.25))
    assert spent.tick_interval_s("sim", watched=100) == pytest.approx(1.0)
    # Settling (the last tick saw VMs run), the generous budget lets the tick come every 0.25 s.
    assert spent.tick_interval_s("sim", watched=100, settling=True) == pytest.approx(SETTLING_TICK_S)
    # A larger budget configured for the bucket shortens it; an explicit VMQ_BATCH_POLL_S is taken as is.
    bigger = Budget(settings_with(redis_url, budget={"hetzner.project": "3600@4/s"}), redis_client)
    assert bigger.tick_interval_s("hetzner", watched=120) == pytest.approx(7.5, rel=0.01)
    fixed = Budget(settings_with(redis_url, batch_poll_s=0.5), redis_client)
    assert fixed.tick_interval_s("digitalocean", watched=1000) == 0.5


def test_a_window_backlog_of_creates_is_read_only_once_it_is_out(
    sim_worker_paused, worker_factory, provisioner, redis_client: redis.Redis, ssh_key: str
) -> None:
    """Issue 15, with a real worker and the sim playing DigitalOcean: 30 creates in windows of 10 (the
    worker's override, 10 per 4 s + its 1 s margin) go out in three bursts and no batched read is sent
    before the last of them; without the reads' yield the reads took slots of those windows (and the
    creates left them a tenth), which made a fourth burst."""
    import json

    from bench.harness import sim_spec
    from workers.providers.sim import LOG_KEY

    env = {
        "VMQ_SIM_PROFILE": "digitalocean",
        "VMQ_SIM_BOOT_S": "1",
        "VMQ_BUDGET": json.dumps({"sim.minute": "10/4 seconds"}),
        "VMQ_DEADLINE_S": "120",
    }
    worker_factory("sim", env=env)
    time.sleep(5.0)  # the worker's start-up list leaves the window (10 per 4 s + 1 s): the budget is full
    jobs = provisioner.create_vms({"spec": sim_spec(f"yield-{i}"), "ssh_key": ssh_key} for i in range(30))
    for job in jobs:
        assert provisioner.wait(job.id, timeout_s=120).state == JobState.running
    calls = [json.loads(raw) for raw in redis_client.lrange(LOG_KEY, 0, -1)]
    creates = sorted(c["t"] for c in calls if c["kind"] == "create" and c["outcome"] == "call")
    reads = [c["t"] for c in calls if c["kind"] == "get_many"]
    assert len(creates) == 30 and reads
    assert min(reads) > max(creates)
    bursts = 1 + sum(1 for a, b in zip(creates, creates[1:], strict=False) if b - a > 2.0)
    assert bursts == 3, creates
    # The creates of the last burst waited 10 s for their slot, and say so (at least 5 s: SLOT_NOTE_S).
    said = [
        j for j in jobs if any("waiting for its create slot" in e.message for e in provisioner.get_job(j.id).history)
    ]
    assert 10 <= len(said) <= 20


def test_a_create_slot_is_found_whatever_the_precision_of_the_times_in_its_window(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create schedule's script moved its slot past the entries of a full window, each time reading
    the window back through Lua's 14-digit ``tostring``: an entry written with a Python float's full
    precision (``note_other``) fell just inside the rounded bound again, and the script looped forever
    (Redis answered BUSY to every client). A socket timeout turns that hang into a failure here."""
    clock = [1_796_042_523.378127123]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    budget = Budget(settings_with(redis_url, budget={"digitalocean.minute": "1/minute"}), redis_client)
    budget.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
    budget._window_slot = budget.redis.register_script(budget_buckets._WINDOW_SLOT)
    budget.acquire("digitalocean", "GET", "/v2/droplets")  # a read at the clock's full precision
    assert budget.create_delay("digitalocean", "job-0") == pytest.approx(61.0, abs=0.01)
    clock[0] += 0.000_123_456
    assert budget.create_delay("digitalocean", "job-1") == pytest.approx(122.0, abs=0.01)


def test_reads_do_not_yield_to_creates_that_fit_their_window(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the reads' yield: a create every 2 s (30 a minute of DigitalOcean's 250) never fills a
    window, so a read never pushes one; but each booking moved the last create slot to now, and a read
    within its 3 s grace waited, so the reads went once per ``read_yield_max_s`` (300 s) instead of every
    tick. Likewise creates paced by a token bucket under a window they do not fill (AWS with
    ``VMQ_RATE_LIMIT``). Reads yield only to creates booked into a window they fill."""
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    budget = Budget(settings_with(redis_url), redis_client)
    waits = []
    for i in range(200):
        budget.create_delay("digitalocean", f"job-{i}")
        clock[0] += 1.0
        waits.append(budget.read_yield_s("digitalocean"))
        budget.acquire("digitalocean", "GET", "/v2/droplets")  # the tick's read, when it goes
        clock[0] += 1.0
    # The first booking starts a burst: the read waits out its grace once (3 s, 1 s of it gone), no more.
    assert waits == [pytest.approx(READ_YIELD_GRACE_S - 1.0)] + [0.0] * 199
    # AWS's creates paced at 2 a second by RunInstances' bucket, under a minute of 1,000 they never fill.
    aws = Budget(settings_with(redis_url, rate_limit={"aws": "1000/minute"}), redis_client)
    delays = [aws.create_delay("aws", f"job-{i}") for i in range(50)]
    assert max(delays) > 10.0  # booked into the future, by the token bucket
    clock[0] += READ_YIELD_GRACE_S  # past the grace of the burst's start
    assert aws.read_yield_s("aws") == 0.0


def test_a_read_past_the_yield_cap_waits_for_room_not_for_a_new_cap(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the yield cap: once ``read_yield_max_s`` had passed, a read that found the shared window
    full waited for its reset, but the wait's start was forgotten then, so the next tick began a new
    full wait; in a backlog whose creates fill every window, no read ever went until it was out."""
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    settings = settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}, read_yield_max_s=100)
    budget = Budget(settings, redis_client)
    for i in range(100):
        budget.create_delay("digitalocean", f"job-{i}")  # windows at +0, +61, +122, +183, +244
    assert budget.read_yield_s("digitalocean") == pytest.approx(100.0)
    clock[0] += 61.0
    for _ in range(20):  # the second window's creates go out: the window is full until +122
        budget.acquire("digitalocean", "POST", "/v2/droplets")
    clock[0] += 39.0  # the cap: the read waits for room in the window, not for the last slot
    assert budget.read_yield_s("digitalocean") == pytest.approx(22.0 + PACING_MARGIN_S, abs=0.01)
    clock[0] += 1.0  # the next tick: still that room it waits for
    assert budget.read_yield_s("digitalocean") == pytest.approx(21.0 + PACING_MARGIN_S, abs=0.01)
    clock[0] += 21.0 + PACING_MARGIN_S  # room: the read goes, then a new wait may start
    assert budget.read_yield_s("digitalocean") == 0.0
    assert budget.read_yield_s("digitalocean") == pytest.approx(100.0)


def test_a_request_noted_in_the_create_schedule_keeps_its_later_slots(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of ``note_other``: it set each window's sorted set to expire a window and a minute after
    the request, even when creates were booked further ahead (1,000 DigitalOcean creates reach +183 s);
    with nothing booked for 121 s the set went with its later slots, and the creates booked next took
    the room of those already booked (429s). The set lives as long as its latest slot needs."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    budget = Budget(settings_with(redis_url), redis_client)
    delays = [budget.create_delay("digitalocean", f"job-{i}") for i in range(1000)]
    budget.acquire("digitalocean", "DELETE", "/v2/droplets/{id}")
    for name in ("minute", "hour"):
        key = f"{budget.prefix}digitalocean:wschedule:{name}"
        period = 61 if name == "minute" else 3601
        assert redis_client.ttl(key) >= max(delays) + period, name
    # A set that holds no later slot still expires a window after its last request.
    redis_client.flushdb()
    budget.acquire("digitalocean", "GET", "/v2/droplets")
    assert 0 < redis_client.ttl(f"{budget.prefix}digitalocean:wschedule:minute") <= 61 + 60


def test_a_request_of_a_profile_without_create_windows_costs_no_model_work_after_its_first(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Review of ``note_other`` on the hot path: a profile whose creates meter no window (AWS, Hetzner,
    the sim's own, OCI, Azure) has nothing to note, yet every request classified itself again there,
    where ``take`` reads its plan (made once per request). Classified once, charged many times."""
    from dataclasses import replace

    budget = Budget(settings_with(redis_url), redis_client)
    for name in ("aws", "hetzner", "sim", "oci", "azure"):
        calls: list[tuple[str, str]] = []
        base = budget.profile(name)
        profile = replace(base, classify=lambda m, t, _c=base.classify, _s=calls: _s.append((m, t)) or _c(m, t))
        method, target = profile.calls["get_many"][0]
        budget._create_pace(profile)  # the create schedule's model, made once per profile
        calls.clear()
        for _ in range(5):
            budget.acquire(name, method, target, profile=profile)
        assert calls == [(method, target)], name


def test_with_the_reads_yield_off_the_reads_share_of_a_window_is_not_counted_twice(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of ``note_other``: with ``VMQ_READ_YIELD_MAX_S=0`` the creates leave the reads a tenth of each
    window they share, as before the yield; yet the requests in that tenth were counted in the create
    schedule too, so creates lost their room twice (DigitalOcean's 225 a minute less every read). A
    window that keeps no share (GCP's mutations: creates and deletes) still counts them."""
    monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
    off = Budget(
        settings_with(redis_url, budget={"digitalocean.minute": "20/minute"}, read_yield_max_s=0), redis_client
    )
    for _ in range(2):
        off.acquire("digitalocean", "GET", "/v2/droplets")  # the tick's reads, in their tenth
    delays = [off.create_delay("digitalocean", f"job-{i}") for i in range(20)]
    assert delays.count(0.0) == 18
    gcp = Budget(settings_with(redis_url, budget={"gcp.mutations": "20/minute"}, read_yield_max_s=0), redis_client)
    for _ in range(2):
        gcp.acquire("gcp", "DELETE", "/compute/v1/projects/p/zones/z/instances/{name}")
    delays = [gcp.create_delay("gcp", f"job-{i}") for i in range(20)]
    assert delays.count(0.0) == 18


def test_request_plans_are_kept_for_few_targets(budget: Budget, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real adapter's targets name resources (Hetzner's GET /servers/123): the plans kept per request
    stay bounded, and a request whose plan was dropped is counted as before."""
    from workers import budget_buckets

    monkeypatch.setattr(budget_buckets, "PLAN_CACHE", 8)
    profile = budget.profile("hetzner")
    for i in range(20):
        assert budget.take("hetzner", profile, "GET", f"/servers/{i}")[0]
    assert len(budget._plans) <= 8
    assert budget.levels("hetzner", profile, {("project", ""): 1})[("project", "")] < 3600 - 19


def test_creates_take_whole_only_the_windows_the_reads_yield_in(redis_url: str, redis_client: redis.Redis) -> None:
    """DigitalOcean's minute (61 s with the margin) is shorter than the reads' longest yield: creates take
    all 250 of it. Its hour (3,601 s) is not: a wait for it would outlast the yield, and a destroy behind
    5,000 creates could wait out its deadline, so the creates leave a tenth of it to the others."""
    budget = Budget(settings_with(redis_url), redis_client)
    profile = budget.profile("digitalocean")
    assert budget._create_pace(profile)[1] == {"hour": (4500, 3601), "minute": (250, 61)}
    assert budget.yielding_windows(profile) == ["minute"]
    off = Budget(settings_with(redis_url, read_yield_max_s=0), redis_client)
    assert off._create_pace(off.profile("digitalocean"))[1] == {"hour": (4500, 3601), "minute": (225, 61)}
    assert off.yielding_windows(off.profile("digitalocean")) == []
