"""cloud-init's own schema validator over the user-data an adapter sends.

cloud-init is not on PyPI; Debian's ``cloud-init`` package (``apt-get install cloud-init``, done by
.ci/run) ships it for the system Python, with its schema (schema-cloud-config-v1.json) and
``cloudinit.config.schema.validate_cloudconfig_schema``. That validator runs here in one
``/usr/bin/python3`` subprocess per call, over every cloud-config document in the user-data; MIME
parts must be of a type cloud-init handles.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
from pathlib import Path

import pytest

from vmqueue.readiness import phone_home_config, phone_home_url
from vmqueue.userdata import merge_user_data

SYSTEM_PYTHON = "/usr/bin/python3"
# cloud-init's user-data handlers by MIME type (cloudinit/handlers and its format docs).
CLOUD_INIT_TYPES = {
    "text/x-shellscript",
    "text/cloud-config",
    "text/x-include-url",
    "text/cloud-boothook",
    "text/part-handler",
    "text/jinja2",
}
# The user's scripts in every format vmqueue merges into, each with a phone_home merged in.
USER_SCRIPTS = {
    "shell": "#!/bin/sh\necho hello > /tmp/hello\n",
    "cloud-config": (
        "#cloud-config\npackages: [nginx]\nruncmd:\n  - [touch, /tmp/ran]\n"
        "write_files:\n  - {path: /etc/x, content: y}\n"
    ),
    "mime": (
        'Content-Type: multipart/mixed; boundary="user-b"\nMIME-Version: 1.0\n\n--user-b\n'
        'Content-Type: text/x-shellscript; charset="us-ascii"\n\n#!/bin/sh\necho one\n--user-b--\n'
    ),
    "none": None,
}
PHONE_HOME_URL = phone_home_url("https://vmq.example.test/api", "job-1", "t0ken")

_VALIDATE = """
import json, sys
from cloudinit.config.schema import SchemaValidationError, get_schema, validate_cloudconfig_schema
schema = get_schema()
out = []
for doc in json.load(sys.stdin):
    try:
        validate_cloudconfig_schema(doc, schema=schema, strict=True)
        out.append(None)
    except SchemaValidationError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""


def phone_home_scripts() -> dict[str, str]:
    """Each user script of ``USER_SCRIPTS`` with ``ready_when=cloud_init``'s phone_home merged in."""
    return {name: merge_user_data(script, phone_home_config(PHONE_HOME_URL)) for name, script in USER_SCRIPTS.items()}


def _documents(user_data: str) -> list[str]:
    """The cloud-config documents in ``user_data``; asserts every MIME part is one cloud-init reads."""
    if user_data.lstrip().startswith("#cloud-config"):
        return [user_data]
    if user_data.lstrip().startswith("#!"):
        return []
    message = email.message_from_string(user_data.lstrip())
    assert message.is_multipart(), f"user-data is neither a script, a cloud-config nor MIME: {user_data[:80]!r}"
    docs = []
    for part in message.get_payload():
        assert part.get_content_type() in CLOUD_INIT_TYPES, part.get_content_type()
        if part.get_content_type() == "text/cloud-config":
            docs.append(part.get_payload(decode=True).decode())
    return docs


def assert_cloud_init_accepts(user_datas: list[str]) -> None:
    """Every cloud-config document in each user-data passes cloud-init's schema (strict: unknown
    keys and wrong types fail), and the user-data carries the phone_home."""
    if (
        not Path(SYSTEM_PYTHON).exists()
        or subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit"], capture_output=True).returncode
    ):
        if os.environ.get("CI"):
            pytest.fail("cloud-init is not installed (apt-get install cloud-init): .ci/run should have")
        pytest.skip("cloud-init (Debian package) is not installed: apt-get install cloud-init")
    import yaml

    docs = [yaml.safe_load(doc) for data in user_datas for doc in _documents(data)]
    assert any("phone_home" in doc for doc in docs)
    run = subprocess.run([SYSTEM_PYTHON, "-c", _VALIDATE], input=json.dumps(docs), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    errors = [(doc, error) for doc, error in zip(docs, json.loads(run.stdout), strict=True) if error]
    assert not errors, errors
