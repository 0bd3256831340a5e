"""Coalesced status reads: the VMs being waited for, per provider, and the one chain that reads them.

For a provider whose adapter can read many VMs in one call (``BatchReads``), a single "tick" chain
per provider reads every watched VM each ``batch_poll_s`` and settles the jobs whose VM changed;
the jobs' own poll chains then only watch their deadlines. So API calls per VM stay near one
(the create) however many VMs are in flight. If the tick chain dies, its lease runs out and the
next job poll starts another one, reading the VM directly meanwhile.
"""

from __future__ import annotations

import uuid

import redis

from producer import keys

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class WatchList:
    def __init__(self, client: redis.Redis, tick_s: float):
        self.redis = client
        self.lease_ms = int(max(5 * tick_s, 10.0) * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def add(self, provider: str, instance_id: str, job_id: str) -> bool:
        """Watch a VM; returns whether a tick chain is alive to read it (both in one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.watch_key(provider), instance_id, job_id)
        pipe.exists(keys.ticker_key(provider))
        return bool(pipe.execute()[1])

    def remove(self, provider: str, instance_id: str) -> None:
        self.redis.hdel(keys.watch_key(provider), instance_id)

    def members(self, provider: str) -> dict[str, str]:
        """instance id -> job id"""
        return self.redis.hgetall(keys.watch_key(provider))

    def claim_ticker(self, provider: str) -> str | None:
        """A token when no tick chain is alive for ``provider`` (the caller must start one), else None."""
        token = uuid.uuid4().hex
        return token if self.redis.set(keys.ticker_key(provider), token, nx=True, px=self.lease_ms) else None

    def renew(self, provider: str, token: str) -> bool:
        """Keep the lease; False when this chain is not (or no longer) the live one."""
        return bool(self._renew(keys=[keys.ticker_key(provider)], args=[token, self.lease_ms]))

    def release(self, provider: str, token: str) -> None:
        self._release(keys=[keys.ticker_key(provider)], args=[token])
