"""``vmq worker``: run a worker for one provider's queue."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from producer.cli.common import console, err
from vmqueue import keys
from vmqueue.models import PROVIDERS

app = typer.Typer()


def worker_argv(provider: str, concurrency: int, name: str, loglevel: str = "INFO") -> list[str]:
    """The standard Celery worker command for one provider's queue, as `vmq worker` and the demo run it."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", f"vmq.{provider}",
            "-P", "threads", "-c", str(concurrency), "-n", name, f"--loglevel={loglevel}", "-E"]  # fmt: skip


@app.command()
def worker(
    provider: Annotated[str | None, typer.Option("--provider", "-p", help=f"one of: {', '.join(PROVIDERS)}")] = None,
    webhooks: Annotated[
        bool, typer.Option("--webhooks", help="serve webhook deliveries (vmq.webhooks) instead of a provider")
    ] = False,
    concurrency: Annotated[
        int | None,
        typer.Option("-c", "--concurrency", help="threads (polls hold none) (default: VMQ_WORKER_CONCURRENCY, 64)"),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a worker for one provider's queue, or the webhook worker.

    Wraps `celery -A workers.app worker -Q vmq.<provider>`. With --webhooks: the worker that delivers
    webhooks (its own queue: a slow receiver delays no job).
    """
    if webhooks == (provider is not None):
        err.print("[red]Give --provider NAME or --webhooks[/]")
        raise typer.Exit(2)
    if webhooks:
        provider = keys.WEBHOOK_QUEUE.removeprefix(keys.QUEUE_PREFIX)
    elif provider not in PROVIDERS:
        err.print(f"[red]Unknown provider {provider!r}[/]; one of: {', '.join(PROVIDERS)}")
        raise typer.Exit(2)
    if concurrency is None:
        from vmqueue.settings import get_settings

        concurrency = get_settings().worker_concurrency
    # The process id makes the name unique on the host (exec keeps it): two workers of one provider
    # on one machine show as two in Flower and answer pings apart.
    argv = worker_argv(provider, concurrency, name=f"{provider}-{os.getpid()}@%h", loglevel=loglevel)
    console.print(f"[dim]exec {' '.join(argv[2:])}[/]")
    os.execv(sys.executable, argv)
