"""The benchmark scripts still run: each with tiny sizes, exit 0 and print its figures.

No figure is asserted (the machine is shared; times mean nothing here): only that the scripts
have not rotted. Each starts its own redis-server and workers, like the full runs.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bench.harness import ROOT

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

CASES = {
    "async_enqueue": (["--jobs", "100", "--rounds", "1", "--concurrency", "10"], ["AsyncProvisioner", "raw send_task"]),
    "throughput": (["--jobs", "50", "--rounds", "1", "--concurrency", "4"], ["vmqueue get jobs", "bare celery no-op"]),
    "enqueue": (["--jobs", "100", "--rounds", "1", "--chunk", "50"], ["Provisioner.create_vm", "raw send_task"]),
    "footprint": (["--repeat", "1", "--concurrency", "4"], ["sim / all-sdks", "hetzner / all-sdks"]),
    "listing": (["--sizes", "100,300", "--repeat", "3"], ["newest 50 failed jobs", "filtered ms"]),
    "budget": (["--profile", "hetzner", "--vms", "20", "--boot", "2"], ["hetzner", "floor", "x 429"]),
    "inflight": (["--vms", "30", "--boot", "2", "--runs", "1", "--no-baseline"], ["x boot", "floor", "no-op"]),
    "ready": (["--vms", "30", "--boot", "2", "--sshd-delay", "1"], ["readiness lag", "API calls per VM"]),
    "wire": (
        ["--fleet", "60", "--inflight", "5"],
        ["aws", "azure", "digitalocean", "gcp", "hetzner", "oci", "tick@fleet", "azure settle tick"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_runs_and_prints_its_figures(name: str) -> None:
    args, expected = CASES[name]
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, capture_output=True, text=True, timeout=220
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for text in [*expected, "ratio" if name != "footprint" else "peak RSS"]:
        assert text in result.stdout, result.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_help_says_what_it_measures(name: str, monkeypatch, capsys) -> None:
    # In this process: the script's own start as ``python -m`` is what the test above runs.
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{name}").main()
    assert exited.value.code in (0, None)
    assert "goal" in capsys.readouterr().out.lower()
