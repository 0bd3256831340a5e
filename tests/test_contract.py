"""The contract the producer enforces before anything is enqueued (property-based where it pays)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vmqueue.models import USER_DATA_LIMIT_BYTES, CreateRequest, VMSpec
from vmqueue.sshkeys import SSHPublicKey, throwaway_public_key

GOOD = {"provider": "sim", "name": "web-1", "region": "sim-1", "instance_type": "small", "image": "ubuntu-24.04"}
OPTIONS = {
    "oci": {
        "compartment_id": "ocid1.compartment.oc1..aaaa",
        "subnet_id": "ocid1.subnet.oc1..bbbb",
        "availability_domain": "Uocm:PHX-AD-1",
    },
    "azure": {"resource_group": "rg1"},
}


def fields_named(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in error["loc"]) for error in exc.errors()}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
@pytest.mark.parametrize("key_type", ["ed25519", "rsa", "ecdsa"])
def test_fingerprints_match_ssh_keygen(tmp_path, key_type):
    path = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "me@host", "-f", str(path)], check=True)
    public = (tmp_path / "key.pub").read_text()
    key = SSHPublicKey.parse(public)
    md5 = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(path)], capture_output=True, text=True).stdout
    sha = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], capture_output=True, text=True).stdout
    assert f"MD5:{key.md5_fingerprint}" in md5
    assert key.sha256_fingerprint in sha
    assert key.comment == "me@host" and key.openssh == public.strip()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected an OpenSSH public key line"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unsupported key type 'ssh-dss'"),
        ("ssh-ed25519 not*base64", "not valid base64"),
        ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", "encodes"),
        ("-----BEGIN OPENSSH " + "PRIVATE KEY----- abc", "private key"),  # split: not a key, a marker
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAAQA=", "32-byte"),
    ],
)
def test_bad_ssh_keys_are_refused_with_the_reason(text, says):
    with pytest.raises(ValueError, match=says):
        SSHPublicKey.parse(text)


def test_short_rsa_key_is_refused(tmp_path):
    path = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(path)], check=True)
    with pytest.raises(ValueError, match="1024 bits is too short"):
        SSHPublicKey.parse((tmp_path / "key.pub").read_text())


@pytest.mark.parametrize("provider", sorted(USER_DATA_LIMIT_BYTES))
def test_startup_script_limit_per_provider(provider):
    spec = {**GOOD, "provider": provider, "options": OPTIONS.get(provider, {})}
    limit = USER_DATA_LIMIT_BYTES[provider]
    fits = "#!/bin/sh\n" + "x" * (limit - 10)
    CreateRequest(spec=spec, ssh_key=throwaway_public_key(), startup_script=fits)
    with pytest.raises(ValidationError, match=f"at most {limit} bytes"):
        CreateRequest(spec=spec, ssh_key=throwaway_public_key(), startup_script=fits + "x")


@pytest.mark.parametrize(
    ("script", "says"),
    [("echo hi", "must start with '#!'"), ("#cloud-config\n: - :\n  bad", "not valid YAML"), ("   ", "empty")],
)
def test_startup_script_format(script, says):
    with pytest.raises(ValidationError, match=says):
        CreateRequest(spec=GOOD, ssh_key=throwaway_public_key(), startup_script=script)


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"name": "Web_1"}, "name", "hostname"),
        ({"name": "a" * 64}, "name", "hostname"),
        ({"provider": "linode"}, "provider", "'sim'"),
        ({"region": ""}, "region", "at least 1"),
        ({"labels": {"managed-by": "me"}}, "labels", "reserved"),
        ({"labels": {"Team": "x"}}, "labels", "label key"),
        ({"labels": {"team": "UPPER"}}, "labels", "value"),
        ({"options": {"subnet": "x"}}, "options.sim.subnet", "Extra inputs"),
        ({"provider": "aws", "options": {"root_volume_gb": 1}}, "options.aws.root_volume_gb", "greater than"),
        (
            {"provider": "azure", "options": {"resource_group": "rg", "admin_username": "root"}},
            "options.azure.admin_username",
            "refuses 'root'",
        ),
        ({"provider": "oci", "options": {}}, "options.oci.compartment_id", "Field required"),
        ({"provider": "oci", "image": "debian-12", "options": OPTIONS["oci"]}, "", "no oci image"),
        ({"fallbacks": [{"region": "eu west"}]}, "fallbacks.0.region", "pattern"),
        ({"fallbacks": [{"region": "r2", "zone": "a"}]}, "fallbacks.0.zone", "Extra inputs"),
        ({"fallbacks": [{"region": f"r{i}"} for i in range(11)]}, "fallbacks", "at most 10"),
        ({"provider": "oci", "instance_type": "VM.Standard.E4.Flex", "options": OPTIONS["oci"]}, "", "ocpus"),
    ],
)
def test_bad_spec_names_the_field(change, field, says):
    with pytest.raises(ValidationError) as info:
        VMSpec(**{**GOOD, **change})
    assert field in fields_named(info.value)
    assert says in str(info.value)


@settings(max_examples=150, deadline=None)
@given(
    name=st.text(max_size=80).filter(lambda s: not __import__("re").fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", s))
)
def test_any_non_hostname_is_refused(name):
    with pytest.raises(ValidationError) as info:
        VMSpec(**{**GOOD, "name": name})
    assert "name" in fields_named(info.value)


@settings(max_examples=150, deadline=None)
@given(key=st.text(max_size=200))
def test_arbitrary_text_is_never_taken_for_a_key(key):
    with pytest.raises(ValueError):
        SSHPublicKey.parse(key)


@pytest.mark.system
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bad=st.one_of(
        st.fixed_dictionaries({"name": st.text(max_size=5).map(lambda s: s + "_X")}),
        st.fixed_dictionaries(
            {
                "labels": st.dictionaries(
                    st.sampled_from(["managed-by", "vmqueue-job", "Bad Key"]), st.text(max_size=3), min_size=1
                )
            }
        ),
        st.fixed_dictionaries({"image": st.sampled_from(["", " ", "ubuntu 24.04", "-x"])}),
        st.fixed_dictionaries(
            {"options": st.dictionaries(st.sampled_from(["foo", "ocpus", "x"]), st.integers(), min_size=1)}
        ),
    ),
    script=st.one_of(st.none(), st.sampled_from(["echo no shebang", "#!/bin/sh\n" + "x" * 70_000])),
)
def test_bad_requests_enqueue_nothing(provisioner, app_keys, bad, script):
    before = app_keys()
    with pytest.raises(ValidationError):
        provisioner.create_vm({**GOOD, **bad}, throwaway_public_key(), script)
    assert app_keys() == before  # no job record, no message, no key


def test_placements_in_order():
    spec = VMSpec(**{**GOOD, "fallbacks": [{"region": "r2"}, {"region": "r3", "instance_type": "big"}]})
    assert [(p.region, p.instance_type) for p in (spec.at_placement(i) for i in range(3))] == [
        ("sim-1", "small"),
        ("r2", "small"),
        ("r3", "big"),
    ]
    assert all(spec.at_placement(i).fallbacks == [] for i in range(3))
