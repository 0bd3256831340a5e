"""What every ``vmq`` command shares: consoles, option types, input parsing and the job table.

It imports no command module, so each command module can import it without a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from producer.cli.fit import Column, FitTable
from vmqueue.models import PROVIDERS, Job, JobKind, JobState, VMInfo
from vmqueue.readiness import ReadyWhen

console = Console()
err = Console(stderr=True)

SUCCESS = {JobState.running, JobState.ready, JobState.gone, JobState.done}
# What a running create with ready_when ssh / cloud_init still waits for (its state alone says "running").
AWAITING = {ReadyWhen.ssh: "ssh readiness", ReadyWhen.cloud_init: "cloud-init's phone-home"}
ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help=f"one of: {', '.join(PROVIDERS)}")]
WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="follow the job live until it ends")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait at most")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the job as JSON (for scripts)")]
DEFAULT_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")  # tried in this order
SSH_KEY_DEFAULT = f"default: {', else '.join(DEFAULT_KEYS)}"


def provisioner():
    """The Provisioner, once Redis answered: else one line naming the URL, exit 1 (within seconds)."""
    from producer.client import Provisioner
    from vmqueue.connection import RedisUnavailable

    client = Provisioner()
    try:
        client.ensure_redis()
    except RedisUnavailable as exc:
        err.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
        raise typer.Exit(1) from None
    return client


def interrupted(what: str) -> typer.Exit:
    """Ctrl-C while following jobs: they go on without us; say so and how to follow them (exit 130)."""
    err.print(f"\n[yellow]Interrupted:[/] stopped following; {what}", soft_wrap=True)
    return typer.Exit(130)


# The request's field names as the flags of `vmq create` that set them: an error names what the user typed.
CREATE_FLAGS = {
    "spec.provider": "--provider",
    "spec.name": "--name",
    "spec.region": "--region",
    "spec.instance_type": "--type",
    "spec.image": "--image",
    "spec.labels": "--label",
    "spec.options": "--option",
    "spec.fallbacks": "--fallback",
    "ssh_key": "--ssh-key",
    "startup_script": "--script",
    "idempotency_key": "--idempotency-key",
    "deadline_s": "--deadline",
    "ttl_s": "--ttl",
    "ready_when": "--ready-when",
    "ready_deadline_s": "--ready-deadline",
    "ready_via": "--ready-via",
    "ssh_port": "--ssh-port",
}
# The job index's filters as the flags of `vmq jobs` / `vmq vms`.
LIST_FLAGS = {
    "labels": "--label",
    **{f: f"--{f}" for f in ("kind", "state", "provider", "name", "fleet", "since", "until")},
}


def as_flag(where: str, flags: Mapping[str, str]) -> str:
    """``where`` (a dotted field location) as the flag that sets it: ``deadline_s`` is ``--deadline``;
    deeper than the flag, the location follows (``--option (spec.options.sim.zone)``)."""
    for field, flag in flags.items():
        if where == field:
            return flag
        if where.startswith(field + "."):
            return f"{flag} ({where})"
    return where


def bad_input(exc: Exception, flags: Mapping[str, str] | None = None) -> typer.Exit:
    """Say what is wrong with the input (exit 2; nothing was enqueued). ``flags``: field names to the
    command's flags (``CREATE_FLAGS``), so a problem names the flag the user typed."""
    flags = flags or {}
    if isinstance(exc, ValidationError):
        err.print(f"[bold red]Invalid request[/] ({exc.error_count()} problem(s)):")
        for problem in exc.errors():
            message = problem["msg"].removeprefix("Value error, ")
            # A check of the whole request names its field first ("startup_script must start with ...").
            where = ".".join(str(p) for p in problem["loc"]) or message.split(" ", 1)[0]
            where = as_flag(where, flags) if where in flags or problem["loc"] else "request"
            err.print(f"  [bold]{escape(where)}[/]: {escape(message)}")
    else:
        message = str(exc)
        field = message.split(" ", 1)[0]
        if field in flags:  # "ttl_s must be in (0, ...] seconds": a check outside pydantic names its field
            message = flags[field] + message[len(field) :]
        err.print(f"[bold red]Invalid request:[/] {escape(message)}")
    err.print("Nothing was enqueued.")
    return typer.Exit(2)


