"""Fixtures every adapter's tests share."""

from __future__ import annotations

import pytest

from tests.providers.contract import parsed_key
from vmqueue.sshkeys import SSHPublicKey


@pytest.fixture
def key() -> SSHPublicKey:
    return parsed_key()
