"""The benchmarks' ``--json``: the flag parses and the figures make one JSON object (no benchmark runs here)."""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from bench import chaos, ready
from bench.harness import ROOT
from vmqueue.models import Job, JobKind, JobState, VMSpec
from vmqueue.readiness import HostKey


def _ready_job(created: datetime, running_s: float, ready_s: float) -> Job:
    spec = VMSpec(provider="sim", name="ssh-1", region="sim-1", instance_type="small", image="debian-12")
    job = Job(kind=JobKind.create, provider="sim", spec=spec, state=JobState.ready, ready_when="ssh")
    job.created_at = created
    job.running_at = created + timedelta(seconds=running_s)
    job.ready_at = created + timedelta(seconds=ready_s)
    job.host_keys = [HostKey(type="ssh-ed25519", sha256="SHA256:x", openssh="ssh-ed25519 AAAA")]
    return job


def test_bench_ready_json_is_one_object_of_the_figures_it_prints():
    assert ready.parse_args([]).json is False
    args = ready.parse_args(["--vms", "2", "--boot", "2", "--sshd-delay", "1", "--json"])
    assert args.json is True and args.vms == 2
    now = datetime.now(UTC)
    jobs = [_ready_job(now, 2.2, 3.5), _ready_job(now, 2.1, 3.3)]
    # Each VM booted at +2 s and its sshd came up at +3 s (epoch seconds, as vm_times gives them).
    times = {j.id: (now.timestamp() + 2, now.timestamp() + 3) for j in jobs}
    cpu = dict.fromkeys(
        ("intake_worker", "intake_readiness_threads", "batch_worker", "batch_readiness_threads"), 0.1
    ) | {"worker_total": 1.0, "sim_host_total": 0.5}
    figures = ready.ready_figures(args, (2.5, 2), (3.6, 2, 0.2), jobs, times, cpu)
    assert json.loads(json.dumps(figures)) == figures
    assert figures["ratio"] == 3.6 / 3 and figures["ssh"]["ready"] == 2 and figures["ssh"]["with_host_keys"] == 2
    assert figures["readiness_lag_s"]["max"] == 0.5 and figures["running"]["calls_per_vm"] == 1.0
    text = "\n".join(ready.report(figures))
    assert "ratio (time until all ready / (boot + sshd delay)): 1.200   goal <= 1.25" in text
    assert "readiness lag (ready_at - sshd up): p50 0.50s p95 0.50s max 0.50s" in text
    # No job ready: the lag figures are null, and the report leaves their lines out.
    none = ready.ready_figures(args, (2.5, 2), (3.6, 2, 0.2), [], {}, cpu)
    assert none["readiness_lag_s"] is None and "readiness lag" not in "\n".join(ready.report(none))


def test_bench_chaos_json_is_one_object_of_every_scenario():
    assert chaos.parse_args(["--only", "R4", "--json"]).json is True and chaos.parse_args([]).json is False
    passed, failed = chaos.Result("R4"), chaos.Result("R7")
    passed.check(True, "r4-stuck-0: failed with deadline_exceeded")
    passed.figures.update(background=Counter(running=3), at=datetime(2030, 1, 1, tzinfo=UTC))
    failed.check(False, "no running VM is destroyed")
    args = vars(chaos.parse_args(["--only", "R4", "R7", "--json"]))
    shaped = chaos.chaos_json([passed, failed], [4.5, 9.0], args, "/tmp/logs")
    assert json.loads(json.dumps(shaped)) == shaped
    assert shaped["ok"] is False and shaped["failed"] == ["R7"] and shaped["args"]["only"] == ["R4", "R7"]
    first = shaped["scenarios"][0]
    assert first["ok"] is True and first["seconds"] == 4.5
    assert first["figures"] == {"background": {"running": 3}, "at": "2030-01-01 00:00:00+00:00"}
    assert first["checks"] == [{"ok": True, "what": "r4-stuck-0: failed with deadline_exceeded"}]


SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if "\ndef main(" in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_takes_json(name: str, monkeypatch, capsys) -> None:
    # As the README says: every script's --help lists --json (in this process, nothing runs).
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{name}").main()
    assert exited.value.code in (0, None) and "--json" in capsys.readouterr().out


def test_the_readme_names_every_bench_script_that_takes_json():
    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("Every script takes `--json`") :].split("(", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", sentence.split(":", 1)[1])) == SCRIPTS, sentence
