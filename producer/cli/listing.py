"""``vmq jobs``, ``vmq vms``, ``vmq cancel`` and ``vmq extend``: see, take back, and keep VMs longer."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from producer.cli.common import (
    LIST_FLAGS,
    JsonOpt,
    TimeoutOpt,
    WaitOpt,
    bad_input,
    console,
    creators,
    err,
    job_table,
    pairs,
    provisioner,
)
from producer.cli.fit import Column, FitTable
from vmqueue.jobindex import JobPage
from vmqueue.models import Job, JobState

app = typer.Typer()

KindOpt = Annotated[str | None, typer.Option("--kind", "-k", help="create, destroy or get")]
StateOpt = Annotated[str | None, typer.Option("--state", "-s", help="queued, running, failed, cancelled, ...")]
ProviderFilter = Annotated[str | None, typer.Option("--provider", "-p", help="only this provider's")]
NameOpt = Annotated[str | None, typer.Option("--name", help="the VM name the create asked for")]
LabelOpt = Annotated[list[str], typer.Option("--label", "-l", help="key=value, repeatable (all must match)")]
FleetOpt = Annotated[str | None, typer.Option("--fleet", help="the VMs of this fleet")]
SinceOpt = Annotated[str | None, typer.Option(help="created at or after (ISO 8601, UTC if no zone)")]
UntilOpt = Annotated[str | None, typer.Option(help="created at or before (ISO 8601, UTC if no zone)")]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", help="at most this many (1..1000), newest first")]
CursorOpt = Annotated[str | None, typer.Option(help="the next page: the cursor the last page printed")]


def _filters(**given: object) -> dict[str, object]:
    labels = pairs(given.pop("label"), "--label")  # type: ignore[arg-type]
    given["since"] = _when(given["since"], "--since")  # type: ignore[arg-type]
    given["until"] = _when(given["until"], "--until")  # type: ignore[arg-type]
    return {k: v for k, v in {**given, "labels": {k: str(v) for k, v in labels.items()}}.items() if v is not None}


def _show(
    page: JobPage, as_json: bool, table: FitTable, what: str, query: dict[str, object], cursor: str | None
) -> None:
    if as_json:
        listed = [job.model_dump(mode="json") for job in page.jobs]
        console.print_json(json.dumps({what: listed, "next_cursor": page.next_cursor}))
        return
    if not page.jobs:  # a table of headers alone says nothing: one line that does, exit 0
        console.print(nothing_listed(what, any(query.values()), cursor is not None), highlight=False, soft_wrap=True)
        return
    console.print(table)
    if page.next_cursor:
        console.print(f"More: [bold]--cursor {page.next_cursor}[/]")


def nothing_listed(what: str, filtered: bool, paged: bool) -> str:
    """What ``vmq jobs`` / ``vmq vms`` (``what``) print when nothing is listed: why, and what to do."""
    noun = "VMs" if what == "vms" else what
    if paged:
        return f"No more {noun} after this cursor."
    if filtered:
        return f"No {noun} match these filters; `vmq {what}` alone lists them all."
    return f"No {noun}; create {'one' if what == 'vms' else 'a VM'} with `vmq create` (see `vmq create --help`)."


@app.command("jobs")
def list_jobs(
    kind: KindOpt = None,
    state: StateOpt = None,
    provider: ProviderFilter = None,
    name: NameOpt = None,
    label: LabelOpt = [],  # noqa: B006
    fleet: FleetOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first.

    Example, the 50 newest failed creates on AWS:

    vmq jobs --state failed --kind create --provider aws
    """
    try:
        query = _filters(
            kind=kind, state=state, provider=provider, name=name, label=label, fleet=fleet, since=since, until=until
        )
        client = provisioner()
        page = client.list_jobs(query, limit=limit, cursor=cursor)
    except (ValidationError, ValueError) as exc:
        raise bad_input(exc, LIST_FLAGS) from None
    vms = {} if as_json else creators(client, page.jobs)
    _show(page, as_json, job_table(page.jobs, vms), "jobs", query, cursor)


