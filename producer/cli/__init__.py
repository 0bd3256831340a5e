"""``vmq``: create, inspect and destroy VMs on six clouds as jobs on a queue.

Every command validates its input before anything is enqueued and exits 2 on bad input, 1 when a
job it waited for failed, 0 otherwise. Each command module builds its own Typer app; this one
merges them, so no command module imports another's registration.
"""

from __future__ import annotations

import typer

from producer.cli import check, demo, fleet, helptext, jobs, listing, sweep, watch, web, worker

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
for module in (jobs, listing, watch, fleet, sweep, worker, check, demo, web):
    helptext.tidy(module.app)
    app.add_typer(module.app)
