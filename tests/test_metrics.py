"""Monitoring: a worker's Prometheus endpoint after real jobs, and its JSON log lines with job id and provider."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import free_port
from vmqueue.models import JobState

pytestmark = pytest.mark.system

SPEC = {"provider": "sim", "name": "metrics-1", "region": "sim-1", "instance_type": "small", "image": "debian-12"}


def _samples(port: int) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_worker_serves_job_and_provider_metrics_and_logs_json(
    sim_worker_paused, worker_factory, provisioner, sim, ssh_key
):
    port = free_port()
    worker = worker_factory("sim", env={"VMQ_METRICS_PORT": str(port), "VMQ_LOG_FORMAT": "json"})
    created = provisioner.wait(provisioner.create_vm(SPEC, ssh_key).id, timeout_s=30)
    assert created.state == JobState.running
    missing = provisioner.wait(provisioner.get_vm("sim", "sim-999999").id, timeout_s=30)
    assert missing.state == JobState.failed

    samples = _samples(port)
    sim_ = ("provider", "sim")
    assert samples[("vmq_jobs_finished_total", frozenset({sim_, ("kind", "create"), ("state", "running")}))] == 1
    assert samples[("vmq_jobs_finished_total", frozenset({sim_, ("kind", "get"), ("state", "failed")}))] == 1
    assert samples[("vmq_job_errors_total", frozenset({sim_, ("kind", "get"), ("code", "not_found")}))] == 1
    assert samples[("vmq_provider_calls_total", frozenset({sim_, ("method", "create_vm")}))] >= 1
    assert samples[("vmq_provider_errors_total", frozenset({sim_, ("method", "get_vm"), ("error", "NotFoundError")}))]
    assert samples[("vmq_create_enqueue_to_running_seconds_count", frozenset({sim_}))] == 1

    # Structured logs: the lines of a job carry its id and provider as fields.
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line["job_id"] == created.id]
        if any("running" in line["msg"] for line in mine) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine and all(line["provider"] == "sim" for line in mine)
    assert any("running" in line["msg"] for line in mine)
