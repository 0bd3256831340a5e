"""Provider name -> a small import function, so a worker imports only the SDK of the queue it serves."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from workers.providers.base import Provider


def _import_sim() -> Provider:
    from workers.providers.sim import SimProvider

    return SimProvider()


def _import_hetzner() -> Provider:
    from workers.providers.hetzner import HetznerProvider

    return HetznerProvider()


def _import_digitalocean() -> Provider:
    from workers.providers.digitalocean import DigitalOceanProvider

    return DigitalOceanProvider()


def _import_aws() -> Provider:
    from workers.providers.aws import AWSProvider

    return AWSProvider()


def _import_gcp() -> Provider:
    from workers.providers.gcp import GCPProvider

    return GCPProvider()


def _import_oci() -> Provider:
    from workers.providers.oci import OCIProvider

    return OCIProvider()


def _import_azure() -> Provider:
    from workers.providers.azure import AzureProvider

    return AzureProvider()


PROVIDER_FACTORIES: dict[str, Callable[[], Provider]] = {
    "sim": _import_sim,
    "hetzner": _import_hetzner,
    "digitalocean": _import_digitalocean,
    "aws": _import_aws,
    "gcp": _import_gcp,
    "oci": _import_oci,
    "azure": _import_azure,
}


class UnknownProviderError(LookupError):
    pass


@cache
def get_provider(name: str) -> Provider:
    """The process-wide adapter for ``name``; its SDK is imported on this first call."""
    try:
        factory = PROVIDER_FACTORIES[name]
    except KeyError:
        raise UnknownProviderError(f"unknown provider {name!r}; known: {', '.join(PROVIDER_FACTORIES)}") from None
    return factory()
