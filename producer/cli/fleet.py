"""``vmq apply FLEET`` and ``vmq destroy --fleet FLEET``: many VMs from one file (see producer/fleet.py).

Exit codes as everywhere in the CLI: 2 when the file is invalid (nothing enqueued), 1 when a VM is
not running after apply (or not gone after destroy, or the wait timed out), 0 otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from producer.cli.common import JsonOpt, TimeoutOpt, console, err, interrupted, provisioner
from producer.cli.fit import Column, FitTable
from producer.fleet import FleetError, load_fleet
from producer.fleetrun import FleetRunner, Tracked, all_gone, all_running

app = typer.Typer()

FleetArg = Annotated[Path, typer.Argument(help="the fleet file (YAML); see examples/fleet.yaml")]


@app.command()
def apply(
    fleet_file: FleetArg,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="follow the jobs until every VM runs (is ready, where ready_when asks)"),
    ] = True,
    timeout: TimeoutOpt = 900.0,
    as_json: JsonOpt = False,
) -> None:
    """Create the VMs of a fleet file that do not exist yet.

    Re-running it creates nothing new. The whole file is validated first: every problem is listed
    with its line, and nothing is enqueued. Exit 0 when every VM is running (and ready, where its
    ready_when asks), 1 otherwise.
    """
    fleet = _load(fleet_file)
    runner = FleetRunner(provisioner(), fleet.name)
    tracked = runner.apply(fleet)
    try:
        done = _follow(runner, tracked, timeout, as_json, "running") if wait else True
    except KeyboardInterrupt:
        raise interrupted(f"the {len(tracked)} job(s) go on. Follow them with `vmq apply {fleet_file}`") from None
    runner.settle_applied(tracked)
    _report(fleet.name, tracked, as_json, done)
    if wait and not (done and all_running(tracked)):
        raise typer.Exit(1)


def destroy_fleet(fleet_file: Path, timeout: float, as_json: bool) -> None:
    """``vmq destroy --fleet``: destroy every VM the fleet created, and follow until they are gone."""
    fleet = _load(fleet_file)
    runner = FleetRunner(provisioner(), fleet.name)
    tracked = runner.destroy()
    if not tracked and not as_json:  # an empty table says nothing: one line that does, exit 0
        console.print(
            f"Fleet {fleet.name}: no VMs to destroy; `vmq apply {fleet_file}` creates them.",
            highlight=False,
            soft_wrap=True,
        )
        return
    try:
        done = _follow(runner, tracked, timeout, as_json, "gone", step=runner.advance_destroy)
    except KeyboardInterrupt:
        what = f"the destroys sent so far go on. Finish and follow them with `vmq destroy --fleet {fleet_file}`"
        raise interrupted(what) from None
    _report(fleet.name, tracked, as_json, done)
    if not (done and all_gone(tracked)):
        raise typer.Exit(1)


def _load(path: Path):
    try:
        return load_fleet(path)
    except FleetError as exc:
        err.print(f"[bold red]Invalid fleet file[/] ({len(exc.problems)} problem(s)):")
        for problem in exc.problems:
            err.print(f"  {problem.format(path)}", markup=False, highlight=False, soft_wrap=True)
        err.print("Nothing was enqueued.")
        raise typer.Exit(2) from None


def _follow(
    runner: FleetRunner,
    tracked: list[Tracked],
    timeout_s: float,
    as_json: bool,
    goal: str,
    step: Callable[[list[Tracked]], None] | None = None,
) -> bool:
    """Follow the jobs with one progress bar per provider (none with --json: stdout is for the JSON)."""
    if as_json:
        return runner.follow(tracked, timeout_s, step=step)
    totals = Counter(t.provider for t in tracked)
    columns = (
        TextColumn("[bold]{task.description:<13}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {p: progress.add_task(p, total=n, detail="") for p, n in sorted(totals.items())}

        def update(items: list[Tracked]) -> None:
            for provider, bar in bars.items():
                mine = [t for t in items if t.provider == provider]
                states = Counter(t.state for t in mine if t.finished)
                detail = " ".join(f"{state} {n}" for state, n in sorted(states.items()))
                progress.update(bar, completed=sum(t.finished for t in mine), detail=detail)

        return runner.follow(tracked, timeout_s, update, step)


# Narrow, the provider goes first, then the instance; name, ips and state always show.
_COLUMNS = [
    Column("name"),
    Column("provider", "cut", drop=2),
    Column("instance", "cut", drop=1),
    Column("ips"),
    Column("state", "words"),
    Column("error", "rest"),
]
_COLOURS = {"running": "green", "ready": "green", "gone": "green", "cancelled": "green", "failed": "red"}


def _outcome(item: Tracked) -> str:
    """What the summary line counts: the action taken, or where a destroy ended (``gone``, ``failed``),
    so it agrees with the table's state column."""
    if item.action in ("destroying", "cancelling") and item.finished:
        return item.state
    return item.action


def _report(fleet: str, tracked: list[Tracked], as_json: bool, done: bool) -> None:
    if as_json:
        rows = [t.row() for t in tracked]
        print(json.dumps({"fleet": fleet, "finished": done, "vms": rows}, indent=2))
        return
    cells = []
    for item in tracked:
        row = item.row()
        colour = _COLOURS.get(row["state"], "yellow")
        private = f"{row['private_ipv4']} (private)" if row["private_ipv4"] else None
        ips = "\n".join(ip for ip in (row["public_ipv4"], row["public_ipv6"], private) if ip)
        problem = " ".join(p for p in (row["error"], row["note"]) if p)
        # As text: rich would read ":abcd:" in an IPv6 address as an emoji, "[x]" in an error as markup.
        cells.append(
            [Text(row["name"]), row["provider"], Text(row["instance_id"] or ""), Text(ips),
             Text(row["state"], style=colour), Text(problem)]
        )  # fmt: skip
    table = FitTable(_COLUMNS, cells, title=f"fleet {fleet}")
    console.print(table)
    actions = Counter(_outcome(t) for t in tracked)
    console.print(", ".join(f"{n} {action}" for action, n in sorted(actions.items())) or "no VMs")
    if not done:
        console.print("[yellow]Timed out before every job finished;[/] run the same command again to follow them.")
