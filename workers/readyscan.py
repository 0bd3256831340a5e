"""The SSH readiness scanner: one asyncio loop per worker process probes every VM waiting for SSH.

It runs in a thread of its own beside Celery's pool, so waiting for sshd holds no worker slot, and
a probe costs no provider API call (the address came with the running VM's read). It shares the
worker process (and its GIL) with the intake, so a probe that finds nothing must cost next to
nothing:

- **Claimed once, probed from memory.** The scanner claims due entries of the shared schedule
  (workers/readyqueue.py) every ``CLAIM_INTERVAL_S`` and keeps the SSH ones in memory (at most
  ``HOLD_PER_SLOT`` x ``ready_concurrency``), probing each on its own schedule; one round trip every
  third of a lease renews all their leases. A probe that finds nothing costs no Redis round trip and
  no thread hop. A scanner that dies (or stalls past the lease) hands its entries on when the lease ends.
- **Cheap probes, one connection.** A probe is a non-blocking TCP connect begun in the scanner's
  loop (``begin_connect``): refused at once (a local address; the socket's pending error says so)
  it ends there, with no task, future or timer; pending (a remote address), it is finished in a
  task. Once the port accepts, the probe peeks at the server's first line: an SSH version line
  (RFC 4253 4.2; other lines before it are read and dropped) hands the same socket to asyncssh's
  ``get_server_host_key``, a real key exchange whose host key is what the job records. The key
  exchange is offered curve25519/ECDH only (``PROBE_KEX_ALGS``): the probe sends no secret, so
  post-quantum hybrids only cost CPU on both ends; the host key's signature is checked all the same.
- **A schedule that follows the wait.** A VM that does not answer is probed again after a tenth of
  the time it has waited since it was seen running (``WAIT_SHARE``), at least ``ready_probe_initial_s``
  and at most ``ready_probe_max_s``, jittered, until its readiness deadline: an sshd that comes up
  T seconds after running is found within about T/10 (never later than the cap), and a VM that
  never answers is probed less and less often. At most ``ready_concurrency`` probes are in flight.
- **Settled in batches.** Answered VMs are settled ``ready`` in batches of up to ``SETTLE_BATCH``,
  one executor call each (workers/lifecycle/ready.py ``ready_reached``: three round trips per job,
  the schedule's bookkeeping shared).

The first answer's key is the one the server prefers among ``ready_host_key_algs`` (OpenSSH's
order: ed25519 first); with ``ready_all_host_keys`` one more key exchange per other type reads the
VM's other host keys (a type the server lacks fails its negotiation and is skipped).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import heapq
import ipaddress
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import asyncssh
import redis

from vmqueue.readiness import HostKey, ReadyWhen
from vmqueue.settings import Settings
from workers.lifecycle import JobRunner
from workers.readyqueue import ReadyQueue, ReadyTarget

log = logging.getLogger("vmqueue.worker")

EXECUTOR_THREADS = 8  # Redis calls of the scanner: claims, renewals, settle batches, deadlines
CLAIM_INTERVAL_S = 0.2  # how often the scanner claims due entries of the shared schedule
PROBE_TICK_S = 0.05  # probes due within one tick start together
HOLD_PER_SLOT = 16  # SSH entries held in memory per probe slot (ready_concurrency)
LEASE_MARGIN_S = 10.0  # a claimed job waits this long past a probe's timeout before another scanner takes it
SETTLE_BATCH = 32  # answered VMs settled per executor call
SETTLE_RETRY_S = 0.5  # a job whose lease was busy is settled again after this
SWITCH_INTERVAL_S = 0.0005  # the worker process's GIL switch interval once its scanner runs (CPython: 0.005)
WAIT_SHARE = 0.1  # the wait before the next probe: this share of the wait so far (within the settings' bounds)
BANNER_MAX_LINES = 20  # lines a server may send before its SSH version line
BANNER_MAX_BYTES = 255  # one line's limit (RFC 4253 4.2)
# curve25519 first (OpenSSH >= 6.5), ECDH and DH group14 for servers without it.
PROBE_KEX_ALGS = [
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "diffie-hellman-group14-sha256",
]
PROBE_ERRORS = (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError)
REFUSED_AT_ONCE = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)  # connect_ex's answers that end a probe


def probe_wait(
    initial_s: float, cap_s: float, share: float = WAIT_SHARE, jitter: float = 0.2
) -> Callable[[float], float]:
    """The wait before probing again a VM that has not answered for ``waited_s``: ``share`` of that
    wait, within ``[initial_s, cap_s]``, spread by +-``jitter`` so a batch of VMs does not probe in step."""

    def wait(waited_s: float) -> float:
        return min(cap_s, max(initial_s, share * waited_s)) * random.uniform(1 - jitter, 1 + jitter)

    return wait


def begin_connect(host: str, port: int) -> tuple[socket.socket, int]:
    """A non-blocking TCP connect to ``host:port`` (an IP address) begun: the socket and the errno
    ``connect_ex`` gave, or the socket's pending error. ``EINPROGRESS`` (a remote address) is
    finished by ``open_ssh``; a local address is often refused (``ECONNREFUSED``) there and then,
    which the scanner takes without ever entering the event loop."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:  # a local refusal is often known by now: the socket says so
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or err
        return sock, err
    except BaseException:
        sock.close()
        raise


