"""Listing cost vs the number of records: the 50 newest failed jobs, served by the job index.

Fills a private redis-server (no worker), one database per size, with job records through the job
store's own write script (``jobstore._ADD``: record, event and index entries, pipelined), half of
them failed, spread over providers and labels, and for each size (--sizes) measures, the sizes
taking turns query by query (a shared machine's load falls on every size alike):
  index     ``Provisioner.list_jobs({"state": "failed"}, limit=50)``: the median time of --repeat
            queries, and the Redis commands one query costs (INFO commandstats);
  filtered  the same with provider=aws and a label (a walk over the smallest set, checked with ZMSCORE;
            a twelfth of the records match, so it returns fewer than 50 below 600 records);
  scan      what listing without the index costs: SCAN every job key, read the records, sort (one
            run; skipped above --scan-max records).
Ratios are vs the smallest size, measured in the same run. Goal: index ratio ~1 (flat) up to 100,000.

    python -m bench.listing                               # 100 / 1,000 / 10,000 / 100,000 records
    python -m bench.listing --sizes 100,1000 --repeat 20  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import timedelta

import redis

from bench.harness import RedisServer
from vmqueue.jobstore import _ADD, add_arguments
from vmqueue.models import Job, JobKind, JobState, VMSpec, utcnow
from vmqueue.settings import Settings

PROVIDERS = ("aws", "sim", "hetzner", "gcp")  # aws: every fourth record, all failed


def fill(client: redis.Redis, settings: Settings, start: int, stop: int) -> None:
    """Records ``start``..``stop``: every other one failed, providers and team labels in turn, a ms apart
    (so 100 records already hold the 50 failed jobs the query asks for)."""
    base = utcnow() - timedelta(days=1)
    add = client.register_script(_ADD)
    pipe = client.pipeline(transaction=False)
    for i in range(start, stop):
        provider = PROVIDERS[i % len(PROVIDERS)]
        spec = VMSpec(
            provider=provider,
            name=f"vm-{i}",
            region="r-1",
            instance_type="t",
            image="img-1",
            labels={"team": f"t{i % 3}"},
        )
        at = base + timedelta(milliseconds=i)
        state = JobState.failed if i % 2 == 0 else JobState.running
        job = Job(kind=JobKind.create, provider=provider, spec=spec, state=state, created_at=at, updated_at=at)
        add_keys, args = add_arguments(job, None, settings)
        add(keys=add_keys, args=args, client=pipe)
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def commands(client: redis.Redis) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items() if k.startswith("cmdstat_"))


def cost(client: redis.Redis, run) -> tuple[int, int]:
    """(Redis commands one query sends, jobs it returned); the first call also warms scripts and caches."""
    run()
    before = commands(client)
    found = len(run().jobs)
    return commands(client) - before - 1, found  # INFO itself counts once


def scan_listing(client: redis.Redis) -> float:
    """Without an index: every job key, every record, filtered and sorted in the client."""
    started = time.perf_counter()
    job_keys = [k for k in client.scan_iter(match="vmq:job:*", count=1000) if not k.endswith(":script")]
    failed = []
    for start in range(0, len(job_keys), 1000):
        for raw in client.mget(job_keys[start : start + 1000]):
            if raw and '"state":"failed"' in raw:
                failed.append(Job.model_validate_json(raw))
    sorted(failed, key=lambda j: j.created_at, reverse=True)[:50]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000,100000", help="record counts (at most 16)")
    parser.add_argument("--repeat", type=int, default=200, help="queries timed per size, in turns (default 200)")
    parser.add_argument("--scan-max", type=int, default=100_000, help="largest size the scan baseline runs at")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    server = RedisServer(aof=False)
    server.start()
    try:
        from producer import Provisioner

        # One database per size, so the timed queries can take turns: a shared machine's load falls
        # on every size alike.
        clients, queries = [], []
        for db, size in enumerate(sizes):
            settings = Settings(redis_url=f"{server.url.rsplit('/', 1)[0]}/{db}")
            client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
            fill(client, settings, 0, size)
            vmq = Provisioner(settings)
            clients.append(client)
            queries.append(
                {
                    "index": lambda vmq=vmq: vmq.list_jobs({"state": "failed"}, limit=50),
                    "filtered": lambda vmq=vmq: vmq.list_jobs(
                        {"state": "failed", "provider": "aws", "labels": {"team": "t0"}}, limit=50
                    ),
                }
            )
        rows = [
            {"records": size, **{name: cost(client, run) for name, run in qs.items()}}
            for size, client, qs in zip(sizes, clients, queries, strict=True)
        ]
        times: list[dict[str, list[float]]] = [{"index": [], "filtered": []} for _ in sizes]
        for _ in range(args.repeat):
            for at, qs in enumerate(queries):
                for name, run in qs.items():
                    started = time.perf_counter()
                    run()
                    times[at][name].append(time.perf_counter() - started)
        for row, timed, client, size in zip(rows, times, clients, sizes, strict=True):
            row["index"] = (statistics.median(timed["index"]), *row["index"])
            row["filtered"] = (statistics.median(timed["filtered"]), *row["filtered"])
            row["scan_s"] = scan_listing(client) if size <= args.scan_max else None
    finally:
        server.cleanup()

    base = rows[0]
    figures = [
        {
            "records": r["records"],
            "index_ms": round(r["index"][0] * 1000, 3),
            "index_ratio": round(r["index"][0] / base["index"][0], 2),
            "index_redis_commands": r["index"][1],
            "index_jobs": r["index"][2],
            "filtered_ms": round(r["filtered"][0] * 1000, 3),
            "filtered_ratio": round(r["filtered"][0] / base["filtered"][0], 2),
            "filtered_redis_commands": r["filtered"][1],
            "filtered_jobs": r["filtered"][2],
            "scan_ms": round(r["scan_s"] * 1000, 1) if r["scan_s"] is not None else None,
            "scan_ratio": round(r["scan_s"] / base["scan_s"], 1) if r["scan_s"] and base["scan_s"] else None,
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print("newest 50 failed jobs; ratios vs the first size, same run; 'jobs': how many a query returned")
    header = (
        "records",
        "index ms",
        "ratio",
        "cmds",
        "jobs",
        "filtered ms",
        "ratio",
        "cmds",
        "jobs",
        "scan ms",
        "ratio",
    )
    line = "{:>9}  {:>9} {:>6} {:>5} {:>5}  {:>11} {:>6} {:>5} {:>5}  {:>9} {:>7}"
    print(line.format(*header))
    for f in figures:
        print(
            line.format(
                f"{f['records']:,}",
                f["index_ms"],
                f["index_ratio"],
                f["index_redis_commands"],
                f["index_jobs"],
                f["filtered_ms"],
                f["filtered_ratio"],
                f["filtered_redis_commands"],
                f["filtered_jobs"],
                "-" if f["scan_ms"] is None else f["scan_ms"],
                "-" if f["scan_ratio"] is None else f["scan_ratio"],
            )
        )


if __name__ == "__main__":
    main()
