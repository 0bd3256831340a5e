"""Errors that say what to do, at once (issue 16): each mistake a new operator makes, and what they see.

Real Redis, real worker processes and the real CLI (in-process through typer's runner, or as a
subprocess where a signal or a process start is part of the story).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from bench.harness import ROOT, sim_spec
from producer.cli import app
from producer.diagnose import AmbiguousJobId
from producer.fleet import FleetError, load_fleet
from producer.submit import JobNotFound
from tests.conftest import KOMBU_KEYS
from vmqueue import keys
from vmqueue.models import PROVIDERS, Job, JobError, JobState
from vmqueue.settings import get_settings

runner = CliRunner()
CREATE = ["create", "-p", "sim", "--name", "ops-1", "--region", "sim-1", "--type", "small", "--image", "debian-12"]
# A provider no test worker serves: its jobs stay queued.
HETZNER = ["create", "-p", "hetzner", "--name", "h-1", "--region", "fsn1", "--type", "cx22", "--image", "debian-12"]
SECRET = "MARKER-script-never-in-an-error"


def _app_keys(redis_client) -> list[str]:
    return [k for k in redis_client.scan_iter() if not k.startswith(KOMBU_KEYS)]


# -- deadlines ----------------------------------------------------------------------------------
def test_a_deadline_that_is_not_positive_is_refused_at_the_producer(cli_env, provisioner, redis_client, ssh_key):
    for bad in (0, -5):
        with pytest.raises(ValidationError) as caught:
            provisioner.create_vm(sim_spec("dl-1"), ssh_key, deadline_s=bad)
        assert [e["loc"] for e in caught.value.errors()] == [("deadline_s",)]
    result = runner.invoke(app, [*CREATE, "--ssh-key", ssh_key, "--deadline", "-5"])
    assert result.exit_code == 2, result.output
    assert "--deadline: " in result.output and "greater than 0" in result.output  # the flag the user typed
    assert _app_keys(redis_client) == []


def test_a_fleet_deadline_that_is_not_positive_names_its_line(tmp_path, ssh_key):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"fleet: f\ndefaults: {{provider: sim, region: sim-1, instance_type: small, image: debian-12, "
        f"ssh_key: '{ssh_key}'}}\nvms:\n  - name: a\n    deadline_s: 0\n"
    )
    with pytest.raises(FleetError, match=r"fleet.yaml:5: vms\[0\].deadline_s: Input should be greater than 0"):
        load_fleet(path)


# -- no script content in any producer error -------------------------------------------------------
@pytest.mark.parametrize(
    "script",
    [
        "#!/bin/sh\n" + "x" * 70_000 + SECRET,  # too long: the error once quoted the script's tail
        "#cloud-config\nruncmd: [echo " + SECRET + "\nfoo: : bar\n",  # bad YAML: PyYAML quotes the line
        "echo " + SECRET,  # no interpreter line
    ],
    ids=["too-long", "bad-cloud-config", "no-interpreter"],
)
def test_no_producer_error_carries_the_startup_script(cli_env, provisioner, tmp_path, ssh_key, script):
    with pytest.raises(ValidationError) as caught:
        provisioner.create_vm(sim_spec("sec-1"), ssh_key, script)
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
    assert "startup_script" in str(caught.value)
    (tmp_path / "init.sh").write_text(script)
    result = runner.invoke(app, [*CREATE, "--ssh-key", ssh_key, "--script", str(tmp_path / "init.sh")])
    assert result.exit_code == 2 and "startup_script" in result.output and SECRET not in result.output
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: f\nvms:\n  - {name: a, provider: sim, region: sim-1, instance_type: small, image: debian-12, "
        f"ssh_key: '{ssh_key}', script: init.sh}}\n"
    )
    with pytest.raises(FleetError) as failed:
        load_fleet(fleet)
    assert SECRET not in str(failed.value) and "script" in str(failed.value)


# -- job id prefixes -----------------------------------------------------------------------------
def _job_with_id(provisioner, job_id: str) -> Job:
    job = Job(id=job_id, kind="get", provider="sim", instance_id="i-1")
    provisioner.store.add(job)
    return job


def test_any_unique_job_id_prefix_works_everywhere_a_job_id_is_read(cli_env, provisioner, redis_client):
    one = _job_with_id(provisioner, "1e8b2e43" + "0" * 24)
    _job_with_id(provisioner, "1e8c0000" + "1" * 24)
    assert provisioner.get_job("1e8b2e43").id == one.id
    assert provisioner.get_job("1e8b").id == one.id
    with pytest.raises(AmbiguousJobId, match=r"'1e8' matches 2 jobs .*give more characters"):
        provisioner.get_job("1e8")
    with pytest.raises(JobNotFound):
        provisioner.get_job("ffff")
    shown = runner.invoke(app, ["job", "1e8b2e43", "--json"])
    assert shown.exit_code == 0 and one.id in shown.output
    assert runner.invoke(app, ["job", "1e8"]).exit_code == 1
    provisioner.store.transition(one.id, JobState.failed, "failed: test", error=JobError(code="test", message="m"))
    waited = runner.invoke(app, ["wait", "1e8b2e43", "--timeout", "5"])
    assert waited.exit_code == 1 and one.id in waited.output  # the full id, to copy


# -- fallbacks and destroy_on_failure from the CLI and fleet files ---------------------------------
def test_fallbacks_and_destroy_on_failure_on_vmq_create(cli_env, provisioner, redis_client, ssh_key):
    options = ["--fallback", "nbg1", "--fallback", "hel1:cx32", "--keep-on-failure", "--json"]
    result = runner.invoke(app, [*HETZNER, "--ssh-key", ssh_key, *options])
    assert result.exit_code == 0, result.output
    job = provisioner.get_job(result.output.split('"id": "')[1].split('"')[0])
    assert [(p.region, p.instance_type) for p in job.spec.fallbacks] == [("nbg1", None), ("hel1", "cx32")]
    assert job.destroy_on_failure is False
    bad = runner.invoke(app, [*HETZNER, "--ssh-key", ssh_key, "--fallback", "bad region"])
    assert bad.exit_code == 2 and "spec.fallbacks.0.region" in bad.output


def test_fallbacks_and_destroy_on_failure_in_a_fleet_file(cli_env, provisioner, tmp_path, ssh_key):
    from producer.fleetrun import FleetRunner

    path = tmp_path / "fleet.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "fleet": "fb",
                "defaults": {
                    "provider": "hetzner",
                    "region": "fsn1",
                    "instance_type": "cx22",
                    "image": "debian-12",
                    "ssh_key": ssh_key,
                    "fallbacks": [{"region": "nbg1"}],
                },  # fmt: skip
                "vms": [{"name": "a", "destroy_on_failure": False}, {"name": "b"}],
            }
        )
    )
    fleet = load_fleet(path)
    tracked = FleetRunner(provisioner, fleet.name).apply(fleet)
    jobs = {t.ident: provisioner.get_job(t.job_id) for t in tracked}
    assert [p.region for p in jobs["hetzner/a"].spec.fallbacks] == ["nbg1"]
    assert jobs["hetzner/a"].destroy_on_failure is False and jobs["hetzner/b"].destroy_on_failure is True


# -- small ones ----------------------------------------------------------------------------------
def test_the_web_install_hint_shows_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # importing it raises ImportError, as when not installed
    result = runner.invoke(app, ["web"])
    assert result.exit_code == 2
    assert "pip install 'vmqueue[web]'" in result.output


def test_compose_starts_only_enabled_providers_and_needs_no_flower_auth_for_other_services():
    compose = (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(compose)["services"]
    by_provider = {
        name: svc["command"][svc["command"].index("--provider") + 1]
        for name, svc in services.items()
        if "--provider" in svc.get("command", [])
    }
    assert set(by_provider.values()) == set(PROVIDERS)
    for name, provider in by_provider.items():  # a cloud's services start only when its profile is enabled
        assert services[name].get("profiles") == (None if provider == "sim" else [provider]), name
    assert {"redis", "flower", "worker-sim", "sweeper-sim"} <= {n for n, s in services.items() if "profiles" not in s}
    # "${VAR:?...}" fails every compose command (even `up redis`) while VAR is unset.
    assert not re.search(r"\$\{[^}]*:?\?", compose)


# -- Redis down ------------------------------------------------------------------------------------
class HangUp:
    """A TCP listener that counts the connections made to it and closes each at once: a Redis that
    does not answer. How often a client dialled it tells a quick check from a retry storm."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.dials = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.dials += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_redis_down_is_one_line_naming_the_url_within_seconds(monkeypatch, ssh_key, tmp_path):
    hangup = HangUp()  # a Redis that hangs up: a command that rode it out would dial it ~20 times
    port = hangup.port
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    monkeypatch.setenv("REDIS_URL", url)
    get_settings.cache_clear()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: f\nvms:\n  - {name: a, provider: sim, region: sim-1, instance_type: small, image: debian-12, "
        f"ssh_key: '{ssh_key}'}}\n"
    )
    try:
        for argv in ([*CREATE, "--ssh-key", ssh_key], ["job", "abcd"], ["get", "sim", "i-1"], ["apply", str(fleet)]):
            before = hangup.dials
            result = runner.invoke(app, argv)
            assert hangup.dials - before <= 2, (argv, hangup.dials - before)  # one quick check, no retries
            assert result.exit_code == 1, (argv, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1, result.output
            assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in lines[0]
            assert "hunter2" not in result.output
    finally:
        hangup.close()
        get_settings.cache_clear()


# -- no worker serves the queue -------------------------------------------------------------------
def _backdate(redis_client, job_id: str, seconds: float) -> None:
    """The job was enqueued ``seconds`` ago (what waiting that long would do, without the wait)."""
    job = Job.model_validate_json(redis_client.get(keys.job_key(job_id)))
    job.created_at = job.created_at.fromtimestamp(time.time() - seconds, job.created_at.tzinfo)
    redis_client.set(keys.job_key(job_id), job.model_dump_json())


def test_a_job_no_worker_takes_says_so_and_how_to_start_one(cli_env, provisioner, redis_client, ssh_key):
    job = provisioner.create_vm({**sim_spec("nw-1"), "provider": "hetzner", "region": "fsn1",
                                 "instance_type": "cx22"}, ssh_key)  # fmt: skip
    assert provisioner.notice(provisioner.get_job(job.id)) is None  # just queued: nothing to say yet
    _backdate(redis_client, job.id, 60)
    notice = provisioner.notice(provisioner.get_job(job.id))
    assert notice and "no worker serves vmq.hetzner" in notice and "vmq worker --provider hetzner" in notice
    result = runner.invoke(app, ["wait", job.id[:8], "--timeout", "1"])
    assert result.exit_code == 1
    assert "no worker serves vmq.hetzner" in result.output and f"vmq wait {job.id}" in result.output
    from fastapi.testclient import TestClient

    from producer.web import create_app

    # The API's job view says the same (its AsyncProvisioner reads REDIS_URL, set by cli_env).
    with TestClient(create_app(allow_no_auth=True)) as client:
        view = client.get(f"/jobs/{job.id[:8]}").json()
    assert view["id"] == job.id and "no worker serves vmq.hetzner" in view["notice"]
    # A live worker of the queue marks it served: a job queued behind others gets no such notice.
    redis_client.set(keys.served_key("hetzner"), "1", ex=30)
    assert provisioner.notice(provisioner.get_job(job.id)) is None


# -- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_while_waiting_says_the_job_goes_on(test_env, redis_client, ssh_key):
    process = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *HETZNER, "--ssh-key", ssh_key, "--wait"],
        cwd=ROOT,
        env={**test_env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a shell starts it: an ignored SIGINT is inherited, and a test process (an xdist worker
        # after some tests) may have SIGINT ignored, which left this CLI waiting on forever.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 20
    # Recorded and published (the message waits on vmq.hetzner, which no worker serves): the CLI is
    # following the job by now. A Ctrl-C before the publish would stop the enqueue, not the wait.
    while not ([k for k in redis_client.scan_iter(f"{keys.JOB_PREFIX}*")] and redis_client.llen("vmq.hetzner")):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)  # a ceiling on a busy machine, not a timing
    job_id = next(redis_client.scan_iter(f"{keys.JOB_PREFIX}*")).removeprefix(keys.JOB_PREFIX)
    assert process.returncode == 130
    assert "Interrupted" in stderr and f"job {job_id} goes on" in stderr and f"vmq wait {job_id}" in stderr
    assert "Traceback" not in stderr


# -- vmq worker: concurrency from the environment, unique names, metrics port in use --------------
def _vmq_worker(test_env: dict[str, str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "--provider", "sim"],
        cwd=ROOT,
        env={**test_env, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.system
def test_vmq_worker_honours_concurrency_names_each_worker_and_reports_a_busy_metrics_port(
    test_env, provisioner, redis_client, tmp_path
):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [
        _vmq_worker(test_env, logs[0], VMQ_WORKER_CONCURRENCY="3"),
        _vmq_worker(test_env, logs[1], VMQ_WORKER_CONCURRENCY="3", VMQ_METRICS_PORT=str(port)),
    ]
    try:
        pids = {f"sim-{w.pid}@" for w in workers}
        deadline = time.monotonic() + 30
        while True:
            stats = provisioner.celery.control.inspect(timeout=1).stats() or {}
            mine = {name: s for name, s in stats.items() if any(name.startswith(p) for p in pids)}
            if len(mine) == 2 or time.monotonic() > deadline:
                break
        assert len(mine) == 2, (stats.keys(), [log.read_text()[-2000:] for log in logs])
        assert all(s["pool"]["max-concurrency"] == 3 for s in mine.values())
        # A live worker marks its queue served (so a queued job is not said to have no worker).
        assert 0 < redis_client.ttl(keys.served_key("sim")) <= 30
        text = logs[1].read_text()
        assert f"metrics: port {port} on 127.0.0.1 is in use" in text and "VMQ_METRICS_PORT" in text
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
        busy.close()


# -- the HTTP API: /healthz reports Redis, a fast 503 naming it, /docs without internet -----------
def test_api_reports_redis_and_serves_its_docs_without_a_cdn(cli_env, monkeypatch, redis_client, ssh_key):
    from fastapi.testclient import TestClient

    from producer.web import create_app

    with TestClient(create_app(allow_no_auth=True)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "redis": "ok"}
        page = client.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]|url: ?['"]([^'"]+)['"]""", page.text)
        urls = [a or b for a, b in assets]
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
        for url in urls:
            assert url.startswith("/"), f"/docs loads {url} from outside the app"
            assert client.get(url).status_code == 200, url

    hangup = HangUp()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{hangup.port}/0")
    get_settings.cache_clear()
    with TestClient(create_app(allow_no_auth=True)) as client:
        health = client.get("/healthz")
        assert health.status_code == 503 and "cannot reach Redis at redis://127.0.0.1:" in health.json()["redis"]
        before = hangup.dials
        answer = client.post("/vms", json={"spec": sim_spec("api-down"), "ssh_key": ssh_key})
        assert answer.status_code == 503 and hangup.dials - before <= 2  # one quick check, no retries
        assert "cannot reach Redis at redis://127.0.0.1:" in answer.json()["detail"]
