"""What each adapter sends as a VM's startup script, and how big that is against the provider's limit.

The adapters build their user-data with these functions, and the producer measures the same bytes
(``sent_size``) before anything is enqueued, so a script is refused at the producer exactly when the
provider would refuse what the adapter sends: on AWS the script travels MIME-wrapped with the SSH key,
on OCI beside the key in a metadata map that is capped as a whole. Plain stdlib and PyYAML; no SDK.
"""

from __future__ import annotations

import base64
import copy
import email
import hashlib
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any, NamedTuple

import yaml

from vmqueue.options import AWSOptions, GCPOptions
from vmqueue.sshkeys import SSHPublicKey

# Limits of what is sent, in bytes, with their sources.
AWS_USER_DATA_BYTES = 16 * 1024  # raw user data before base64 (EC2 API reference, RunInstances UserData)
OCI_METADATA_BYTES = 32_000  # metadata + extendedMetadata together (OCI API reference, LaunchInstanceDetails)
GCP_VALUE_BYTES = 256 * 1024  # one metadata value (Compute Engine docs, "Metadata limits")
GCP_METADATA_BYTES = 512 * 1024  # all metadata entries together (same page)
PLAIN_LIMITS: dict[str, int] = {
    "sim": 64 * 1024,
    "hetzner": 32 * 1024,  # Hetzner API reference, POST /servers user_data: "limited to 32KiB"
    "digitalocean": 64 * 1024,  # DigitalOcean API reference, droplets create user_data: 64 KiB
    "azure": 65_535,  # osProfile.customData: at most 65,535 bytes before base64 (Azure Compute reference)
}

# cloud-init's MIME type of each kind of startup script ``check_startup_script`` accepts.
SCRIPT_TYPES = (("#cloud-config", "cloud-config"), ("#include", "x-include-url"), ("#!", "x-shellscript"))


class SentSize(NamedTuple):
    """``size`` bytes of ``what`` go to the provider, which takes at most ``limit``."""

    size: int
    limit: int
    what: str


def aws_user_data(ssh_key: SSHPublicKey, script: str | None) -> str:
    """MIME multipart user-data: the user's script, then a #cloud-config with the SSH key.

    The boundary is derived from the content: a random one would change the request between retries
    and EC2 would refuse it under the same ClientToken (IdempotentParameterMismatch).
    """
    keys = MIMEText(
        "#cloud-config\n" + yaml.safe_dump({"ssh_authorized_keys": [ssh_key.openssh]}, width=4096), "cloud-config"
    )
    # Appends our key to any ssh_authorized_keys of the user's own #cloud-config instead of replacing it.
    keys["Merge-Type"] = "list(append)+dict(no_replace,recurse_list)+str()"
    parts: list[Any] = []
    if script and script.lstrip().lower().startswith("content-type:"):
        user = email.message_from_string(script.lstrip())
        parts = user.get_payload() if user.is_multipart() else [user]
    elif script:
        subtype = next((t for prefix, t in SCRIPT_TYPES if script.lstrip().startswith(prefix)), "x-shellscript")
        parts = [MIMEText(script, subtype)]
    boundary = "vmq-" + hashlib.sha256(f"{ssh_key.openssh}\n{script}".encode()).hexdigest()[:32]
    message = MIMEMultipart(boundary=boundary)
    for part in [*parts, keys]:
        message.attach(part)
    return message.as_string()


def aws_sent(options: AWSOptions, ssh_key: SSHPublicKey, script: str | None) -> str | None:
    """EC2's UserData: the script alone when an EC2 key pair carries the key, else the MIME above."""
    return script if options.key_name else aws_user_data(ssh_key, script)


def oci_metadata(ssh_key: SSHPublicKey, script: str | None) -> dict[str, str]:
    """OCI's instance metadata: the key, and the script base64-encoded as ``user_data``."""
    metadata = {"ssh_authorized_keys": ssh_key.openssh}
    if script is not None:
        metadata["user_data"] = base64.b64encode(script.encode()).decode()
    return metadata


def gcp_metadata(ssh_user: str, ssh_key: SSHPublicKey, script: str | None, image: str) -> dict[str, str]:
    """GCE metadata items: ``ssh-keys``, and the script as ``user-data`` (cloud-init) or ``startup-script``.

    Raises ValueError for a Debian image (no cloud-init; the guest agent runs ``startup-script``) with a
    script that is not a shell script.
    """
    items = {"ssh-keys": f"{ssh_user}:{ssh_key.openssh}"}
    if script and "debian" in image:
        if not script.lstrip().startswith("#!"):
            raise ValueError("GCP Debian images have no cloud-init: the startup script must start with '#!'")
        items["startup-script"] = script
    elif script:
        items["user-data"] = script
    return items


def custom_data(script: str | None) -> str | None:
    """Azure's ``osProfile.customData``: the script base64-encoded."""
    return base64.b64encode(script.encode()).decode() if script else None


