"""The sim VMs' insides: a real sshd and a real cloud-init phone-home for every simulated VM.

``python -m workers.providers.simhost`` (REDIS_URL / VMQ_REDIS_URL as for the workers) follows the
simulated cloud in Redis (workers/providers/sim.py) and, for each VM that runs:

- from ``ssh_up_at_ms`` on (the VM's boot plus ``VMQ_SIM_SSH_DELAY_S``), an asyncssh server on
  the VM's public and private loopback addresses (127.88.x.y / 127.89.x.y) at its ``ssh_port``,
  with host keys generated for that VM (ed25519 and ECDSA P-256, as a fresh Ubuntu has besides RSA),
  whose public halves go in the VM's record (``host_keys``) so tests can compare;
- at ``cloud_init_done_at_ms``, if the VM's user-data asked for a ``phone_home``, the POST cloud-init's
  cc_phone_home makes: form-encoded ``pub_key_*``, ``instance_id``, ``hostname``, ``fqdn`` to its
  URL (``$INSTANCE_ID`` substituted), ``tries`` attempts 3 s apart.

A VM created with the fate ``unreachable`` (``VMQ_SIM_UNREACHABLE_RATE``) runs but does neither. The
servers close when the VM is deleted (seen within ``CHECK_S``). Only loopback targets are ever
contacted: a phone_home URL elsewhere is logged and skipped. Everything runs in one asyncio loop:
hundreds of VMs cost a few listening sockets each. The host looks for new VMs every ``POLL_S`` (one
round trip) and starts each one's sshd and phone-home on a timer at its moment, so a probe's lag is
the prober's, not the host's; every VM known is read again only every ``CHECK_S`` (a thousand VMs
cost Redis a thousand reads a second, not five).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncssh
import redis

from vmqueue.keys import SIM_PREFIX
from workers.providers.sim import VMS_KEY, _vm_key, sim_address

log = logging.getLogger("vmqueue.simhost")

POLL_S = 0.2  # how often the host looks for new VMs (each is set up seconds before its sshd starts)
CHECK_S = 1.0  # how often every VM known is looked at again for a deletion
NEXT_ID_KEY = f"{SIM_PREFIX}next_id"
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256")
PHONE_HOME_FIELDS = {"ssh-ed25519": "pub_key_ed25519", "ecdsa-sha2-nistp256": "pub_key_ecdsa", "ssh-rsa": "pub_key_rsa"}
PHONE_HOME_RETRY_S = 3.0  # cloud-init's sec_between for phone_home


@dataclass
class SimVM:
    instance_id: str
    record: dict[str, str]
    host_keys: list[asyncssh.SSHKey] = field(default_factory=list)
    servers: list[asyncssh.SSHAcceptor] = field(default_factory=list)
    timers: list[asyncio.Task] = field(default_factory=list)  # its sshd's start, its cloud-init's phone-home

    @property
    def number(self) -> int:
        return int(self.instance_id.removeprefix("sim-"))

    def at(self, name: str) -> float:
        return int(self.record[name]) / 1000


class SimHost:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self.vms: dict[str, SimVM] = {}
        self.next_id = 0  # the sim's next instance number as last read: lower means its state was wiped
        self.posts = 0  # phone-home POSTs answered 2xx

    async def run(self, stop: asyncio.Event | None = None) -> None:
        next_check = 0.0
        while stop is None or not stop.is_set():
            try:
                await self.step(check=time.time() >= next_check)
            except redis.RedisError as exc:
                log.warning("sim host: Redis unavailable (%s)", exc)
            else:
                next_check = next_check if time.time() < next_check else time.time() + CHECK_S
            await asyncio.sleep(POLL_S)
        for vm in list(self.vms.values()):
            self._close(vm)

    async def step(self, check: bool = True) -> None:
        """Follow the cloud: new VMs get their sshd and phone-home timed to the millisecond; with
        ``check`` (every ``CHECK_S``, and at once when the sim's ids went back: its state was wiped),
        every VM known is looked at again, and one deleted or replaced has its servers closed."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(VMS_KEY)
        pipe.get(NEXT_ID_KEY)
        members, next_id = pipe.execute()
        live = {_s(i) for i in members}
        next_id = int(next_id or 0)
        check = check or next_id < self.next_id
        self.next_id = next_id
        for instance_id in [i for i in self.vms if i not in live]:
            self._close(self.vms.pop(instance_id))
        if check:
            self._check_known()
        new = [i for i in live if i not in self.vms]
        pipe = self.redis.pipeline(transaction=False)
        for instance_id in new:
            pipe.hgetall(_vm_key(instance_id))
        for instance_id, record in zip(new, pipe.execute(), strict=True):
            record = {_s(k): _s(v) for k, v in record.items()}
            if record.get("ssh_up_at_ms"):  # else: a VM created before the sim knew about insides
                vm = self.vms[instance_id] = SimVM(instance_id, record)
                if record["fate"] == "ok" and not record.get("delete_at_ms"):
                    self._at(vm, vm.at("ssh_up_at_ms"), lambda vm=vm: self._start_sshd(vm))
                    self._at(vm, vm.at("cloud_init_done_at_ms"), lambda vm=vm: self._cloud_init(vm))

    def _check_known(self) -> None:
        known = list(self.vms)
        pipe = self.redis.pipeline(transaction=False)
        for instance_id in known:
            pipe.hmget(_vm_key(instance_id), "delete_at_ms", "created_ms")
        for instance_id, (delete_at, created) in zip(known, pipe.execute(), strict=True):
            if _s(created or "") != self.vms[instance_id].record["created_ms"]:
                self._close(self.vms.pop(instance_id))  # another VM under the same id: the sim's state was wiped
            elif delete_at is not None:
                self._close(self.vms[instance_id])  # deleted: known until it leaves the sim's set

    def _at(self, vm: SimVM, at: float, act: Callable[[], Awaitable[None]]) -> None:
        """Run ``act`` at epoch ``at`` (at once if past), unless the VM is closed first."""

        async def later() -> None:
            await asyncio.sleep(max(0.0, at - time.time()))
            await act()

        vm.timers.append(asyncio.create_task(later()))

    async def _cloud_init(self, vm: SimVM) -> None:
        phone_home = json.loads(vm.record.get("phone_home") or "null")
        if phone_home:
            self._keys(vm)
            await self._phone_home(vm, phone_home)

    def _keys(self, vm: SimVM) -> list[asyncssh.SSHKey]:
        """The VM's host keys, made on first use (first boot) and published in its record."""
        if not vm.host_keys:
            vm.host_keys = [asyncssh.generate_private_key(t) for t in HOST_KEY_TYPES]
            lines = [k.export_public_key("openssh").decode().strip() for k in vm.host_keys]
            self.redis.hset(_vm_key(vm.instance_id), "host_keys", json.dumps(lines))
        return vm.host_keys

    async def _start_sshd(self, vm: SimVM) -> None:
        keys = self._keys(vm)
        port = int(vm.record["ssh_port"])
        for public in (True, False):
            address = sim_address(vm.number, public)
            try:
                vm.servers.append(
                    await asyncssh.listen(address, port, server_host_keys=keys, reuse_address=True, login_timeout=10)
                )
            except OSError as exc:
                log.error("sim host: %s sshd on %s:%s failed: %s", vm.instance_id, address, port, exc)

    async def _phone_home(self, vm: SimVM, config: dict) -> None:
        url = (
            str(config.get("url", "")).replace("$INSTANCE_ID", vm.instance_id).replace("${INSTANCE_ID}", vm.instance_id)
        )
        host = urllib.parse.urlsplit(url).hostname or ""
        if not _loopback(host):
            log.error(
                "sim host: %s phone_home to %s skipped: the sim only calls loopback addresses", vm.instance_id, url
            )
            return
        public = {PHONE_HOME_FIELDS[k.get_algorithm()]: k.export_public_key("openssh").decode() for k in vm.host_keys}
        values = {**public, "instance_id": vm.instance_id, "hostname": vm.record["name"], "fqdn": vm.record["name"]}
        post = config.get("post", "all")
        names = list(PHONE_HOME_FIELDS.values()) + ["instance_id", "hostname", "fqdn"] if post == "all" else post
        body = urllib.parse.urlencode({name: values.get(name, "N/A") for name in names}).encode()
        for attempt in range(int(config.get("tries", 10))):
            if attempt:
                await asyncio.sleep(PHONE_HOME_RETRY_S)
            try:
                status = await asyncio.to_thread(_post, url, body)
            except OSError as exc:
                log.info("sim host: %s phone_home attempt %d failed: %s", vm.instance_id, attempt + 1, exc)
                continue
            if 200 <= status < 300:
                self.posts += 1
                return
            log.info("sim host: %s phone_home attempt %d: HTTP %d", vm.instance_id, attempt + 1, status)

    def _close(self, vm: SimVM) -> None:
        for timer in vm.timers:
            timer.cancel()
        for server in vm.servers:
            server.close()
        vm.servers.clear()


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Cloud-Init/sim"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback only, checked
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main() -> None:
    from vmqueue.connection import connect
    from vmqueue.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    host = SimHost(connect(get_settings()))
    log.info("sim host: following the simulated cloud")
    asyncio.run(host.run())


if __name__ == "__main__":
    main()
