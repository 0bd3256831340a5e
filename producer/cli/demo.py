"""``vmq demo``: the whole pipeline on one machine, with nothing but Python and redis-server.

It uses the Redis at REDIS_URL when one answers, else starts a private redis-server on a free
loopback port; starts a sim worker; creates VMs and shows them reach running with their IPs;
destroys them and shows them gone; then stops what it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from producer.cli.common import console as cli_console
from producer.cli.common import job_table, live, public_address
from producer.cli.worker import worker_argv
from vmqueue.connection import answers
from vmqueue.models import Job, VMInfo
from vmqueue.settings import Settings, get_settings
from vmqueue.sshkeys import throwaway_public_key

app = typer.Typer()

DEMO_SCRIPT = "#!/bin/sh\necho 'hello from vmqueue' > /etc/motd\n"


def _answers(url: str) -> bool:
    try:
        return answers(Settings(redis_url=url))
    except ValueError:  # a malformed sentinel:// URL
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.1)


def _start_redis(stack: ExitStack, console: Console) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "no Redis answers at REDIS_URL and redis-server is not installed: "
            "install it (apt-get install redis-server) or set REDIS_URL to a running Redis"
        )
    port = _free_port()
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmq-demo-redis-"))
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop, process)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_until(lambda: _answers(url), 10, "redis-server start")
    console.print(f"[dim]Started a private redis-server on 127.0.0.1:{port}[/]")
    return url


def _start_worker(stack: ExitStack, console: Console, url: str, boot_s: float) -> Path:
    """Start the sim worker (stopped when ``stack`` closes); returns its log's path, which the caller
    removes once the demo succeeded (a failed demo keeps it, to read)."""
    log = stack.enter_context(tempfile.NamedTemporaryFile(prefix="vmq-demo-worker-", suffix=".log", delete=False))
    env = {
        **os.environ,
        "REDIS_URL": url,
        "VMQ_SIM_BOOT_S": str(boot_s),
        "VMQ_SIM_DESTROY_S": "1",
        "VMQ_POLL_INITIAL_S": "1",
        "VMQ_POLL_MAX_S": "2",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }

    process = subprocess.Popen(
        worker_argv("sim", 16, name=f"demo-{os.getpid()}@%h"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack.callback(_stop, process)
    path = Path(log.name)
    _wait_until(lambda: b" ready." in path.read_bytes() or process.poll() is not None, 60, "the sim worker start")
    if process.poll() is not None:
        raise RuntimeError(f"the sim worker exited; its log ({path}):\n{path.read_text(errors='replace')[-2000:]}")
    console.print(f"[dim]Started a sim worker (log: {path})[/]")
    return path


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def _follow(
    provisioner, jobs: list[Job], console: Console, title: str, timeout_s: float, vms: dict[str, VMInfo] | None = None
) -> list[Job]:
    """Show ``jobs`` live until each is finished; every row names its VM and its public address (or
    "-", never a private one: a booting or deleting sim VM reports only that). ``vms``, by destroy
    job id: the VM as its create saw it running, which a destroy job's own reads may never see."""
    with live(job_table(jobs, vms, public_address, title), console) as shown:
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = [provisioner.get_job(job.id) for job in jobs]
            shown.update(job_table(jobs, vms, public_address, title))
            if all(job.finished for job in jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    console.print()
    return jobs


def run_demo(console: Console, count: int, boot_s: float, redis_url: str) -> int:
    """The demo; returns its exit code. Whatever it started is stopped, also on Ctrl-C or failure."""
    log: Path | None = None
    code = 1
    try:
        with ExitStack() as stack:
            try:
                if _answers(redis_url):
                    console.print(f"[dim]Using the Redis at {redis_url.split('@')[-1]}[/]")
                else:
                    redis_url = _start_redis(stack, console)
                log = _start_worker(stack, console, redis_url, boot_s)
            except RuntimeError as exc:
                console.print(f"[bold red]Cannot run the demo:[/] {exc}")
                return 1
            code = _run(console, count, redis_url)
            return code
    finally:  # the worker has stopped: its log goes after a demo that worked, else it is kept to read
        if log is not None and code == 0:
            log.unlink(missing_ok=True)
        elif log is not None:
            console.print(f"The sim worker's log is kept: {log}", highlight=False, soft_wrap=True)


def _run(console: Console, count: int, redis_url: str) -> int:
    """Create ``count`` VMs, follow them to running, destroy them, follow them gone; 0 if all did."""
    from producer.client import Provisioner

    provisioner = Provisioner(Settings(redis_url=redis_url))
    key = throwaway_public_key()
    run = f"{os.getpid() % 10000}"
    created = [
        provisioner.create_vm(
            {
                "provider": "sim",
                "name": f"demo-{run}-{i}",
                "region": "sim-1",
                "instance_type": "small",
                "image": "ubuntu-24.04",
                "labels": {"app": "demo"},
            },
            key,
            DEMO_SCRIPT,
        )
        for i in range(1, count + 1)
    ]
    created = _follow(provisioner, created, console, f"Creating {count} VMs on the simulated cloud", 120)
    running = [job for job in created if job.state == "running"]
    destroyed = [provisioner.destroy_vm("sim", job.instance_id) for job in running]
    # The VM as its create last saw it running: its name and public address stay on its row while
    # the destroy job's own reads see it deleting (no public address) or not at all (gone at once).
    seen = {destroy.id: create.vm for destroy, create in zip(destroyed, running, strict=True) if create.vm}
    destroyed = _follow(provisioner, destroyed, console, f"Destroying {len(running)} VMs", 120, seen)
    gone = sum(job.state == "gone" for job in destroyed)
    ok = len(running) == count and gone == count
    colour = "green" if ok else "red"
    console.print(f"[bold {colour}]{len(running)}/{count} VMs reached running, {gone}/{count} are gone.[/]")
    return 0 if ok else 1


@app.command()
def demo(
    count: Annotated[int, typer.Option(min=1, max=50, help="how many VMs")] = 5,
    boot: Annotated[float, typer.Option(help="simulated boot time, seconds")] = 4.0,
) -> None:
    """Create VMs on the simulated cloud, watch them run, destroy them.

    Uses REDIS_URL if a Redis answers there, otherwise starts a private redis-server; starts a sim
    worker, and stops everything it started.
    """
    raise typer.Exit(run_demo(cli_console, count=count, boot_s=boot, redis_url=get_settings().redis_url))
