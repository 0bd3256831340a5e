"""``vmq``: create, inspect and destroy VMs on six clouds as jobs on a queue.

Every command validates its input before anything is enqueued and exits 2 on bad input, 1 when a
job it waited for failed, 0 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from producer.models import PROVIDERS, Job, JobState
from producer.settings import get_settings

app = typer.Typer(
    help=(
        "Create, inspect and destroy cloud VMs on Hetzner, DigitalOcean, AWS, GCP, OCI, Azure "
        "(and the simulated cloud 'sim') as jobs on a Redis queue.\n\n"
        "Start with `vmq demo`. Jobs are served by workers: `vmq worker --provider sim`. "
        "Redis comes from REDIS_URL (default redis://127.0.0.1:6379/0)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console()
err = Console(stderr=True)

SUCCESS = {JobState.running, JobState.gone, JobState.done}
ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help=f"one of: {', '.join(PROVIDERS)}")]
WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="follow the job live until it ends")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait at most")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the job as JSON (for scripts)")]
DEFAULT_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")


def _provisioner():
    from producer.client import Provisioner

    return Provisioner()


def _bad_input(exc: Exception) -> typer.Exit:
    if isinstance(exc, ValidationError):
        err.print(f"[bold red]Invalid request[/] ({exc.error_count()} problem(s)):")
        for problem in exc.errors():
            where = ".".join(str(p) for p in problem["loc"]) or "request"
            err.print(f"  [bold]{where}[/]: {problem['msg'].removeprefix('Value error, ')}")
    else:
        err.print(f"[bold red]Invalid request:[/] {exc}")
    err.print("Nothing was enqueued.")
    return typer.Exit(2)


def _pairs(values: list[str], what: str) -> dict[str, Any]:
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


def _read_key(value: str | None) -> str:
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


def job_table(jobs: list[Job]) -> Table:
    table = Table(expand=False)
    for column in ("job", "kind", "provider", "name", "state", "instance", "public ipv4"):
        table.add_column(column, no_wrap=True)
    table.add_column("error")
    for job in jobs:
        colour = "green" if job.state in SUCCESS else "red" if job.state == JobState.failed else "yellow"
        error = f"{job.error.code}: {job.error.message}" if job.error else ""
        if job.cleanup:
            error += f" (cleanup {job.cleanup})"
        table.add_row(
            job.id[:8],
            job.kind,
            job.provider,
            (job.spec.name if job.spec else None) or (job.vm.name if job.vm else ""),
            f"[{colour}]{job.state}[/]",
            job.instance_id or "",
            (job.vm.public_ipv4 if job.vm else None) or "",
            error,
        )
    return table


def _finish(job: Job, wait: bool, timeout: float, as_json: bool) -> None:
    provisioner = _provisioner()
    if wait:
        from producer.client import JobTimeout

        try:
            if as_json:
                job = provisioner.wait(job.id, timeout_s=timeout)
            else:
                with Live(job_table([job]), console=console, refresh_per_second=4) as live:
                    job = provisioner.wait(job.id, timeout_s=timeout, on_update=lambda j: live.update(job_table([j])))
        except JobTimeout as exc:
            err.print(f"[yellow]{exc}[/]; follow it with `vmq wait {job.id}`")
            raise typer.Exit(1) from None
    if as_json:
        console.print_json(job.model_dump_json())
    elif not wait:
        console.print(job_table([job]))
        console.print(f"Enqueued. Follow it with [bold]vmq wait {job.id}[/] or [bold]vmq job {job.id}[/].")
    if wait and job.state not in SUCCESS:
        raise typer.Exit(1)


@app.command()
def create(
    provider: ProviderOpt,
    name: Annotated[str, typer.Option(help="hostname: lowercase letters, digits, hyphens")],
    region: Annotated[str, typer.Option(help="provider-native: location, region or zone (GCP)")],
    instance_type: Annotated[str, typer.Option("--type", "-t", help="provider-native type/size/shape")],
    image: Annotated[str, typer.Option(help="ubuntu-22.04, ubuntu-24.04, debian-12, or a native image id")],
    ssh_key: Annotated[
        str | None, typer.Option(help="public key file or key line; default ~/.ssh/id_ed25519.pub")
    ] = None,
    script: Annotated[Path | None, typer.Option(help="startup script file (shell or #cloud-config)")] = None,
    label: Annotated[list[str], typer.Option(help="key=value, repeatable")] = [],  # noqa: B006
    option: Annotated[list[str], typer.Option(help="provider option key=value, repeatable")] = [],  # noqa: B006
    idempotency_key: Annotated[str | None, typer.Option(help="the same key never creates twice")] = None,
    deadline: Annotated[float | None, typer.Option(help="seconds until running, else fail and destroy")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM. Example:

    vmq create -p hetzner --name web-1 --region fsn1 --type cx22 --image ubuntu-24.04 --wait
    """
    try:
        spec = {
            "provider": provider,
            "name": name,
            "region": region,
            "instance_type": instance_type,
            "image": image,
            "labels": _pairs(label, "--label"),
            "options": _pairs(option, "--option"),
        }
        startup = script.read_text() if script else None
        job = _provisioner().create_vm(
            spec, _read_key(ssh_key), startup, idempotency_key=idempotency_key, deadline_s=deadline
        )
    except (ValidationError, ValueError, OSError) as exc:
        raise _bad_input(exc) from None
    _finish(job, wait, timeout, as_json)


