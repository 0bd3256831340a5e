"""Readiness benchmark: 1,000 creates with ready_when=ssh on the sim, one worker process.

The sim's VMs boot in ``--boot`` seconds and their sshd (played by the sim host, a real asyncssh
server per VM on a loopback address) answers ``--sshd-delay`` seconds later. Printed:

- ratio: time from the first enqueue until every job is ``ready`` ÷ (boot + sshd delay); goal <= 1.25;
- provider API calls per VM for ``ready_when=ssh`` and, measured in the same run with the same
  worker, for ``ready_when=running`` (the baseline): the SSH probes must cost none;
- the readiness lag per VM: its job's ``ready_at`` minus the moment its sshd came up (the sim's
  ``ssh_up_at_ms``: boot + sshd delay), p50/p95/max, and the scanner's own part of it (from the
  later of sshd up and the job running: a job is probed only once the tick saw its VM run), beside
  how long after its boot the tick saw each VM running; what is left of the ratio is the running part;
- the worker CPU the readiness scanner's threads (``vmq-ready-*``, named at the OS level) used while
  the batch's creates were still being taken in (until no job is ``queued``/``submitting``) and in
  all, beside the whole worker's: the scanner shares the process (and its GIL) with the intake.

    python -m bench.ready                 # the issue's figure: 1,000 VMs, 20 s boot, sshd 5 s later
    python -m bench.ready --vms 50 --boot 2 --sshd-delay 1   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker, free_port, sim_spec
from bench.probes import wait_for


def thread_cpu_s(pid: int, prefix: str) -> float:
    """CPU time (user + system) the threads of ``pid`` whose OS name starts with ``prefix`` have used (Linux)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith(prefix):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class CPUWindow:
    """CPU seconds of the worker and of its readiness scanner threads, read at marked moments."""

    def __init__(self, pid: int):
        self.pid = pid
        self.marks: dict[str, tuple[float, float]] = {}

    def mark(self, name: str) -> None:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        whole = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        self.marks[name] = (whole, thread_cpu_s(self.pid, "vmq-ready"))

    def between(self, start: str, end: str) -> tuple[float, float]:
        """(worker, scanner threads) CPU seconds from mark ``start`` to mark ``end``."""
        (w0, s0), (w1, s1) = self.marks[start], self.marks[end]
        return w1 - w0, s1 - s0


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


def _state(raw: str) -> str:
    """A job record's state without a parse (the watcher must not take the CPU the worker under test
    needs): the record's first "state" is the job's own (Job's fields: id, kind, provider, state, ...)."""
    return raw.split('"state":"', 1)[1].split('"', 1)[0]


def run_batch(
    provisioner, client: redis.Redis, key: str, n: int, ready_when: str, port: int, timeout_s: float, cpu: CPUWindow
):
    """Enqueue ``n`` creates and wait until all finished; returns (seconds, jobs, API calls, intake seconds).

    ``cpu`` is marked at the start, when the intake is over (no job queued or submitting any more)
    and at the end."""
    before = sum(int(v) for k, v in client.hgetall("vmq:sim:calls").items() if ":" not in k)
    cpu.mark(f"{ready_when}:start")
    start = time.monotonic()
    intake: list[float] = []
    prefix = ready_when.replace("_", "-")
    requests = (
        {"spec": sim_spec(f"{prefix}-{i}"), "ssh_key": key, "ready_when": ready_when, "ssh_port": port}
        for i in range(n)
    )
    ids = [job.id for job in provisioner.create_vms(requests)]  # one batch, as bench/inflight.py enqueues

    def all_finished():
        raws = client.mget([f"vmq:job:{i}" for i in ids])
        if not intake and not any(raw and _state(raw) in ("queued", "submitting") for raw in raws):
            cpu.mark(f"{ready_when}:intake")
            intake.append(time.monotonic() - start)
        done = ("ready", "failed", "running") if ready_when == "running" else ("ready", "failed")
        return all(raw and _state(raw) in done for raw in raws)

    wait_for(all_finished, timeout_s, f"{n} {ready_when} jobs", every_s=0.2)
    elapsed = time.monotonic() - start
    cpu.mark(f"{ready_when}:end")
    if not intake:
        cpu.mark(f"{ready_when}:intake")
        intake.append(elapsed)
    jobs = [provisioner.get_job(i) for i in ids]
    after = sum(int(v) for k, v in client.hgetall("vmq:sim:calls").items() if ":" not in k)
    return elapsed, jobs, after - before, intake[0]


