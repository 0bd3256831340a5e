"""Lookups kept per worker process (workers/providers/lookups.py): one ask per key, failures not kept."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.providers.lookups import Lookups


def test_threads_missing_a_cold_key_together_ask_once() -> None:
    lookups, asked = Lookups(), []
    start = threading.Barrier(8)

    def fetch() -> str:
        asked.append(1)
        time.sleep(0.2)  # a slow lookup: the other threads arrive while it is out
        return "ami-1"

    def one(_: int) -> str:
        start.wait()
        return lookups.get(("eu-west-1", "ubuntu-24.04"), fetch)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert answers == ["ami-1"] * 8 and len(asked) == 1


def test_a_failed_lookup_is_not_kept_and_other_keys_are_apart() -> None:
    lookups, asked = Lookups(), []

    def failing() -> str:
        asked.append("x")
        raise RuntimeError("throttled")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            lookups.get("a", failing)
    assert asked == ["x", "x"]
    assert lookups.get("a", lambda: "ok") == "ok" and lookups.get("b", lambda: "other") == "other"
    assert lookups.get("a", failing) == "ok"  # kept now


def test_an_answer_expires_after_its_ttl() -> None:
    lookups = Lookups(ttl_s=0.05)
    assert lookups.get("k", lambda: 1) == 1
    time.sleep(0.1)
    assert lookups.get("k", lambda: 2) == 2
