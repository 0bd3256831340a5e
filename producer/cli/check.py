"""``vmq check [--provider NAME]``: can a worker serve this provider here? Settings, Redis, the SDK,
and the credentials (one read-only call), each saying what to install or set when it fails.

The checks are the workers' own (workers/preflight.py, which every worker also runs at start and
refuses to consume its queue when they fail); the producer imports no worker code or SDK, so this
command runs them in a child interpreter. Exit 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from producer.cli.common import err
from vmqueue.models import PROVIDERS

app = typer.Typer()


@app.command()
def check(
    provider: Annotated[
        list[str], typer.Option("--provider", "-p", help=f"repeatable; default: all of {', '.join(PROVIDERS)}")
    ] = [],  # noqa: B006
) -> None:
    """Check a worker's needs here: settings, Redis, SDK, credentials.

    For each provider given (default: all), what its worker needs on this machine.

    Example:

    vmq check --provider hetzner
    """
    unknown = [p for p in provider if p not in PROVIDERS]
    if unknown:
        err.print(f"[red]Unknown provider {unknown[0]!r}[/]; one of: {', '.join(PROVIDERS)}")
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "workers.preflight", *(a for p in provider for a in ("--provider", p))]
    os.execv(sys.executable, argv)
