"""The CLI's job table shows the address a user can reach: IPv4, else IPv6 (an IPv6-only VM), else private."""

from __future__ import annotations

import pytest
from rich.console import Console

from producer.cli.common import job_table
from vmqueue.models import Job, JobKind, JobState, VMInfo, VMStatus


def rendered(vm: VMInfo) -> str:
    job = Job(kind=JobKind.create, provider="hetzner", state=JobState.running, instance_id="42", vm=vm)
    console = Console(width=200, record=True, color_system=None)
    console.print(job_table([job]))
    return console.export_text()


@pytest.mark.parametrize(
    ("addresses", "shown"),
    [
        ({"public_ipv6": "2a01:4f8:c012:abcd::1"}, "2a01:4f8:c012:abcd::1"),  # Hetzner, enable_ipv4: false
        ({"public_ipv4": "203.0.113.7", "public_ipv6": "2a01:4f8::1"}, "203.0.113.7"),
        ({"private_ipv4": "10.0.0.5"}, "10.0.0.5 (private)"),
    ],
)
def test_table_shows_the_reachable_address(addresses, shown):
    vm = VMInfo(provider="hetzner", instance_id="42", status=VMStatus.running, **addresses)
    text = rendered(vm)
    assert "address" in text and shown in text
