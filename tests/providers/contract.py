"""The tests every adapter's test module must have, one per part of the Provider protocol.

Subclass ``AdapterContract`` in ``tests/providers/test_<name>.py``; ``test_contract_is_complete``
fails while any name below has no test, so no protocol method goes untested (hcloud's habit).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key

REQUIRED_TESTS = (
    "test_create_sends_key_script_and_labels",
    "test_create_resolves_image_alias",
    "test_create_twice_same_job_one_vm",
    "test_create_lost_answer_one_vm",
    "test_get_maps_every_documented_state",
    "test_get_public_and_private_ips",
    "test_get_without_public_ip",
    "test_get_unknown_raises_not_found",
    "test_get_vms_reads_many_in_few_calls",
    "test_get_vms_matches_get_vm",
    "test_destroy",
    "test_destroy_twice",
    "test_destroy_unknown_id",
    "test_errors_map_to_taxonomy",
    "test_rate_limited_carries_retry_after",
    "test_missing_credentials_auth_error",
    "test_sdk_retries_off",
    "test_list_owned_vms",
    "test_meter_sees_every_request",
)


class AdapterContract:
    def test_contract_is_complete(self) -> None:
        missing = [name for name in REQUIRED_TESTS if not callable(getattr(self, name, None))]
        assert not missing, f"{type(self).__name__} lacks {missing}"


def make_ed25519_key(comment: str = "test@vmqueue") -> str:
    """A syntactically valid OpenSSH ed25519 public key line (random point; public data only)."""
    return throwaway_public_key(comment)


def parsed_key() -> SSHPublicKey:
    """A fresh parsed public key, as the pipeline hands one to an adapter."""
    return SSHPublicKey.parse(make_ed25519_key())


class RecordingMeter:
    """A ``Meter`` that records what an adapter's transport reports: each request before it goes out
    (method, target, scope) and each answer (method, target, status, headers)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.answers: list[tuple[str, str, int, dict[str, str]]] = []
        self._lock = threading.Lock()

    def before(self, method: str, target: str, scope: str = "") -> None:
        with self._lock:
            self.sent.append((method, target, scope))

    def after(self, method: str, target: str, status: int, headers: Mapping[str, str], scope: str = "") -> None:
        with self._lock:
            self.answers.append((method, target, status, dict(headers)))

    def requests(self) -> list[tuple[str, str]]:
        return [(method, target) for method, target, _ in self.sent]
