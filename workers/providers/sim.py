"""The simulated cloud: a real adapter of the protocol whose "cloud" is state in Redis.

Every worker process sees the same cloud. A VM boots after a settable time, calls take a settable
latency, and faults are injected by rate. Settings come from ``VMQ_SIM_*`` environment variables;
the Redis hash ``vmq:sim:config`` overrides any of them at run time (tests and benchmarks change
faults without restarting workers). Counters of API calls by kind live in ``vmq:sim:calls``.

It meters like a real cloud: each adapter call is the HTTP requests the adapter of
``VMQ_SIM_PROFILE`` would send (a create on the "azure" profile is three writes, a batched read one
request per page of that provider's page size), each request passes the worker's budget meter, and,
with a profile set, the simulated API enforces that provider's published buckets itself: a request
over budget is refused with 429 and Retry-After, and answers carry the provider's rate-limit headers.
Requests on the simulated wire are counted in ``vmq:sim:requests`` ("<method> <target>" -> n, and
"429" -> refused). The profile is read from the environment only (the worker's meter is fixed at start).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmqueue.keys import SIM_PREFIX
from vmqueue.models import VMInfo, VMSpec, VMStatus
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import cloud_configs
from workers.budget_buckets import BucketStore
from workers.budget_profiles import PROFILES, Profile
from workers.providers.base import SETTLED_STATUSES, resolve_alias
from workers.providers.errors import (
    AuthError,
    CapacityError,
    InvalidSpecError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from workers.providers.lookups import Lookups
from workers.providers.metering import Metered
from workers.providers.sim_scripts import CALL_CREATE, CREATE, PAGE

# The sim reports raw states the way a provider would; the table maps them like any adapter's.
STATUS_MAP: dict[str, VMStatus] = {
    "booting": VMStatus.pending,
    "active": VMStatus.running,
    "deleting": VMStatus.terminating,
    "failed": VMStatus.error,
}

CONFIG_KEY = f"{SIM_PREFIX}config"
CALLS_KEY = f"{SIM_PREFIX}calls"  # hash: call kind -> count, and "<kind>:<fault>" -> count
CALLS_PER_S_KEY = f"{SIM_PREFIX}calls_per_s"  # hash: epoch second -> calls in that second
REQUESTS_KEY = f"{SIM_PREFIX}requests"  # hash: "<method> <target>" -> requests on the simulated wire; "429"
LOG_KEY = f"{SIM_PREFIX}log"  # list of recent calls, newest first: {"t", "kind", "outcome"}
VMS_KEY = f"{SIM_PREFIX}vms"  # set of live instance ids
LOG_LENGTH = 20_000
COUNT_KEYS = [REQUESTS_KEY, CALLS_KEY, CALLS_PER_S_KEY, LOG_KEY]  # a call's counters, in the scripts' order
# A VM record's fields a read needs; the first two change after the create (a test ages a VM by
# rewriting created_ms: tests/test_sweep.py), the rest never do.
ROW = (
    "created_ms",
    "delete_at_ms",
    "name",
    "region",
    "instance_type",
    "image",
    "labels",
    "boot_at_ms",
    "fate",
    "ssh_port",
)
FIXED_CACHE = 10_000  # VMs whose fixed part a provider keeps parsed (a tick reads every watched VM)


class SimConfig(BaseSettings):
    """Knobs of the simulated cloud; rates are probabilities per call (0..1)."""

    model_config = SettingsConfigDict(env_prefix="VMQ_SIM_", extra="ignore")

    boot_s: float = 3.0  # time from create until the VM is running
    boot_jitter_s: float = 0.0
    destroy_s: float = 1.0  # time from delete until the VM is gone
    latency_ms: float = 0.0  # added to every API call
    transient_rate: float = 0.0  # 503 on any call
    rate_limit_rate: float = 0.0  # 429 on any call
    retry_after_s: float = 2.0  # the Retry-After of those 429s
    capacity_rate: float = 0.0  # "no capacity" on create
    full_regions: str = ""  # comma-separated regions where every create meets "no capacity"
    lost_response_rate: float = 0.0  # create succeeds but the answer is lost (a timeout)
    stuck_rate: float = 0.0  # VM never leaves pending
    # Eventual consistency (EC2 after RunInstances): for this long after its create a VM is unknown to
    # reads and deletes (a delete of it answers NotFound, which the adapter takes as "already gone").
    invisible_s: float = 0.0
    honour_token: bool = True  # False: a provider without idempotency tokens (each create makes a VM)
    error_rate: float = 0.0  # VM ends in error instead of running
    token: str = ""  # when set, the API rejects callers whose VMQ_SIM_TOKEN differs
    # The VMs' insides, played by the sim host (workers/providers/simhost.py) on loopback addresses:
    ssh_port: int = 2222  # the port each VM's sshd listens on, at its public and private address
    ssh_delay_s: float = 5.0  # sshd answers this long after the VM runs
    cloud_init_s: float = 10.0  # after the VM runs, cloud-init's final stage (a phone_home, if asked) runs
    unreachable_rate: float = 0.0  # the VM runs, but its sshd never answers and cloud-init never finishes
    profile: str = ""  # a provider whose published API budget the simulated cloud plays (budget_profiles.py)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _vm_key(instance_id: str) -> str:
    return f"{SIM_PREFIX}vm:{instance_id}"


class SimProvider(Metered):
    """See the protocol (workers/providers/base.py)."""

    name = "sim"

    def __init__(self, redis_client=None, caller_token: str | None = None):
        from vmqueue.connection import connect

        self._redis = redis_client or connect(get_settings())
        self._env = SimConfig()  # read once: building settings from the environment costs ~1 ms
        self._caller_token = caller_token if caller_token is not None else self._env.token
        self._configs: dict[frozenset, SimConfig] = {}
        self._images = Lookups()  # as the AWS adapter keeps its SSM answers (workers/providers/lookups.py)
        self._create = self._redis.register_script(CREATE)
        self._call_create = self._redis.register_script(CALL_CREATE)
        self._page = self._redis.register_script(PAGE)
        # The last config overrides seen (flat, as HGETALL lists them) and their parse: a create
        # guesses them to be current and sends its whole call in one round trip (see create_vm).
        self._seen: tuple[list[str], SimConfig] = ([], self._env)
        self._fixed: dict[str, _Fixed] = {}  # instance id -> its record's fixed part, parsed
        self._fixed_lock = threading.Lock()
        if self._env.profile and self._env.profile not in PROFILES:
            raise ValueError(f"VMQ_SIM_PROFILE={self._env.profile!r}: use one of {', '.join(PROFILES)}")
        self.budget_profile = self._env.profile or None
        self.profile: Profile = PROFILES[self._env.profile or "sim"]
        # The simulated API's own buckets (the published ones, no client overrides), refusing at once.
        self._cloud = (
            BucketStore(self._settings(redis_client), self._redis, prefix=f"{SIM_PREFIX}cloud:", overrides=False)
            if self._env.profile
            else None
        )

    @staticmethod
    def _settings(client: redis.Redis | None) -> Settings:
        """The settings, pointed at the Redis of a client given in (tests hand the sim their own)."""
        if client is None:
            return get_settings()
        kwargs = client.connection_pool.connection_kwargs
        return Settings(
            redis_url=f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
        )

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        # An API call like AWS's image lookup (an SSM parameter read): metered, and its faults apply;
        # it answers at once (``latency_ms`` slows the VM calls), so a create is "submitting" as soon
        # as a worker takes it. Kept per region and image for an hour, as the AWS adapter keeps it.
        self._images.get((spec.region, spec.image), lambda: self._call("prepare", slow=False))
        return resolve_alias(self.name, spec)

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        config: SimConfig | None = None
        flat, guess = self._seen
        if self._quiet(guess):
            # One round trip: the simulated API's budget, the counters, a check that the config is
            # still the guessed one, the create. Another config: the call is counted and goes on below
            # with that config.
            requests, request, charge_keys, charge_args = self._charge("create")
            record, no_capacity = _record(spec, ssh_key, startup_script, job_id, guess)
            reply = self._call_create(
                keys=[CONFIG_KEY, *COUNT_KEYS, *_create_keys(job_id), *charge_keys],
                args=[
                    *charge_args,
                    *_count_args("create", requests),
                    len(flat),
                    *flat,
                    *_create_args(record, no_capacity, guess),
                ],
            )
            self._answer_charged(request, reply)
            created, _, instance_id = reply
            if created == 2:
                overrides = _pairs(instance_id)
            else:
                config = guess
        else:
            overrides, _ = self._arrive("create", self._send("create"))
        if config is None:
            config = self._admit("create", overrides)
            record, no_capacity = _record(spec, ssh_key, startup_script, job_id, config)
            created, instance_id = self._create(
                keys=_create_keys(job_id), args=_create_args(record, no_capacity, config)
            )
        if created == -1:
            self._count("create", "capacity")
            raise CapacityError(f"no capacity for {spec.instance_type} in {spec.region}", provider_code="capacity")
        if not created:
            return self.get_vm(instance_id, _counted=True)
        record["instance_id"] = instance_id
        if random.random() < config.lost_response_rate:
            self._count("create", "lost_response")
            raise TransientError("read timeout: the create was accepted but its answer was lost")
        return self._info(record)

    def get_vm(self, instance_id: str, _counted: bool = False) -> VMInfo:
        if _counted:
            record = self._redis.hgetall(_vm_key(instance_id))
        else:  # the record rides in the call's own round trip (a get is the hot path of polling)
            config, record = self._call("get", read=_vm_key(instance_id))
            if record and self._invisible(record.get("created_ms"), config):
                record = None
        if not record or self._gone(instance_id, record.get("delete_at_ms")):
            raise NotFoundError(f"instance {instance_id} not found", provider_code="not_found")
        return self._info(record)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """One request per page of the profile's page size, as a filtered list call would; plus the
        profile's reads of the VMs seen settled (``settle_requests``: OCI's per VM, Azure's per VM or its
        group's lists, the simulated cloud's VMs being one group).

        A page is one round trip (sim_scripts.PAGE) that reads only what may have changed of a VM
        whose fixed part this provider has parsed before."""
        found: dict[str, VMInfo] = {}
        size = self.profile.page_size
        for start in range(0, len(instance_ids), size):
            chunk = instance_ids[start : start + size]
            requests, request, charge_keys, charge_args = self._charge("get_many")
            known = [self._fixed.get(instance_id) for instance_id in chunk]
            reply = self._page(
                keys=[CONFIG_KEY, *COUNT_KEYS, *charge_keys],
                args=[
                    *charge_args,
                    *_count_args("get_many", requests),
                    _vm_key(""),
                    "".join("0" if fixed else "1" for fixed in known),
                    len(ROW),
                    *ROW,
                    *chunk,
                ],
            )
            self._answer_charged(request, reply)
            _, _, config_flat, *rows = reply
            config = self._admit("get_many", _pairs(config_flat))
            now_ms = _now_ms()
            for instance_id, fixed, row in zip(chunk, known, rows, strict=True):
                created_ms, delete_at_ms = row[0], row[1]
                if created_ms is None:  # no such VM (or a record that lost it: nothing to tell)
                    continue
                if fixed is None or fixed.created_ms != created_ms:
                    if fixed is not None:  # rewritten since it was parsed: read it whole
                        row = self._redis.hmget(_vm_key(instance_id), ROW)
                    fixed = self._fix({"instance_id": instance_id, **dict(zip(ROW, row, strict=True))})
                if not self._invisible(created_ms, config) and not self._gone(instance_id, delete_at_ms):
                    found[instance_id] = self._vm_info(fixed, delete_at_ms, now_ms)
        if settled := sum(vm.status in SETTLED_STATUSES for vm in found.values()):
            group = self._redis.scard(VMS_KEY) if self.profile.settle_lists else 0
            for method, target in self.profile.settle_requests(settled, group):
                self._request(method, target)
        return found

    def destroy_vm(self, instance_id: str) -> None:
        config = self._begin("destroy")
        key = _vm_key(instance_id)
        record = self._redis.hgetall(key)
        if not record or self._invisible(record.get("created_ms"), config):  # NotFound: "already gone"
            return
        self._redis.hsetnx(key, "delete_at_ms", _now_ms() + int(config.destroy_s * 1000))

    def list_owned_vms(self) -> list[VMInfo]:
        pages = max(1, -(-self._redis.scard(VMS_KEY) // self.profile.page_size))
        self._call("list", pages=pages)
        owned = []
        for instance_id in self._redis.smembers(VMS_KEY):
            record = self._redis.hgetall(_vm_key(instance_id))
            if record and not self._gone(instance_id, record.get("delete_at_ms")):
                info = self._info(record)
                if info.labels.get("managed-by") == "vmqueue":
                    owned.append(info)
        return owned

    # -- the simulated API's machinery ------------------------------------------------------
    def config(self) -> SimConfig:
        return self._parse_config(self._redis.hgetall(CONFIG_KEY))

    def _parse_config(self, overrides: dict[str, str]) -> SimConfig:
        """The environment's settings with the Redis overrides on top (parsed once per distinct set)."""
        if not overrides:
            return self._env
        cache_key = frozenset(overrides.items())
        if cache_key not in self._configs:
            try:
                self._configs[cache_key] = SimConfig.model_validate({**self._env.model_dump(), **overrides})
            except ValidationError as exc:
                raise ProviderError(f"bad {CONFIG_KEY}: {exc}", provider_code="sim_config") from exc
        return self._configs[cache_key]

    def _begin(self, kind: str) -> SimConfig:
        return self._call(kind)[0]

    def _call(
        self, kind: str, read: str | None = None, pages: int = 1, slow: bool = True
    ) -> tuple[SimConfig, dict[str, str] | None]:
        """One API call: its requests through the meter and the simulated API's budget, then the
        config, the counters and the hash ``read`` (if any; as it was when the call arrived) in one
        round trip, then the latency and the faults."""
        overrides, record = self._arrive(kind, self._send(kind, pages), read)
        return self._admit(kind, overrides, slow), record

    def _send(self, kind: str, pages: int = 1) -> tuple[tuple[str, str], ...]:
        """The call's requests through the meter and the simulated API's budget; the caller counts
        them in ``REQUESTS_KEY`` in its own round trip (the hot path of P1). A kind the profile does
        not list (the image lookup of prepare_spec) sends no metered request."""
        requests = self.profile.calls.get(kind, ()) * pages
        for method, target in requests:
            self._request(method, target, counted=False)
        return requests

    def _arrive(
        self, kind: str, requests: tuple[tuple[str, str], ...], read: str | None = None
    ) -> tuple[dict[str, str], dict[str, str] | None]:
        """The call's counters, the config overrides and the hash ``read`` (if any) in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for method, target in requests:
            pipe.hincrby(REQUESTS_KEY, f"{method} {target}", 1)
        pipe.hgetall(CONFIG_KEY)
        if read is not None:
            pipe.hgetall(read)
        self._count(kind, pipe=pipe)
        replies = pipe.execute()[len(requests) :]
        return replies[0], replies[1] if read is not None else None

    def _admit(self, kind: str, overrides: dict[str, str], slow: bool = True) -> SimConfig:
        """The config of a counted call, then its latency and faults (``slow=False``: no latency).

        Raises ``AuthError``, ``RateLimitedError`` or ``TransientError`` as the config says."""
        config = self._parse_config(overrides)
        self._seen = ([x for kv in overrides.items() for x in kv], config)
        if config.latency_ms and slow:
            time.sleep(config.latency_ms / 1000)
        if config.token and self._caller_token != config.token:
            self._count(kind, "auth")
            raise AuthError("the simulated cloud rejected the token: set VMQ_SIM_TOKEN", provider_code="unauthorized")
        if random.random() < config.rate_limit_rate:
            self._count(kind, "rate_limited")
            raise RateLimitedError(
                "too many requests", provider_code="rate_limit_exceeded", retry_after_s=config.retry_after_s
            )
        if random.random() < config.transient_rate:
            self._count(kind, "transient")
            raise TransientError("503 service unavailable", provider_code="unavailable")
        return config

    def _quiet(self, config: SimConfig) -> bool:
        """Whether a call under ``config`` surely passes ``_admit`` at once (no latency, token or fault
        to play), so that its create may go in the round trip that reads the config (create_vm)."""
        return (
            not config.latency_ms
            and (not config.token or self._caller_token == config.token)
            and config.rate_limit_rate <= 0
            and config.transient_rate <= 0
        )

    def _request(self, method: str, target: str, counted: bool = True) -> None:
        """One request on the simulated wire: the worker's meter, then the simulated API's own budget.

        ``counted=False``: the caller counts it in ``REQUESTS_KEY`` (in a round trip it makes anyway)."""
        self.meter.before(method, target)
        taken = None
        if self._cloud is not None:
            taken = self._cloud.take(self.profile.provider, self.profile, method, target)
            if not taken[0]:
                self._redis.hincrby(REQUESTS_KEY, "429", 1)
        if counted and (taken is None or taken[0]):
            self._redis.hincrby(REQUESTS_KEY, f"{method} {target}", 1)
        self._answer(method, target, taken)

    def _answer(self, method: str, target: str, taken: tuple[bool, float, float] | None) -> None:
        """The simulated API's answer to a request it charged (``taken``: ``BucketStore.take``'s; None:
        no budget of its own) to the worker's meter, with the profile's headers; a refusal raised as
        the 429 it is (already counted)."""
        headers: dict[str, str] = {}
        if taken is not None:
            charged, wait, least = taken
            headers = _rate_headers(self._cloud, self.profile, method, target, least)
            if not charged:
                self.meter.after(method, target, 429, {**headers, "Retry-After": f"{wait:.3f}"})
                raise RateLimitedError(
                    f"simulated {self.profile.provider} API: {method} {target} over budget",
                    provider_code="rate_limit_exceeded",
                    retry_after_s=wait,
                )
        self.meter.after(method, target, 200, headers)

    def _charge(self, kind: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, str] | None, list[str], list[object]]:
        """A call of ``kind`` whose script charges the simulated API's budget in its own round trip:
        (its requests, the one request charged there or None, the charge's KEYS and ARGV). A call of
        one request passes the worker's meter here and its answer goes to ``_answer_charged``; any
        other sends its requests one by one first (``_send``) and charges nothing in the script."""
        requests = self.profile.calls.get(kind, ())
        if len(requests) != 1:
            return self._send(kind), None, [], [repr(time.time()), 0, 0, 0]
        method, target = requests[0]
        self.meter.before(method, target)
        if self._cloud is None:
            return requests, requests[0], [], [repr(time.time()), 0, 0, 0]
        charge_keys, charge_args = self._cloud.charge_args(self.profile.provider, self.profile, method, target)
        return requests, requests[0], charge_keys, charge_args

    def _answer_charged(self, request: tuple[str, str] | None, reply: list[Any]) -> None:
        """``_answer`` for the request ``_charge`` let a script charge: the script's reply is a refusal
        (sim_scripts REFUSE: [-2, wait, window flags]) or has the tokens left second."""
        if request is None:
            return
        taken = None
        if self._cloud is not None:
            answer = [0, reply[1], "0", reply[2]] if reply[0] == -2 else [1, "0", reply[1], ""]
            taken = self._cloud.charged(self.profile.provider, self.profile, *request, answer)
        self._answer(*request, taken)

    def _count(self, kind: str, outcome: str = "", pipe: redis.client.Pipeline | None = None) -> None:
        now = time.time()
        run, pipe = pipe is None, pipe or self._redis.pipeline(transaction=False)
        pipe.hincrby(CALLS_KEY, f"{kind}:{outcome}" if outcome else kind, 1)
        if not outcome:
            pipe.hincrby(CALLS_PER_S_KEY, str(int(now)), 1)
        pipe.lpush(LOG_KEY, json.dumps({"t": now, "kind": kind, "outcome": outcome or "call"}))
        pipe.ltrim(LOG_KEY, 0, LOG_LENGTH - 1)
        if run:
            pipe.execute()

    @staticmethod
    def _invisible(created_ms: str | None, config: SimConfig) -> bool:
        # Only when asked for: the sim runs on each worker's clock, and a VM another worker's clock
        # stamped must not look unborn to this one (bench/chaos.py R13 skews them).
        return config.invisible_s > 0 and _now_ms() < int(created_ms or 0) + config.invisible_s * 1000

    def _gone(self, instance_id: str, delete_at_ms: str | None) -> bool:
        if delete_at_ms and _now_ms() >= int(delete_at_ms):
            self._redis.delete(_vm_key(instance_id))
            self._redis.srem(VMS_KEY, instance_id)
            return True
        return False

    def _info(self, record: dict[str, Any]) -> VMInfo:
        """The VMInfo of a whole record (as Redis holds it, or as create_vm wrote it)."""
        fixed = self._fixed.get(record["instance_id"])
        if fixed is None or fixed.created_ms != str(record["created_ms"]):
            fixed = self._fix(record)
        delete_at_ms = record.get("delete_at_ms")
        return self._vm_info(fixed, str(delete_at_ms) if delete_at_ms else None, _now_ms())

    def _fix(self, record: dict[str, Any]) -> _Fixed:
        """Parse a record's fixed part and keep it (the oldest kept is dropped past FIXED_CACHE)."""
        fixed = _Fixed.of(record)
        with self._fixed_lock:
            self._fixed[fixed.info["instance_id"]] = fixed
            if len(self._fixed) > FIXED_CACHE:
                del self._fixed[next(iter(self._fixed))]
        return fixed

    def _vm_info(self, fixed: _Fixed, delete_at_ms: str | None, now_ms: int) -> VMInfo:
        if delete_at_ms:
            raw = "deleting"
        elif now_ms < fixed.boot_at_ms or fixed.fate == "stuck":
            raw = "booting"
        else:
            raw = "failed" if fixed.fate == "error" else "active"
        return VMInfo(
            **fixed.info,
            status=STATUS_MAP.get(raw, VMStatus.unknown),
            provider_status=raw,
            public_ipv4=fixed.public_ipv4 if raw == "active" else None,
        )

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive a VM:
        the simulated cloud makes nothing but VMs."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"sim creates no {resource.kind} beside a VM: nothing to delete")


@dataclass(frozen=True, slots=True)
class _Fixed:
    """What a VM's record never changes after its create, parsed once: every tick reads every VM it
    watches, and parsing the labels, the time and the addresses again was most of the sim's cost."""

    created_ms: str  # the record's, to tell a cached part from a rewritten record (tests age VMs)
    boot_at_ms: int
    fate: str
    public_ipv4: str  # shown once the VM runs
    info: dict[str, Any]  # VMInfo's fields but the status, the raw status and the public address

    @classmethod
    def of(cls, record: dict[str, Any]) -> _Fixed:
        instance_id = record["instance_id"]
        n = int(instance_id.removeprefix("sim-"))
        return cls(
            created_ms=str(record["created_ms"]),
            boot_at_ms=int(record["boot_at_ms"]),
            fate=record["fate"],
            # Loopback addresses of this machine, where the sim host plays the VM's sshd: probes of
            # a sim VM never leave the machine. No IPv6: ::1 is the only loopback address there.
            public_ipv4=sim_address(n, public=True),
            info={
                "provider": SimProvider.name,
                "instance_id": instance_id,
                "name": record["name"],
                "private_ipv4": sim_address(n, public=False),
                "region": record["region"],
                "instance_type": record["instance_type"],
                "image": record["image"],
                "labels": json.loads(record["labels"]),  # VMInfo copies it: the cached one stays as read
                "created_at": datetime.fromtimestamp(int(record["created_ms"]) / 1000, UTC),
                "ssh_port": int(record["ssh_port"]) if record.get("ssh_port") else None,  # the sim host's sshd
            },
        )


def _record(
    spec: VMSpec, ssh_key: SSHPublicKey, startup_script: str | None, job_id: str, config: SimConfig
) -> tuple[dict[str, Any], bool]:
    """The record a create under ``config`` writes (its fate drawn now), and whether capacity refuses it."""
    no_capacity = random.random() < config.capacity_rate or spec.region in config.full_regions.split(",")
    now = _now_ms()
    boot_ms = int((config.boot_s + random.uniform(0, config.boot_jitter_s)) * 1000)
    fate = "stuck" if random.random() < config.stuck_rate else "error" if random.random() < config.error_rate else "ok"
    if fate == "ok" and random.random() < config.unreachable_rate:
        fate = "unreachable"  # runs as far as the API can tell; nothing answers inside
    record = {
        "name": spec.name,
        "region": spec.region,
        "instance_type": spec.instance_type,
        "image": spec.image,
        "labels": json.dumps(spec.ownership_labels(job_id)),
        "ssh_key": ssh_key.sha256_fingerprint,
        "user_data_bytes": len(startup_script.encode()) if startup_script else 0,
        "created_ms": now,
        "boot_at_ms": now + boot_ms,
        "fate": fate,
        # What the sim host does inside the VM: sshd from ssh_up_at_ms, cloud-init's phone_home.
        "ssh_port": config.ssh_port,
        "ssh_up_at_ms": now + boot_ms + int(config.ssh_delay_s * 1000),
        "cloud_init_done_at_ms": now + boot_ms + int(config.cloud_init_s * 1000),
        "phone_home": json.dumps(_phone_home(startup_script)),
    }
    return record, no_capacity


def _create_keys(job_id: str) -> list[str]:
    """The create's KEYS (sim_scripts): the ClientToken's key, the id counter, the live set."""
    return [f"{SIM_PREFIX}token:{job_id}", f"{SIM_PREFIX}next_id", VMS_KEY]


def _create_args(record: dict[str, Any], no_capacity: bool, config: SimConfig) -> list[str]:
    """The create's ARGV (sim_scripts): the ClientToken is honoured unless the config says not."""
    flags = ["1" if no_capacity else "0", "1" if config.honour_token else "0", f"{SIM_PREFIX}vm:"]
    return [*flags, *(str(x) for kv in record.items() for x in kv)]


def _count_args(kind: str, requests: tuple[tuple[str, str], ...]) -> list[str | int]:
    """The counters' ARGV (sim_scripts): as ``SimProvider._count`` counts a call, and its requests."""
    now = time.time()
    entry = json.dumps({"t": now, "kind": kind, "outcome": "call"})
    return [
        kind,
        str(int(now)),
        entry,
        LOG_LENGTH,
        len(requests),
        *(f"{method} {target}" for method, target in requests),
    ]


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash from the flat field, value list a script's HGETALL returns."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def sim_address(n: int, public: bool) -> str:
    """The loopback address of sim VM number ``n``: 127.88.x.y public, 127.89.x.y private."""
    return f"127.{88 if public else 89}.{n // 250 % 256}.{n % 250 + 1}"


def _phone_home(user_data: str | None) -> dict | None:
    """The phone_home cloud-init would run for this user-data (its cloud-config, merged), or None."""
    try:
        configs = cloud_configs(user_data)
    except (ValueError, yaml.YAMLError):
        return None  # cloud-init would skip a broken document too
    return next((doc["phone_home"] for doc in configs if isinstance(doc.get("phone_home"), dict)), None)


def _rate_headers(cloud: BucketStore, profile: Profile, method: str, target: str, least: float) -> dict[str, str]:
    """The rate-limit headers the profile's provider sends with an answer (what is left after it)."""
    left = str(max(0, int(least)))
    if profile.provider == "hetzner":
        bucket = profile.buckets["project"]
        full_at = time.time() + (bucket.capacity - max(least, 0)) / bucket.refill_per_s
        return {
            "RateLimit-Limit": str(int(bucket.capacity)),
            "RateLimit-Remaining": left,
            "RateLimit-Reset": str(int(full_at)),
        }
    if profile.provider == "digitalocean":
        remaining, reset_at = cloud.window_stats(profile.provider, profile, "hour", target)
        return {"ratelimit-limit": "5000", "ratelimit-remaining": str(remaining), "ratelimit-reset": str(int(reset_at))}
    if profile.provider == "azure":
        return {f"x-ms-ratelimit-remaining-subscription-{profile.classify(method, target)[0]}": left}
    return {}