async def open_ssh(host: str, port: int, begun: tuple[socket.socket, int] | None = None) -> socket.socket:
    """A socket connected to ``host:port`` whose server has begun its SSH version line, not yet read.

    Until sshd is up this is one refused (or unanswered) non-blocking connect: no stream objects, no
    key exchange. Lines a server sends before its version line (RFC 4253 4.2) are read and dropped.
    ``begun``: the connect ``begin_connect`` started. Raises ``OSError`` (``ConnectionError`` when
    the port answers with something other than SSH). The caller bounds the time
    (``asyncio.timeout``) and owns the socket.
    """
    loop = asyncio.get_running_loop()
    if begun is None:
        if not _is_ip(host):  # a name: resolved without blocking the loop
            host = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0][4][0]
        begun = begin_connect(host, port)
    sock, err = begun
    try:
        if err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            await loop.sock_connect(sock, (host, port))  # waits for the connect begun to end
        elif err:
            raise OSError(err, os.strerror(err))
        for _ in range(BANNER_MAX_LINES):
            data = await _peek(loop, sock)
            if data.startswith(b"SSH-"):
                return sock
            end = data.find(b"\n")
            if end < 0:
                if len(data) >= BANNER_MAX_BYTES:
                    break
                await asyncio.sleep(PROBE_TICK_S)  # a line in pieces: wait for the rest
                continue
            sock.recv(end + 1)  # a line before the version line: dropped
        raise ConnectionError("the port answered, but with no SSH version line")
    except BaseException:
        sock.close()
        raise


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """What the socket has received so far, left unread; ``ConnectionError`` when it was closed."""
    readable = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    data = sock.recv(BANNER_MAX_BYTES * BANNER_MAX_LINES, socket.MSG_PEEK)
    if not data:
        raise ConnectionError("the port answered, but with no SSH version line")
    return data


async def probe_ssh(
    host: str,
    port: int,
    algs: list[str],
    options: asyncssh.SSHClientConnectionOptions,
    timeout_s: float,
    every: bool,
    begun: tuple[socket.socket, int] | None = None,
) -> list[HostKey]:
    """The host keys of the SSH server at ``host:port``: the one it prefers among ``algs`` (its key
    exchange runs on the connection ``open_ssh`` opened) and, with ``every``, those of the other
    types in ``algs`` too (one more connection and key exchange each).

    Raises what a failed connect, version line or first key exchange raises (``OSError``,
    ``asyncssh.Error``, ``TimeoutError``): the server is not up. Later exchanges fail quietly for a type
    it lacks. ``begun``: the connect ``begin_connect`` started.
    """
    async with asyncio.timeout(timeout_s):
        sock = await open_ssh(host, port, begun)
        try:
            first = await _host_key(host, port, algs, options, sock)
        finally:
            sock.close()  # asyncssh closed it already, or never took it
    if first is None:
        raise asyncssh.ConnectionLost("the server offered no host key")
    found = {first.get_algorithm(): first}
    rest = [a for a in algs if _key_type(a) not in found] if every else []

    async def one(alg: str) -> asyncssh.SSHKey | None:
        async with asyncio.timeout(timeout_s):
            return await _host_key(host, port, [alg], options)

    for key in await asyncio.gather(*(one(a) for a in rest), return_exceptions=True):
        if isinstance(key, asyncssh.SSHKey):
            found.setdefault(key.get_algorithm(), key)
    return [
        HostKey(type=k.get_algorithm(), sha256=k.get_fingerprint("sha256"), openssh=_openssh(k)) for k in found.values()
    ]


async def _host_key(
    host: str,
    port: int,
    algs: list[str],
    options: asyncssh.SSHClientConnectionOptions,
    sock: socket.socket | None = None,
) -> asyncssh.SSHKey | None:
    # config=None: the worker user's ~/.ssh/config (a ProxyCommand, say) has no say in a probe.
    return await asyncssh.get_server_host_key(
        host, port, sock=sock, server_host_key_algs=algs, kex_algs=PROBE_KEX_ALGS, config=None, options=options
    )


