"""P3 throughput: get jobs per second through the whole pipeline vs a bare Celery no-op task.

Measures, in one run, on a private redis-server, with ONE worker process started as
``celery -A bench.noop_app`` (the real sim worker plus a no-op task, so both kinds run in the same
process with the same app config from vmqueue/celery_config.py, pool and concurrency):
  vmqueue   N get jobs: Provisioner.get_vm("sim", id) -> Redis -> worker (lease + record, the sim's
            get_vm through the shared rate limit, compare-and-set to done) -> job store; the sim
            answers at once (zero latency) about a VM created beforehand.
  celery    N bare no-op tasks: send_task of a message of the same size from the same producer app
            to the same queue and worker.
Each batch is timed from its first enqueue until the queue is empty and every message is
acknowledged (then every get job is checked to be done). Rounds alternate the two kinds, the order
flipped each round, and medians are reported. Goal: vmqueue >= 0.5 x celery.

The sim's shared API limit (500/s by default, like a provider's) would measure the limit, not the
pipeline, so the bench raises it (--rate-limit); every call still checks it in Redis.

    python -m bench.throughput                         # 5 rounds of 3,000 of each, 64 threads
    python -m bench.throughput --jobs 500 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker
from bench.noop_app import NOOP_TASK
from bench.probes import flush_keeping_bindings
from vmqueue import keys
from vmqueue.models import JobState, VMSpec
from vmqueue.settings import Settings
from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key

QUEUE = keys.queue_name("sim")
UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, not yet acknowledged messages here


def sim_vm(client: redis.Redis) -> str:
    """A running VM on the sim for the gets to find, made through the adapter itself."""
    os.environ["VMQ_SIM_BOOT_S"] = "0"  # read by this process's SimProvider only
    from workers.providers.sim import SimProvider

    spec = VMSpec(provider="sim", name="bench-get", region="sim-1", instance_type="small", image="ubuntu-24.04")
    key = SSHPublicKey.parse(throwaway_public_key())
    return SimProvider(redis_client=client).create_vm(spec, key, job_id=uuid.uuid4().hex).instance_id


def wait_drained(client: redis.Redis, timeout_s: float) -> None:
    """Until no message waits in the queue and none is delivered but unacknowledged.

    Asked twice in a row: between kombu's BRPOP and its note in the unacked hash a message is in
    neither place for an instant. Acks come late (after the task ran), so drained means done.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2:
        if time.monotonic() > deadline:
            raise SystemExit(f"FAIL: queue not drained after {timeout_s:.0f}s")
        pipe = client.pipeline(transaction=False)
        pipe.llen(QUEUE)
        pipe.hlen(UNACKED_KEY)
        waiting, unacked = pipe.execute()
        quiet = quiet + 1 if waiting == 0 and unacked == 0 else 0
        time.sleep(0.002)


def run_batch(
    client: redis.Redis, worker: Worker, jobs: int, send: Callable[[int], str | None], timeout_s: float
) -> dict:
    started, worker_cpu = time.monotonic(), worker.cpu_s()
    ids = [send(i) for i in range(jobs)]
    enqueued_s = time.monotonic() - started
    wait_drained(client, timeout_s)
    wall_s = time.monotonic() - started
    # CPU per job: steadier than rates on a shared machine, and not bounded by the producer.
    worker_ms = (worker.cpu_s() - worker_cpu) * 1000 / jobs
    job_ids = [i for i in ids if i]
    if job_ids:
        not_done = 0
        for start in range(0, len(job_ids), 1000):
            raws = client.mget([keys.job_key(j) for j in job_ids[start : start + 1000]])
            not_done += sum(1 for raw in raws if raw is None or f'"state":"{JobState.done}"' not in raw)
        if not_done:
            raise SystemExit(f"FAIL: {not_done} of {len(job_ids)} get jobs not done after the queue drained")
    return {"enqueue_s": enqueued_s, "wall_s": wall_s, "per_s": jobs / wall_s, "worker_cpu_ms": worker_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per batch, of each kind (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="batches of each kind, alternated (default 5)")
    parser.add_argument("--concurrency", type=int, default=64, help="worker threads (default 64, as vmq worker)")
    parser.add_argument("--pool", default="threads", help="worker pool (default threads, as vmq worker)")
    parser.add_argument("--rate-limit", default="1000000/second", help="the sim's shared API limit in the bench")
    parser.add_argument("--env", action="append", default=[], help="extra worker env KEY=VALUE (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    server = RedisServer(aof=False)
    server.start()
    worker = None
    try:
        from producer import Provisioner

        client = redis.Redis.from_url(server.url, decode_responses=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VMQ_", "REDIS_URL"))}
        env.update(
            REDIS_URL=server.url,
            PYTHONPATH=str(ROOT),
            VMQ_RATE_LIMIT=json.dumps({"sim": args.rate_limit}),
            **dict(item.split("=", 1) for item in args.env),
        )
        worker = Worker(
            "sim",
            env,
            args.concurrency,
            Path(tempfile.mkdtemp(prefix="vmq-bench-")),
            pool=args.pool,
            loglevel="WARNING",
            app="bench.noop_app",
        ).wait_ready()
        provisioner = Provisioner(Settings(redis_url=server.url))
        instance_id = sim_vm(client)

        def get(_: int) -> str:
            return provisioner.get_vm("sim", instance_id).id

        def noop(_: int) -> None:
            # The same size as a get job's message: one job id argument and a similar argsrepr.
            job_id = uuid.uuid4().hex
            provisioner.celery.send_task(
                NOOP_TASK, args=[job_id], queue=QUEUE, argsrepr=f"(get sim job={job_id})", kwargsrepr="{}"
            )

        kinds = {"vmqueue": get, "celery": noop}
        timeout_s = max(60.0, args.jobs / 20)
        for send in kinds.values():  # warm-up: imports, connections, the adapter, the scripts
            run_batch(client, worker, min(200, args.jobs), send, timeout_s)
        results: dict[str, list[dict]] = {name: [] for name in kinds}
        for round_no in range(args.rounds):
            order = list(kinds) if round_no % 2 == 0 else list(reversed(kinds))
            for name in order:
                results[name].append(run_batch(client, worker, args.jobs, kinds[name], timeout_s))
            flush_keeping_bindings(client)
            instance_id = sim_vm(client)
    finally:
        if worker:
            worker.stop()
        server.cleanup()

    rates = {name: statistics.median(r["per_s"] for r in runs) for name, runs in results.items()}
    enqueue = {name: statistics.median(args.jobs / r["enqueue_s"] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r["worker_cpu_ms"] for r in runs) for name, runs in results.items()}
    ratio = rates["vmqueue"] / rates["celery"]
    figures = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "pool": args.pool,
        "concurrency": args.concurrency,
        "per_s": rates,
        "enqueue_per_s": enqueue,
        "worker_cpu_ms": cpu,
        "ratio": ratio,
        "runs": results,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"P3 throughput: {args.rounds} x {args.jobs} jobs of each kind, one worker ({args.pool}, c={args.concurrency}),"
        " first enqueue -> all done, median"
    )
    for name, label in (("vmqueue", "vmqueue get jobs"), ("celery", "bare celery no-op")):
        print(
            f"  {label:17s} {rates[name]:7.0f} /s  (enqueue alone {enqueue[name]:.0f} /s;"
            f" worker CPU {cpu[name]:.2f} ms per job)"
        )
    print(
        f"  ratio             {ratio:.2f} x bare celery (goal >= 0.5);"
        f" worker CPU per job {cpu['vmqueue'] / cpu['celery']:.2f} x"
    )


if __name__ == "__main__":
    main()
