"""Readiness: what "ready" means for a create job, the host keys it records, and the phone-home token.

A provider's API says "running" long before the VM is usable: sshd answers seconds later and
cloud-init finishes minutes later. A create request says which of these ends its job
(``ready_when``); the workers then carry the job from ``running`` to ``ready``:

- ``ssh``: every worker process runs one asynchronous scanner (workers/readyscan.py) that probes
  the VM's SSH port until a key exchange succeeds, and records the host keys it offered.
- ``cloud_init``: the producer adds a cloud-init ``phone_home`` to the user-data
  (vmqueue/userdata.py) pointing at the HTTP API with a per-job one-time token; cloud-init posts
  the host keys when its final stage runs, and the API (producer/phonehome.py) settles the job.

The schedule both sides share lives in Redis: ``keys.READY_DUE`` (a sorted set: job id -> when it
is next due, epoch s) and ``keys.READY_TARGETS`` (job id -> what to probe, JSON).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import StrEnum

import redis
from pydantic import BaseModel, ConfigDict

from vmqueue import keys
from vmqueue.sshkeys import SSHPublicKey


class ReadyWhen(StrEnum):
    """What ends a create job."""

    running = "running"  # the provider's API says the VM runs (the default, and the only final state)
    ssh = "ssh"  # the VM's SSH port completes a key exchange; its host keys are read
    cloud_init = "cloud_init"  # cloud-init's final stage posted to the HTTP API (phone_home)


class ReadyVia(StrEnum):
    """Which of the VM's addresses the SSH scanner probes."""

    public = "public"  # public IPv4, else public IPv6
    private = "private"  # private IPv4: workers inside the VM's network


class HostKey(BaseModel):
    """One SSH host key of a VM, so a caller can fill known_hosts instead of trusting on first use."""

    model_config = ConfigDict(frozen=True)

    type: str  # the key's algorithm name, e.g. "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"
    sha256: str  # "SHA256:<base64>" as `ssh-keygen -l` prints it
    openssh: str  # "<type> <base64>": the known_hosts line without the host name

    @classmethod
    def parse(cls, line: str) -> HostKey:
        """From an OpenSSH public key line; ``ValueError`` when it is not one."""
        key = SSHPublicKey.parse(line)
        return cls(type=key.key_type, sha256=key.sha256_fingerprint, openssh=f"{key.key_type} {key.body}")


# cloud-init's phone_home posts these fields (cc_phone_home.POST_LIST_ALL, less the DSA key nothing accepts).
PHONE_HOME_POST = ("pub_key_rsa", "pub_key_ecdsa", "pub_key_ed25519", "instance_id", "hostname", "fqdn")
PHONE_HOME_KEY_FIELDS = ("pub_key_rsa", "pub_key_ecdsa", "pub_key_ed25519")
# cloud-init tries this often, 3 s apart (its own default is 10): an API restart should not lose a VM.
PHONE_HOME_TRIES = 20
PHONE_HOME_PATH = "/ready/{job_id}/{token}"
TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh per-job token (256 bits, URL-safe); only its SHA-256 is stored."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def phone_home_url(base_url: str, job_id: str, token: str) -> str:
    """The URL a VM's cloud-init posts to: ``<base>/ready/<job id>/<token>``."""
    return base_url.rstrip("/") + PHONE_HOME_PATH.format(job_id=job_id, token=token)


def phone_home_config(url: str) -> dict:
    """The cloud-config that makes cloud-init's final stage post the VM's host keys to ``url``."""
    return {"phone_home": {"url": url, "post": list(PHONE_HOME_POST), "tries": PHONE_HOME_TRIES}}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_digest(token: str) -> str:
    """What the job store keeps of a token (``keys.ready_token_key``): its SHA-256, hex."""
    return _digest(token)


def digest_matches(stored: str | bytes | None, token: str) -> bool:
    """Whether ``token`` is the one whose digest the store kept (constant-time compare)."""
    if stored is None:
        return False
    stored = stored.decode() if isinstance(stored, bytes) else stored
    return hmac.compare_digest(stored, _digest(token))


def spend_token(client: redis.Redis, job_id: str) -> None:
    """The token has been used: it opens nothing any more."""
    client.delete(keys.ready_token_key(job_id))


def wake(client: redis.Redis, job_id: str) -> None:
    """Make the job's readiness entry due now (if it has one), so a worker's scanner looks at it."""
    client.zadd(keys.READY_DUE, {job_id: 0}, xx=True)
