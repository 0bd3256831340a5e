"""Bad input, everywhere it can enter: the producer, the CLI, and a provider queue itself.

tests/test_contract.py covers names, reserved labels, images, sim options and scripts at the
producer; this file adds keys, instance ids, regions/types, label syntax and every provider's
options at the producer, the same through the CLI, and malformed messages on vmq.sim. Each bad
request is refused naming its field with nothing written to Redis; each bad message is refused by
the worker with a logged reason, and the worker still completes a normal job afterwards.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from unittest import mock

import pytest
import typer.main
import typer.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer
from pydantic import ValidationError
from typer.testing import CliRunner

from producer.cli import app
from tests.conftest import KOMBU_KEYS
from vmqueue.sshkeys import throwaway_public_key

pytestmark = pytest.mark.system


class _OneCommandRunner(CliRunner):
    """typer's CliRunner, but the click command is built from ``app`` once, not on every invoke
    (~0.1 s each, and the hypothesis tests below invoke the CLI a few hundred times)."""

    command = typer.main.get_command(app)

    def invoke(self, cli_app, *args, **kwargs):
        with mock.patch.object(typer.testing, "_get_command", lambda _: self.command):
            return super().invoke(cli_app, *args, **kwargs)


runner = _OneCommandRunner()
GOOD = {"provider": "sim", "name": "web-1", "region": "sim-1", "instance_type": "small", "image": "ubuntu-24.04"}
FIXTURES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- what malformed looks like -------------------------------------------------------------------
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NATIVE_ID = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._:/@+()-]*")
bad_instance_ids = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=30).filter(lambda s: not _NATIVE_ID.fullmatch(s)),
    st.text(alphabet="ab", min_size=1025, max_size=1100),
)
bad_keys = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["ssh-rsa", "ssh-ed25519 ", "ssh-ed25519 AAAA", "ecdsa-sha2-nistp256 AAAAE2Vj"]),
    st.binary(min_size=1, max_size=40).map(lambda b: "ssh-ed25519 " + b.hex()),
)
bad_places = st.one_of(
    st.just(""), st.text(min_size=1, max_size=20).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", s))
)
bad_label_keys = st.text(min_size=1, max_size=70).filter(lambda s: not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", s))
bad_label_values = st.text(min_size=1, max_size=70).filter(lambda s: not re.fullmatch(r"[a-z0-9_-]{0,63}", s))
bad_scripts = st.text(min_size=1, max_size=200).filter(
    lambda s: (
        s.strip()
        and not s.lstrip().startswith(("#!", "#cloud-config", "#include"))
        and not s.lstrip().lower().startswith("content-type:")
    )
)
# (provider, options, the field the error must name); each is wrong by type, range or name.
BAD_OPTIONS = [
    ("aws", {"subnet_id": 42}, "options.aws.subnet_id"),
    ("aws", {"security_group_ids": "sg-1"}, "options.aws.security_group_ids"),
    ("aws", {"root_volume_gb": 7}, "options.aws.root_volume_gb"),
    ("aws", {"associate_public_ip": "maybe"}, "options.aws.associate_public_ip"),
    ("gcp", {"ssh_user": "Root User"}, "options.gcp.ssh_user"),
    ("gcp", {"disk_size_gb": -1}, "options.gcp.disk_size_gb"),
    ("hetzner", {"enable_ipv4": [1]}, "options.hetzner.enable_ipv4"),
    ("digitalocean", {"monitoring": {"on": True}}, "options.digitalocean.monitoring"),
    ("oci", {"compartment_id": "c", "subnet_id": "s", "availability_domain": "ad", "ocpus": 0}, "options.oci.ocpus"),
    ("azure", {"resource_group": "rg with spaces"}, "options.azure.resource_group"),
    ("azure", {"resource_group": "rg", "subnet_id": "/not/an/arm/id"}, "options.azure.subnet_id"),
    ("sim", {"provider": "aws"}, "options"),
]
REGIONS = {"aws": "eu-central-1", "gcp": "europe-west3-a", "oci": "eu-frankfurt-1", "azure": "westeurope"}


def named(exc: ValidationError) -> str:
    """Every field the error names, and every message (a model-level error names its field in words)."""
    return " ".join(".".join(str(p) for p in e["loc"]) + " " + e["msg"] for e in exc.errors())


def keys_in(redis_client) -> set[str]:
    return {k for k in redis_client.scan_iter(count=1000) if not k.startswith(KOMBU_KEYS)}


# -- the producer ----------------------------------------------------------------------------------
@FIXTURES
@given(instance_id=bad_instance_ids, get=st.booleans())
def test_bad_instance_ids_are_refused(provisioner, redis_client, instance_id, get):
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        (provisioner.get_vm if get else provisioner.destroy_vm)("sim", instance_id)
    assert "instance_id" in named(info.value)
    assert keys_in(redis_client) == before


@FIXTURES
@given(
    provider=st.text(max_size=15).filter(
        lambda p: p not in {"sim", "hetzner", "digitalocean", "aws", "gcp", "oci", "azure"}
    )
)
def test_unknown_providers_are_refused_everywhere(provisioner, redis_client, provider):
    before = keys_in(redis_client)
    for call in (
        lambda: provisioner.destroy_vm(provider, "i-1"),
        lambda: provisioner.create_vm({**GOOD, "provider": provider}, throwaway_public_key()),
    ):
        with pytest.raises(ValidationError) as info:
            call()
        assert "provider" in named(info.value)
    assert keys_in(redis_client) == before


@FIXTURES
@given(key=bad_keys)
def test_bad_ssh_keys_are_refused_naming_the_key(provisioner, redis_client, key):
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        provisioner.create_vm(GOOD, key)
    assert "ssh_key" in named(info.value)
    assert keys_in(redis_client) == before


@FIXTURES
@given(field=st.sampled_from(["region", "instance_type"]), value=bad_places)
def test_bad_regions_and_types_are_refused(provisioner, redis_client, field, value):
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        provisioner.create_vm({**GOOD, field: value}, throwaway_public_key())
    assert f"spec.{field}" in named(info.value)
    assert keys_in(redis_client) == before


@FIXTURES
@given(labels=st.one_of(
    st.dictionaries(bad_label_keys, st.just("ok"), min_size=1, max_size=3),
    st.dictionaries(st.just("team"), bad_label_values, min_size=1),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.just("v"), min_size=21, max_size=25),
))  # fmt: skip
def test_bad_labels_are_refused(provisioner, redis_client, labels):
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        provisioner.create_vm({**GOOD, "labels": labels}, throwaway_public_key())
    assert "spec.labels" in named(info.value)
    assert keys_in(redis_client) == before


@FIXTURES
@given(script=bad_scripts)
def test_scripts_cloud_init_cannot_read_are_refused(provisioner, redis_client, script):
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        provisioner.create_vm(GOOD, throwaway_public_key(), script)
    assert "startup_script" in named(info.value)
    assert keys_in(redis_client) == before


@pytest.mark.parametrize(("provider", "options", "field"), BAD_OPTIONS)
def test_bad_options_of_every_provider_name_the_option(provisioner, redis_client, provider, options, field):
    spec = {**GOOD, "provider": provider, "region": REGIONS.get(provider, "fsn1"), "options": options}
    before = keys_in(redis_client)
    with pytest.raises(ValidationError) as info:
        provisioner.create_vm(spec, throwaway_public_key())
    assert field in named(info.value)
    assert keys_in(redis_client) == before


# -- the CLI ---------------------------------------------------------------------------------------
CREATE = ["create", "-p", "sim", "--region", "sim-1", "--type", "small", "--image", "debian-12"]


def _refused(result, field: str) -> None:
    """Exit 2, nothing enqueued, the problem named as the user typed it (``--name``, not ``spec.name``)."""
    assert result.exit_code == 2, result.output
    assert "Nothing was enqueued" in result.output
    assert field in result.output, result.output


@FIXTURES
@given(
    name=st.text(min_size=1, max_size=70).filter(lambda s: not _HOSTNAME.fullmatch(s) and not s.startswith("-")),
)
def test_cli_refuses_bad_names(cli_env, redis_client, name):
    before = keys_in(redis_client)
    _refused(runner.invoke(app, [*CREATE, "--name", name, "--ssh-key", throwaway_public_key()]), "--name")
    assert keys_in(redis_client) == before


@FIXTURES
@given(key=bad_label_keys.filter(lambda s: "=" not in s and not s.startswith("-")))
def test_cli_refuses_bad_labels(cli_env, redis_client, key):
    before = keys_in(redis_client)
    args = [*CREATE, "--name", "web-1", "--ssh-key", throwaway_public_key(), "--label", f"{key}=x"]
    _refused(runner.invoke(app, args), "--label")
    assert keys_in(redis_client) == before


@FIXTURES
@given(key=bad_keys.filter(lambda s: s.strip() and not s.startswith("-") and "\x00" not in s))
def test_cli_refuses_bad_keys(cli_env, redis_client, tmp_path_factory, key):
    path = tmp_path_factory.mktemp("key") / "id.pub"
    path.write_text(key)
    before = keys_in(redis_client)
    _refused(runner.invoke(app, [*CREATE, "--name", "web-1", "--ssh-key", str(path)]), "--ssh-key")
    assert keys_in(redis_client) == before


@FIXTURES
@given(script=bad_scripts.filter(lambda s: "\x00" not in s))
def test_cli_refuses_bad_scripts(cli_env, redis_client, tmp_path_factory, script):
    path = tmp_path_factory.mktemp("script") / "init.sh"
    path.write_text(script)
    before = keys_in(redis_client)
    args = [*CREATE, "--name", "web-1", "--ssh-key", throwaway_public_key(), "--script", str(path)]
    _refused(runner.invoke(app, args), "--script")
    assert keys_in(redis_client) == before


@pytest.mark.parametrize(("provider", "options", "field"), [o for o in BAD_OPTIONS if o[0] != "sim"])
def test_cli_refuses_bad_options(cli_env, redis_client, provider, options, field):
    args = ["create", "-p", provider, "--name", "web-1", "--region", REGIONS.get(provider, "fsn1"), "--type", "t",
            "--image", "ubuntu-24.04", "--ssh-key", throwaway_public_key()]  # fmt: skip
    args += [arg for key, value in options.items() for arg in ("--option", f"{key}={json.dumps(value)}")]
    before = keys_in(redis_client)
    _refused(runner.invoke(app, args), field)
    assert keys_in(redis_client) == before


@FIXTURES
@given(instance_id=bad_instance_ids.filter(lambda s: s and not s.startswith("-") and "\x00" not in s))
def test_cli_refuses_bad_instance_ids(cli_env, redis_client, instance_id):
    before = keys_in(redis_client)
    for command in ("destroy", "get"):
        _refused(runner.invoke(app, [command, "sim", instance_id]), "instance_id")
    assert keys_in(redis_client) == before


# -- malformed messages on a provider queue -------------------------------------------------------
def _publish_raw(redis_url: str, body: bytes | str, content_type: str, headers: dict | None = None) -> None:
    """A message put on vmq.sim with kombu directly, bypassing every check of the producer."""
    with Connection(redis_url) as connection:
        Producer(connection).publish(
            body,
            exchange=Exchange("vmq.sim", type="direct"),
            routing_key="vmq.sim",
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            headers=headers or {},
        )


def _wait_logged(worker, since: int, text: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.log()[since:]:
        assert worker.process.poll() is None, f"the worker died:\n{worker.log()[since:]}"
        assert time.monotonic() < deadline, f"not logged within {timeout_s}s: {text!r}\n{worker.log()[since:][-3000:]}"
        time.sleep(0.1)


def test_malformed_messages_are_refused_with_a_reason_and_the_worker_goes_on(
    sim_worker, provisioner, redis_url, ssh_key
):
    since = len(sim_worker.log())
    send = provisioner.celery.send_task
    task_headers = {"task": "vmq.create", "id": uuid.uuid4().hex, "lang": "py", "argsrepr": "()", "kwargsrepr": "{}"}
    cases = [
        # (how the message is malformed, what the worker logs)
        (lambda: send("vmq.create", args=[{"job": 1}], queue="vmq.sim"), "the argument must be a job id string"),
        (lambda: send("vmq.destroy", args=[12345], queue="vmq.sim"), "got 12345"),
        (lambda: send("vmq.get", kwargs={"job_id": None}, queue="vmq.sim"), "got None"),
        (lambda: send("vmq.create", args=["a", "b"], queue="vmq.sim"), "seq must be a step number >= 0, got 'b'"),
        (lambda: send("vmq.create", args=["a", 1, 2], queue="vmq.sim"), "takes from 2 to 3 positional arguments"),
        (lambda: send("vmq.create", args=["no-such-job"], queue="vmq.sim"), "job=no-such-job dropped: no such job"),
        (lambda: send("vmq.nonsense", args=["x"], queue="vmq.sim"), "unregistered task of type 'vmq.nonsense'"),
        (lambda: send("vmq.sweep", args=["not a request"], queue="vmq.sim"), "vmq.sweep message rejected"),
        (lambda: _publish_raw(redis_url, "{not json", "application/json", task_headers), "Can't decode message body"),
        (
            lambda: _publish_raw(redis_url, b"\x80\x04K\x01.", "application/x-python-serialize", task_headers),
            "untrusted content of type pickle",
        ),
        (
            lambda: _publish_raw(redis_url, json.dumps({"hello": "world"}), "application/json"),
            "Received and deleted unknown message",
        ),
    ]
    for publish, logged in cases:
        publish()
        _wait_logged(sim_worker, since, logged)
    job = provisioner.wait(provisioner.create_vm({**GOOD, "name": "after-garbage"}, ssh_key).id, timeout_s=30)
    assert job.state == "running"
    assert sim_worker.process.poll() is None