def vm_times(client: redis.Redis, jobs) -> dict[str, tuple[float, float]]:
    """Job id -> (when its VM booted, when the sim host's sshd for it came up: boot + sshd delay), epoch s."""
    with_vm = [j for j in jobs if j.instance_id]
    pipe = client.pipeline(transaction=False)
    for job in with_vm:
        pipe.hmget(f"vmq:sim:vm:{job.instance_id}", "boot_at_ms", "ssh_up_at_ms")
    return {
        j.id: (int(boot) / 1000, int(up) / 1000)
        for j, (boot, up) in zip(with_vm, pipe.execute(), strict=True)
        if boot and up
    }


def spread(values: list[float]) -> dict[str, float]:
    """p50, p95 and max of ``values`` (seconds)."""
    values = sorted(values)
    return {"p50": values[len(values) // 2], "p95": values[int(len(values) * 0.95)], "max": values[-1]}


def quantiles(values: dict[str, float]) -> str:
    return f"p50 {values['p50']:.2f}s p95 {values['p95']:.2f}s max {values['max']:.2f}s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ready",
        description="ready_when=ssh at scale on the sim: time until all ready / (boot + sshd delay), goal <= 1.25",
    )
    parser.add_argument("--vms", type=int, default=1000, help="create jobs per batch (default 1000)")
    parser.add_argument("--boot", type=float, default=20.0, help="simulated boot time, s (default 20)")
    parser.add_argument(
        "--sshd-delay", type=float, default=5.0, help="s from boot until the sim host's sshd answers (default 5)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="the worker's pool threads")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser.parse_args(argv)


def ready_figures(
    args: argparse.Namespace,
    running: tuple[float, int],
    ssh: tuple[float, int, float],
    ssh_jobs: list,
    times: dict[str, tuple[float, float]],
    cpu: dict[str, float],
) -> dict:
    """The run's figures as one JSON-able object: ``running`` (seconds, API calls) of the
    ready_when=running batch, ``ssh`` (seconds, API calls, intake seconds) of the ssh batch, its jobs,
    ``times`` from ``vm_times`` and ``cpu`` (CPU seconds by name, from ``CPUWindow`` and the processes)."""
    (t_run, calls_run), (t_ssh, calls_ssh, t_intake) = running, ssh
    ready = [j for j in ssh_jobs if j.state == "ready"]
    base = args.boot + args.sshd_delay
    figures: dict = {
        "vms": args.vms,
        "boot_s": args.boot,
        "sshd_delay_s": args.sshd_delay,
        "concurrency": args.concurrency,
        "running": {"wall_s": t_run, "x_boot": t_run / args.boot, "calls_per_vm": calls_run / args.vms},
        "ssh": {
            "wall_s": t_ssh,
            "ready": len(ready),
            "with_host_keys": sum(1 for j in ready if j.host_keys),
            "calls_per_vm": calls_ssh / args.vms,
            "intake_s": t_intake,
        },
        "ratio": t_ssh / base,
        "goal": 1.25,
        "last_sshd_up_s": None,
        "last_ready_s": None,
        "seen_running_after_boot_s": None,  # the tick
        "readiness_lag_s": None,  # ready_at - sshd up
        "scanner_lag_s": None,  # ready_at - the later of sshd up and running: the scanner's own part
        "cpu_s": {
            **cpu,
            "readiness_ms_per_vm": cpu["batch_readiness_threads"] / args.vms * 1000,
        },
    }
    timed = [j for j in ready if j.id in times]
    if timed:
        start = min(j.created_at for j in ssh_jobs).timestamp()
        figures["last_sshd_up_s"] = max(times[j.id][1] for j in timed) - start
        figures["last_ready_s"] = max(j.ready_at.timestamp() for j in ready) - start
        figures["seen_running_after_boot_s"] = spread([j.running_at.timestamp() - times[j.id][0] for j in timed])
        figures["readiness_lag_s"] = spread([j.ready_at.timestamp() - times[j.id][1] for j in timed])
        figures["scanner_lag_s"] = spread(
            [j.ready_at.timestamp() - max(times[j.id][1], j.running_at.timestamp()) for j in timed]
        )
    return figures


def report(f: dict) -> list[str]:
    """The figures as the lines the benchmark prints."""
    run, ssh, cpu, base = f["running"], f["ssh"], f["cpu_s"], f["boot_s"] + f["sshd_delay_s"]
    lines = [
        f"VMs: {f['vms']}  boot {f['boot_s']:.0f}s  sshd +{f['sshd_delay_s']:.0f}s  one worker process",
        f"ready_when=running: all running after {run['wall_s']:.1f}s ({run['x_boot']:.2f} x boot)",
        f"ready_when=ssh: {ssh['ready']}/{f['vms']} ready ({ssh['with_host_keys']} with host keys)"
        f" after {ssh['wall_s']:.1f}s",
        f"ratio (time until all ready / (boot + sshd delay)): {f['ratio']:.3f}   goal <= {f['goal']}",
        f"provider API calls per VM: running {run['calls_per_vm']:.2f}, ssh {ssh['calls_per_vm']:.2f}",
    ]
    if f["readiness_lag_s"] is not None:
        lines += [
            f"ssh batch: last sshd up at +{f['last_sshd_up_s']:.1f}s ({f['last_sshd_up_s'] / base:.3f} x), "
            f"last ready at +{f['last_ready_s']:.1f}s",
            f"  running seen after boot (the tick): {quantiles(f['seen_running_after_boot_s'])}",
            f"  readiness lag (ready_at - sshd up): {quantiles(f['readiness_lag_s'])}",
            f"  scanner's lag (ready_at - later of sshd up and running): {quantiles(f['scanner_lag_s'])}",
        ]
    return [
        *lines,
        f"worker CPU during the ssh batch's intake ({ssh['intake_s']:.1f}s): {cpu['intake_worker']:.2f}s, "
        f"of which readiness threads {cpu['intake_readiness_threads']:.2f}s",
        f"worker CPU over the ssh batch: {cpu['batch_worker']:.2f}s, of which readiness threads "
        f"{cpu['batch_readiness_threads']:.2f}s ({cpu['readiness_ms_per_vm']:.1f} ms per VM)",
        f"CPU seconds: worker {cpu['worker_total']:.1f}, sim host {cpu['sim_host_total']:.1f}",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

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
        cpu = CPUWindow(worker.process.pid)
        t_run, _, calls_run, _ = run_batch(provisioner, client, key, args.vms, "running", port, timeout, cpu)
        t_ssh, ssh_jobs, calls_ssh, t_intake = run_batch(provisioner, client, key, args.vms, "ssh", port, timeout, cpu)
        times = vm_times(client, [j for j in ssh_jobs if j.state == "ready"])
        intake_worker, intake_scan = cpu.between("ssh:start", "ssh:intake")
        all_worker, all_scan = cpu.between("ssh:start", "ssh:end")
        cpu_s = {
            "intake_worker": intake_worker,
            "intake_readiness_threads": intake_scan,
            "batch_worker": all_worker,
            "batch_readiness_threads": all_scan,
            "worker_total": worker.cpu_s(),
            "sim_host_total": host.cpu_s(),
        }
        figures = ready_figures(args, (t_run, calls_run), (t_ssh, calls_ssh, t_intake), ssh_jobs, times, cpu_s)
    finally:
        worker.stop()
        host.stop()
        server.cleanup()
    print(json.dumps(figures, indent=2) if args.json else "\n".join(report(figures)))


if __name__ == "__main__":
    main()
