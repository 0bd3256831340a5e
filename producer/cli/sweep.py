"""``vmq sweep --provider NAME``: find (and, on a later pass, destroy) VMs that no live job owns.

The pass runs on a worker of that provider (the producer imports no cloud SDK); this command
enqueues it and prints the report. ``--every S`` repeats it forever: the periodic sweeper, which
never exits on a late or failed pass (a backlog, a restarting worker): it says so and goes on, and
hands each pass the store epoch the previous report saw, so a store that lost its records between
two passes makes the next pass destroy nothing.
Exit codes (one pass): 2 bad input, 1 the sweep failed or no report came, 0 otherwise.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

import kombu.exceptions
import redis
import typer
from rich.table import Table

from producer.cli.common import JsonOpt, ProviderOpt, TimeoutOpt, console, err, provisioner
from producer.sweep import SweepTimeout, request_sweep, wait_report
from vmqueue.models import PROVIDERS
from vmqueue.sweep import DEFAULT_DELAY_S, DEFAULT_MAX_DESTROY_SHARE, SweepReport, SweepRequest

app = typer.Typer()
log = logging.getLogger("vmqueue.sweep")


@app.command()
def sweep(
    provider: ProviderOpt,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what a pass would do; change nothing")] = False,
    delay: Annotated[
        float, typer.Option(min=0, help="seconds between reporting an orphan and destroying it")
    ] = DEFAULT_DELAY_S,
    every: Annotated[
        float | None, typer.Option(min=1, help="repeat every S seconds until interrupted (the periodic sweeper)")
    ] = None,
    max_destroy_share: Annotated[
        float,
        typer.Option(min=0, max=1, help="share of the listed VMs one pass may destroy, rounded up (1: no limit)"),
    ] = DEFAULT_MAX_DESTROY_SHARE,
    timeout: TimeoutOpt = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Find (and on a later pass destroy) VMs no live job owns.

    Lists the VMs carrying vmqueue's ownership label and compares them with the job store.
    A VM no live job owns is reported on a first pass and remembered.
    A later pass, at least --delay seconds after, destroys it if it is still orphaned.
    Example, a sweep every 10 minutes:

    vmq sweep --provider hetzner --every 600 --delay 1800
    """
    if provider not in PROVIDERS:
        err.print(f"[red]Unknown provider {provider!r}[/]; one of: {', '.join(PROVIDERS)}")
        raise typer.Exit(2)
    client = provisioner()
    epoch: str | None = None  # the store epoch the last report saw (the periodic sweeper's memory)
    while True:
        request = SweepRequest(
            provider=provider, dry_run=dry_run, delay_s=delay, max_destroy_share=max_destroy_share, epoch=epoch
        )
        try:
            request_sweep(client.celery, request)
            report = wait_report(client.store.redis, request.id, timeout)
        except (SweepTimeout, redis.RedisError, kombu.exceptions.OperationalError) as exc:
            if every is None:
                err.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from None
            # A late report (a backlog, a restarting worker) or Redis away: nothing restarts this
            # loop outside compose, so it says so and tries again; a late pass still runs on its own.
            err.print(f"[yellow]sweep {provider}: {exc}; the next pass in {every:.0f}s[/]")
            log.warning("sweep %s of %s: %s; going on", request.id, provider, exc)
        else:
            _show(report, as_json)
            if report.epoch is not None:
                epoch = report.epoch.id
            if every is None:
                raise typer.Exit(1 if report.error else 0)
        time.sleep(every)


def _show(report: SweepReport, as_json: bool) -> None:
    if as_json:
        console.print_json(report.model_dump_json())
        return
    mode = " (dry run: nothing changed)" if report.dry_run else ""
    console.print(
        f"[bold]sweep {report.provider}[/]{mode}: {report.listed} VMs carry the ownership label, "
        f"{report.owned} belong to live jobs, {report.extras_listed} other resources carry it, "
        f"{len(report.orphans)} orphaned"
    )
    if report.rescued:
        verb = "would send again" if report.dry_run else "sent again"
        console.print(
            f"{len(report.rescued)} stalled job(s) whose message was lost: {verb}: {', '.join(report.rescued)}"
        )
    if report.error:
        err.print(f"[red]{report.error}[/]")
    if report.refused:
        err.print(f"[bold yellow]This pass destroys nothing:[/] {report.refused}")
    if report.orphans:
        table = Table()
        for column in ("resource", "name", "status", "job", "why orphaned", "action"):
            table.add_column(column)
        for o in report.orphans:
            action = f"{o.action}: {o.kept_because}" if o.action == "kept" else str(o.action)
            resource = o.instance_id if o.kind == "vm" else f"{o.kind} {o.instance_id}"
            table.add_row(resource, o.name or "", o.status, (o.job_id or "")[:12], o.reason, action)
        console.print(table)
        if any(o.action == "held" for o in report.orphans):
            console.print(f"Held: this pass destroys at most {report.destroy_limit} VM(s) (--max-destroy-share).")
