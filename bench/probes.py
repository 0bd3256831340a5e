"""What the chaos suite and its tests look at: the sim's books, everything in Redis, a real Flower.

Process helpers (redis-server, workers) are in ``bench/harness.py``; this module adds what the
chaos scenarios need beyond them. Shared by ``bench/chaos.py`` and the tests, so both count the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import httpx
import redis

from bench.harness import ROOT, free_port

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str = "condition", every_s: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` naming ``what`` after."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not met within {timeout_s:.0f}s")
        time.sleep(every_s)


def flush_keeping_bindings(client: redis.Redis) -> None:
    """Empty the database but for kombu's exchange bindings, which running workers declared once."""
    doomed = [key for key in client.scan_iter(count=1000) if not _str(key).startswith("_kombu.")]
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start : start + 1000])


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Flower:
    """A real ``celery -A workers.app flower --conf=flower.conf`` on a free loopback port, with basic auth."""

    def __init__(self, env: dict[str, str], log_dir: Path, basic_auth: tuple[str, str] = ("ops", "chaos-pw")):
        self.port = free_port()
        self.auth = basic_auth
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"flower-{self.port}.log"
        self._log = self.log_path.open("wb")
        flower_env = {
            **env,
            "FLOWER_PORT": str(self.port),
            "FLOWER_ADDRESS": "127.0.0.1",
            "FLOWER_BASIC_AUTH": ":".join(basic_auth),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--conf=flower.conf"],
            cwd=ROOT,
            env=flower_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30) -> Flower:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout_s, "flower start", every_s=0.2)
        return self

    def wait_events(self, provisioner, timeout_s: float = 60, every_s: float = 5.0) -> Flower:
        """Until Flower's event receiver shows a probe job's task.

        Its HTTP side answers before the receiver listens, and a task sent in between is never seen,
        so a new probe (a get of a VM that does not exist) goes every ``every_s`` until one shows.
        """
        probes: list[str] = []
        began = time.monotonic()

        def seen() -> bool:
            if len(probes) * every_s <= time.monotonic() - began:
                probes.append(provisioner.get_vm("sim", "sim-flower-probe").id)
            tasks = self.get("/api/tasks").json()
            return any(p in tasks or any(p in str(t.get("args")) for t in tasks.values()) for p in probes)

        wait_for(seen, timeout_s, "Flower sees task events", 0.3)
        return self

    def get(self, path: str, auth: bool = True) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=self.auth if auth else None, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


class Sim:
    """The simulated cloud seen from outside: its knobs (live, through Redis) and its counters."""

    def __init__(self, client: redis.Redis):
        from workers.providers import sim

        self.module = sim
        self.redis = client

    def configure(self, **knobs: object) -> None:
        self.redis.hset(self.module.CONFIG_KEY, mapping={k: str(v) for k, v in knobs.items()})

    def reset(self) -> None:
        self.redis.delete(self.module.CONFIG_KEY)

    def calls(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.module.CALLS_KEY).items()}

    def calls_per_s(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.redis.hgetall(self.module.CALLS_PER_S_KEY).items()}

    def call_log(self) -> list[dict]:
        return [json.loads(e) for e in reversed(self.redis.lrange(self.module.LOG_KEY, 0, -1))]

    def live_vms(self) -> list[dict[str, str]]:
        """VMs the cloud still has (not deleted, or deleted but not yet gone)."""
        return [self.redis.hgetall(f"{self.module.SIM_PREFIX}vm:{i}") for i in self.redis.smembers(self.module.VMS_KEY)]

    def existing_vms(self) -> list[dict[str, str]]:
        """VMs that exist now: a VM whose delete time has passed is gone even if nobody read it since."""
        now_ms = time.time() * 1000
        return [vm for vm in self.live_vms() if vm and (not vm.get("delete_at_ms") or int(vm["delete_at_ms"]) > now_ms)]

    @staticmethod
    def job_of(vm: dict[str, str]) -> str | None:
        return json.loads(vm.get("labels", "{}")).get("vmqueue-job")


def scan_values(client: redis.Redis, skip: Callable[[str], bool] = lambda key: False) -> Iterable[tuple[str, str]]:
    """Every (key, value) in the database, whatever the key's type; the broker's queues included."""
    readers: dict[str, Callable[[str], list]] = {
        "string": lambda k: [client.get(k) or ""],
        "list": lambda k: client.lrange(k, 0, -1),
        "hash": lambda k: [*client.hgetall(k).keys(), *client.hgetall(k).values()],
        "zset": lambda k: client.zrange(k, 0, -1),
        "set": lambda k: list(client.smembers(k)),
        "stream": lambda k: [json.dumps(entry, default=str) for entry in client.xrange(k)],
    }
    for key in client.scan_iter(count=1000):
        key = _str(key)
        if skip(key):
            continue
        for value in readers.get(_str(client.type(key)), lambda k: [])(key):
            yield key, _str(value)
