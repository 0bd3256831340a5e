"""P1 in flight + P2 API economy: many creates on the simulated cloud against ONE worker process.

Measures, in one run, on a private redis-server:
  vmqueue   N create jobs through the whole pipeline (producer -> Redis -> one worker process with
            --slots threads -> sim), with the default poll schedule: wall time from the first enqueue
            until every job is running, divided by the boot time (goal <= 1.15 as the median of
            --runs runs in this invocation), and provider API calls per created VM from the sim's
            counters (goal <= 6). The jobs are enqueued with one ``Provisioner.create_vms`` call
            (one Redis MULTI/EXEC, one batched publish), as a fleet or batch script does;
            ``--single`` enqueues with ``create_vm`` one by one instead.
  blocking  the baseline: a thread per VM that creates it and then calls get_vm in a sleep loop,
            with the same number of slots (--slots) -- what a blocking waiter does.
  floor     what one Celery worker process alone needs to take N messages in: N bare no-op tasks
            (bench/noop_app.py, the same app, pool, slots and events) from the first send until the
            queue is drained. No intake can be faster, so boot + this is the pipeline's floor here;
            printed with the worker's CPU per message beside vmqueue's CPU per create.

    python -m bench.inflight                       # 3 runs of 1,000 VMs, 20 s boot, 64 slots
    python -m bench.inflight --vms 200 --boot 5    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker, sim_spec
from bench.noop_app import NOOP_TASK
from bench.throughput import QUEUE, wait_drained
from vmqueue import keys
from vmqueue.models import Job, JobState, VMSpec
from vmqueue.settings import Settings
from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key


def _sim_calls(client: redis.Redis) -> dict[str, int]:
    from workers.providers.sim import CALLS_KEY

    return {k: int(v) for k, v in client.hgetall(CALLS_KEY).items()}


def _reset(client: redis.Redis) -> None:
    keep = [k for k in client.scan_iter(count=1000) if not k.startswith("_kombu.")]
    for i in range(0, len(keep), 1000):
        client.delete(*keep[i : i + 1000])


def run_pipeline(
    server: RedisServer,
    vms: int,
    boot_s: float,
    slots: int,
    env_extra: dict[str, str],
    events: bool = True,
    bulk: bool = True,
) -> dict:
    from producer import Provisioner

    client = redis.Redis.from_url(server.url, decode_responses=True)
    _reset(client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(REDIS_URL=server.url, PYTHONPATH=str(ROOT), VMQ_SIM_BOOT_S=str(boot_s), **env_extra)
    worker = _worker(env, slots, events)
    try:
        provisioner = Provisioner(Settings(redis_url=server.url))
        key = throwaway_public_key()
        started, cpu_s = time.monotonic(), worker.cpu_s()
        if bulk:
            jobs = [
                job.id
                for job in provisioner.create_vms({"spec": sim_spec(f"bench-{i}"), "ssh_key": key} for i in range(vms))
            ]
        else:
            jobs = [provisioner.create_vm(sim_spec(f"bench-{i}"), key).id for i in range(vms)]
        enqueued_s = time.monotonic() - started
        pending = set(jobs)
        finished: dict[str, Job] = {}
        while pending and time.monotonic() - started < boot_s * 10 + 120:
            ids = list(pending)
            for job_id, raw in zip(ids, client.mget([keys.job_key(j) for j in ids]), strict=True):
                # A substring test, not a parse of every pending record each time: the watcher must
                # not take the CPU the worker under test needs (1,000 parses every 0.2 s: ~30 % of a core).
                if f'"state":"{JobState.running}"' not in raw and f'"state":"{JobState.failed}"' not in raw:
                    continue
                job = Job.model_validate_json(raw)
                if job.state == JobState.running:
                    pending.discard(job_id)
                    finished[job_id] = job
                elif job.state == JobState.failed:
                    raise SystemExit(f"FAIL: job {job_id} failed: {job.error}")
            time.sleep(0.2)
        wall_s, cpu_s = time.monotonic() - started, worker.cpu_s() - cpu_s
        if pending:
            raise SystemExit(f"FAIL: {len(pending)} jobs still not running after {wall_s:.0f}s")
        calls = _sim_calls(client)
        api_calls = sum(v for k, v in calls.items() if ":" not in k)
        # Where the time went: enqueue -> create sent (queueing), and booted -> seen running (polling).
        submit_lag = sorted((j.submitted_at - j.created_at).total_seconds() for j in finished.values())
        detect_lag = sorted((j.updated_at - j.vm.created_at).total_seconds() - boot_s for j in finished.values())
        return {
            "enqueue_s": enqueued_s,
            "wall_s": wall_s,
            "calls": calls,
            "calls_per_vm": api_calls / vms,
            "worker_cpu_ms": cpu_s * 1000 / vms,  # the whole process (intake, tick, events) per create
            "submit_lag_s": {"p50": submit_lag[len(submit_lag) // 2], "max": submit_lag[-1]},
            "detect_lag_s": {"p50": detect_lag[len(detect_lag) // 2], "max": detect_lag[-1]},
        }
    finally:
        worker.stop()


def _worker(env: dict[str, str], slots: int, events: bool) -> Worker:
    """The sim worker, knowing the no-op task too (bench/noop_app.py), so the floor runs in the same app."""
    log_dir = Path(tempfile.mkdtemp(prefix="vmq-bench-"))
    return Worker("sim", env, slots, log_dir, loglevel="WARNING", events=events, app="bench.noop_app").wait_ready()


def run_floor(server: RedisServer, vms: int, slots: int, env_extra: dict[str, str], events: bool = True) -> dict:
    """Seconds (and worker CPU per message) one worker process takes to drain ``vms`` no-op messages."""
    from producer import Provisioner

    client = redis.Redis.from_url(server.url, decode_responses=True)
    _reset(client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(REDIS_URL=server.url, PYTHONPATH=str(ROOT), **env_extra)
    worker = _worker(env, slots, events)
    try:
        celery = Provisioner(Settings(redis_url=server.url)).celery

        def send(n: int) -> None:
            with celery.producer_or_acquire() as producer:  # as create_vms: one connection for the batch
                for i in range(n):
                    job_id = f"floor-{i:032d}"[-32:]
                    celery.send_task(NOOP_TASK, args=[job_id], queue=QUEUE, producer=producer, argsrepr=job_id)

        send(min(200, vms))  # warm-up: connections, imports
        wait_drained(client, 60)
        started, cpu_s = time.monotonic(), worker.cpu_s()
        send(vms)
        wait_drained(client, max(60.0, vms / 20))
        return {"wall_s": time.monotonic() - started, "worker_cpu_ms": (worker.cpu_s() - cpu_s) * 1000 / vms}
    finally:
        worker.stop()


def run_blocking(server: RedisServer, vms: int, boot_s: float, slots: int, poll_s: float) -> dict:
    """The baseline: one thread per VM (``slots`` at a time) holding its slot while it polls."""
    from workers.providers.sim import SimProvider

    client = redis.Redis.from_url(server.url, decode_responses=True)
    _reset(client)
    client.hset("vmq:sim:config", mapping={"boot_s": boot_s})
    sim = SimProvider(redis_client=client)
    key = SSHPublicKey.parse(throwaway_public_key())

    def one(i: int) -> None:
        vm = sim.create_vm(VMSpec(**sim_spec(f"bench-{i}")), key, job_id=f"blocking-{i}")
        while sim.get_vm(vm.instance_id).status != "running":
            time.sleep(poll_s)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        list(pool.map(one, range(vms)))
    wall_s = time.monotonic() - started
    calls = _sim_calls(client)
    return {"wall_s": wall_s, "calls": calls, "calls_per_vm": sum(v for k, v in calls.items() if ":" not in k) / vms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1000, help="create jobs (default 1000)")
    parser.add_argument("--boot", type=float, default=20.0, help="simulated boot time, s (default 20)")
    parser.add_argument("--slots", type=int, default=64, help="worker threads, and baseline threads (default 64)")
    parser.add_argument("--baseline-poll", type=float, default=2.0, help="the blocking waiter's sleep, s")
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) blocking baseline")
    parser.add_argument("--env", action="append", default=[], help="extra worker env KEY=VALUE (repeatable)")
    parser.add_argument("--no-events", action="store_true", help="worker without -E (Flower sees no tasks)")
    parser.add_argument("--runs", type=int, default=3, help="pipeline runs; the median is the figure (default 3)")
    parser.add_argument("--single", action="store_true", help="enqueue with create_vm one by one, not create_vms")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    server = RedisServer(aof=False)
    server.start()
    try:
        extra = dict(item.split("=", 1) for item in args.env)
        runs = [
            run_pipeline(
                server, args.vms, args.boot, args.slots, extra, events=not args.no_events, bulk=not args.single
            )
            for _ in range(args.runs)
        ]
        ours = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        floor = run_floor(server, args.vms, args.slots, extra, events=not args.no_events)
        base = None if args.no_baseline else run_blocking(server, args.vms, args.boot, args.slots, args.baseline_poll)
    finally:
        server.cleanup()

    ratios = sorted(r["wall_s"] / args.boot for r in runs)
    figures = {
        "vms": args.vms,
        "boot_s": args.boot,
        "slots": args.slots,
        "enqueue": "create_vm" if args.single else "create_vms",
        "ratios": ratios,
        "vmqueue": ours,
        "floor": floor,
        "blocking": base,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"P1/P2: {args.vms} creates on sim, {args.boot:.0f} s boot, one worker process, {args.slots} slots,"
        f" enqueued with {figures['enqueue']}, {len(runs)} runs"
    )
    print(f"  runs      {', '.join(f'{r:.2f}' for r in ratios)} x boot (the median is the figure below)")
    print(
        f"  vmqueue   enqueue {ours['enqueue_s']:.2f} s, all running after {ours['wall_s']:.1f} s"
        f" -> {ours['wall_s'] / args.boot:.2f} x boot (goal <= 1.15, median);"
        f" {ours['calls_per_vm']:.2f} API calls per VM (goal <= 6)  {ours['calls']}"
    )
    floor_s = args.boot + floor["wall_s"]
    print(
        f"  floor     Celery alone drains {args.vms} no-op messages in {floor['wall_s']:.1f} s"
        f" ({floor['worker_cpu_ms']:.2f} ms worker CPU each; vmqueue: {ours['worker_cpu_ms']:.2f} ms per create)"
        f" -> boot + that = {floor_s / args.boot:.2f} x boot; ratio vmqueue / floor = {ours['wall_s'] / floor_s:.2f}"
    )
    sub, det = ours["submit_lag_s"], ours["detect_lag_s"]
    print(
        f"            enqueue -> create sent: p50 {sub['p50']:.1f} s, max {sub['max']:.1f} s;"
        f" booted -> seen running: p50 {det['p50']:.1f} s, max {det['max']:.1f} s"
    )
    if base:
        print(
            f"  blocking  all running after {base['wall_s']:.1f} s -> {base['wall_s'] / args.boot:.2f} x boot;"
            f" {base['calls_per_vm']:.2f} API calls per VM"
        )
        print(f"  ratio     blocking / vmqueue wall time = {base['wall_s'] / ours['wall_s']:.1f}")


if __name__ == "__main__":
    main()
