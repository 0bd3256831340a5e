"""``vmq create``, ``get``, ``destroy``, ``job`` and ``wait``: one job at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape

from producer.cli.common import (
    CREATE_FLAGS,
    SSH_KEY_DEFAULT,
    JsonOpt,
    ProviderOpt,
    TimeoutOpt,
    WaitOpt,
    bad_input,
    console,
    creators,
    err,
    finish,
    job_table,
    pairs,
    placement,
    print_readiness,
    provisioner,
    read_key,
)
from vmqueue.models import PROVIDERS
from vmqueue.readiness import ReadyVia, ReadyWhen

app = typer.Typer()


@app.command()
def create(
    provider: ProviderOpt,
    name: Annotated[str, typer.Option(help="hostname: lowercase letters, digits, hyphens")],
    region: Annotated[str, typer.Option(help="provider-native: location, region or zone (GCP)")],
    instance_type: Annotated[
        str, typer.Option("--type", "-t", help="a portable size (2vcpu-4gb, ...) or a native type/shape")
    ],
    image: Annotated[str, typer.Option(help="ubuntu-22.04, ubuntu-24.04, debian-12, or a native image id")],
    ssh_key: Annotated[str | None, typer.Option(help=f"public key file or key line; {SSH_KEY_DEFAULT}")] = None,
    script: Annotated[Path | None, typer.Option(help="startup script file (shell or #cloud-config)")] = None,
    label: Annotated[list[str], typer.Option(metavar="K=V", help="key=value, repeatable")] = [],  # noqa: B006
    option: Annotated[list[str], typer.Option(metavar="K=V", help="provider option key=value, repeatable")] = [],  # noqa: B006
    idempotency_key: Annotated[str | None, typer.Option(help="the same key never creates twice")] = None,
    deadline: Annotated[float | None, typer.Option(help="seconds until running, else fail and destroy")] = None,
    ttl: Annotated[float | None, typer.Option(help="destroy the VM this many seconds from now")] = None,
    ready_when: Annotated[
        ReadyWhen,
        typer.Option(metavar="WHEN", help="what ends the job (and --wait): running, ssh (sshd answers) or cloud_init"),
    ] = ReadyWhen.running,
    ready_deadline: Annotated[float | None, typer.Option(help="seconds from running to ready, else fail")] = None,
    ready_via: Annotated[
        ReadyVia, typer.Option(metavar="VIA", help="the address SSH probes use: public or private")
    ] = ReadyVia.public,
    ssh_port: Annotated[
        int | None, typer.Option(help="the port SSH probes use (default: the VM's sshd port: 22, the sim's 2222)")
    ] = None,
    fallback: Annotated[
        list[str],
        typer.Option(metavar="REGION", help="REGION or REGION:TYPE to try next when there is no capacity, repeatable"),
    ] = [],  # noqa: B006
    # Two flags, not one --destroy-on-failure/--keep-on-failure pair: the pair's two columns squeeze
    # the help of every option to a few characters in an 80-column terminal.
    keep_on_failure: Annotated[
        bool, typer.Option("--keep-on-failure", help="keep the VM of a failed create (default: VMQ_DESTROY_ON_FAILURE)")
    ] = False,
    destroy_on_failure: Annotated[
        bool, typer.Option("--destroy-on-failure", help="destroy it even if VMQ_DESTROY_ON_FAILURE=false")
    ] = False,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM.

    Example:

    vmq create -p hetzner --name web-1 --region fsn1 --type cx22 --image ubuntu-24.04 --fallback nbg1 --wait

    With --ready-when ssh, --wait returns once sshd answers (the job lists the host keys).
    """
    try:
        if keep_on_failure and destroy_on_failure:
            raise ValueError("give --keep-on-failure or --destroy-on-failure, not both")
        spec = {
            "provider": provider,
            "name": name,
            "region": region,
            "instance_type": instance_type,
            "image": image,
            "labels": pairs(label, "--label"),
            "options": pairs(option, "--option"),
            "fallbacks": [placement(value) for value in fallback],
        }
        startup = script.read_text() if script else None
        job = provisioner().create_vm(
            spec,
            read_key(ssh_key),
            startup,
            idempotency_key=idempotency_key,
            deadline_s=deadline,
            ready_when=ready_when,
            ready_deadline_s=ready_deadline,
            ready_via=ready_via,
            ssh_port=ssh_port,
            ttl_s=ttl,
            destroy_on_failure=False if keep_on_failure else True if destroy_on_failure else None,
        )
    except (ValidationError, ValueError, OSError) as exc:
        raise bad_input(exc, CREATE_FLAGS) from None
    finish(job, wait, timeout, as_json)


@app.command()
def get(
    provider: Annotated[str, typer.Argument(help=f"one of: {', '.join(PROVIDERS)}")],
    instance_id: Annotated[str, typer.Argument(help="the provider-native instance id")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Read one VM's status and addresses, through a worker.

    Like every provider call, the read is a job a worker of that provider runs.
    """
    try:
        job = provisioner().get_vm(provider, instance_id)
    except (ValidationError, ValueError) as exc:
        raise bad_input(exc) from None
    finish(job, wait, timeout, as_json)


@app.command()
def destroy(
    provider: Annotated[str | None, typer.Argument(help=f"one of: {', '.join(PROVIDERS)}")] = None,
    instance_id: Annotated[str | None, typer.Argument(help="the provider-native instance id")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    as_json: JsonOpt = False,
    fleet: Annotated[Path | None, typer.Option(help="destroy every VM this fleet file created (and wait)")] = None,
) -> None:
    """Destroy a VM and what vmqueue created with it.

    An already gone VM counts as destroyed.

    vmq destroy PROVIDER INSTANCE_ID, or vmq destroy --fleet fleet.yaml
    """
    if (fleet is None) == (provider is None or instance_id is None) or (fleet and (provider or instance_id)):
        raise bad_input(ValueError("give PROVIDER and INSTANCE_ID, or --fleet FILE alone"))
    if fleet is not None:
        from producer.cli.fleet import destroy_fleet

        return destroy_fleet(fleet, timeout, as_json)
    try:
        job = provisioner().destroy_vm(provider, instance_id)
    except (ValidationError, ValueError) as exc:
        raise bad_input(exc) from None
    finish(job, wait, timeout, as_json)


@app.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """Show a job: state, VM, error, phases and history.

    A create with --ready-when ssh or cloud_init shows "running, awaiting ..." until it is ready.
    """
    from producer.client import JobNotFound

    client = provisioner()
    try:
        found = client.get_job(job_id)
    except JobNotFound as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(found.model_dump_json())
        return
    console.print(job_table([found], creators(client, [found])))
    if found.vm_destroyed_by:  # the full id, to copy: the table shows 8 characters
        console.print(f"Its VM was destroyed by job {found.vm_destroyed_by}.", highlight=False)
    for event in found.history:  # the state said once: "running", not "running running"
        line = f"  {event.at:%H:%M:%S} [bold]{event.state}[/]{escape(event.line[len(event.state) :])}"
        console.print(line, soft_wrap=True)  # one line each, as `vmq watch` prints them: the terminal wraps
    print_readiness(found)


@app.command("wait")
def wait_cmd(job_id: str, timeout: TimeoutOpt = 900.0, as_json: JsonOpt = False) -> None:
    """Follow a job until it ends; exit 0 if it succeeded, else 1."""
    from producer.client import JobNotFound

    try:
        found = provisioner().get_job(job_id)
    except JobNotFound as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    finish(found, True, timeout, as_json)
