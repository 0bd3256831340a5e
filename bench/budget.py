"""Provider profiles: 1,000 creates on the sim playing one provider's published API budget, one worker.

For each profile (workers/budget_profiles.py) the simulated cloud meters like that provider (requests per
call, page sizes, its buckets enforced with 429 and Retry-After, its rate-limit headers) and the worker
spends the same budget from its side. Measures, in one run per profile, on a private redis-server:
  wall      time from the first enqueue (one ``create_vms`` call) until every VM is running
  floor     max(boot, the time the profile's buckets need for the unavoidable requests: one create
            each, one read per page of VMs, and the reads that learn the VMs' addresses as they
            settle: per VM (OCI), or once per read as lists of the group when fewer (Azure, at least one
            read's lists))
  ratio     wall / floor (goal <= 1.10), and requests the simulated API refused with 429 (goal 0)
  last create  when the last create went out (beside the time the buckets need for the creates
            alone), and the time from it until all were running (its boot, then the tick that saw it)
  bound     max(floor, the creates' time + boot, boot + the reads' time): a VM is read only once it
            booted, so no client finishes before this; wall / bound is printed beside the ratio
The clock starts with a full budget, as the floor assumes: where the run fills a window more than once
(DigitalOcean's minute), the enqueue waits until the worker's own start-up request (its preflight's list)
has left that window.

    python -m bench.budget                                   # every profile, 1,000 VMs, 30 s boot
    python -m bench.budget --profile hetzner --vms 200       # one profile, a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import redis
from limits import parse

from bench.harness import ROOT, RedisServer, Worker, sim_spec
from bench.inflight import _reset
from vmqueue import keys
from vmqueue.models import JobState
from vmqueue.settings import Settings
from vmqueue.sshkeys import throwaway_public_key
from workers.budget import WINDOW_MARGIN_S
from workers.budget_profiles import PROFILES, Bucket, Profile


def _time_for(bucket: Bucket, requests: int) -> float:
    """Seconds from a full budget until ``requests`` requests have gone out (the last one's time)."""
    if bucket.window:
        item = parse(bucket.window)
        return math.floor((requests - 1) / item.amount) * item.get_expiry()
    return max(0.0, (requests - bucket.capacity) / bucket.refill_per_s)


def _request_s(profile: Profile, requests: list[tuple[str, str]]) -> float:
    """Seconds the profile's buckets need, from full, until ``requests`` have all gone out."""
    spent: dict[str, int] = {}
    for method, target in requests:
        for name in profile.classify(method, target):
            key = f"{name}:{target}" if profile.buckets[name].per_action else name
            spent[key] = spent.get(key, 0) + 1
    return max((_time_for(profile.buckets[k.split(":")[0]], n) for k, n in spent.items()), default=0.0)


def _unavoidable(profile: Profile, vms: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(creates, reads): one create each, one read per page, the settle reads (see ``floor_s``)."""
    creates = list(profile.calls["create"]) * vms
    reads = list(profile.calls["get_many"]) * math.ceil(vms / profile.page_size)
    reads += profile.settle_requests(vms, vms)  # the fewest: every VM seen settling in one read
    return creates, reads


def settle_before_start_s(profile: Profile, vms: int) -> float:
    """How long to let the worker's own start-up requests (its preflight's list) leave the windows the run
    fills: the floor counts from a full budget, as in a deployment whose workers started before the batch.
    The length plus the client's margin of every window the run needs more than once (DigitalOcean's
    minute: 61 s); 0.0 when none."""
    creates, reads = _unavoidable(profile, vms)
    spent: dict[str, int] = {}
    for method, target in creates + reads:
        for name in profile.classify(method, target):
            spent[name] = spent.get(name, 0) + 1
    windows = {n: profile.buckets[n] for n in spent if profile.buckets[n].kind == "window"}
    filled = [parse(b.window or "").get_expiry() for n, b in windows.items() if spent[n] > b.burst()]
    return max(filled, default=-WINDOW_MARGIN_S) + WINDOW_MARGIN_S


def floor_s(profile: Profile, vms: int, boot_s: float) -> tuple[float, float]:
    """(the issue's floor, the bound) for ``vms`` creates.

    The floor: max(boot, the time the buckets need for the unavoidable requests: one create each, one
    read per page of VMs, the reads that learn the VMs' addresses as they settle, ``settle_requests``:
    per VM, or a group's lists once if every VM were seen settling in one read). The bound adds what no
    client can avoid either: a VM is read only once it booted, so the last create's VM boots before a
    read sees it (the creates' time + boot), and no read of a settled VM goes before the first boot
    (boot + the reads' time).
    """
    creates, reads = _unavoidable(profile, vms)
    floor = max(boot_s, _request_s(profile, creates + reads))
    return floor, max(floor, _request_s(profile, creates) + boot_s, boot_s + _request_s(profile, reads))


def run_profile(server: RedisServer, name: str, vms: int, boot_s: float, slots: int, tick_s: float | None) -> dict:
    from producer import Provisioner

    client = redis.Redis.from_url(server.url, decode_responses=True)
    _reset(client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    env.update(
        REDIS_URL=server.url,
        PYTHONPATH=str(ROOT),
        VMQ_SIM_BOOT_S=str(boot_s),
        VMQ_SIM_PROFILE=name,
        VMQ_DEADLINE_S=str(max(600.0, 4 * floor_s(PROFILES[name], vms, boot_s)[1])),
    )
    if tick_s is not None:  # else the worker derives it from the profile's read budget
        env["VMQ_BATCH_POLL_S"] = str(tick_s)
    worker = Worker("sim", env, slots, Path(tempfile.mkdtemp(prefix="vmq-budget-")), loglevel="WARNING").wait_ready()
    try:
        time.sleep(settle_before_start_s(PROFILES[name], vms))
        provisioner = Provisioner(Settings(redis_url=server.url))
        key = throwaway_public_key()
        started, started_epoch = time.monotonic(), time.time()
        jobs = provisioner.create_vms({"spec": sim_spec(f"budget-{i}"), "ssh_key": key} for i in range(vms))
        pending = {job.id for job in jobs}
        limit_s = 4 * floor_s(PROFILES[name], vms, boot_s)[1] + 120
        while pending and time.monotonic() - started < limit_s:
            ids = list(pending)
            for job_id, raw in zip(ids, client.mget([keys.job_key(j) for j in ids]), strict=True):
                if raw and f'"state":"{JobState.running}"' not in raw and f'"state":"{JobState.failed}"' not in raw:
                    continue  # no parse of every pending record: the watcher must not take the worker's CPU
                state = json.loads(raw)["state"] if raw else None
                if state == JobState.running:
                    pending.discard(job_id)
                elif state == JobState.failed:
                    raise SystemExit(f"FAIL: {name}: job {job_id} failed: {json.loads(raw).get('error')}")
            time.sleep(0.25)
        wall_s = time.monotonic() - started
        if pending:
            raise SystemExit(f"FAIL: {name}: {len(pending)} jobs still not running after {wall_s:.0f}s")
        from workers.providers.sim import LOG_KEY, REQUESTS_KEY

        requests = {k: int(v) for k, v in client.hgetall(REQUESTS_KEY).items()}
        calls = [json.loads(raw) for raw in client.lrange(LOG_KEY, 0, -1)]
        creates = [c["t"] for c in calls if c["kind"] == "create" and c["outcome"] == "call"]
        return {
            "wall_s": wall_s,
            "refused_429": requests.pop("429", 0),
            "requests": requests,
            "last_create_s": max(creates, default=started_epoch) - started_epoch,
        }
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="append", choices=sorted(set(PROFILES) - {"sim"}), help="(repeatable)")
    parser.add_argument("--vms", type=int, default=1000, help="creates per profile (default 1000)")
    parser.add_argument("--boot", type=float, default=30.0, help="simulated boot time, s (default 30)")
    parser.add_argument("--slots", type=int, default=64, help="worker threads (default 64)")
    parser.add_argument(
        "--tick",
        type=float,
        default=None,
        help="VMQ_BATCH_POLL_S of the worker (default: from the profile's read budget)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    names = args.profile or sorted(set(PROFILES) - {"sim"})

    server = RedisServer(aof=False)
    server.start()
    figures = {}
    try:
        for name in names:
            result = run_profile(server, name, args.vms, args.boot, args.slots, args.tick)
            floor, bound = floor_s(PROFILES[name], args.vms, args.boot)
            figures[name] = {**result, "floor_s": floor, "bound_s": bound}
            if not args.json:
                print(
                    f"  {name:<13} all running after {result['wall_s']:7.1f} s; floor {floor:6.1f} s"
                    f" -> ratio {result['wall_s'] / floor:.2f} (goal <= 1.10);"
                    f" bound {bound:6.1f} s -> {result['wall_s'] / bound:.2f};"
                    f" {result['refused_429']} x 429 (goal 0); {sum(result['requests'].values())} requests;"
                    f" last create sent at {result['last_create_s']:.1f} s"
                    f" (buckets: {_request_s(PROFILES[name], list(PROFILES[name].calls['create']) * args.vms):.1f} s),"
                    f" then {result['wall_s'] - result['last_create_s']:.1f} s to all running",
                    flush=True,
                )
    finally:
        server.cleanup()
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
