"""Coalesced status reads: the VMs being waited for, per provider, and the one chain that reads them.

For a provider whose adapter can read many VMs in one call (``BatchReads``), a single "tick" chain
per provider reads every watched VM each tick interval (``tick_interval_s``) and settles the jobs whose VM settled or
whose deadline passed; a watched job has no message of its own meanwhile, so a create costs one
message and API calls per VM stay near one however many VMs are in flight. If the tick chain dies,
its lease runs out and every worker's supervisor thread (workers/tasks.py) starts another.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis

from vmqueue import keys

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class WatchList:
    def __init__(self, client: redis.Redis, tick_s: Callable[[str], float]):
        self.redis = client
        self.tick_s = tick_s  # provider -> its tick interval
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def add(self, provider: str, instance_id: str, job_id: str, deadline: float) -> bool:
        """Watch a VM until ``deadline`` (epoch s); returns whether a tick chain is alive (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.watch_key(provider), instance_id, f"{job_id} {deadline:.3f}")
        pipe.exists(keys.ticker_key(provider))
        return bool(pipe.execute()[1])

    def remove(self, provider: str, *instance_ids: str) -> None:
        """Watch these VMs no more (one round trip, however many)."""
        if instance_ids:
            self.redis.hdel(keys.watch_key(provider), *instance_ids)

    def members(self, provider: str) -> dict[str, tuple[str, float]]:
        """instance id -> (job id, deadline epoch s)"""
        watched = {}
        for instance_id, value in self.redis.hgetall(keys.watch_key(provider)).items():
            job_id, _, deadline = value.partition(" ")
            watched[instance_id] = (job_id, float(deadline or 0))
        return watched

    def providers_waiting(self, providers: list[str]) -> list[str]:
        """Of ``providers``, those with VMs watched but no live tick chain (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for provider in providers:
            pipe.exists(keys.watch_key(provider))
            pipe.exists(keys.ticker_key(provider))
        found = pipe.execute()
        return [p for i, p in enumerate(providers) if found[2 * i] and not found[2 * i + 1]]

    def claim_ticker(self, provider: str) -> str | None:
        """A token when no tick chain is alive for ``provider`` (the caller must start one), else None."""
        token = uuid.uuid4().hex
        return token if self.redis.set(keys.ticker_key(provider), token, nx=True, px=self._lease_ms(provider)) else None

    def renew(self, provider: str, token: str) -> bool:
        """Keep the lease; False when this chain is not (or no longer) the live one."""
        return bool(self._renew(keys=[keys.ticker_key(provider)], args=[token, self._lease_ms(provider)]))

    def _lease_ms(self, provider: str) -> int:
        # A few missed ticks before another chain may take over.
        return int(max(5 * self.tick_s(provider), 10.0) * 1000)

    def release(self, provider: str, token: str) -> None:
        self._release(keys=[keys.ticker_key(provider)], args=[token])
