"""Enqueue throughput for asyncio backends: AsyncProvisioner vs the sync Provisioner in a thread pool.

Measures, in one run, on a private redis-server (no worker: the messages stay queued and are purged
after each batch), N validated creates on the sim (spec and key checked, record written, message
published) made three ways:
  async    AsyncProvisioner.create_vm from 100 concurrent coroutines on one event loop
  threads  Provisioner.create_vm from a ThreadPoolExecutor of 100 threads (what an asyncio backend
           does today with run_in_executor)
  raw      celery_app.send_task of one job-id message from one thread: the publish alone, no
           validation and no record (the floor)
Each round runs the three in turn (the order rotated every round); the median round is reported.
Goal: async >= 1.5 x threads (creates per second).

    python -m bench.async_enqueue                          # 5 rounds of 5,000 of each
    python -m bench.async_enqueue --jobs 500 --rounds 1    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis

from bench.harness import RedisServer, sim_spec
from bench.probes import flush_keeping_bindings
from vmqueue import keys
from vmqueue.settings import Settings
from vmqueue.sshkeys import throwaway_public_key

QUEUE = keys.queue_name("sim")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5_000, help="creates per batch, of each kind (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="batches of each kind (default 5)")
    parser.add_argument("--concurrency", type=int, default=100, help="coroutines / threads (default 100)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    server = RedisServer(aof=False)
    server.start()
    try:
        from producer import Provisioner
        from producer.aclient import AsyncProvisioner

        settings = Settings(redis_url=server.url)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        sync = Provisioner(settings)
        key = throwaway_public_key()
        loop = asyncio.new_event_loop()
        vmq = AsyncProvisioner(settings, celery_app=sync.celery)
        pool = ThreadPoolExecutor(args.concurrency)

        def spec(i: int) -> dict:
            return sim_spec(f"bench-{i}", labels={"team": "bench"})

        def run_async(jobs: int) -> float:
            async def batch() -> None:
                counter = iter(range(jobs))

                async def worker() -> None:
                    for i in counter:  # the coroutines share one iterator: each takes the next create
                        await vmq.create_vm(spec(i), key)

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))

            started = time.perf_counter()
            loop.run_until_complete(batch())
            return time.perf_counter() - started

        def run_threads(jobs: int) -> float:
            started = time.perf_counter()
            list(pool.map(lambda i: sync.create_vm(spec(i), key), range(jobs)))
            return time.perf_counter() - started

        def run_raw(jobs: int) -> float:
            started = time.perf_counter()
            for _ in range(jobs):
                job_id = uuid.uuid4().hex
                sync.celery.send_task(
                    keys.TASK_CREATE, args=[job_id], queue=QUEUE, argsrepr=f"(create sim job={job_id})", kwargsrepr="{}"
                )
            return time.perf_counter() - started

        kinds = {"async": run_async, "threads": run_threads, "raw": run_raw}
        for run in kinds.values():  # warm-up: imports, connections, the thread pool
            run(min(300, args.jobs))
        flush_keeping_bindings(client)
        times: dict[str, list[float]] = {name: [] for name in kinds}
        order = list(kinds)
        for _ in range(args.rounds):
            for name in order:
                times[name].append(kinds[name](args.jobs))
                queued = client.llen(QUEUE)
                if queued != args.jobs:
                    raise SystemExit(f"FAIL: {queued} messages queued after {args.jobs} {name} creates")
                flush_keeping_bindings(client)
            order = order[1:] + order[:1]
        pool.shutdown()
        loop.run_until_complete(vmq.aclose())
        loop.close()
    finally:
        server.cleanup()

    rates = {name: [args.jobs / t for t in ts] for name, ts in times.items()}
    ratios = [a / t for a, t in zip(rates["async"], rates["threads"], strict=True)]
    figures = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "per_second": {name: statistics.median(r) for name, r in rates.items()},
        "async_vs_threads": statistics.median(ratios),
        "runs_s": times,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"Async enqueue: {args.rounds} rounds of {args.jobs} creates of each kind, median")
    labels = {
        "async": f"AsyncProvisioner, {args.concurrency} coroutines",
        "threads": f"Provisioner, {args.concurrency} threads",
        "raw": "raw send_task, 1 thread",
    }
    for name, label in labels.items():
        print(f"  {label:34s} {figures['per_second'][name]:7.0f} /s")
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    ratio = figures["async_vs_threads"]
    print(f"  ratio async / threads              {ratio:.2f} x (goal >= 1.5; per round {per_round})")


if __name__ == "__main__":
    main()
