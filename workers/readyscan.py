"""The SSH readiness scanner: one asyncio loop per worker process probes every VM waiting for SSH.

It runs in a thread of its own beside Celery's pool, so waiting for sshd holds no worker slot, and
a probe costs no provider API call (the address came with the running VM's read). Each pass
claims the due jobs of the shared schedule (workers/readyqueue.py), at most ``ready_concurrency``
probes in flight; a probe is asyncssh's ``get_server_host_key``: a real key exchange, whose host
key is what the job records. A VM that does not answer is probed again after a growing wait
(``ready_probe_initial_s`` x1.5 up to ``ready_probe_max_s``), until its readiness deadline.
The first answer's key is the one the server prefers among ``ready_host_key_algs`` (OpenSSH's
order: ed25519 first); with ``ready_all_host_keys`` one more key exchange per other type reads the
VM's other host keys (a type the server lacks fails its negotiation and is skipped).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import asyncssh
import redis

from vmqueue.readiness import HostKey, ReadyWhen
from vmqueue.settings import Settings
from workers.backoff import exponential_backoff
from workers.lifecycle import JobRunner
from workers.readyqueue import ReadyQueue, ReadyTarget

log = logging.getLogger("vmqueue.worker")

EXECUTOR_THREADS = 16
SCAN_INTERVAL_S = 0.2
BANNER_MAX_LINES = 20  # how often the scanner claims due jobs
LEASE_MARGIN_S = 10.0  # a claimed job waits this long past a probe's timeout before another scanner takes it
PROBE_ERRORS = (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError)


async def ssh_banner(host: str, port: int, timeout_s: float) -> str:
    """The SSH version line the server at ``host:port`` sends on connect (RFC 4253 4.2: it may send
    other lines first). A cheap first probe: until sshd is up, this is one refused or unanswered
    TCP connect, where a key exchange attempt would cost the scanner a thousand times more CPU."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        for _ in range(BANNER_MAX_LINES):
            line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not line:
                break
            if line.startswith(b"SSH-"):
                return line.decode(errors="replace").strip()
    finally:
        writer.close()
    raise ConnectionError("the port answered, but with no SSH version line")


async def fetch_host_keys(
    host: str, port: int, algs: list[str], options: asyncssh.SSHClientConnectionOptions, timeout_s: float, every: bool
) -> list[HostKey]:
    """The host keys of the SSH server at ``host:port`` (asyncssh's key exchange): the one it prefers
    among ``algs`` and, with ``every``, those of the other types in ``algs`` too.

    Raises what a failed first key exchange raises (``OSError``, ``asyncssh.Error``, ``TimeoutError``):
    the server is not up. Later exchanges, one per remaining type, fail quietly for a type it lacks.
    """

    async def one(server_host_key_algs: list[str]) -> asyncssh.SSHKey | None:
        return await asyncio.wait_for(
            asyncssh.get_server_host_key(host, port, server_host_key_algs=server_host_key_algs, options=options),
            timeout_s,
        )

    first = await one(algs)
    if first is None:
        raise asyncssh.ConnectionLost("the server offered no host key")
    found = {first.get_algorithm(): first}
    rest = [a for a in algs if _key_type(a) not in found] if every else []
    for key in await asyncio.gather(*(one([a]) for a in rest), return_exceptions=True):
        if isinstance(key, asyncssh.SSHKey):
            found.setdefault(key.get_algorithm(), key)
    return [
        HostKey(type=k.get_algorithm(), sha256=k.get_fingerprint("sha256"), openssh=_openssh(k)) for k in found.values()
    ]


def _key_type(alg: str) -> str:
    # An RSA key is negotiated as rsa-sha2-256/512 but is an "ssh-rsa" key.
    return "ssh-rsa" if alg.startswith("rsa-sha2-") else alg


def _openssh(key: asyncssh.SSHKey) -> str:
    """``<type> <base64>``, the known_hosts form without a host name or comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


class ReadyScanner:
    """Probes the schedule's due jobs; settles each through the runner (which takes the job's lease)."""

    def __init__(self, runner: JobRunner, settings: Settings):
        self.runner = runner
        self.settings = settings
        self.queue = ReadyQueue(runner.store.redis)
        self.backoff = exponential_backoff(settings.ready_probe_initial_s, settings.ready_probe_max_s, 1.5)
        self.tries: dict[str, int] = {}  # per VM in this process: how many probes failed
        self.probes = 0  # probes sent by this process (benchmarks and tests read it)

    @functools.cache  # noqa: B019 - one scanner per process
    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        # Built once: asyncssh's options take milliseconds to build (config files, defaults). No
        # known_hosts: a probe reads the key, it trusts nothing; no client keys: it never logs in.
        timeout_s = self.settings.ready_probe_timeout_s
        return asyncssh.SSHClientConnectionOptions(
            known_hosts=None, client_keys=None, agent_path=None, connect_timeout=timeout_s, login_timeout=timeout_s
        )

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="vmq-ready-scanner", daemon=True)
        thread.start()
        return thread

    async def run(self, stop: asyncio.Event | None = None) -> None:
        # Job store calls run in threads: enough of them that settling hundreds of VMs at once (a
        # few Redis round trips each) does not queue behind the default executor's handful.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(EXECUTOR_THREADS, "vmq-ready"))
        in_flight: set[asyncio.Task] = set()
        lease_s = self.settings.ready_probe_timeout_s * (1 + len(self.settings.ready_host_key_algs)) + LEASE_MARGIN_S
        while stop is None or not stop.is_set():
            free = self.settings.ready_concurrency - len(in_flight)
            if free > 0:
                try:
                    claimed = await asyncio.to_thread(self.queue.claim, time.time(), free, lease_s)
                except redis.RedisError as exc:
                    log.warning("ready scanner: Redis unavailable (%s); retrying", exc)
                    claimed = []
                    await asyncio.sleep(1.0)
                for target in claimed:
                    task = asyncio.create_task(self._handle(target))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            await asyncio.sleep(SCAN_INTERVAL_S)

    async def _handle(self, target: ReadyTarget) -> None:
        try:
            now = time.time()
            if target.mode != ReadyWhen.ssh or now >= target.deadline:
                if not await asyncio.to_thread(self.runner.ready_due, target.job_id, now, target.deadline):
                    await asyncio.to_thread(self.queue.reschedule, target.job_id, now + 1.0)
                return
            self.probes += 1
            timeout_s = self.settings.ready_probe_timeout_s
            try:
                await ssh_banner(target.host, target.port, timeout_s)
                host_keys = await fetch_host_keys(
                    target.host,
                    target.port,
                    self.settings.ready_host_key_algs,
                    self._options(),
                    timeout_s,
                    self.settings.ready_all_host_keys,
                )
            except PROBE_ERRORS as exc:
                tries = self.tries.get(target.job_id, 0)
                self.tries[target.job_id] = tries + 1
                at = min(time.time() + self.backoff(tries), target.deadline)
                log.debug("job=%s ssh %s:%s not up (%s); next probe in %.1fs", target.job_id, target.host,
                          target.port, type(exc).__name__, at - time.time())  # fmt: skip
                await asyncio.to_thread(self.queue.reschedule, target.job_id, at)
                return
            self.tries.pop(target.job_id, None)
            if not await asyncio.to_thread(self.runner.ready_reached, target.job_id, host_keys):
                await asyncio.to_thread(self.queue.reschedule, target.job_id, time.time() + 0.5)
        except Exception:  # noqa: BLE001 - one job's bug must not stop the scanner; its lease brings it back
            log.exception("job=%s ready scanner step failed", target.job_id)
