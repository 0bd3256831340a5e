"""A misconfigured worker refuses to start: ``vmq check`` and the same checks at every worker's start.

Real processes: ``vmq check`` as a subprocess, real Celery workers, the session's Redis, and the
Hetzner adapter's HTTP-level fake for credentials that work.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from bench.harness import ROOT, free_port
from tests.providers.fakehttp import serve
from tests.providers.hetzner_fake import FakeHetzner
from vmqueue import keys
from vmqueue.models import JobState

pytestmark = pytest.mark.system

CREDENTIAL_VARS = ("HCLOUD_TOKEN", "HCLOUD_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")
# Makes one module unimportable in a child interpreter, as in an environment without that SDK.
BLOCK = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Absent())
"""


def _env(test_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in test_env.items() if k not in CREDENTIAL_VARS}, "NO_PROXY": "*", **extra}


def _check(env: dict[str, str], *providers: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "producer.cli", "check", *(a for p in providers for a in ("-p", p))]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_vmq_check_says_which_credentials_to_set_and_accepts_working_ones(test_env, httpserver: HTTPServer):
    missing = _check(_env(test_env), "hetzner")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "FAIL  credentials" in missing.stdout and "set HCLOUD_TOKEN" in missing.stdout
    assert "ok    sdk          hcloud" in missing.stdout and "ok    redis" in missing.stdout

    endpoint = serve(httpserver, FakeHetzner())
    working = _check(_env(test_env, HCLOUD_TOKEN="fake-token", HCLOUD_ENDPOINT=endpoint), "hetzner")
    assert working.returncode == 0, working.stdout + working.stderr
    assert "ok    credentials  accepted" in working.stdout


def test_the_credentials_check_is_charged_to_the_shared_api_budget(test_env, redis_client, settings):
    """Issue 15: its list is a request like any other; uncounted, the workers' model of DigitalOcean's
    minute was one request short of the provider's and a create at the window's end drew a 429."""
    from workers.budget import Budget

    done = _check(_env(test_env, VMQ_SIM_PROFILE="digitalocean"), "sim")
    assert done.returncode == 0, done.stdout + done.stderr
    budget = Budget(settings, redis_client)
    left, _ = budget.window_stats("sim", budget.profile("sim", "digitalocean"), "minute", "/v2/droplets")
    assert left == 249


def test_vmq_check_names_the_extra_to_install_when_the_sdk_is_missing(test_env, tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK.format(name="google.cloud.compute_v1"))
    env = _env(test_env, PYTHONPATH=f"{tmp_path}:{ROOT}")
    result = _check(env, "gcp")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  sdk" in result.stdout and "pip install 'vmqueue[gcp]'" in result.stdout
    assert "credentials" not in result.stdout  # not tried without the SDK


def test_vmq_check_names_a_redis_that_does_not_answer(test_env):
    result = _check(_env(test_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), "sim")
    assert result.returncode == 1 and "FAIL  redis" in result.stdout and "cannot reach Redis at" in result.stdout


def test_a_worker_that_fails_its_preflight_refuses_to_consume_and_the_job_stays_queued(
    test_env, provisioner, redis_client, ssh_key, tmp_path: Path
):
    spec = {"provider": "hetzner", "name": "pf-1", "region": "fsn1", "instance_type": "cx22", "image": "debian-12"}
    job = provisioner.create_vm(spec, ssh_key)
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "vmq.hetzner", "-P", "threads",
            "-c", "2", "-n", f"pf-{time.monotonic_ns()}@%h", "--without-gossip", "--without-mingle"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.run(argv, cwd=ROOT, env=_env(test_env), stdout=out, stderr=subprocess.STDOUT, timeout=60)
    text = log.read_text()
    assert process.returncode == 78, text[-3000:]
    assert "set HCLOUD_TOKEN" in text and "will not consume vmq.hetzner" in text
    assert provisioner.get_job(job.id).state == JobState.queued
    assert redis_client.llen(keys.queue_name("hetzner")) == 1  # the message waits for a worker that can serve it


def test_a_budget_override_naming_no_bucket_stops_the_worker_before_it_takes_jobs(test_env, redis_client):
    """A newcomer's typo (``sim.minut``) passed the preflight as a warning under credentials; the worker
    took jobs and every create failed with internal_error. It is a fatal budget check now, naming the
    buckets there are. (``redis_client``: a clean database, so no other test's sim faults answer the list.)"""
    env = _env(test_env, VMQ_SIM_PROFILE="digitalocean", VMQ_BUDGET='{"sim.minut": "10/4 seconds"}')
    result = _check(env, "sim")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  budget" in result.stdout and "sim.minute" in result.stdout and "VMQ_BUDGET" in result.stdout
    assert "credentials" not in result.stdout
    good = _check(_env(test_env, VMQ_SIM_PROFILE="digitalocean", VMQ_BUDGET='{"sim.minute": "10/4 seconds"}'), "sim")
    assert good.returncode == 0, good.stdout
    assert "ok    budget       digitalocean's buckets: minute, hour" in good.stdout
