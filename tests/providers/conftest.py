"""Fixtures every adapter's tests share."""

from __future__ import annotations

import gzip
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from tests.providers.contract import parsed_key
from vmqueue.sshkeys import SSHPublicKey


def _moto_base_amis() -> None:
    """Point moto at its own base list of 44 AMIs (``MOTO_AMIS_PATH``, read when moto is imported).

    Without it every EC2 backend moto makes (one per region, again in every test) also loads the
    region's ~1,100 ECS-optimised AMIs: over half of test_aws.py's time. The tests use only base-list
    AMIs (ami-12c6146b, and the first amazon one for an alias), which stay as moto ships them.
    """
    if "MOTO_AMIS_PATH" in os.environ:
        return
    spec = importlib.util.find_spec("moto")
    if spec is None or not spec.submodule_search_locations:
        return
    resources = Path(next(iter(spec.submodule_search_locations))) / "ec2" / "resources"
    if (resources / "amis.json").exists():
        text = (resources / "amis.json").read_text()
    elif (resources / "amis.json.gz").exists():
        text = gzip.decompress((resources / "amis.json.gz").read_bytes()).decode()
    else:
        return
    fd, path = tempfile.mkstemp(prefix="vmq-moto-amis-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.environ["MOTO_AMIS_PATH"] = path


_moto_base_amis()


@pytest.fixture
def key() -> SSHPublicKey:
    return parsed_key()
