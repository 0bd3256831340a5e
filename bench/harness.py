"""Real processes for tests and benchmarks: a private redis-server and Celery worker subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def sim_spec(name: str, **extra: object) -> dict:
    """A create request for the simulated cloud, as the benchmarks send it."""
    return {
        "provider": "sim",
        "name": name,
        "region": "sim-1",
        "instance_type": "small",
        "image": "ubuntu-24.04",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the test session's own, which a test may stop and start again."""

    def __init__(self, aof: bool = True) -> None:
        self.aof = aof
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="vmq-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._ports_left = 3  # new ports to try on the first start (see start)

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers.

        On the first start only, a port taken between ``free_port()`` and the bind (parallel test
        sessions pick ports at once) moves the server to another free port; a restart keeps its port.
        """
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                # Ours answers, not another session's redis-server that holds the port.
                ours = client.info("server")["process_id"] == self.process.pid
            except redis.ConnectionError:
                ours = False
            if ours:
                self._ports_left = 0
                return
            if self.process.poll() is not None and self._ports_left > 0:
                self._ports_left -= 1
                self.port = free_port()
                self.url = f"redis://127.0.0.1:{self.port}/0"
                return self.start()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    def __init__(
        self,
        provider: str,
        env: dict[str, str],
        concurrency: int,
        log_dir: Path,
        pool: str = "threads",
        loglevel: str = "INFO",
        events: bool = True,
        app: str = "workers.app",
    ):
        # ``app``: another module may wrap the worker app (benchmarks add a no-op task or import every SDK).
        self.provider = provider
        self.env = env
        self.name = f"{provider}-{time.monotonic_ns()}@{socket.gethostname()}"
        self.log_path = log_dir / f"worker-{self.name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                f"vmq.{provider}",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-n",
                self.name,
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                *(["-E"] if events else []),
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30, ping_timeout_s: float = 0.5) -> Worker:
        """Until the worker answers a ping over the broker (whatever its log level).

        A ping sent before the worker listens is lost, so ``ping_timeout_s`` is also how finely this
        notices the worker came up (the start-up benchmark asks often).
        """
        from vmqueue.celery_config import make_celery
        from vmqueue.settings import Settings

        control = make_celery(Settings(redis_url=self.env["REDIS_URL"])).control
        deadline = time.monotonic() + timeout_s
        while not self._pings(control, ping_timeout_s):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker for {self.provider} did not start:\n{self.log()}")
        return self

    def _pings(self, control, timeout_s: float) -> bool:
        try:
            return bool(control.ping(destination=[self.name], timeout=timeout_s))
        except redis.ConnectionError:
            # kombu pools broker connections per URL process-wide: after a Redis restart the first
            # broadcast meets a stale one (and drops it); ask again.
            return False

    def peak_rss_kib(self) -> int:
        """The worker process's peak resident set so far (VmHWM; Linux). The threads pool is one process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))

    def cpu_s(self) -> float:
        """CPU time (user + system) the worker process has used so far (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to ack, requeue or clean up anything."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
