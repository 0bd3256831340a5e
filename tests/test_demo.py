"""`vmq demo`, the quick start's main job, run as a user runs it: a subprocess, on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench.harness import ROOT

pytestmark = pytest.mark.system


@pytest.mark.parametrize("redis", ["answers", "absent"])
def test_demo_creates_and_destroys_on_the_simulated_cloud(redis, redis_url, redis_client, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMQ_")}
    # The default settings, as a user has them: a destroyed VM its create saw running is believed gone
    # at its first NotFound, not after the 30 s consistency window (35.8 s for this demo before).
    # "absent": nothing listens there, so the demo starts (and stops) a private redis-server.
    env["REDIS_URL"] = redis_url if redis == "answers" else "redis://127.0.0.1:1/0"
    # A newcomer's 80 columns, and a wide terminal: either way state, name and address show whole.
    env["COLUMNS"] = columns = "80" if redis == "answers" else "200"
    env["TMPDIR"] = str(tmp_path)  # where the demo's worker log goes (and, absent, its redis-server's directory)
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "--count", "2", "--boot", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 VMs reached running, 2/2 are gone." in result.stdout
    assert ("private redis-server" in result.stdout) == (redis == "absent")
    # Both tables (as a pipe gets them: the last frame), one row per VM: its name and public address,
    # on the destroy rows too (the destroy job's own read sees a deleting VM, without its public one).
    created, destroyed = result.stdout.split("Destroying 2 VMs")
    for table, kind, state in ((created, "create", "running"), (destroyed, "destroy", "gone")):
        rows = [line for line in table.splitlines() if f"│ {kind} " in line]
        assert len(rows) == 2, table
        for row in rows:
            assert re.search(rf"│ demo-\d+-[12] +│ {state} +│ sim-\d+ +│ 127\.88\.\d+\.\d+ +│", row), row
    assert "(private)" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= int(columns)
    # A demo that worked leaves nothing behind: its worker's log (printed at the start) is removed.
    said = result.stdout.replace("\n", "")  # the path may wrap
    assert f"(log: {tmp_path}/vmq-demo-worker-" in said and list(tmp_path.iterdir()) == [], said
