"""Portable size aliases (``2vcpu-4gb``...) and each provider's type for them, resolved in the producer.

An alias names at least that many vCPUs and GB of memory; each provider's entry is its cheapest
general-purpose type that meets both in the family named below (list prices, Linux, on demand; the
sources and the date are on docs/providers/*.md). The producer replaces the alias with the native type
before the job is stored (``VMSpec.size`` keeps the alias), so a worker only ever sees native types.
A native type passes through untouched.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class Size(NamedTuple):
    vcpus: int
    memory_gb: int


ALIASES: dict[str, Size] = {
    "1vcpu-1gb": Size(1, 1),
    "1vcpu-2gb": Size(1, 2),
    "2vcpu-4gb": Size(2, 4),
    "2vcpu-8gb": Size(2, 8),
    "4vcpu-8gb": Size(4, 8),
    "4vcpu-16gb": Size(4, 16),
    "8vcpu-16gb": Size(8, 16),
    "8vcpu-32gb": Size(8, 32),
}

# Hetzner's shared x86 types: cx (cost-optimized) in its European locations, cpx elsewhere, where cx
# is not offered.
HETZNER_CX_LOCATIONS = frozenset({"fsn1", "nbg1", "hel1"})
OCI_FLEX_SHAPE = "VM.Standard.E4.Flex"  # AMD x86; 1 OCPU = 2 vCPUs, 1-64 GB of memory per OCPU

TYPES: dict[str, dict[str, str]] = {
    "sim": {alias: alias for alias in ALIASES},  # the simulated cloud takes any type name
    "hetzner": {
        "1vcpu-1gb": "cx23",
        "1vcpu-2gb": "cx23",
        "2vcpu-4gb": "cx23",
        "2vcpu-8gb": "cx33",
        "4vcpu-8gb": "cx33",
        "4vcpu-16gb": "cx43",
        "8vcpu-16gb": "cx43",
        "8vcpu-32gb": "cx53",
    },
    "hetzner-cpx": {
        "1vcpu-1gb": "cpx22",
        "1vcpu-2gb": "cpx22",
        "2vcpu-4gb": "cpx22",
        "2vcpu-8gb": "cpx32",
        "4vcpu-8gb": "cpx32",
        "4vcpu-16gb": "cpx42",
        "8vcpu-16gb": "cpx42",
        "8vcpu-32gb": "cpx62",
    },
    "digitalocean": {
        "1vcpu-1gb": "s-1vcpu-1gb",
        "1vcpu-2gb": "s-1vcpu-2gb",
        "2vcpu-4gb": "s-2vcpu-4gb",
        "2vcpu-8gb": "s-4vcpu-8gb",
        "4vcpu-8gb": "s-4vcpu-8gb",
        "4vcpu-16gb": "s-6vcpu-16gb",
        "8vcpu-16gb": "s-8vcpu-32gb",
        "8vcpu-32gb": "s-8vcpu-32gb",
    },
    "aws": {
        "1vcpu-1gb": "t3.micro",
        "1vcpu-2gb": "t3.small",
        "2vcpu-4gb": "t3.medium",
        "2vcpu-8gb": "t3.large",
        "4vcpu-8gb": "t3.xlarge",
        "4vcpu-16gb": "t3.xlarge",
        "8vcpu-16gb": "t3.2xlarge",
        "8vcpu-32gb": "t3.2xlarge",
    },
    "gcp": {
        "1vcpu-1gb": "e2-micro",
        "1vcpu-2gb": "e2-small",
        "2vcpu-4gb": "e2-medium",
        "2vcpu-8gb": "e2-standard-2",
        "4vcpu-8gb": "e2-standard-4",
        "4vcpu-16gb": "e2-standard-4",
        "8vcpu-16gb": "e2-standard-8",
        "8vcpu-32gb": "e2-standard-8",
    },
    "oci": {alias: OCI_FLEX_SHAPE for alias in ALIASES},
    "azure": {
        "1vcpu-1gb": "Standard_B1s",
        "1vcpu-2gb": "Standard_B1ms",
        "2vcpu-4gb": "Standard_B2s",
        "2vcpu-8gb": "Standard_B2ms",
        "4vcpu-8gb": "Standard_B4ms",
        "4vcpu-16gb": "Standard_B4ms",
        "8vcpu-16gb": "Standard_B8ms",
        "8vcpu-32gb": "Standard_B8ms",
    },
}


def is_alias(instance_type: str | None) -> bool:
    return instance_type in ALIASES


def resolve(provider: str, region: str, alias: str) -> tuple[str, dict[str, Any]]:
    """The native type for ``alias`` in ``region``, and the options it needs (OCI Flex: OCPUs and memory).

    Raises KeyError for a name that is not an alias.
    """
    size = ALIASES[alias]
    if provider == "oci":
        return OCI_FLEX_SHAPE, {"ocpus": float(math.ceil(size.vcpus / 2)), "memory_gb": float(size.memory_gb)}
    table = "hetzner-cpx" if provider == "hetzner" and region not in HETZNER_CX_LOCATIONS else provider
    return TYPES[table][alias], {}
