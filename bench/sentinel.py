"""A Sentinel-managed Redis of a test's or benchmark's own: one master, replicas, three sentinels.

Every process is a real ``redis-server`` on a free loopback port (sentinels are ``redis-server
--sentinel``, the same binary Debian's ``redis-sentinel`` runs), so failovers are Redis's own.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.harness import free_port

MASTER_NAME = "vmqueue"


class SentinelRedis:
    """``replicas`` replicas and ``sentinels`` sentinels (quorum 2) watching one master.

    ``down_after_ms`` is how long the master may stay silent before the sentinels call it down;
    small values make a failover take a few seconds instead of the default 30 s.
    """

    def __init__(self, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="vmq-sentinel-"))
        self.down_after_ms = down_after_ms
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.url = ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    # -- life --------------------------------------------------------------------------------
    def start(self) -> SentinelRedis:
        master = self.data_ports[0]
        for port in self.data_ports:
            self._start_data(port, replica_of=None if port == master else master)
        for port in self.data_ports[1:]:
            _wait(lambda p=port: _client(p).info("replication").get("master_link_status") == "up", 15, "replica sync")
        for port in self.sentinel_ports:
            self._start_sentinel(port, master)
        _wait(lambda: self.master_port() == master and self._sentinels_agree(), 15, "sentinels agree on the master")
        return self

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    cleanup = stop  # the RedisServer interface the chaos cluster uses

    def __enter__(self) -> SentinelRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the sentinels say -------------------------------------------------------------
    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                address = _client(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def _sentinels_agree(self) -> bool:
        try:
            return all(
                int(_client(p).sentinel_master(MASTER_NAME)["num-other-sentinels"]) == len(self.sentinel_ports) - 1
                for p in self.sentinel_ports
            )
        except (redis.RedisError, KeyError):
            return False

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until the master has every live replica online and in sync: a failover is over and the
        next one would lose nothing that was acknowledged (WAIT)."""
        live = sum(1 for port in self.data_ports if self.processes[port].poll() is None)

        def healthy() -> bool:
            port = self.master_port()
            try:
                info = _client(port).info("replication") if port else {}
            except redis.RedisError:
                return False
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            # Workers write all the time, so offsets never stand still: in sync means online and
            # acknowledging within the last second (Redis's own replica lag).
            return (
                info.get("role") == "master"
                and len(online) == live - 1
                and all(r["state"] == "online" and int(r["lag"]) <= 1 for r in online)
            )

        _wait(healthy, timeout_s, "every replica online and in sync")

    # -- breaking things ---------------------------------------------------------------------
    def kill_master(self) -> int:
        """SIGKILL the current master (no shutdown, no last write); returns its port."""
        port = self.master_port()
        assert port is not None, "no master known to the sentinels"
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(10)
        return port

    def wait_promoted(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the sentinels name another master and it accepts writes; returns its port."""

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            try:
                return _client(port).info("replication")["role"] == "master"
            except redis.RedisError:
                return False

        _wait(promoted, timeout_s, "a replica promoted to master")
        return self.master_port()

    def failover(self) -> None:
        """A graceful failover (SENTINEL FAILOVER): the master is demoted to a replica and answers
        writes with READONLY, the case a client connected to it must survive."""
        _client(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    # -- processes ---------------------------------------------------------------------------
    def _start_data(self, port: int, replica_of: int | None) -> None:
        argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--dir", str(self._workdir(port)), "--replica-announce-ip", "127.0.0.1"]  # fmt: skip
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.processes[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _answers(port), 10, f"redis-server :{port} start")

    def _start_sentinel(self, port: int, master: int) -> None:
        conf = self._workdir(port) / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\nsentinel announce-ip 127.0.0.1\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.processes[port] = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait(lambda: _answers(port), 10, f"redis-sentinel :{port} start")

    def _workdir(self, port: int) -> Path:
        path = self.dir / str(port)
        path.mkdir(exist_ok=True)
        return path


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)


def _answers(port: int) -> bool:
    try:
        return bool(_client(port).ping())
    except redis.RedisError:
        return False


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.1)
