"""Real parts for the tests: a private redis-server per session and real Celery worker processes.

Fixtures:
- ``redis_server``: the session's own redis-server on a free loopback port (AOF on), restartable.
- ``redis_url`` / ``redis_client``: its URL and a client; the database is flushed before each test.
- ``test_env``: the environment a worker runs with (short polls, short visibility timeout).
- ``worker_factory(provider, env=None, concurrency=8)``: starts a worker subprocess on ``vmq.<provider>``
  and waits until it is ready; every worker it started is killed at the end of the test.
- ``sim_worker``: one sim worker shared by the session (faster than one per test).
- ``provisioner``: a ``producer.Provisioner`` with the same settings as the workers.
- ``sim``: the simulated cloud's knobs and counters.

Under pytest-xdist (the README's test command runs ``-n 2 --dist loadgroup``) every xdist worker is
a session of its own: its own redis-server on a free loopback port, its own sim worker. The tests of
a module that uses a module- or class-scoped fixture (a chaos cluster, a Sentinel set, a sim host)
stay on one xdist worker, so that fixture starts once (``pytest_collection_modifyitems`` below).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.harness import ROOT, RedisServer, Worker
from bench.probes import Sim

# Test settings: everything that waits is shrunk so the suite stays within minutes on two cores.
FAST_ENV = {
    "VMQ_VISIBILITY_TIMEOUT_S": "8",
    "VMQ_UNACKED_RESTORE_INTERVAL_S": "1",
    "VMQ_POLL_INITIAL_S": "0.2",
    "VMQ_POLL_MAX_S": "0.5",
    "VMQ_BATCH_POLL_S": "0.3",
    "VMQ_RETRY_BASE_S": "0.2",
    "VMQ_RETRY_MAX_S": "1",
    "VMQ_CALL_WAIT_MAX_S": "0.5",
    "VMQ_STEP_LEASE_S": "5",
    "VMQ_NOT_FOUND_GRACE_S": "3",
    "VMQ_DEADLINE_S": "30",
    "VMQ_SIM_BOOT_S": "0.5",
    "VMQ_SIM_DESTROY_S": "0.3",
}


SHARED_SCOPES = ("module", "class", "package")


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into its groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep each module whose tests share a module- or class-scoped fixture on one xdist worker."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs.values() if fixtures else ()
        if any(d and d[-1].scope in SHARED_SCOPES for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def test_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMQ_", "REDIS_URL"))}
    env.update(FAST_ENV, REDIS_URL=redis_url, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


def flush_keeping_bindings(client: redis.Redis) -> None:
    """Empty the database but for kombu's exchange bindings, which running workers declared once."""
    doomed = [key for key in client.scan_iter(count=1000) if not key.startswith("_kombu.")]
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start : start + 1000])


# Written by any running worker at any time: kombu's own bookkeeping (the unacked-message sweep) and
# the marks of the queues live workers serve (workers/presence.py).
KOMBU_KEYS = ("_kombu.", "unacked", "vmq:served:")


@pytest.fixture
def app_keys(redis_client: redis.Redis) -> Callable[[], set[str]]:
    """The keys vmqueue itself has written (queues, jobs, ...), not kombu's bookkeeping."""
    return lambda: {k for k in redis_client.scan_iter(count=1000) if not k.startswith(KOMBU_KEYS)}


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    flush_keeping_bindings(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture
def worker_factory(test_env: dict[str, str], _log_dir: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(provider: str, env: dict[str, str] | None = None, concurrency: int = 8) -> Worker:
        worker = Worker(provider, {**test_env, **(env or {})}, concurrency, _log_dir)
        started.append(worker)
        return worker.wait_ready(60)  # an adapter's SDK import is slow on two busy cores

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def sim_worker(test_env: dict[str, str], _log_dir: Path) -> Iterator[Worker]:
    worker = Worker("sim", test_env, 16, _log_dir).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def sim_worker_paused(sim_worker: Worker, provisioner) -> Iterator[Worker]:
    """The session's sim worker stops consuming for one test, which runs workers of its own."""
    control = provisioner.celery.control
    control.cancel_consumer("vmq.sim", destination=[sim_worker.name], reply=True, timeout=5)
    yield sim_worker
    control.add_consumer("vmq.sim", destination=[sim_worker.name], reply=True, timeout=5)


@pytest.fixture
def settings(test_env: dict[str, str]):
    from vmqueue.settings import Settings

    fields = {k.removeprefix("VMQ_").lower(): v for k, v in test_env.items() if k.startswith("VMQ_")}
    fields = {k: v for k, v in fields.items() if k in Settings.model_fields}
    return Settings(redis_url=test_env["REDIS_URL"], **fields)


@pytest.fixture
def provisioner(settings, redis_client):
    from producer import Provisioner

    return Provisioner(settings)


@pytest.fixture
def cli_env(monkeypatch, test_env: dict[str, str], redis_client: redis.Redis) -> Iterator[None]:
    """The CLI reads its settings from the environment once per process (``get_settings`` is cached):
    point them at this session's Redis and forget them after the test, so no other test's stay."""
    from vmqueue.settings import get_settings

    for key, value in test_env.items():
        if key.startswith("VMQ_") or key == "REDIS_URL":
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def sim(redis_client: redis.Redis) -> Sim:
    return Sim(redis_client)


@pytest.fixture
def ssh_key() -> str:
    from tests.providers.contract import make_ed25519_key

    return make_ed25519_key()