def pairs(values: list[str], what: str) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON (numbers, true, lists) is taken as such."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def placement(value: str) -> dict[str, str]:
    """``--fallback REGION`` or ``REGION:TYPE`` as a ``Placement`` mapping (validated with the spec)."""
    region, _, instance_type = value.partition(":")
    return {"region": region, "instance_type": instance_type} if instance_type else {"region": region}


def read_key(value: str | None) -> str:
    if value is None:
        for candidate in DEFAULT_KEYS:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path.read_text()
        raise ValueError(f"no --ssh-key given and none of {', '.join(DEFAULT_KEYS)} exists")
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    return value


def reachable_address(vm: VMInfo | None) -> str:
    """The address to reach the VM at: its public IPv4, else its public IPv6 (an IPv6-only VM), else
    its private IPv4, marked as such."""
    if vm is None:
        return ""
    if vm.public_ipv4 or vm.public_ipv6:
        return vm.public_ipv4 or vm.public_ipv6 or ""
    return f"{vm.private_ipv4} (private)" if vm.private_ipv4 else ""


def public_address(vm: VMInfo | None) -> str:
    """The VM's public address (IPv4, else IPv6), else "-": what the demo shows on every row alike."""
    return (vm.public_ipv4 or vm.public_ipv6 or "-") if vm else "-"


def state_label(job: Job) -> str:
    """The state as a person reads it: a create that runs but still waits for ``ready_when`` says
    what for (``running, awaiting ssh readiness``), not a bare ``running`` that looks finished; a
    create whose VM a destroy job removed says so (``running → destroyed by 1a2b3c4d``)."""
    if job.vm_destroyed_by:
        return f"{job.state} → destroyed by {job.vm_destroyed_by[:8]}"
    if job.awaiting_ready:
        return f"{job.state}, awaiting {AWAITING[job.ready_when]}"
    return str(job.state)


# Narrow, provider goes first, then kind, then instance; job, name, state and address always show.
JOB_COLUMNS = [
    Column("job"),
    Column("kind", "cut", drop=2),
    Column("provider", "cut", drop=3),
    Column("name"),
    Column("state", "words"),
    Column("instance", "cut", drop=1),
    Column("address"),
    Column("error", "rest"),
]


def job_table(
    jobs: list[Job],
    vms: Mapping[str, VMInfo] | None = None,
    address: Callable[[VMInfo | None], str] = reachable_address,
    title: str | None = None,
) -> FitTable:
    """One row per job. ``vms``: by job id, the VM to show instead of the job's own (a destroy job's
    VM as its create saw it running), for the name and address; ``address`` picks the address. A
    job without a VM name (a destroy of a VM vmqueue did not name) shows its instance id there."""
    rows = []
    for job in jobs:
        colour = "red" if job.state == JobState.failed else "yellow"
        if job.state in SUCCESS and not job.awaiting_ready and not job.vm_destroyed_by:
            colour = "green"
        error = f"{job.error.code}: {job.error.message}" if job.error else ""
        if job.cleanup:
            error += f" (cleanup {job.cleanup})"
        vm = (vms or {}).get(job.id) or job.vm
        name = (job.spec.name if job.spec else None) or (vm.name if vm else None) or job.instance_id or ""
        rows.append(
            [
                job.id[:8],
                job.kind,
                job.provider,
                Text(name),
                Text(state_label(job), style=colour),
                Text(job.instance_id or ""),
                Text(address(vm)),  # as text: rich would read ":abcd:" in an IPv6 address as an emoji
                Text(error.strip()),  # as text: a provider's message may hold [brackets]
            ]
        )
    return FitTable(JOB_COLUMNS, rows, title)


