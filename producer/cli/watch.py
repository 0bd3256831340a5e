"""``vmq watch [JOB_ID...]``: follow job events live in the terminal (vmqueue/events.py)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from producer.cli.common import JsonOpt, console, err, provisioner
from vmqueue.events import JobChange
from vmqueue.models import JobState, message_detail

app = typer.Typer()

_COLOURS = {
    JobState.running: "green",
    JobState.ready: "green",
    JobState.gone: "green",
    JobState.done: "green",
    JobState.failed: "red",
}


def event_line(change: JobChange) -> str:
    """One event as a terminal line: time, job, kind/provider, previous -> state, VM, message."""
    came = f"{change.previous} -> " if change.previous else ""
    colour = _COLOURS.get(change.state, "yellow")
    parts = [
        f"{change.at:%H:%M:%S}",
        change.job_id,
        f"{change.kind}/{change.provider}",
        f"{came}[{colour}]{change.state}[/]",
    ]
    if change.cleanup:
        parts.append(f"(cleanup {change.cleanup})")
    if change.vm and change.vm.public_ipv4:
        parts.append(change.vm.public_ipv4)
    elif change.instance_id:
        parts.append(change.instance_id)
    if change.error:
        parts.append(f"[red]{change.error.code}[/]")
    detail = message_detail(change.state, change.message)  # "running -> running" says it once
    if detail:
        parts.append(f"[dim]{escape(detail)}[/]")
    return " ".join(parts)


@app.command()
def watch(
    job_ids: Annotated[list[str] | None, typer.Argument(help="jobs to follow; none: every job, from now on")] = None,
    after: Annotated[str | None, typer.Option(help="resume after this event id (as printed by --json)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow job events live; with no JOB_ID, every job's.

    The given jobs from their first event until each is finished (exit 1 if any failed), or with no
    JOB_ID every job's changes from now on, until Ctrl-C.
    """
    client = provisioner()
    known = []
    for job_id in job_ids or []:
        job = client.store.get(job_id)
        if job is None:
            err.print(f"[red]no job {job_id!r}[/] (unknown, or expired)")
            raise typer.Exit(1)
        known.append(job.id)
    failed = False
    try:
        for event_id, change in client.events(known or None, after):
            failed |= change.finished and change.state == JobState.failed
            if as_json:
                console.print_json(data={"id": event_id, **change.model_dump(mode="json")})
            else:
                console.print(event_line(change), highlight=False, soft_wrap=True)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if failed:
        raise typer.Exit(1)
