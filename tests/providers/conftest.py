"""Fixtures every adapter's tests share."""

from __future__ import annotations

import pytest

from producer.sshkeys import SSHPublicKey
from tests.providers.contract import parsed_key


@pytest.fixture
def key() -> SSHPublicKey:
    return parsed_key()