def creators(client: Any, jobs: list[Job]) -> dict[str, VMInfo]:
    """By destroy job id, the VM its create job saw, for destroy jobs that do not know their VM's name:
    one job-index read each, while the VM lives (once gone, the index no longer maps it). ``client``:
    a ``Provisioner``."""
    out: dict[str, VMInfo] = {}
    unnamed = [job for job in jobs if job.kind == JobKind.destroy and job.instance_id and not (job.vm and job.vm.name)]
    for job in unnamed:
        create = client.store.creator_of(job.provider, job.instance_id)
        if create is not None and create.vm is not None:
            out[job.id] = create.vm
    return out


@contextmanager
def live(renderable: Any, out: Console | None = None) -> Iterator[Live]:
    """A live display of ``renderable`` that ends its last line: rich prints the final frame once
    when stdout is no terminal (a pipe, a CI log) and leaves that frame without its newline."""
    out = out or console
    try:
        with Live(renderable, console=out, refresh_per_second=4) as shown:
            yield shown
    finally:  # also when the block ends by exiting (a failed job's exit code, a timeout)
        if not out.is_terminal:
            out.line()


def finish(job: Job, wait: bool, timeout: float, as_json: bool) -> None:
    client = provisioner()
    if wait:
        from producer.client import JobTimeout

        told: set[str] = set()

        def tell(current: Job) -> None:
            # Said once, under the live table: what the state alone does not say (no worker, ...).
            notice = client.notice(current)
            if notice and notice not in told:
                told.add(notice)
                err.print(f"[yellow]{escape(notice)}[/]", soft_wrap=True)

        try:
            if as_json:
                job = client.wait(job.id, timeout_s=timeout, on_update=tell)
            else:
                with live(job_table([job])) as shown:

                    def update(current: Job) -> None:
                        shown.update(job_table([current]))
                        tell(current)

                    job = client.wait(job.id, timeout_s=timeout, on_update=update)
        except JobTimeout as exc:
            err.print(f"[yellow]{exc}[/]; follow it with `vmq wait {job.id}`")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise interrupted(f"job {job.id} goes on. Follow it with `vmq wait {job.id}`") from None
    if as_json:
        console.print_json(job.model_dump_json())
    elif not wait:
        console.print(job_table([job]))
        console.print(f"Enqueued. Follow it with [bold]vmq wait {job.id}[/] or [bold]vmq job {job.id}[/].")
    else:
        print_readiness(job)
    if wait and not job.succeeded:
        if not as_json:  # the table shows 8 characters; the full id is what a person copies
            err.print(f"job {job.id} {job.state}: `vmq job {job.id}` shows its history", soft_wrap=True)
        raise typer.Exit(1)


def _at(moment: datetime) -> str:
    return f"{moment:%H:%M:%S}"


def phase_lines(job: Job) -> list[str]:
    """A create's phases with the times its record holds: queued, submitted, running, then ready or
    what it still awaits (with the time its readiness deadline fails it). Empty for other kinds."""
    if job.kind != JobKind.create:
        return []
    lines = [f"queued     {_at(job.created_at)}"]
    if job.submitted_at is not None:
        lines.append(f"submitted  {_at(job.submitted_at)}")
    if job.running_at is not None:
        lines.append(f"running    {_at(job.running_at)}")
    if job.ready_at is not None:
        after = f", {(job.ready_at - job.running_at).total_seconds():.1f}s after running" if job.running_at else ""
        lines.append(f"ready      {_at(job.ready_at)}  ({job.ready_when}{after})")
    elif job.awaiting_ready and job.running_at is not None:
        deadline = job.running_at.timestamp() + job.ready_deadline_s
        until = datetime.fromtimestamp(deadline, job.running_at.tzinfo)
        lines.append(f"awaiting   {AWAITING[job.ready_when]} (ready_timeout at {_at(until)})")
    return lines


def print_readiness(job: Job) -> None:
    """A create's phases with their times (UTC), and the host keys read on the way (``ready_when``
    ssh / cloud_init), so a caller can fill known_hosts instead of trusting the first connection."""
    lines = phase_lines(job)
    if lines:
        console.print("phases (UTC):", highlight=False)
    for line in lines:
        console.print(f"  {line}", highlight=False)
    for key in job.host_keys:
        console.print(f"  host key {key.type} {key.sha256}", highlight=False)