def sent_size(provider: str, options: Any, ssh_key: SSHPublicKey, script: str, image: str = "") -> SentSize:
    """The bytes the adapter of ``provider`` sends for ``script`` (with ``ssh_key`` where it travels along).

    ``options`` is the spec's options model (or None). Raises ValueError where the script cannot be
    sent at all (GCP Debian images and a non-shell script).
    """
    if provider == "aws":
        sent = aws_sent(options if isinstance(options, AWSOptions) else AWSOptions(), ssh_key, script) or ""
        return SentSize(len(sent.encode()), AWS_USER_DATA_BYTES, "user-data (MIME, with the SSH key)")
    if provider == "oci":
        size = len(json.dumps(oci_metadata(ssh_key, script)).encode())
        return SentSize(size, OCI_METADATA_BYTES, "metadata (base64 user_data and the SSH key)")
    if provider == "gcp":
        user = options.ssh_user if isinstance(options, GCPOptions) else GCPOptions().ssh_user
        items = gcp_metadata(user, ssh_key, script, image)
        total = sum(len(k.encode()) + len(v.encode()) for k, v in items.items())
        if total > GCP_METADATA_BYTES:
            return SentSize(total, GCP_METADATA_BYTES, "metadata (the script and the SSH key)")
        return SentSize(len(script.encode()), GCP_VALUE_BYTES, "one metadata value")
    return SentSize(len(script.encode()), PLAIN_LIMITS[provider], "user-data")


# -- merging vmqueue's own cloud-config into a user's script, whatever its format ---------------------
# cloud-init reads user-data as one of several formats (https://cloudinit.readthedocs.io/en/latest/
# explanation/format.html): ``#cloud-config`` YAML, a shell script (``#!``), ``#include``, or MIME
# multipart holding several. ``merge_user_data`` adds our keys (``ready_when=cloud_init``: a
# phone_home): none -> a #cloud-config of ours; ``#cloud-config`` -> keys merged (mappings recurse,
# lists append, the user's scalars win); anything else -> MIME multipart, the user's part(s) then a
# text/cloud-config part whose Merge-Type appends to the user's. A pure function of its input (the
# MIME boundary is a digest), so retries of a create send identical bytes.
CLOUD_CONFIG = "#cloud-config"
# Appends our lists to the user's and never replaces a key the user set (cloud-init's merging docs).
MERGE_TYPE = "list(append)+dict(no_replace,recurse_list)+str()"


def _is_mime(script: str) -> bool:
    return script.lstrip().lower().startswith("content-type:")


def _dump(config: dict[str, Any]) -> str:
    return CLOUD_CONFIG + "\n" + yaml.safe_dump(config, sort_keys=False, width=4096)


def cloud_configs(script: str | None) -> list[dict[str, Any]]:
    """Every cloud-config document in ``script`` (one for ``#cloud-config``, one per MIME part of
    type ``text/cloud-config``; none for a shell script). ``ValueError`` on YAML that is no mapping."""
    if not script:
        return []
    if script.lstrip().startswith(CLOUD_CONFIG):
        return [_mapping(script)]
    if not _is_mime(script):
        return []
    found = []
    for part in email.message_from_string(script.lstrip()).walk():
        if part.get_content_type() == "text/cloud-config":
            payload = part.get_payload(decode=True)
            found.append(_mapping(payload.decode() if isinstance(payload, bytes) else str(payload)))
    return found


def _mapping(text: str) -> dict[str, Any]:
    document = yaml.safe_load(text)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ValueError("a #cloud-config document must be a YAML mapping")
    return document


def deep_merge(user: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """``ours`` merged into ``user``: mappings recurse, lists append, the user's scalars win."""
    merged = copy.deepcopy(user)
    for key, value in ours.items():
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(merged[key], list) and isinstance(value, list):
            merged[key] = merged[key] + copy.deepcopy(value)
    return merged


def merge_user_data(script: str | None, config: dict[str, Any]) -> str:
    """The user-data that runs ``script`` and applies our cloud-config ``config`` (see the module doc)."""
    if not script:
        return _dump(config)
    if script.lstrip().startswith(CLOUD_CONFIG):
        return _dump(deep_merge(_mapping(script), config))
    ours = MIMEText(_dump(config), "cloud-config")
    ours["Merge-Type"] = MERGE_TYPE
    if _is_mime(script):
        user = email.message_from_string(script.lstrip())
        parts: list[Any] = user.get_payload() if user.is_multipart() else [user]
    else:
        subtype = next((t for prefix, t in SCRIPT_TYPES if script.lstrip().startswith(prefix)), "x-shellscript")
        parts = [MIMEText(script, subtype)]
    seed = json.dumps([script, config], sort_keys=True)
    message = MIMEMultipart(boundary="vmq-" + hashlib.sha256(seed.encode()).hexdigest()[:32])
    for part in [*parts, ours]:
        message.attach(part)
    return message.as_string()
