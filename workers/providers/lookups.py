"""Lookups a create makes before its request, kept per worker process for a while.

An image alias (``ubuntu-24.04``) names the newest image of an OS release, which providers replace
every few weeks (Canonical's public SSM parameters on AWS; OCI's platform images, listed newest
first). Asking before every create spent a request per VM on an answer that rarely changes; a
worker asks once per region and alias every ``IMAGE_TTL_S`` seconds instead. The resolved image is
written on the job's spec, so a job's retries keep the image its first attempt chose.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

from cachetools import TTLCache

IMAGE_TTL_S = 3600.0  # s; an hour-old image is as good as a new one for a VM that updates at boot

T = TypeVar("T")


class Lookups:
    """A thread-safe TTL cache of lookup answers (cachetools' ``TTLCache``).

    One lookup per key at a time: the pool's threads that miss a cold key together wait for the one
    that asks (a cold worker taking 1,000 creates asked 2-6 times). A failed lookup is not kept.
    """

    def __init__(self, ttl_s: float = IMAGE_TTL_S, maxsize: int = 256) -> None:
        self._cache: TTLCache[Hashable, object] = TTLCache(maxsize=maxsize, ttl=ttl_s)
        self._lock = threading.Lock()
        self._asking: dict[Hashable, threading.Lock] = {}  # key -> held while one thread asks

    def get(self, key: Hashable, fetch: Callable[[], T]) -> T:
        """The cached answer for ``key``, or ``fetch()``'s (which raises as it raises, keeping nothing)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]  # type: ignore[return-value]
            asking = self._asking.setdefault(key, threading.Lock())
        with asking:  # outside the cache's lock: a slow lookup holds up only its own key
            with self._lock:
                if key in self._cache:  # another thread asked while this one waited
                    return self._cache[key]  # type: ignore[return-value]
            try:
                value = fetch()
            finally:
                with self._lock:
                    self._asking.pop(key, None)
            with self._lock:
                self._cache[key] = value
            return value
