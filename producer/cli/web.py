"""``vmq web``: serve the HTTP API (producer/web.py) with uvicorn; needs ``pip install 'vmqueue[web]'``."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.cli.common import err

app = typer.Typer()


@app.command()
def web(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP API (POST /vms, GET /jobs/ID, ...).

    OpenAPI at /docs. API keys come from VMQ_API_KEYS.
    """
    try:
        import uvicorn
    except ImportError:
        # markup=False: rich would read "[web]" as a style tag and print pip install 'vmqueue'.
        err.print("The HTTP API needs its extra: pip install 'vmqueue[web]'", markup=False, style="red")
        raise typer.Exit(2) from None
    uvicorn.run("producer.web:app", host=host, port=port, workers=workers, proxy_headers=True)
