"""P4 enqueue: validated create jobs from Provisioner.create_vm vs raw Celery send_task calls.

Measures, in one run, on a private redis-server (no worker: the messages stay queued and are purged
after each batch):
  vmqueue   N Provisioner.create_vm calls on the sim: the spec and SSH key validated with pydantic,
            the job record written to Redis, one message holding the job id published.
  raw       N celery_app.send_task calls of the same size (one job-id argument, the same argsrepr)
            from the same producer app, to the same queue.
Each round runs both kinds in interleaved chunks (--chunk calls, the order flipped every chunk), so
the load of a shared machine falls on both alike; the median round is reported.
Goal: vmqueue <= 1.5 x raw.

    python -m bench.enqueue                         # 3 rounds of 10,000 of each
    python -m bench.enqueue --jobs 1000 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable

import redis

from bench.harness import RedisServer, sim_spec
from bench.probes import flush_keeping_bindings
from vmqueue import keys
from vmqueue.settings import Settings
from vmqueue.sshkeys import throwaway_public_key

QUEUE = keys.queue_name("sim")


def timed(jobs: int, send: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for i in range(jobs):
        send(i)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="calls per batch, of each kind (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="batches of each kind, alternated (default 3)")
    parser.add_argument("--chunk", type=int, default=500, help="calls of one kind before switching (default 500)")
    parser.add_argument("--script", action="store_true", help="give every create a startup script too")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    server = RedisServer(aof=False)
    server.start()
    try:
        from producer import Provisioner

        client = redis.Redis.from_url(server.url, decode_responses=True)
        provisioner = Provisioner(Settings(redis_url=server.url))
        key = throwaway_public_key()  # a caller passes the key as text, as read from a .pub file
        script = "#!/bin/sh\necho hello\n" if args.script else None

        def create(i: int) -> object:
            return provisioner.create_vm(sim_spec(f"bench-{i}", labels={"team": "bench"}), key, script)

        def raw(_: int) -> object:
            job_id = uuid.uuid4().hex
            return provisioner.celery.send_task(
                keys.TASK_CREATE, args=[job_id], queue=QUEUE, argsrepr=f"(create sim job={job_id})", kwargsrepr="{}"
            )

        kinds = {"vmqueue": create, "raw": raw}
        for send in kinds.values():  # warm-up: imports, connections, declarations
            timed(min(200, args.jobs), send)
        flush_keeping_bindings(client)
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(args.rounds):
            spent = dict.fromkeys(kinds, 0.0)
            for chunk_no, start in enumerate(range(0, args.jobs, args.chunk)):
                size = min(args.chunk, args.jobs - start)
                for name in list(kinds) if chunk_no % 2 == 0 else list(reversed(kinds)):
                    spent[name] += timed(size, kinds[name])
            queued = client.llen(QUEUE)
            if queued != 2 * args.jobs:
                raise SystemExit(f"FAIL: {queued} messages queued after {args.jobs} calls of each kind")
            flush_keeping_bindings(client)  # purge: the queue and the job records
            for name in kinds:
                times[name].append(spent[name])
    finally:
        server.cleanup()

    ratios = [v / r for v, r in zip(times["vmqueue"], times["raw"], strict=True)]
    ratio = statistics.median(ratios)
    medians = {name: statistics.median(t) for name, t in times.items()}
    figures = {"jobs": args.jobs, "rounds": args.rounds, "seconds": medians, "ratio": ratio, "runs": times}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"P4 enqueue: {args.rounds} rounds of {args.jobs} calls of each kind (interleaved by {args.chunk}),"
        " one producer thread, median"
    )
    for name, label in (("vmqueue", "Provisioner.create_vm"), ("raw", "raw send_task")):
        s = medians[name]
        print(f"  {label:22s} {s:6.2f} s  ({args.jobs / s:5.0f} /s, {s / args.jobs * 1e6:4.0f} us each)")
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"  ratio                  {ratio:.2f} x raw (goal <= 1.5; per round {per_round})")


if __name__ == "__main__":
    main()
