"""The worker app with every provider SDK imported up front: P5's baseline (bench/footprint.py).

What a worker would weigh if the adapters were not loaded lazily per queue: the six adapter modules
and the SDK packages the OCI and Azure adapters import inside their functions. Never in production.
"""

from __future__ import annotations

import azure.identity  # noqa: F401
import azure.mgmt.compute  # noqa: F401
import azure.mgmt.network  # noqa: F401
import oci  # noqa: F401

import workers.providers.aws  # noqa: F401
import workers.providers.azure  # noqa: F401
import workers.providers.digitalocean  # noqa: F401
import workers.providers.gcp  # noqa: F401
import workers.providers.hetzner  # noqa: F401
import workers.providers.oci  # noqa: F401
from workers.app import app

__all__ = ["app"]