@app.command()
def get(
    provider: Annotated[str, typer.Argument(help=f"one of: {', '.join(PROVIDERS)}")],
    instance_id: Annotated[str, typer.Argument(help="the provider-native instance id")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Read one VM's status and addresses (through a worker, like every provider call)."""
    try:
        job = _provisioner().get_vm(provider, instance_id)
    except (ValidationError, ValueError) as exc:
        raise _bad_input(exc) from None
    _finish(job, wait, timeout, as_json)


@app.command()
def destroy(
    provider: Annotated[str | None, typer.Argument(help=f"one of: {', '.join(PROVIDERS)}")] = None,
    instance_id: Annotated[str | None, typer.Argument(help="the provider-native instance id")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    as_json: JsonOpt = False,
    fleet: Annotated[Path | None, typer.Option(help="destroy every VM this fleet file created (and wait)")] = None,
) -> None:
    """Destroy a VM and what vmqueue created with it; an already gone VM counts as destroyed.

    vmq destroy PROVIDER INSTANCE_ID, or vmq destroy --fleet fleet.yaml
    """
    if (fleet is None) == (provider is None or instance_id is None) or (fleet and (provider or instance_id)):
        raise _bad_input(ValueError("give PROVIDER and INSTANCE_ID, or --fleet FILE alone"))
    if fleet is not None:
        from producer.cli_fleet import destroy_fleet

        return destroy_fleet(fleet, timeout, as_json)
    try:
        job = _provisioner().destroy_vm(provider, instance_id)
    except (ValidationError, ValueError) as exc:
        raise _bad_input(exc) from None
    _finish(job, wait, timeout, as_json)


@app.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """Show a job: state, VM, error, and its history."""
    from producer.client import JobNotFound

    try:
        found = _provisioner().get_job(job_id)
    except JobNotFound as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(found.model_dump_json())
        return
    console.print(job_table([found]))
    for event in found.history:
        console.print(f"  {event.at:%H:%M:%S} [bold]{event.state}[/] {event.message}")


@app.command("wait")
def wait_cmd(job_id: str, timeout: TimeoutOpt = 900.0, as_json: JsonOpt = False) -> None:
    """Follow a job until it ends; exit 0 if it succeeded, 1 if it failed or timed out."""
    from producer.client import JobNotFound

    try:
        found = _provisioner().get_job(job_id)
    except JobNotFound as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    _finish(found, True, timeout, as_json)


def worker_argv(provider: str, concurrency: int, name: str, loglevel: str = "INFO") -> list[str]:
    """The standard Celery worker command for one provider's queue, as `vmq worker` and the demo run it."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", f"vmq.{provider}",
            "-P", "threads", "-c", str(concurrency), "-n", name, f"--loglevel={loglevel}", "-E"]  # fmt: skip


@app.command()
def worker(
    provider: ProviderOpt,
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", help="threads; polls hold none")] = 64,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a worker for one provider's queue (wraps `celery -A workers.app worker -Q vmq.<provider>`)."""
    if provider not in PROVIDERS:
        err.print(f"[red]Unknown provider {provider!r}[/]; one of: {', '.join(PROVIDERS)}")
        raise typer.Exit(2)
    argv = worker_argv(provider, concurrency, name=f"{provider}@%h", loglevel=loglevel)
    console.print(f"[dim]exec {' '.join(argv[2:])}[/]")
    os.execv(sys.executable, argv)


@app.command()
def demo(
    count: Annotated[int, typer.Option(min=1, max=50, help="how many VMs")] = 5,
    boot: Annotated[float, typer.Option(help="simulated boot time, seconds")] = 4.0,
) -> None:
    """The main job on the embedded default: create VMs on the simulated cloud, watch them run, destroy them.

    Uses REDIS_URL if a Redis answers there, otherwise starts a private redis-server; starts a sim
    worker, and stops everything it started.
    """
    from producer.demo import run_demo

    raise typer.Exit(run_demo(console, count=count, boot_s=boot, redis_url=get_settings().redis_url))


from producer import cli_fleet, cli_sweep, cli_web  # noqa: E402,F401 - they register their commands on ``app``

if __name__ == "__main__":  # pragma: no cover
    app()
