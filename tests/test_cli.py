"""The vmq CLI, in-process through typer's runner, against the session's real Redis and sim worker."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from producer.cli import app
from tests.conftest import KOMBU_KEYS
from vmqueue.settings import get_settings

runner = CliRunner()
CREATE = ["create", "-p", "sim", "--name", "cli-1", "--region", "sim-1", "--type", "small", "--image", "debian-12"]


@pytest.fixture
def cli_env(monkeypatch, test_env, redis_client):
    for key, value in test_env.items():
        if key.startswith("VMQ_") or key == "REDIS_URL":
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_help_teaches():
    result = runner.invoke(app, ["create", "--help"])
    assert result.exit_code == 0
    assert "--provider" in result.output and "ubuntu-24.04" in result.output


def test_bad_input_exits_2_names_the_field_and_enqueues_nothing(cli_env, redis_client, ssh_key):
    result = runner.invoke(app, [*CREATE[:4], "Bad_Name", *CREATE[5:], "--ssh-key", ssh_key, "--label", "x"])
    assert result.exit_code == 2
    assert "--label 'x' must look like key=value" in result.output
    result = runner.invoke(app, [*CREATE[:4], "Bad_Name", *CREATE[5:], "--ssh-key", ssh_key, "--option", "zone=1"])
    assert result.exit_code == 2
    assert "spec.name" in result.output and "options.sim.zone" in result.output
    assert "Nothing was enqueued" in result.output
    assert [k for k in redis_client.scan_iter() if not k.startswith(KOMBU_KEYS)] == []


def test_bad_key_file_is_explained(cli_env, tmp_path):
    key = tmp_path / "id.pub"
    key.write_text("ssh-dss AAAA")
    result = runner.invoke(app, [*CREATE, "--ssh-key", str(key)])
    assert result.exit_code == 2 and "unsupported key type 'ssh-dss'" in result.output


@pytest.mark.system
def test_create_wait_job_destroy(cli_env, sim_worker, tmp_path, ssh_key):
    script = tmp_path / "init.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    result = runner.invoke(
        app, [*CREATE, "--ssh-key", ssh_key, "--script", str(script), "--label", "team=web", "--wait", "--json"]
    )
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["state"] == "running" and job["vm"]["labels"]["team"] == "web"

    shown = runner.invoke(app, ["job", job["id"]])
    assert shown.exit_code == 0 and "running" in shown.output and "create attempt 1" in shown.output

    gone = runner.invoke(app, ["destroy", "sim", job["instance_id"], "--wait", "--json"])
    assert gone.exit_code == 0 and json.loads(gone.output)["state"] == "gone"

    missing = runner.invoke(app, ["get", "sim", job["instance_id"], "--json"])
    assert missing.exit_code == 1 and json.loads(missing.output)["error"]["code"] == "not_found"


def test_unknown_job_and_unknown_provider(cli_env):
    assert runner.invoke(app, ["job", "nope"]).exit_code == 1
    result = runner.invoke(app, ["worker", "--provider", "linode"])
    assert result.exit_code == 2 and "Unknown provider 'linode'" in result.output
