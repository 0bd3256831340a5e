"""The vmq CLI, in-process through typer's runner, against the session's real Redis and sim worker."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from producer.cli import app
from producer.cli.common import job_table, phase_lines, read_key
from producer.cli.watch import event_line
from tests.conftest import KOMBU_KEYS
from vmqueue.events import JobChange
from vmqueue.models import Job, JobEvent, JobKind, JobState, VMInfo, VMSpec, VMStatus

runner = CliRunner()
CREATE = ["create", "-p", "sim", "--name", "cli-1", "--region", "sim-1", "--type", "small", "--image", "debian-12"]


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
    # Each problem names the flag the user typed, not the request's field ("--name", not "spec.name").
    assert "--name: must be a hostname" in result.output and "--option (spec.options.sim.zone)" in result.output
    assert "Nothing was enqueued" in result.output
    for flag, value in (("--deadline", "0"), ("--ready-deadline", "-1"), ("--ssh-port", "0"), ("--ttl", "0")):
        result = runner.invoke(app, [*CREATE, "--ssh-key", ssh_key, flag, value])
        named = re.search(rf"^(  |Invalid request: ){flag}[: ]", result.output, re.M)
        assert result.exit_code == 2 and named, result.output
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
    history = runner.invoke(app, ["job", json.loads(gone.output)["id"]], env={"COLUMNS": "200"}).output
    assert "gone" in _history(history) and _history(shown.output)["running"] == [""], history

    missing = runner.invoke(app, ["get", "sim", job["instance_id"], "--json"])
    assert missing.exit_code == 1 and json.loads(missing.output)["error"]["code"] == "not_found"


def test_unknown_job_and_unknown_provider(cli_env):
    assert runner.invoke(app, ["job", "nope"]).exit_code == 1
    result = runner.invoke(app, ["worker", "--provider", "linode"])
    assert result.exit_code == 2 and "Unknown provider 'linode'" in result.output


COMMANDS = sorted(get_command(app).commands)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_reads_whole_in_80_columns(command):
    # A newcomer's narrow terminal: typer's option table cut names and defaults to "--idempotency-…".
    result = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "<bool>" not in result.output  # a flag takes no value: it shows no type
    # The description reads whole: no line of a paragraph ends before the next line's first word
    # would have fit (a docstring's own line breaks cut "starts a sim" / "worker, and ..." apart).
    text = result.output.split("╭")[0].splitlines()[2:]  # after the usage line
    for line, following in zip(text, text[1:], strict=False):
        if line.strip() and following.strip():
            assert len(line.strip()) + 1 + len(following.split()[0]) > 78, (line, following)


def test_every_command_summary_fits_its_row_in_80_columns():
    # A summary that wraps mid-sentence over lines of `vmq --help` reads as cut ("its VM is" / "destroyed").
    lines = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output.splitlines()
    for name, command in get_command(app).commands.items():
        summary = command.help.split("\n\n")[0].strip()
        assert [line for line in lines if f" {name} " in line and summary in line], (name, summary)


def _ssh_create(state: JobState = JobState.running, ready_when: str = "ssh") -> Job:
    spec = VMSpec(provider="sim", name="ssh-1", region="sim-1", instance_type="small", image="debian-12")
    vm = VMInfo(provider="sim", instance_id="sim-1", name="ssh-1", status=VMStatus.running, public_ipv4="127.88.0.2")
    now = datetime.now(UTC)
    return Job(
        kind=JobKind.create,
        provider="sim",
        spec=spec,
        state=state,
        instance_id="sim-1",
        vm=vm,
        created_at=now - timedelta(seconds=5),
        submitted_at=now - timedelta(seconds=5),
        running_at=now,
        ready_when=ready_when,
    )


def _table(job: Job) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(job_table([job]))
    return console.export_text()


def test_a_create_awaiting_readiness_says_so_with_its_phases():
    waiting = _ssh_create()
    assert "│ running, awaiting ssh readiness │" in _table(waiting)
    assert [line.split()[0] for line in phase_lines(waiting)] == ["queued", "submitted", "running", "awaiting"]
    deadline = waiting.running_at + timedelta(seconds=waiting.ready_deadline_s)
    assert phase_lines(waiting)[-1] == f"awaiting   ssh readiness (ready_timeout at {deadline:%H:%M:%S})"

    ready = _ssh_create(JobState.ready)
    ready.ready_at = ready.running_at + timedelta(seconds=4.5)
    assert "│ ready │" in _table(ready) and "awaiting" not in _table(ready)
    assert phase_lines(ready)[-1] == f"ready      {ready.ready_at:%H:%M:%S}  (ssh, 4.5s after running)"
    plain = _ssh_create(ready_when="running")
    assert "│ running │" in _table(plain) and phase_lines(plain)[-1].startswith("running ")


def test_vmq_job_and_wait_show_the_phase_and_end_their_lines(cli_env):
    from producer.client import Provisioner

    store = Provisioner().store
    waiting = store.add(_ssh_create())
    shown = runner.invoke(app, ["job", waiting.id[:8]])
    assert shown.exit_code == 0, shown.output
    assert "awaiting" in shown.output and "awaiting   ssh readiness (ready_timeout at" in shown.output

    ready = _ssh_create(JobState.ready)
    ready.ready_at = ready.running_at + timedelta(seconds=2)
    store.add(ready)
    # `wait` on a finished job: the live table's last frame, in a pipe, then the phases on lines of their own.
    waited = runner.invoke(app, ["wait", ready.id])
    assert waited.exit_code == 0, waited.output
    assert re.search(r"┘\nphases \(UTC\):\n  queued .*\n  submitted .*\n  running .*\n  ready ", waited.output)
    gone = store.add(Job(kind=JobKind.destroy, provider="sim", instance_id="sim-1", state=JobState.gone))
    waited = runner.invoke(app, ["wait", gone.id])
    assert waited.exit_code == 0 and waited.output.endswith("┘\n"), repr(waited.output[-20:])


# History messages as the workers and the producer write them (workers/lifecycle/, producer/control.py).
WRITTEN = [
    (JobState.submitting, "create attempt 1 in sim-1 (small)"),
    (JobState.provisioning, "provider accepted the create: sim-1"),
    (JobState.running, "running"),
    (JobState.ready, "ready: ssh answered on public port 2222"),
    (JobState.cancelled, "cancelled (asked by alice at 2030-01-01 00:00:00 UTC); destroying sim-1"),
    (JobState.failed, "failed: ready_timeout: running but not ready: ssh within 600s"),
]
TWICE = re.compile(r"\b([a-z]+)\W+\1\b")  # "running running", "failed failed:"


def _history(output: str) -> dict[str, list[str]]:
    """The history lines `vmq job` printed, by state: what each says after its state, which it must
    not say again (it read "running running", "gone the provider reports the VM gone")."""
    lines: dict[str, list[str]] = {}
    for state, rest in re.findall(r"^  \d\d:\d\d:\d\d (\w+)(.*)$", output, re.M):
        assert state not in re.findall(r"[a-z]+", rest), (state, rest)
        lines.setdefault(state, []).append(rest.strip())
    return lines


def test_history_lines_say_the_state_once(cli_env):
    """A newcomer's `vmq job` read `running running`: the state, then a message repeating it."""
    from producer.client import Provisioner
    from workers.jobevents import final_event

    job = _ssh_create(JobState.failed)
    job.history = [JobEvent(state=state, message=message) for state, message in WRITTEN]
    Provisioner().store.add(job)
    shown = runner.invoke(app, ["job", job.id], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert len(_history(shown.output)) == len(WRITTEN)
    lines = [line.split(None, 1)[1] for line in shown.output.splitlines() if re.match(r"  \d\d:\d\d:\d\d ", line)]
    assert lines == [
        "submitting: create attempt 1 in sim-1 (small)",
        "provisioning: provider accepted the create: sim-1",
        "running",
        "ready: ssh answered on public port 2222",
        "cancelled (asked by alice at 2030-01-01 00:00:00 UTC); destroying sim-1",
        "failed: ready_timeout: running but not ready: ssh within 600s",
    ], shown.output
    # Flower's page of a failed job shows the same lines; `vmq watch` says the state once too.
    assert [line.split(None, 1)[1] for line in final_event(job)[1]["traceback"].splitlines()] == lines
    for state, message in WRITTEN:
        change = JobChange(job_id=job.id, kind=job.kind, provider="sim", state=state, finished=False, message=message)
        assert not TWICE.search(re.sub(r"\[/?\w*\]", "", event_line(change))), event_line(change)
    assert JobEvent(state=JobState.running, message="running-ish").line == "running: running-ish"


def test_ssh_key_help_names_every_key_tried_in_order(monkeypatch, tmp_path, ssh_key):
    """`--ssh-key`'s help named only ~/.ssh/id_ed25519.pub, though ECDSA and RSA keys are tried too."""
    params = {p.name: p for p in get_command(app).commands["create"].params}
    tried = ["~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub"]
    said = re.findall(r"~/\.ssh/\S+\.pub", params["ssh_key"].help)
    assert said == tried, params["ssh_key"].help
    shown = runner.invoke(app, ["create", "--help"], env={"COLUMNS": "80"}).output
    assert all(path in shown for path in tried), shown
    # What the help says is what is done: the first of them that exists.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    for name, line in (("id_rsa.pub", "ssh-rsa AAAA rsa"), ("id_ecdsa.pub", "ecdsa-sha2-nistp256 AAAA ecdsa")):
        (tmp_path / ".ssh" / name).write_text(line)
    assert read_key(None) == "ecdsa-sha2-nistp256 AAAA ecdsa"
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text(ssh_key)
    assert read_key(None) == ssh_key
