"""Every Redis key and queue name vmqueue uses, in one place."""

from __future__ import annotations

QUEUE_PREFIX = "vmq."
JOB_PREFIX = "vmq:job:"
SCRIPT_SUFFIX = ":script"
IDEMPOTENCY_PREFIX = "vmq:idem:"
LOCK_PREFIX = "vmq:lock:"
DUE_PREFIX = "vmq:due:"  # a job's next step: when it is due (for the rescue) and its message's sequence number
RATE_LIMIT_PREFIX = "vmq:ratelimit"
BUDGET_PREFIX = "vmq:budget:"  # <provider>:<scope>:<bucket>: API budgets (workers/budget.py)
SIM_PREFIX = "vmq:sim:"
WATCH_PREFIX = "vmq:watch:"  # hash per provider: instance id -> job id of VMs being waited for
TICKER_PREFIX = "vmq:ticker:"  # per provider: the token of the one live batch-read chain
FLEET_PREFIX = "vmq:fleet:"  # hash per fleet: "<provider>/<name>" -> the VM's create job; no TTL
EVENTS_KEY = "vmq:events"  # stream: every job's state changes (vmqueue/events.py); capped
SWEEP_PREFIX = "vmq:sweep:"  # seen:<provider> (orphan -> first seen), report:<id>, lock:<provider>
# The job store's continuity marker (vmqueue/sweep.py StoreEpoch): written once, no TTL; missing or
# new means records may have been lost, and the sweeper destroys nothing on "record gone" from before it.
EPOCH_KEY = "vmq:epoch"
# Written just before a Redis WAIT, so the WAIT covers every earlier write (vmqueue/jobstore.py).
REPLICATION_PROBE_KEY = "vmq:replicated"
# The job index (vmqueue/jobindex.py): sorted sets of job ids by creation time, kept by the job store.
INDEX_PREFIX = "vmq:idx:"
READY_PREFIX = "vmq:ready:"
READY_DUE = f"{READY_PREFIX}due"  # sorted set: job id -> when its readiness is next looked at (epoch s)
READY_TARGETS = f"{READY_PREFIX}targets"  # hash: job id -> what the scanner probes (JSON)
SERVED_PREFIX = "vmq:served:"  # per provider: refreshed by every live worker of its queue (short TTL)

TASK_CREATE = "vmq.create"
TASK_CREATE_MANY = "vmq.create_many"  # the first step of many create jobs in one message (producer/bulk.py)
TASK_DESTROY = "vmq.destroy"
TASK_GET = "vmq.get"
TASK_OF_KIND = {"create": TASK_CREATE, "destroy": TASK_DESTROY, "get": TASK_GET}  # a job kind's task
TASK_TICK = "vmq.tick"
TASK_SWEEP = "vmq.sweep"
TASK_WEBHOOK = "vmq.webhook"
# Webhook deliveries have a queue (and workers) of their own: a slow receiver never holds a job's slot.
WEBHOOK_QUEUE = f"{QUEUE_PREFIX}webhooks"


def task_argsrepr(kind: str, provider: str, job_id: str, name: str | None = None) -> str:
    """What Flower shows as a job task's arguments, searchable by kind, provider, VM name and job id.

    Never a script or key: the task's only real argument is the job id.
    """
    return f"({kind} {provider}{f' {name}' if name else ''} job={job_id})"


def served_key(provider: str) -> str:
    return f"{SERVED_PREFIX}{provider}"


def queue_name(provider: str) -> str:
    return f"{QUEUE_PREFIX}{provider}"


def provider_of_queue(queue: str) -> str:
    """``vmq.sim`` -> ``sim``: the provider a queue serves."""
    return queue.removeprefix(QUEUE_PREFIX)


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def script_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}{SCRIPT_SUFFIX}"


def idempotency_key(key: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{key}"


def events_key(job_id: str) -> str:
    """Stream of one job's state changes; expires with the record's TTL."""
    return f"{EVENTS_KEY}:{job_id}"


def lock_key(job_id: str) -> str:
    return f"{LOCK_PREFIX}{job_id}"


def due_key(job_id: str) -> str:
    return f"{DUE_PREFIX}{job_id}"


def ready_token_key(job_id: str) -> str:
    """The digest of a job's one-time phone-home token (not under ``vmq:job:``: that prefix holds records)."""
    return f"{READY_PREFIX}token:{job_id}"


def fleet_key(fleet: str) -> str:
    return f"{FLEET_PREFIX}{fleet}"


def watch_key(provider: str) -> str:
    return f"{WATCH_PREFIX}{provider}"


def ticker_key(provider: str) -> str:
    return f"{TICKER_PREFIX}{provider}"


def sweep_seen_key(provider: str) -> str:
    return f"{SWEEP_PREFIX}seen:{provider}"


def sweep_report_key(sweep_id: str) -> str:
    return f"{SWEEP_PREFIX}report:{sweep_id}"


def index_key(*parts: str) -> str:
    """A sorted set of the job index, e.g. ``index_key("state", "failed")`` -> ``vmq:idx:state:failed``."""
    return INDEX_PREFIX + ":".join(parts)


def sweep_lock_key(provider: str) -> str:
    return f"{SWEEP_PREFIX}lock:{provider}"