@app.command("vms")
def list_vms(
    provider: ProviderFilter = None,
    state: StateOpt = None,
    name: NameOpt = None,
    label: LabelOpt = [],  # noqa: B006
    fleet: FleetOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the VMs vmqueue manages (not destroyed), newest first."""
    try:
        query = _filters(state=state, provider=provider, name=name, label=label, fleet=fleet, since=since, until=until)
        page = provisioner().list_vms(query, limit=limit, cursor=cursor)
    except (ValidationError, ValueError) as exc:
        raise bad_input(exc, LIST_FLAGS) from None
    _show(page, as_json, vm_table(page.jobs), "vms", query, cursor)


# Narrow, the expiry goes first, then the creation time, then the provider; the rest always shows.
VM_COLUMNS = [
    Column("provider", "cut", drop=2),
    Column("name"),
    Column("instance"),
    Column("status", "words"),
    Column("public ipv4"),
    Column("created", "cut", drop=3),
    Column("expires", "cut", drop=4),
    Column("job"),
]


def vm_table(jobs: list[Job]) -> FitTable:
    """One row per VM; its create job by the 8-character prefix every command takes (as `vmq jobs`)."""
    rows = []
    for job in jobs:
        vm = job.vm
        status = str(vm.status) if vm else ""
        if job.cleanup:
            status += f" (cleanup {job.cleanup})"
        rows.append(
            [
                job.provider,
                Text(job.spec.name if job.spec else ""),
                Text(job.instance_id or ""),
                status,
                (vm.public_ipv4 if vm else None) or "",
                f"{job.created_at:%Y-%m-%d %H:%M}",
                f"{job.expires_at:%Y-%m-%d %H:%M:%S}" if job.expires_at else "",
                job.id[:8],
            ]
        )
    return FitTable(VM_COLUMNS, rows)


@app.command()
def cancel(
    job_id: str,
    reason: Annotated[str, typer.Option(help="kept in the job's history")] = "",
    by: Annotated[str | None, typer.Option(help="who asks (default: your OS user)")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Take a job back (a create's VM is destroyed); exit 1 if refused.

    A queued job never runs; a create in flight ends cancelled and its VM is destroyed; a destroy
    cannot be cancelled once its delete was sent.
    """
    from producer.client import JobNotFound, JobTimeout
    from producer.control import CancelRefused

    client = provisioner()
    try:
        # A unique prefix of the id, as the job table shows it, names the job here as everywhere.
        job = client.cancel(client.get_job(job_id).id, by=by, reason=reason)
        if wait:
            job = client.wait(job.id, timeout_s=timeout)
    except (JobNotFound, CancelRefused, JobTimeout) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(job.model_dump_json())
    else:
        console.print(job_table([job]))
        if job.state != JobState.cancelled:
            console.print(f"Cancel recorded; the worker ends the job. Follow it with [bold]vmq wait {job.id}[/].")


@app.command()
def extend(
    job_id: str,
    ttl: Annotated[float | None, typer.Option(help="destroy the VM this many seconds from now")] = None,
    expires_at: Annotated[str | None, typer.Option(help="destroy the VM at this time (ISO 8601 with a zone)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the time a VM created with --ttl is destroyed.

    Also for expires_at set through the API. Exit 1 if the VM expired already.
    """
    from producer.client import JobNotFound
    from producer.control import ExtendRefused

    try:
        client = provisioner()
        job = client.extend(client.get_job(job_id).id, ttl_s=ttl, expires_at=_when(expires_at, "--expires-at"))
    except (JobNotFound, ExtendRefused) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    except ValueError as exc:
        raise bad_input(exc, {"ttl_s": "--ttl", "expires_at": "--expires-at"}) from None
    if as_json:
        console.print_json(job.model_dump_json())
    else:
        console.print(f"Job {job.id}: its VM is destroyed at {job.expires_at:%Y-%m-%d %H:%M:%S %Z}.")


def _when(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time (``2030-01-01T00:00:00Z``, ``2030-01-01``); ValueError naming ``option``."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{option} {value!r}: expected an ISO 8601 time, e.g. 2030-01-01T00:00:00Z") from None