def favour_io_threads(on: bool = True, default_s: float = 0.005) -> None:
    """Lower the process's GIL switch interval to ``SWITCH_INTERVAL_S`` (never raise it); ``on=False``
    puts ``default_s`` (the interval the process had) back.

    Only while the scanner probes: a 0.5 ms interval hands the GIL around ten times as often, which
    cost the worker's intake CPU (bench.ready at 1,000 VMs: 38 -> 46 s of worker CPU) when nothing
    needs it (a batch of ``ready_when=running`` creates).

    The scanner's loop gives the GIL up at every system call (a key exchange makes dozens) and must
    win it back each time from the worker's busy threads: at CPython's default 5 ms, one CPU-bound
    thread beside it stretched key exchanges to seconds (300 VMs: readiness lag p50 11.5 s at 5 ms,
    1.05 s at 1 ms, 0.47 s at 0.5 ms; /tmp harness, one busy thread).
    """
    want = min(default_s, SWITCH_INTERVAL_S) if on else default_s
    if sys.getswitchinterval() != want:
        sys.setswitchinterval(want)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` at the OS level too (Linux, 15 bytes), so ``top -H``, py-spy
    and the readiness benchmark (which reads ``/proc/<pid>/task/*/comm``) can tell its CPU apart."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, on the thread that calls it
    except (OSError, AttributeError):  # not Linux: the name is only a convenience
        pass


def _key_type(alg: str) -> str:
    # An RSA key is negotiated as rsa-sha2-256/512 but is an "ssh-rsa" key.
    return "ssh-rsa" if alg.startswith("rsa-sha2-") else alg


def _openssh(key: asyncssh.SSHKey) -> str:
    """``<type> <base64>``, the known_hosts form without a host name or comment."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


@dataclass
class _Held:
    """An SSH entry this scanner claimed and probes from memory."""

    target: ReadyTarget
    lease: float  # the entry's score in the schedule as this scanner last wrote it (its lease's end)
    since: float  # epoch s the wait counts from: the VM seen running (else the claim)
    next_at: float = 0.0  # epoch s of the next probe

    @functools.cached_property
    def literal(self) -> bool:
        """Its address is an IP address: a connect can begin without a name lookup."""
        return _is_ip(self.target.host or "")


class ReadyScanner:
    """Probes the schedule's due jobs; settles each through the runner (which takes the job's lease)."""

    def __init__(self, runner: JobRunner, settings: Settings):
        self.runner = runner
        self.settings = settings
        self.queue = ReadyQueue(runner.store.redis)
        self.wait = probe_wait(settings.ready_probe_initial_s, settings.ready_probe_max_s)
        self.lease_s = settings.ready_probe_timeout_s * (1 + len(settings.ready_host_key_algs)) + LEASE_MARGIN_S
        self.held: dict[str, _Held] = {}  # job id -> entry probed from memory
        self._switch_s = sys.getswitchinterval()  # the process's own, put back while nothing is probed
        self.probes = 0  # probes sent by this process (benchmarks and tests read it)
        self._due: list[tuple[float, str]] = []  # (next probe at, job id), a heap; stale pairs skipped
        self._in_flight = 0
        self._answered: dict[str, list[HostKey]] = {}  # job id -> host keys, waiting to be settled
        self._settling = 0
        self._tasks: set[asyncio.Task] = set()

    @functools.cache  # noqa: B019 - one scanner per process
    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        # Built once: asyncssh's options take milliseconds to build (config files, defaults). No
        # known_hosts: a probe reads the key, it trusts nothing; no client keys: it never logs in.
        timeout_s = self.settings.ready_probe_timeout_s
        return asyncssh.SSHClientConnectionOptions(
            config=None,
            known_hosts=None,
            client_keys=None,
            agent_path=None,
            connect_timeout=timeout_s,
            login_timeout=timeout_s,
        )

    def start(self) -> threading.Thread:
        def main() -> None:
            name_os_thread("vmq-ready-scan")
            asyncio.run(self.run())

        thread = threading.Thread(target=main, name="vmq-ready-scan", daemon=True)
        thread.start()
        return thread

    async def run(self, stop: asyncio.Event | None = None) -> None:
        # Redis calls run in threads of the scanner's own (named for the OS: their CPU is told apart).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(EXECUTOR_THREADS, "vmq-ready-io", name_os_thread, ("vmq-ready-io",))
        )
        next_claim = next_renew = 0.0
        while stop is None or not stop.is_set():
            now = time.time()
            try:
                if now >= next_renew:
                    next_renew = now + self.lease_s / 3
                    await self._renew(now)
                if now >= next_claim:
                    next_claim = now + CLAIM_INTERVAL_S
                    await self._claim(now)
            except redis.RedisError as exc:
                log.warning("ready scanner: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
            self._start_due(time.time())
            self._settle_answered()
            favour_io_threads(bool(self.held), self._switch_s)
            await asyncio.sleep(PROBE_TICK_S)

    async def _claim(self, now: float) -> None:
        room = self.settings.ready_concurrency * HOLD_PER_SLOT - len(self.held)
        if room <= 0:
            return
        lease = now + self.lease_s
        for target in await asyncio.to_thread(self.queue.claim, now, room, lease):
            if target.mode != ReadyWhen.ssh:
                self._spawn(self._look(target))
            elif held := self.held.get(target.job_id):
                held.lease = lease  # its lease lapsed (a stall) and this scanner claimed it back
            else:
                held = _Held(target, lease, since=target.since or now)
                self.held[target.job_id] = held
                self._probe_at(held, now)

    async def _renew(self, now: float) -> None:
        if not self.held:
            return
        lease = now + self.lease_s
        kept = set(await asyncio.to_thread(self.queue.renew, {i: h.lease for i, h in self.held.items()}, lease))
        for job_id in list(self.held):
            if job_id in kept:
                self.held[job_id].lease = lease
            elif job_id not in self._answered:  # settled meanwhile, or another scanner's now
                del self.held[job_id]

    def _probe_at(self, held: _Held, at: float) -> None:
        held.next_at = min(at, held.target.deadline)
        heapq.heappush(self._due, (held.next_at, held.target.job_id))

    def _start_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and self._in_flight < self.settings.ready_concurrency:
            at, job_id = heapq.heappop(self._due)
            held = self.held.get(job_id)
            if held is None or held.next_at != at:
                continue  # let go, or rescheduled since
            begun = None
            if now < held.target.deadline and held.literal:
                # The connect starts here; refused at once (a local address), the probe ends here too.
                try:
                    begun = begin_connect(held.target.host, held.target.port)
                except OSError:
                    begun = None  # the async probe meets the same error and reschedules
                if begun is not None and begun[1] in REFUSED_AT_ONCE:
                    begun[0].close()
                    self.probes += 1
                    self._probe_at(held, now + self.wait(now - held.since))
                    continue
            self._in_flight += 1
            self._spawn(self._probe(held, begun))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, held: _Held, begun: tuple[socket.socket, int] | None = None) -> None:
        target = held.target
        try:
            if time.time() >= target.deadline:
                self.held.pop(target.job_id, None)
                await self._look(target)
                return
            self.probes += 1
            try:
                host_keys = await probe_ssh(
                    target.host,
                    target.port,
                    self.settings.ready_host_key_algs,
                    self._options(),
                    self.settings.ready_probe_timeout_s,
                    self.settings.ready_all_host_keys,
                    begun,
                )
            except PROBE_ERRORS as exc:
                now = time.time()
                wait = self.wait(now - held.since)
                log.debug("job=%s ssh %s:%s not up (%s); next probe in %.1fs", target.job_id, target.host,
                          target.port, type(exc).__name__, wait)  # fmt: skip
                self._probe_at(held, now + wait)
                return
            self._answered[target.job_id] = host_keys
            self._settle_answered()  # at once; answers that come while batches are settling wait for the next
        except Exception:  # noqa: BLE001 - one job's bug must not stop the scanner; its lease brings it back
            log.exception("job=%s ready scanner step failed", target.job_id)
            self.held.pop(target.job_id, None)
        finally:
            self._in_flight -= 1

    def _settle_answered(self) -> None:
        """Hand the answered VMs to the runner in batches (a few executor calls at once)."""
        while self._answered and self._settling < EXECUTOR_THREADS // 2:
            batch = dict(list(self._answered.items())[:SETTLE_BATCH])
            for job_id in batch:
                del self._answered[job_id]
            self._settling += 1
            self._spawn(self._settle(batch))

    async def _settle(self, batch: dict[str, list[HostKey]]) -> None:
        try:
            busy = set(await asyncio.to_thread(self.runner.ready_reached, batch))
        except Exception:  # noqa: BLE001 - Redis down, or a bug: each job is settled again shortly
            log.exception("ready scanner: settling %d jobs failed; retrying", len(batch))
            busy = set(batch)
        finally:
            self._settling -= 1
        for job_id, host_keys in batch.items():
            if job_id in busy:
                asyncio.get_running_loop().call_later(SETTLE_RETRY_S, self._answered.setdefault, job_id, host_keys)
            else:
                self.held.pop(job_id, None)

    async def _look(self, target: ReadyTarget) -> None:
        """An entry the scanner does not probe: cloud-init's (settled by the HTTP API, or waiting for
        its deadline), or one past its deadline."""
        try:
            now = time.time()
            if not await asyncio.to_thread(self.runner.ready_due, target.job_id, now, target.deadline):
                await asyncio.to_thread(self.queue.reschedule, target.job_id, now + 1.0)
        except Exception:  # noqa: BLE001 - one job's bug must not stop the scanner; its lease brings it back
            log.exception("job=%s ready scanner step failed", target.job_id)
