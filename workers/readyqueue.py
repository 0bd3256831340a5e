"""The readiness schedule in Redis: which running jobs wait to be ready, and when each is next due.

``keys.READY_DUE`` (sorted set: job id -> epoch s) says when a job's readiness is next looked at;
``keys.READY_TARGETS`` (hash: job id -> ``ReadyTarget`` JSON) says what to look at. Every worker
process's scanner (workers/readyscan.py) claims due jobs by pushing their score one lease ahead, so
two scanners never probe one VM at once and a scanner that dies hands its jobs on when the lease
ends. A scanner keeps the SSH entries it claimed in memory and probes them on its own schedule,
renewing all their leases in one round trip now and then (``renew``: only those still carrying the
score its claim or last renewal wrote, so an entry another scanner took over after a stall is let
go). The HTTP API makes a job due at once (``vmqueue.readiness.wake``) when cloud-init phones home.
"""

from __future__ import annotations

import redis
from pydantic import BaseModel

from vmqueue import keys
from vmqueue.readiness import ReadyWhen

# Claim up to ARGV[2] jobs due by ARGV[1] in one round trip: each becomes due again at ARGV[3]
# (the claim's lease) and comes back with its target.
_CLAIM = """
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then return {} end
for _, id in ipairs(due) do redis.call('zadd', KEYS[1], ARGV[3], id) end
local targets = redis.call('hmget', KEYS[2], unpack(due))
local out = {}
for i, id in ipairs(due) do
  out[#out + 1] = id
  out[#out + 1] = targets[i] or ''
end
return out
"""


# Renew the leases of ARGV[2..] (job id, the score this scanner last wrote, pairs) to ARGV[1], in one
# round trip; an entry whose score changed (taken over, woken, removed) is left alone. Returns the ids renewed.
_RENEW = """
local kept = {}
for i = 2, #ARGV, 2 do
  local score = redis.call('zscore', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('zadd', KEYS[1], ARGV[1], ARGV[i])
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


class ReadyTarget(BaseModel):
    """What the scanner looks at for one job."""

    job_id: str
    provider: str
    mode: ReadyWhen
    host: str | None = None  # ssh: the address to probe
    port: int = 22
    deadline: float  # epoch s: not ready by then fails the job
    since: float | None = None  # epoch s: when the VM was seen running (the wait between probes grows with it)


class ReadyQueue:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)

    def add(self, target: ReadyTarget, due_at: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.READY_TARGETS, target.job_id, target.model_dump_json())
        pipe.zadd(keys.READY_DUE, {target.job_id: due_at})
        pipe.execute()

    def claim(self, now: float, limit: int, lease_until: float) -> list[ReadyTarget]:
        """Up to ``limit`` targets due by ``now``, each held until ``lease_until`` (due again then)."""
        flat = self._claim(keys=[keys.READY_DUE, keys.READY_TARGETS], args=[now, limit, lease_until])
        claimed = []
        for job_id, raw in zip(flat[::2], flat[1::2], strict=True):
            if raw:
                claimed.append(ReadyTarget.model_validate_json(raw))
            else:  # a due entry without a target (a crash between the two writes): nothing to look at
                self.redis.zrem(keys.READY_DUE, job_id)
        return claimed

    def renew(self, held: dict[str, float], lease_until: float) -> list[str]:
        """Hold the entries of ``held`` (job id -> the score this scanner last wrote) until
        ``lease_until``; returns those renewed (the others are not this scanner's any more)."""
        if not held:
            return []
        args: list[object] = [lease_until]
        for job_id, score in held.items():
            args += [job_id, score]
        return [_str(i) for i in self._renew(keys=[keys.READY_DUE], args=args)]

    def reschedule(self, job_id: str, at: float) -> None:
        """Due again at ``at`` (only if still scheduled: a settled job stays gone)."""
        self.redis.zadd(keys.READY_DUE, {job_id: at}, xx=True)

    def remove(self, *job_ids: str) -> None:
        """Off the schedule (settled, failed), in one round trip however many."""
        if not job_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.READY_DUE, *job_ids)
        pipe.hdel(keys.READY_TARGETS, *job_ids)
        pipe.execute()

    def size(self) -> int:
        return self.redis.zcard(keys.READY_DUE)


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
