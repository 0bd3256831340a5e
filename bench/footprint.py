"""P5 footprint: start-up time and peak RSS of a one-provider worker vs one that imports all six SDKs.

Measures, in one run, on a private redis-server, worker processes started the way ``vmq worker``
starts them (threads pool, --concurrency threads), each serving one get job before it is measured:
  sim       ``celery -A workers.app`` on vmq.sim: the sim adapter only (imported on the first job).
  hetzner   ``celery -A workers.app`` on vmq.hetzner with a dummy HCLOUD_TOKEN, pointed at a local
            fake API that answers 404: the job imports the hcloud SDK, calls it and fails not_found.
  all-sdks  ``celery -A bench.all_sdks_app`` on vmq.hetzner: the same worker with every adapter and
            every SDK (hcloud, pydo, boto3, google-cloud-compute, oci, azure-mgmt) imported up front.
For each: start-up (process start until the worker answers a ping), first job (process start until
its first get job has finished: the lazy adapter import included), and peak RSS (VmHWM) after that
job. The variants run in turn, rotated, --repeat times; medians are reported.
Goal: the one-provider worker <= 0.5 x the all-SDK worker, on start-up time and on peak RSS.

    python -m bench.footprint               # 3 repeats
    python -m bench.footprint --repeat 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from bench.harness import ROOT, RedisServer, Worker
from bench.throughput import sim_vm
from vmqueue.settings import Settings

# name -> (Celery app module, queue's provider)
VARIANTS: dict[str, tuple[str, str]] = {
    "sim": ("workers.app", "sim"),
    "hetzner": ("workers.app", "hetzner"),
    "all-sdks": ("bench.all_sdks_app", "hetzner"),
}


class _NotFound(BaseHTTPRequestHandler):
    """Hetzner's answer for an unknown server, to every request."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b'{"error": {"code": "not_found", "message": "server not found", "details": null}}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def fake_hetzner() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def measure(variant: str, env: dict[str, str], concurrency: int, instance_ids: dict[str, str]) -> dict:
    from producer import Provisioner

    app, provider = VARIANTS[variant]
    log_dir = Path(tempfile.mkdtemp(prefix="vmq-bench-"))
    started = time.monotonic()
    worker = Worker(provider, env, concurrency, log_dir, loglevel="WARNING", app=app)
    try:
        # Asked every 50 ms: a ping sent before the worker listens is lost, so this is the resolution.
        worker.wait_ready(timeout_s=120, ping_timeout_s=0.05)
        ready_s = time.monotonic() - started
        provisioner = Provisioner(Settings(redis_url=env["REDIS_URL"]))
        job = provisioner.wait(provisioner.get_vm(provider, instance_ids[provider]).id, timeout_s=60, poll_s=0.01)
        first_job_s = time.monotonic() - started
        if job.error and job.error.code != "not_found":  # the fake Hetzner API answers 404
            raise SystemExit(f"FAIL: the {variant} worker's get job failed: {job.error}\n{worker.log()}")
        return {"startup_s": ready_s, "first_job_s": first_job_s, "peak_rss_mib": worker.peak_rss_kib() / 1024}
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each variant (default 3)")
    parser.add_argument("--concurrency", type=int, default=64, help="worker threads (default 64, as vmq worker)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    server = RedisServer(aof=False)
    server.start()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        with fake_hetzner() as endpoint:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("VMQ_", "REDIS_URL", "HCLOUD_"))}
            env.update(
                REDIS_URL=server.url,
                PYTHONPATH=str(ROOT),
                HCLOUD_TOKEN="dummy-token-for-the-footprint-bench",
                HCLOUD_ENDPOINT=endpoint,
            )
            instance_ids = {"sim": sim_vm(redis.Redis.from_url(server.url, decode_responses=True)), "hetzner": "4711"}
            names = list(VARIANTS)
            for i in range(args.repeat):
                for name in names[i % len(names) :] + names[: i % len(names)]:  # rotated: no variant always first
                    runs[name].append(measure(name, env, args.concurrency, instance_ids))
    finally:
        server.cleanup()

    figures = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()
    }
    base = figures["all-sdks"]
    ratios = {name: {key: figures[name][key] / base[key] for key in base} for name in VARIANTS if name != "all-sdks"}
    if args.json:
        print(
            json.dumps({"repeat": args.repeat, "median": figures, "ratio_to_all_sdks": ratios, "runs": runs}, indent=2)
        )
        return
    print(f"P5 footprint: worker processes (threads, c={args.concurrency}), median of {args.repeat}")
    print(f"  {'worker':10s} {'start-up':>9s} {'first job':>10s} {'peak RSS':>9s}")
    for name, fig in figures.items():
        print(f"  {name:10s} {fig['startup_s']:8.2f}s {fig['first_job_s']:9.2f}s {fig['peak_rss_mib']:6.0f} MiB")
    for name, ratio in ratios.items():
        print(
            f"  {name} / all-sdks: start-up {ratio['startup_s']:.2f} x, first job {ratio['first_job_s']:.2f} x,"
            f" peak RSS {ratio['peak_rss_mib']:.2f} x (goal <= 0.5 on start-up and RSS)"
        )


if __name__ == "__main__":
    main()
