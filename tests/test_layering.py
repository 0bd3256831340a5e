"""Who may import whom (DESIGN §1), and what the lazy registry and the queue declarations promise."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from celery.exceptions import QueueNotFound

from bench.harness import ROOT
from vmqueue.celery_config import make_celery
from vmqueue.models import PROVIDERS
from vmqueue.settings import Settings
from workers.providers.registry import PROVIDER_FACTORIES, UnknownProviderError, get_provider

SDK_MODULES = ["hcloud", "pydo", "boto3", "botocore", "google.cloud.compute_v1", "oci", "azure.mgmt.compute"]


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint([m for m in {SDK_MODULES!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own probe's list literal


def test_the_producer_imports_no_cloud_sdk():
    assert _imported_after("import producer, producer.cli, producer.client, producer.web") == []


def test_a_sim_worker_imports_no_cloud_sdk():
    code = "import workers.tasks\nfrom workers.providers.registry import get_provider\nget_provider('sim')"
    assert _imported_after(code) == []


def test_a_worker_imports_only_its_own_providers_sdk():
    assert _imported_after("from workers.providers.registry import get_provider\nget_provider('hetzner')") == ["hcloud"]


def test_the_base_distribution_pulls_no_cloud_sdk():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not any(sdk in base for sdk in ("hcloud", "pydo", "boto", "google-cloud", "oci", "azure"))
    assert set(project["optional-dependencies"]) >= {*[p for p in PROVIDERS if p != "sim"], "all", "dev"}


def test_the_registry_knows_every_provider_and_refuses_others():
    assert set(PROVIDER_FACTORIES) == set(PROVIDERS)
    with pytest.raises(UnknownProviderError, match="unknown provider 'linode'"):
        get_provider("linode")


def test_a_misspelt_queue_is_an_error_at_publish():
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))  # never reached: refused before sending
    with pytest.raises(QueueNotFound):
        app.send_task("vmq.get", args=["job"], queue="vmq.hetzer")
