"""Create batches: the UTC minute a create was sent, written on the VM so status reads cost what is in flight.

DigitalOcean (a tag) and Hetzner (a label) mark every VM with the minute of its create, in the create
request itself; a tick then lists only the batches that hold VMs in flight (workers/providers/
digitalocean.py, hetzner.py say how each lists). This module holds what both share: the minute's
name and the bounded, insertion-ordered books of which batch each VM is in.
"""

from __future__ import annotations

import time
from typing import Any

BATCH_S = 60  # s; one batch per UTC minute
BATCH_LOOKBACK = 30  # batches a read lists back from the current one to find VMs this process never saw
KNOWN_MAX = 50_000  # VM ids whose batch a process remembers (the oldest are forgotten first)


def batch_minute(at_s: float) -> str:
    """The batch of a create sent at ``at_s`` (epoch seconds): its UTC minute, ``YYYYMMDDHHMM``."""
    return time.strftime("%Y%m%d%H%M", time.gmtime(at_s - at_s % BATCH_S))


def forget_oldest(entries: dict[Any, Any], keep: int) -> None:
    """Drop the oldest insertions of ``entries`` beyond ``keep`` (the caller holds the lock)."""
    while len(entries) > keep:
        del entries[next(iter(entries))]
