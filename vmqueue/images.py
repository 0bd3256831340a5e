"""Portable image aliases and what each provider calls them (part of the contract: the producer
refuses an alias a provider does not have before anything is enqueued).

The values are what each adapter's ``prepare_spec`` starts from: a native image name (Hetzner, DO),
an SSM parameter (AWS), an image family (GCP), an OS/version pair to search (OCI), or an image URN
(Azure). Anything that is not an alias is taken as a provider-native image id and passed through.
"""

from __future__ import annotations

IMAGES: dict[str, dict[str, str]] = {
    "sim": {
        "ubuntu-22.04": "sim-ubuntu-2204",
        "ubuntu-24.04": "sim-ubuntu-2404",
        "debian-12": "sim-debian-12",
    },
    "hetzner": {"ubuntu-22.04": "ubuntu-22.04", "ubuntu-24.04": "ubuntu-24.04", "debian-12": "debian-12"},
    "digitalocean": {
        "ubuntu-22.04": "ubuntu-22-04-x64",
        "ubuntu-24.04": "ubuntu-24-04-x64",
        "debian-12": "debian-12-x64",
    },
    "aws": {
        "ubuntu-22.04": "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id",
        "ubuntu-24.04": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
        "debian-12": "/aws/service/debian/release/12/latest/amd64",
    },
    "gcp": {
        "ubuntu-22.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts",
        "ubuntu-24.04": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
        "debian-12": "projects/debian-cloud/global/images/family/debian-12",
    },
    # OCI has no Debian platform image: debian-12 needs a native image OCID.
    "oci": {"ubuntu-22.04": "Canonical Ubuntu:22.04", "ubuntu-24.04": "Canonical Ubuntu:24.04"},
    "azure": {
        "ubuntu-22.04": "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2:latest",
        "ubuntu-24.04": "Canonical:ubuntu-24_04-lts:server:latest",
        "debian-12": "Debian:debian-12:12-gen2:latest",
    },
}


ALIASES: tuple[str, ...] = ("ubuntu-22.04", "ubuntu-24.04", "debian-12")


def is_alias(image: str) -> bool:
    return image in ALIASES


def lookup(provider: str, image: str) -> str | None:
    """The provider's name for an alias; None when ``image`` is not an alias (a native id)."""
    return IMAGES[provider].get(image)
