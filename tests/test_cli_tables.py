"""The CLI's tables in a newcomer's 80-column terminal: what matters shows whole; a destroyed VM says so."""

from __future__ import annotations

import json
import re

from rich.console import Console
from typer.testing import CliRunner

from bench.harness import ROOT
from producer.cli import app
from producer.cli.common import job_table, public_address, state_label
from producer.cli.listing import vm_table
from vmqueue.models import Job, JobError, JobKind, JobState, VMInfo, VMSpec, VMStatus

runner = CliRunner()
ERROR = "The project has reached its server limit of 10; ask Hetzner support to raise it or destroy unused servers."


def _create(state: JobState = JobState.running, **fields) -> Job:
    spec = VMSpec(provider="hetzner", name="web-frontend-1", region="fsn1", instance_type="cx22", image="debian-12")
    vm = VMInfo(
        provider="hetzner",
        instance_id="58123456",
        name="web-frontend-1",
        status=VMStatus.running,
        public_ipv4="203.0.113.77",
    )
    return Job(kind=JobKind.create, provider="hetzner", spec=spec, state=state, instance_id="58123456", vm=vm, **fields)


def _render(table, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width, text
    return text


def _cells(text: str, column: int) -> list[str]:
    """The stripped cells of one column (0-based), row line by row line, headers included."""
    return [line.split("│")[column + 1].strip() for line in text.splitlines() if line.count("│") > column + 1]


def test_job_table_at_80_columns_keeps_name_state_and_address_whole_and_wraps_the_error_at_words():
    failed = _create(JobState.failed, error=JobError(code="quota_exceeded", message=ERROR))
    failed.vm, failed.instance_id = None, None
    jobs = [_create(), _create(ready_when="ssh"), failed, Job(kind=JobKind.destroy, provider="hetzner")]
    text = _render(job_table(jobs))
    assert f"│ {jobs[0].id[:8]} │" in text and jobs[0].id not in text
    assert text.count("web-frontend-1") == 3 and text.count("203.0.113.77") == 2
    assert "…" not in text  # nothing that shows is cut
    # The state label wraps at its words ("running, awaiting ssh readiness"), each whole.
    assert {"running", "failed", "queued", "readiness"} <= set(" ".join(_cells(text, 2)).split())
    # The error takes the rest and wraps at word boundaries: every word of the message is on one line.
    error_words = " ".join(cell for line in text.splitlines() for cell in line.split("│")[-2:-1]).split()
    assert set(ERROR.split()) <= set(error_words), text
    assert "narrow terminal:" in text  # what was left out to make room is said


def test_demo_table_at_80_columns_shows_state_name_and_address_whole():
    text = _render(job_table([_create(), _create(JobState.provisioning)], None, public_address))
    assert re.search(r"│ web-frontend-1 │ running +│", text) and re.search(r"│ provisioning │", text), text
    assert "…" not in text


def test_vm_table_at_80_columns_shows_the_job_id_prefix_and_the_vm_whole():
    job = _create(ttl_s=3600)
    text = _render(vm_table([job]))
    assert job.id not in text and f"│ {job.id[:8]} │" in text
    assert re.search(r"│ web-frontend-1 │ 58123456 │ running │ 203\.0\.113\.77 │", text), text


def test_an_empty_column_goes_before_any_other_is_cut():
    """A newcomer's 80 columns: "provi…", "destr…", "insta…" beside an error column empty in every row."""
    spec = VMSpec(provider="sim", name="web-1", region="sim-1", instance_type="small", image="ubuntu-24.04")
    vm = VMInfo(provider="sim", instance_id="sim-1", name="web-1", status=VMStatus.running, public_ipv4="127.88.0.2")
    destroyed = Job(
        kind=JobKind.create, provider="sim", spec=spec, state=JobState.running, instance_id="sim-1", vm=vm,
        vm_destroyed_by="60b722f7" * 4,
    )  # fmt: skip
    gone = Job(kind=JobKind.destroy, provider="sim", instance_id="sim-1", state=JobState.gone)
    text = _render(job_table([destroyed, gone]))
    assert " error " not in text and "…" not in text, text
    assert all(f" {header} " in text for header in ("kind", "provider", "instance")), text


def test_wide_tables_show_every_column():
    text = _render(job_table([_create()]), 200)
    assert all(f" {header} " in text for header in ("kind", "provider", "instance", "error"))
    assert "narrow terminal" not in text


def test_a_create_whose_vm_was_destroyed_says_so_and_the_destroy_row_names_the_vm(cli_env):
    from producer.client import Provisioner

    store = Provisioner().store
    create = store.add(_create())
    destroy = store.add(Job(kind=JobKind.destroy, provider="hetzner", instance_id="58123456"))
    # While the VM lives, the destroy job's row names it (its create's VM, from the job index).
    shown = runner.invoke(app, ["job", destroy.id])
    assert shown.exit_code == 0 and "web-frontend-1" in shown.output, shown.output
    listed = runner.invoke(app, ["jobs", "--kind", "destroy"])
    assert listed.exit_code == 0 and "web-frontend-1" in listed.output, listed.output

    def destroyed(job: Job) -> None:
        job.vm_destroyed_by = destroy.id

    store.update(create.id, destroyed)
    shown = runner.invoke(app, ["job", create.id])
    assert shown.exit_code == 0 and f"Its VM was destroyed by job {destroy.id}." in shown.output, shown.output
    assert state_label(store.get(create.id)) == f"running → destroyed by {destroy.id[:8]}"
    # Gone from the index, a destroy job without its VM's name shows the instance id in the name column.
    assert "│ 58123456 " in _render(job_table([store.get(destroy.id)]), 200).split("destroy")[1]


def test_an_empty_listing_says_so_in_one_line_and_how_to_create_a_vm(cli_env, monkeypatch):
    """A newcomer's `vmq vms` with no VM printed a table of headers alone: one line says why instead."""
    monkeypatch.chdir(ROOT)  # the fleet file below, by the path a newcomer types
    for command, noun in (("vms", "VMs"), ("jobs", "jobs")):
        empty = runner.invoke(app, [command], env={"COLUMNS": "80"})
        assert empty.exit_code == 0, empty.output
        assert empty.output.startswith(f"No {noun}; create ") and "`vmq create`" in empty.output, empty.output
        assert empty.output.count("\n") == 1 and "┃" not in empty.output, empty.output
        filtered = runner.invoke(app, [command, "--provider", "aws"], env={"COLUMNS": "80"})
        assert (
            filtered.exit_code == 0
            and filtered.output == f"No {noun} match these filters; `vmq {command}` alone lists them all.\n"
        )
        # Scripts read JSON: the empty list, no sentence.
        assert json.loads(runner.invoke(app, [command, "--json"]).output) == {command: [], "next_cursor": None}
    paged = runner.invoke(app, ["jobs", "--cursor", "1:" + "0" * 32])
    assert paged.exit_code == 0 and paged.output == "No more jobs after this cursor.\n", paged.output
    # The same kind of case: destroying a fleet that has no VMs printed an empty table.
    fleet = runner.invoke(app, ["destroy", "--fleet", "examples/fleet.yaml"], env={"COLUMNS": "80"})
    assert fleet.exit_code == 0 and "┃" not in fleet.output, fleet.output
    assert fleet.output == "Fleet example: no VMs to destroy; `vmq apply examples/fleet.yaml` creates them.\n"
