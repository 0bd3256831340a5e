"""What ``Provisioner`` and ``AsyncProvisioner`` say when something is wrong that a job's state does
not show: a job id typed as a prefix, a job no worker will take, a Redis that is not there.

Pure logic, no I/O: each client reads Redis its own way (blocking or awaited) and asks here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from producer.submit import JobNotFound
from vmqueue import keys
from vmqueue.models import Job, JobState, utcnow

# What the CLI's table shows of a job id is its first 8 characters: any shorter hex string is a prefix.
_ID_PREFIX = re.compile(r"^[0-9a-f]{1,31}$")
# A job still queued this long, on a queue no live worker serves, gets a notice saying so.
NO_WORKER_AFTER_S = 10.0
# How long a Redis check is trusted before a client asks again (one PING per this, not per request).
REDIS_CHECK_EVERY_S = 1.0


class AmbiguousJobId(JobNotFound):
    """A job id prefix that more than one job starts with."""


def is_prefix(job_id: str) -> bool:
    return bool(_ID_PREFIX.match(job_id))


def prefix_match(prefix: str) -> str:
    """The ``SCAN MATCH`` pattern of job records whose id starts with ``prefix`` (hex: no glob characters)."""
    return f"{keys.JOB_PREFIX}{prefix}*"


def pick(prefix: str, found_keys: Iterable[str]) -> str:
    """The one job id among the scanned record keys; ``prefix`` itself when none (the caller's lookup
    then says "no job"); ``AmbiguousJobId`` naming a few matches when several."""
    ids = sorted({k.removeprefix(keys.JOB_PREFIX) for k in found_keys if not k.endswith(keys.SCRIPT_SUFFIX)} - {""})
    ids = [i for i in ids if ":" not in i]  # other keys under vmq:job:<id>:... are not records
    if len(ids) > 1:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise AmbiguousJobId(f"job id {prefix!r} matches {len(ids)} jobs ({shown}): give more characters")
    return ids[0] if ids else prefix


def needs_worker_check(job: Job) -> bool:
    """Whether ``job`` has waited long enough in ``queued`` to ask if any worker serves its queue."""
    return job.state == JobState.queued and (utcnow() - job.created_at).total_seconds() >= NO_WORKER_AFTER_S


def no_worker_notice(job: Job) -> str:
    """What to tell about a job no live worker will take (``vmq:served:<provider>`` absent)."""
    return (
        f"no worker serves {keys.queue_name(job.provider)}, so nobody has taken this job yet; "
        f"start one: vmq worker --provider {job.provider} (the job stays queued until then)"
    )
