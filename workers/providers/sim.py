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
import time
from datetime import UTC, datetime

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


# Create-or-return-existing by token in one round trip: [1 created / 0 known token / -1 no capacity, id].
# The token is looked up before capacity, as real providers answer a known token with its VM.
# ARGV: "1" if capacity refuses a new VM, "1" if tokens are honoured, the VM key prefix, its fields.
_CREATE = """
if ARGV[2] == '1' then
  local existing = redis.call('get', KEYS[1])
  if existing then return {0, existing} end
end
if ARGV[1] == '1' then return {-1, ''} end
local id = 'sim-' .. redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], id)
redis.call('hset', ARGV[3] .. id, 'instance_id', id, unpack(ARGV, 4))
redis.call('sadd', KEYS[3], id)
return {1, id}
"""


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
        self._create = self._redis.register_script(_CREATE)
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
        config = self._begin("create")
        no_capacity = random.random() < config.capacity_rate or spec.region in config.full_regions.split(",")
        now = _now_ms()
        boot_ms = int((config.boot_s + random.uniform(0, config.boot_jitter_s)) * 1000)
        fate = (
            "stuck" if random.random() < config.stuck_rate else "error" if random.random() < config.error_rate else "ok"
        )
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
        # The ClientToken: the same job id gets the same VM back, decided atomically in Redis.
        created, instance_id = self._create(
            keys=[f"{SIM_PREFIX}token:{job_id}", f"{SIM_PREFIX}next_id", VMS_KEY],
            args=[
                "1" if no_capacity else "0",
                "1" if config.honour_token else "0",
                f"{SIM_PREFIX}vm:",
                *(str(x) for kv in record.items() for x in kv),
            ],
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
            if record and self._invisible(record, config):
                record = None
        if not record or self._gone(record):
            raise NotFoundError(f"instance {instance_id} not found", provider_code="not_found")
        return self._info(record)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """One request per page of the profile's page size, as a filtered list call would; plus the
        profile's reads of the VMs seen settled (``settle_requests``: OCI's per VM, Azure's per VM or its
        group's lists, the simulated cloud's VMs being one group)."""
        found: dict[str, VMInfo] = {}
        size = self.profile.page_size
        for start in range(0, len(instance_ids), size):
            chunk = instance_ids[start : start + size]
            config = self._begin("get_many")
            pipe = self._redis.pipeline(transaction=False)
            for instance_id in chunk:
                pipe.hgetall(_vm_key(instance_id))
            for record in pipe.execute():
                if record and not self._invisible(record, config) and not self._gone(record):
                    found[record["instance_id"]] = self._info(record)
        if settled := sum(vm.status in SETTLED_STATUSES for vm in found.values()):
            group = self._redis.scard(VMS_KEY) if self.profile.settle_lists else 0
            for method, target in self.profile.settle_requests(settled, group):
                self._request(method, target)
        return found

    def destroy_vm(self, instance_id: str) -> None:
        config = self._begin("destroy")
        key = _vm_key(instance_id)
        record = self._redis.hgetall(key)
        if not record or self._invisible(record, config):  # NotFound, which adapters take as "already gone"
            return
        self._redis.hsetnx(key, "delete_at_ms", _now_ms() + int(config.destroy_s * 1000))

    def list_owned_vms(self) -> list[VMInfo]:
        pages = max(1, -(-self._redis.scard(VMS_KEY) // self.profile.page_size))
        self._call("list", pages=pages)
        owned = []
        for instance_id in self._redis.smembers(VMS_KEY):
            record = self._redis.hgetall(_vm_key(instance_id))
            if record and not self._gone(record) and json.loads(record["labels"]).get("managed-by") == "vmqueue":
                owned.append(self._info(record))
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
        # A kind the profile does not list (the image lookup of prepare_spec) sends no metered request.
        requests = self.profile.calls.get(kind, ()) * pages
        for method, target in requests:
            self._request(method, target, counted=False)
        pipe = self._redis.pipeline(transaction=False)
        for method, target in requests:  # counted in the call's own round trip (the hot path of P1)
            pipe.hincrby(REQUESTS_KEY, f"{method} {target}", 1)
        pipe.hgetall(CONFIG_KEY)
        if read is not None:
            pipe.hgetall(read)
        self._count(kind, pipe=pipe)
        replies = pipe.execute()[len(requests) :]
        config = self._parse_config(replies[0])
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
        return config, replies[1] if read is not None else None

    def _request(self, method: str, target: str, counted: bool = True) -> None:
        """One request on the simulated wire: the worker's meter, then the simulated API's own budget.

        ``counted=False``: the caller counts it in ``REQUESTS_KEY`` (in a round trip it makes anyway)."""
        self.meter.before(method, target)
        headers: dict[str, str] = {}
        if self._cloud is not None:
            charged, wait, least = self._cloud.take(self.profile.provider, self.profile, method, target)
            headers = _rate_headers(self._cloud, self.profile, method, target, least)
            if not charged:
                self._redis.hincrby(REQUESTS_KEY, "429", 1)
                self.meter.after(method, target, 429, {**headers, "Retry-After": f"{wait:.3f}"})
                raise RateLimitedError(
                    f"simulated {self.profile.provider} API: {method} {target} over budget",
                    provider_code="rate_limit_exceeded",
                    retry_after_s=wait,
                )
        if counted:
            self._redis.hincrby(REQUESTS_KEY, f"{method} {target}", 1)
        self.meter.after(method, target, 200, headers)

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
    def _invisible(record: dict[str, str], config: SimConfig) -> bool:
        # Only when asked for: the sim runs on each worker's clock, and a VM another worker's clock
        # stamped must not look unborn to this one (bench/chaos.py R13 skews them).
        return config.invisible_s > 0 and _now_ms() < int(record["created_ms"]) + config.invisible_s * 1000

    def _gone(self, record: dict[str, str]) -> bool:
        delete_at = record.get("delete_at_ms")
        if delete_at and _now_ms() >= int(delete_at):
            self._redis.delete(_vm_key(record["instance_id"]))
            self._redis.srem(VMS_KEY, record["instance_id"])
            return True
        return False

    def _info(self, record: dict[str, str]) -> VMInfo:
        raw = self._raw_status(record)
        n = int(record["instance_id"].removeprefix("sim-"))
        booted = raw == "active"
        return VMInfo(
            provider=self.name,
            instance_id=record["instance_id"],
            name=record["name"],
            status=STATUS_MAP.get(raw, VMStatus.unknown),
            provider_status=raw,
            # Loopback addresses of this machine, where the sim host plays the VM's sshd: probes of
            # a sim VM never leave the machine. No IPv6: ::1 is the only loopback address there.
            public_ipv4=sim_address(n, public=True) if booted else None,
            private_ipv4=sim_address(n, public=False),
            region=record["region"],
            instance_type=record["instance_type"],
            image=record["image"],
            labels=json.loads(record["labels"]),
            created_at=datetime.fromtimestamp(int(record["created_ms"]) / 1000, UTC),
            ssh_port=int(record["ssh_port"]) if record.get("ssh_port") else None,  # where the sim host's sshd is
        )

    @staticmethod
    def _raw_status(record: dict[str, str]) -> str:
        if record.get("delete_at_ms"):
            return "deleting"
        if _now_ms() < int(record["boot_at_ms"]) or record["fate"] == "stuck":
            return "booting"
        return "failed" if record["fate"] == "error" else "active"

    def list_owned_extras(self) -> list[OwnedResource]:
        """See the protocol. None can outlive a VM:
        the simulated cloud makes nothing but VMs."""
        return []

    def delete_extra(self, resource: OwnedResource) -> None:
        raise InvalidSpecError(f"sim creates no {resource.kind} beside a VM: nothing to delete")


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
