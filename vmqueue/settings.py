"""Configuration from environment variables (documented in the README)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMQ_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "VMQ_REDIS_URL"),
        description=(
            "broker, job store and rate-limit buckets; redis:// or rediss:// (password allowed), or "
            "sentinel://host1:26379;sentinel://host2:26379 for a Sentinel-managed Redis"
        ),
    )
    redis_master_name: str = Field("vmqueue", description="with a sentinel:// REDIS_URL: the master's name")
    redis_sentinel_password: str | None = Field(None, description="with Sentinel: the sentinels' own password")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="a new job's record is acknowledged by this many replicas (WAIT) before the enqueue returns",
    )
    redis_wait_timeout_ms: int = Field(500, ge=1, description="the longest WAIT for those replicas")
    redis_ssl_cert_reqs: str = Field(
        "required", description="for rediss:// URLs: required (default), optional or none (opt-out)"
    )
    # Redis re-delivers any message held longer than this, countdown polls included (kombu#337):
    # every countdown stays far below it.
    visibility_timeout_s: int = 1800
    unacked_restore_interval_s: float = 10.0
    job_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    events_maxlen: int = Field(100_000, ge=100, description="events the all-jobs stream keeps (about)")
    job_events_maxlen: int = Field(100, ge=10, description="events each job's own stream keeps")

    deadline_s: float = Field(
        600.0, description="default per-job deadline: seconds from enqueue until running (create) or gone (destroy)"
    )
    cleanup_deadline_s: float = Field(
        600.0, description="how long the cleanup of a failed create may take, from the failure until the VM is gone"
    )
    destroy_on_failure: bool = True
    poll_initial_s: float = 2.0
    poll_max_s: float = 15.0
    poll_factor: float = 1.5
    batch_poll_s: float | None = Field(
        None,
        description="one batched status read per provider this often; default: from the provider's API limit",
    )
    max_attempts: int = Field(
        6, description="task-level attempts per phase (submit, poll, cleanup, destroy, get) before the phase fails"
    )
    retry_base_s: float = 2.0
    retry_max_s: float = 60.0
    call_attempts: int = Field(3, description="quick in-call attempts (tenacity) of a transient error")
    call_wait_max_s: float = Field(5.0, description="longest in-call wait; longer Retry-After goes to the task")
    step_lease_s: float = Field(120.0, description="how long one task step holds a job's lock")
    step_slots: int = Field(
        4,
        ge=0,
        description="pool threads of a worker process that run vmqueue's own step code at once (0: all); "
        "threads waiting on a provider do not count (workers/gate.py)",
    )
    not_found_grace_s: float = Field(30.0, description="NotFound this soon after create reads as pending")
    read_yield_max_s: float = Field(
        300.0,
        ge=0,
        description="longest the batched status reads of a provider wait while its creates are booked into later "
        "windows of a window budget they share (DigitalOcean's minute); 0: reads keep a tenth of each window",
    )
    rate_limit: dict[str, str] = Field(
        default_factory=dict, description='per-provider API limits, e.g. {"aws": "10/second"}'
    )
    budget: dict[str, str] = Field(
        default_factory=dict,
        description='API budget overrides per bucket, e.g. {"aws.run_instances": "10@4/s", "digitalocean.minute": '
        '"200/minute"} (workers/budget_profiles.py names the buckets)',
    )
    worker_concurrency: int = 64
    # Webhooks (vmqueue/webhooks.py, workers/webhooks.py): signed per Standard Webhooks.
    webhook_secret: SecretStr | None = Field(
        None, description="whsec_<base64>: the key webhooks are signed with (workers); unset: none is sent"
    )
    webhook_allow_http: bool = Field(False, description="accept http:// callback URLs (default: https only)")
    webhook_allow_private: bool = Field(
        False, description="deliver to loopback, private, link-local and other non-global addresses"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="connect and each read of one delivery")
    webhook_max_attempts: int = Field(8, ge=1, le=50, description="deliveries of one webhook before giving up")
    webhook_retry_base_s: float = Field(5.0, gt=0, description="first backoff; doubles per attempt, full jitter")
    webhook_retry_max_s: float = Field(600.0, gt=0, description="longest wait between two attempts")
    # Readiness (vmqueue/readiness.py): ready_when=ssh probes, ready_when=cloud_init phone-homes.
    ready_base_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="the HTTP API's URL as VMs reach it (phone_home); unset: ready_when=cloud_init is refused",
    )
    ready_deadline_s: float = Field(600.0, gt=0, description="default seconds from running to ready, else fail")
    ready_probe_initial_s: float = Field(0.5, gt=0, description="first wait between SSH probes of one VM")
    # A refused or unanswered probe costs the scanner next to nothing, and each second of wait here
    # is a second a caller waits past sshd's start: short.
    ready_probe_max_s: float = Field(2.0, gt=0, description="longest wait between SSH probes of one VM")
    ready_probe_timeout_s: float = Field(5.0, gt=0, description="one SSH probe: connect and key exchange")
    ready_concurrency: int = Field(256, ge=1, description="SSH probes in flight at once per worker process")
    ready_host_key_algs: list[str] = Field(
        default_factory=lambda: ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512"],
        description="host key types the scanner accepts, in OpenSSH's order of preference",
    )
    ready_all_host_keys: bool = Field(
        False,
        description="read every type in ready_host_key_algs (one more key exchange each), not only the "
        "one the server prefers (enough for known_hosts: OpenSSH then asks for that type)",
    )
    eta_task_limit: int = 20_000


def max_countdown_s(settings: Settings) -> float:
    """The longest countdown any step's message may carry: far below the visibility timeout, or Redis
    would deliver the message again while a worker still holds it (kombu#337)."""
    return settings.visibility_timeout_s / 4


# Sustained request rate per provider the tick interval is derived from (the per-bucket budgets are in
# workers/budget_profiles.py); VMQ_RATE_LIMIT overrides any of them and caps all of a provider's requests.
DEFAULT_RATE_LIMITS: dict[str, str] = {
    "sim": "500/second",
    "hetzner": "3600/hour",
    "digitalocean": "250/minute",
    "aws": "20/second",
    "gcp": "1500/minute",
    "oci": "10/second",
    "azure": "10/second",
}


def rate_limit_for(settings: Settings, provider: str) -> str:
    return settings.rate_limit.get(provider) or DEFAULT_RATE_LIMITS[provider]


# Batched status reads may spend this share of a provider's API limit; within these bounds.
TICK_SHARE_OF_LIMIT = 0.1
TICK_BOUNDS_S = (1.0, 30.0)
# While VMs settle (the last tick saw some run or fail) the tick may come this soon, as far as the
# read budget allows: the VMs of a fleet boot within seconds of each other, and a 1 s tick left the
# last of 1,000 seen up to 1.6 s after it booted (bench/inflight.py).
SETTLING_TICK_S = 0.25


def tick_interval_s(settings: Settings, provider: str) -> float:
    """How often a provider's tick chain reads its VMs: VMQ_BATCH_POLL_S, else a tenth of its API limit
    (Hetzner's 3,600/h gives a read every 10 s, AWS or the sim one a second)."""
    if settings.batch_poll_s is not None:
        return settings.batch_poll_s
    from limits import parse

    limit = parse(rate_limit_for(settings, provider))
    calls_per_s = limit.amount / limit.get_expiry()
    low, high = TICK_BOUNDS_S
    return min(high, max(low, 1 / (TICK_SHARE_OF_LIMIT * calls_per_s)))


@lru_cache
def get_settings() -> Settings:
    return Settings()
