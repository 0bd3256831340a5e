"""The producer's startup-script check measures what each adapter sends (vmqueue/userdata.py).

The adapters' own tests (tests/providers/) show that each sends exactly the bytes measured here.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from vmqueue.models import CreateRequest, VMSpec
from vmqueue.options import OPTIONS_MODELS
from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key
from vmqueue.userdata import sent_size

OPTIONS = {
    "oci": {"compartment_id": "ocid1.compartment.oc1..aaaa", "subnet_id": "ocid1.subnet.oc1..bbbb"}
    | {"availability_domain": "Uocm:PHX-AD-1"},
    "azure": {"resource_group": "rg1"},
}
REGIONS = {"gcp": "us-central1-a", "oci": "us-phoenix-1"}


def spec(provider: str, **options: object) -> dict:
    return {
        "provider": provider,
        "name": "web-1",
        "region": REGIONS.get(provider, "r1"),
        "instance_type": "t1",
        "image": "ubuntu-24.04",
        "options": {**OPTIONS.get(provider, {}), **options},
    }


def rsa_key(bits: int = 4096) -> str:
    """A fresh RSA public key line (its private half is dropped at once)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_aws_script_that_fits_raw_but_not_wrapped_is_refused():
    """16,073 bytes of shell script with an ed25519 key: over EC2's 16 KiB once MIME-wrapped with the key."""
    script = "#!/bin/sh\n" + "x" * (16_073 - 10)
    key = throwaway_public_key()
    with pytest.raises(ValidationError, match=r"bytes as sent to aws \(user-data \(MIME, with the SSH key\)\)"):
        CreateRequest(spec=spec("aws"), ssh_key=key, startup_script=script)
    # With an EC2 key pair the key does not travel in the user-data: the script alone fits.
    CreateRequest(spec=spec("aws", key_name="ops"), ssh_key=key, startup_script=script)


def test_oci_metadata_counts_the_key():
    """23 KiB of script was under the old raw limit; base64 beside an RSA key it is over 32,000 bytes."""
    script = "#!/bin/sh\n" + "x" * (23 * 1024 - 10)
    with pytest.raises(ValidationError, match="as sent to oci \\(metadata"):
        CreateRequest(spec=spec("oci"), ssh_key=rsa_key(), startup_script=script)


def test_fallback_placement_options_decide_the_wrapping():
    """A fallback region without the key pair wraps the script with the key: checked for that placement too."""
    script = "#!/bin/sh\n" + "x" * (16_073 - 10)
    fallback = {"region": "r2", "options": {"key_name": None}}
    with pytest.raises(ValidationError, match="as sent to aws"):
        CreateRequest(
            spec={**spec("aws", key_name="ops"), "fallbacks": [fallback]},
            ssh_key=throwaway_public_key(),
            startup_script=script,
        )


@pytest.mark.parametrize("provider", sorted(OPTIONS_MODELS))
def test_limit_is_on_the_sent_bytes(provider):
    """The longest script whose sent form fits the provider's limit passes; one byte more is refused."""
    key = throwaway_public_key()
    parsed = SSHPublicKey.parse(key)
    options = VMSpec.model_validate(spec(provider)).options

    def script(n: int) -> str:
        return "#!/bin/sh\n" + "x" * n

    low, high = 0, 300 * 1024  # sent size grows with n: the longest that fits lies between
    while low < high:
        mid = (low + high + 1) // 2
        size = sent_size(provider, options, parsed, script(mid))
        low, high = (mid, high) if size.size <= size.limit else (low, mid - 1)
    limit = sent_size(provider, options, parsed, script(low)).limit
    assert limit - 4 <= sent_size(provider, options, parsed, script(low)).size <= limit  # base64 steps by 4
    CreateRequest(spec=spec(provider), ssh_key=key, startup_script=script(low))
    with pytest.raises(ValidationError, match=f"at most {limit} bytes"):
        CreateRequest(spec=spec(provider), ssh_key=key, startup_script=script(low + 1))


def test_gcp_debian_needs_a_shell_script_at_the_producer():
    with pytest.raises(ValidationError, match="Debian images have no cloud-init"):
        CreateRequest(
            spec={**spec("gcp"), "image": "debian-12"},
            ssh_key=throwaway_public_key(),
            startup_script="#cloud-config\npackages: [nginx]\n",
        )
