"""Readiness benchmark: 1,000 creates with ready_when=ssh on the sim, one worker process.

The sim's VMs boot in ``--boot`` seconds and their sshd (played by the sim host, a real asyncssh
server per VM on a loopback address) answers ``--sshd-delay`` seconds later. Printed:

- ratio: time from the first enqueue until every job is ``ready`` ÷ (boot + sshd delay); goal <= 1.25;
- provider API calls per VM for ``ready_when=ssh`` and, measured in the same run with the same
  worker, for ``ready_when=running`` (the baseline): the SSH probes must cost none.

    python -m bench.ready                 # the issue's figure: 1,000 VMs, 20 s boot, sshd 5 s later
    python -m bench.ready --vms 50 --boot 2 --sshd-delay 1   # a quick run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker, free_port, sim_spec
from bench.probes import wait_for


class SimHostProcess:
    """``python -m workers.providers.simhost``: the sim VMs' sshd and cloud-init, in a process of its own."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.log_path = log_dir / f"simhost-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.providers.simhost"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_s(self) -> float:
        """CPU time (user + system) the process has used so far (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def run_batch(provisioner, client: redis.Redis, key: str, n: int, ready_when: str, port: int, timeout_s: float):
    """Enqueue ``n`` creates and wait until all finished; returns (seconds, jobs, API calls)."""
    before = sum(int(v) for k, v in client.hgetall("vmq:sim:calls").items() if ":" not in k)
    start = time.monotonic()
    prefix = ready_when.replace("_", "-")
    ids = [
        provisioner.create_vm(sim_spec(f"{prefix}-{i}"), key, ready_when=ready_when, ssh_port=port).id for i in range(n)
    ]

    def all_finished():
        raws = client.mget([f"vmq:job:{i}" for i in ids])
        return all(raw and ('"state":"ready"' in raw or '"state":"failed"' in raw or
                            (ready_when == "running" and '"state":"running"' in raw)) for raw in raws)  # fmt: skip

    wait_for(all_finished, timeout_s, f"{n} {ready_when} jobs", every_s=0.2)
    elapsed = time.monotonic() - start
    jobs = [provisioner.get_job(i) for i in ids]
    after = sum(int(v) for k, v in client.hgetall("vmq:sim:calls").items() if ":" not in k)
    return elapsed, jobs, after - before


def main() -> None:
    parser = argparse.ArgumentParser(description="ready_when=ssh at scale on the sim")
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--boot", type=float, default=20.0)
    parser.add_argument("--sshd-delay", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64, help="the worker's pool threads")
    args = parser.parse_args()

    from producer.client import Provisioner
    from tests.providers.contract import make_ed25519_key
    from vmqueue.settings import Settings

    server = RedisServer(aof=False)
    server.start()
    log_dir = Path(tempfile.mkdtemp(prefix="vmq-bench-ready-"))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VMQ_", "REDIS_URL"))},
        "REDIS_URL": server.url,
        "PYTHONPATH": str(ROOT),
        "VMQ_SIM_BOOT_S": str(args.boot),
        "VMQ_SIM_SSH_DELAY_S": str(args.sshd_delay),
        "VMQ_SIM_SSH_PORT": str(port),
        "VMQ_DEADLINE_S": "600",
    }
    client = redis.Redis.from_url(server.url, decode_responses=True)
    host = SimHostProcess(env, log_dir)
    worker = Worker("sim", env, args.concurrency, log_dir, loglevel="WARNING", events=False)
    try:
        worker.wait_ready(60)
        provisioner = Provisioner(Settings(redis_url=server.url))
        key = make_ed25519_key()
        timeout = 10 * (args.boot + args.sshd_delay) + 120
        t_run, running_jobs, calls_run = run_batch(provisioner, client, key, args.vms, "running", port, timeout)
        t_ssh, ssh_jobs, calls_ssh = run_batch(provisioner, client, key, args.vms, "ssh", port, timeout)
        ready = [j for j in ssh_jobs if j.state == "ready"]
        keyed = sum(1 for j in ready if j.host_keys)
        base = args.boot + args.sshd_delay
        print(f"VMs: {args.vms}  boot {args.boot:.0f}s  sshd +{args.sshd_delay:.0f}s  one worker process")
        print(f"ready_when=running: all running after {t_run:.1f}s ({t_run / args.boot:.2f} x boot)")
        print(f"ready_when=ssh: {len(ready)}/{args.vms} ready ({keyed} with host keys) after {t_ssh:.1f}s")
        print(f"ratio (time until all ready / (boot + sshd delay)): {t_ssh / base:.3f}   goal <= 1.25")
        print(f"provider API calls per VM: running {calls_run / args.vms:.2f}, ssh {calls_ssh / args.vms:.2f}")
        if ready:
            start = min(j.created_at for j in ssh_jobs)
            running = sorted((j.running_at - start).total_seconds() for j in ready)
            waits = sorted((j.ready_at - j.running_at).total_seconds() for j in ready)
            p50, p95 = waits[len(waits) // 2], waits[int(len(waits) * 0.95)]
            print(f"ssh batch: last running at +{running[-1]:.1f}s; running -> ready p50 {p50:.1f}s")
            print(f"  p95 {p95:.1f}s max {waits[-1]:.1f}s (sshd delay {args.sshd_delay:.0f}s)")
        print(f"CPU seconds: worker {worker.cpu_s():.1f}, sim host {host.cpu_s():.1f}")
    finally:
        worker.stop()
        host.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
