"""A whole vmqueue on one machine for the chaos suite: its own redis-server, sim workers, a producer.

Every process gets one environment (``Cluster.env``), the way compose gives every service the same
settings: kombu restores unacked messages with its own visibility timeout, so they must agree.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker
from bench.probes import Flower, Sim, flush_keeping_bindings, wait_for
from bench.sentinel import MASTER_NAME, SentinelRedis
from vmqueue.models import Job

# Short but realistic: every countdown (polls <= 1 s, retries <= 1 s, Retry-After 1 s) stays far
# below the visibility timeout, which decides how soon a SIGKILLed worker's messages come back.
CHAOS_ENV = {
    "VMQ_VISIBILITY_TIMEOUT_S": "8",
    "VMQ_UNACKED_RESTORE_INTERVAL_S": "1",
    "VMQ_POLL_INITIAL_S": "0.3",
    "VMQ_POLL_MAX_S": "1",
    "VMQ_RETRY_BASE_S": "0.2",
    "VMQ_RETRY_MAX_S": "1",
    "VMQ_CALL_WAIT_MAX_S": "0.5",
    "VMQ_STEP_LEASE_S": "10",
    "VMQ_NOT_FOUND_GRACE_S": "3",
    "VMQ_DEADLINE_S": "120",
    "VMQ_SIM_BOOT_S": "1",
    "VMQ_SIM_DESTROY_S": "0.5",
    "VMQ_SIM_RETRY_AFTER_S": "1",
}


@dataclass
class ClusterConfig:
    workers: int = 3
    concurrency: int = 16
    rate_limit_per_s: int = 100  # the shared sim API limit every worker obeys (VMQ_RATE_LIMIT)
    workdir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # overrides of CHAOS_ENV
    sentinel: bool = False  # a Sentinel-managed Redis (master, two replicas, three sentinels)


class Cluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.workdir = config.workdir or Path(tempfile.mkdtemp(prefix="vmq-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_server = SentinelRedis() if config.sentinel else RedisServer()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VMQ_", "REDIS_URL", "FLOWER_"))}
        self.env.update(
            CHAOS_ENV,
            REDIS_URL=self.redis_server.url,
            VMQ_REDIS_MASTER_NAME=MASTER_NAME,
            VMQ_RATE_LIMIT=json.dumps({"sim": f"{config.rate_limit_per_s}/second"}),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        self.env.update(config.env)
        self.workers: list[Worker] = []
        self.retired: list[Worker] = []  # killed workers: their logs still count (secret scan)
        self.flowers: list[Flower] = []
        self.settings = _settings(self.env)
        self.client: redis.Redis | None = None
        self.sim: Sim | None = None
        self.provisioner = None

    # -- life --------------------------------------------------------------------------------
    def start(self) -> Cluster:
        from producer.client import Provisioner
        from vmqueue.connection import connect

        self.redis_server.start()
        self.env["REDIS_URL"] = self.redis_server.url  # a taken port moves a new server (RedisServer.start)
        self.settings = _settings(self.env)
        self.client = connect(self.settings)  # rides out the Redis restart of R2, like every client we ship
        self.sim = Sim(self.client)
        self.provisioner = Provisioner(self.settings)
        self.workers = [self._worker() for _ in range(self.config.workers)]
        for worker in self.workers:
            worker.wait_ready(60)
        return self

    def stop(self) -> None:
        for flower in self.flowers:
            flower.stop()
        for worker in self.workers + self.retired:
            worker.stop()
        self.redis_server.cleanup()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """A clean cloud and job store between scenarios; the workers keep running."""
        flush_keeping_bindings(self.client)

    # -- breaking things ---------------------------------------------------------------------
    def kill_and_restart(self, slot: int = 0) -> None:
        """SIGKILL one worker, then start a fresh one in its place (as a supervisor would)."""
        victim = self.workers[slot]
        victim.kill()
        self.retired.append(victim)
        self.workers[slot] = self._worker().wait_ready(60)

    def pause(self, slot: int, seconds: float) -> None:
        """SIGSTOP one worker for ``seconds``, then SIGCONT: a stalled host (GC pause, frozen VM,
        partition) whose steps and lease renewals stop mid-call and go on later."""
        import signal

        process = self.workers[slot].process
        process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            process.send_signal(signal.SIGCONT)

    @contextmanager
    def replaced_workers(
        self, specs: list[tuple[dict[str, str], str]], concurrency: int | None = None
    ) -> Iterator[None]:
        """Run a scenario on other workers: one per (env overrides, app module) in ``specs``; the
        usual ones are stopped meanwhile and started again after."""
        for worker in self.workers:
            worker.stop()
        self.retired += self.workers
        threads = concurrency or self.config.concurrency
        self.workers = [Worker("sim", {**self.env, **env}, threads, self.workdir, app=app) for env, app in specs]
        try:
            for worker in self.workers:
                worker.wait_ready(60)
            yield
        finally:
            for worker in self.workers:
                worker.stop()
            self.retired += self.workers
            self.workers = [self._worker() for _ in range(self.config.workers)]
            for worker in self.workers:
                worker.wait_ready(60)

    def restart_redis(self, down_s: float) -> float:
        """Stop redis-server (SIGTERM: the AOF is flushed), keep it down ``down_s``, start it again."""

        began = time.monotonic()
        self.redis_server.stop()
        time.sleep(down_s)
        self.redis_server.start()
        return time.monotonic() - began

    def start_flower(self) -> Flower:
        flower = Flower(self.env, self.workdir)
        self.flowers.append(flower)
        flower.wait_ready(60)
        flower.wait_events(self.provisioner)
        return flower

    def logs(self) -> dict[str, str]:
        out = {str(w.log_path.name): w.log() for w in self.workers + self.retired}
        out.update({str(f.log_path.name): f.log() for f in self.flowers})
        return out

    @contextmanager
    def sweeping(self, every_s: float = 5.0) -> Iterator[list]:
        """The deployment's periodic sweeper (``vmq sweep --every``) in a thread; yields its reports.

        Its delay is far beyond a run, so it never destroys anything here: what it does is send
        again the task of a job whose message the broker lost (workers/rescue.py).
        """
        from producer.sweep import SweepTimeout, request_sweep, wait_report
        from vmqueue.sweep import SweepRequest

        reports: list = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                request = SweepRequest(provider="sim", delay_s=24 * 3600)
                request_sweep(self.provisioner.celery, request)
                try:
                    reports.append(wait_report(self.client, request.id, 60))
                except SweepTimeout:
                    pass  # a pass lost with a killed worker; the next one comes

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield reports
        finally:
            stop.set()
            thread.join(90)

    # -- jobs --------------------------------------------------------------------------------
    def jobs(self, ids: list[str]) -> list[Job | None]:
        from vmqueue import keys

        out: list[Job | None] = []
        for start in range(0, len(ids), 500):
            raws = self.client.mget([keys.job_key(i) for i in ids[start : start + 500]])
            out.extend(Job.model_validate_json(raw) if raw else None for raw in raws)
        return out

    def wait_finished(self, ids: list[str], timeout_s: float) -> list[Job | None]:
        """The jobs once all finished (a failed create's cleanup included), or as they are at the timeout."""
        try:
            wait_for(lambda: self.unfinished(ids) == 0, timeout_s, "jobs finish", 0.25)
        except TimeoutError:
            pass  # the scenario's checks say what did not finish
        return self.jobs(ids)

    def unfinished(self, ids: list[str]) -> int:
        return sum(1 for j in self.jobs(ids) if j is None or not j.finished)

    def _worker(self) -> Worker:
        return Worker("sim", self.env, self.config.concurrency, self.workdir)


def _settings(env: dict[str, str]):
    from vmqueue.settings import Settings

    fields = {k.removeprefix("VMQ_").lower(): v for k, v in env.items() if k.startswith("VMQ_")}
    fields = {k: v for k, v in fields.items() if k in Settings.model_fields}
    fields["rate_limit"] = json.loads(fields.get("rate_limit", "{}"))
    return Settings(redis_url=env["REDIS_URL"], **fields)
