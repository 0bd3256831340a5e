"""Operations files: the compose file is valid and consistent, flower.conf loads, the Dockerfile copies what exists.

No Docker engine runs here, so the compose file is validated against the Compose Specification's
JSON Schema and checked against what the project really has.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import typer
import yaml
from jsonschema import Draft7Validator

from producer.cli import app
from vmqueue.models import PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT.parent / "shared" / "reference" / "compose" / "compose-spec.json"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.skipif(not SCHEMA.exists(), reason="the Compose schema lives in ../shared (not in a plain clone)")
def test_compose_file_matches_the_compose_spec():
    errors = sorted(Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(COMPOSE), key=str)
    assert errors == []


def test_every_provider_queue_has_a_worker_service():
    served = {
        svc["command"][3]
        for svc in COMPOSE["services"].values()
        if svc.get("command", [])[:3] == ["vmq", "worker", "--provider"]
    }
    assert served == set(PROVIDERS)


def test_every_service_command_is_one_the_project_has():
    commands = set(typer.main.get_command(app).commands)
    for name, service in COMPOSE["services"].items():
        command = service.get("command")
        if name == "redis" or name.startswith("redis-"):
            assert command[0] == "redis-server" and "--appendonly" in command
        elif name.startswith("sentinel-"):
            assert command[:2] == ["sh", "-c"]
            assert command[2].endswith("exec redis-server /tmp/sentinel.conf --sentinel")
            assert service["profiles"] == ["ha"]
        elif command[0] == "vmq":
            assert command[1] in commands
            if "--provider" in command:
                assert command[command.index("--provider") + 1] in PROVIDERS
        else:
            assert command[:4] == ["celery", "-A", "workers.app", "flower"], name
            assert (ROOT / command[4].split("=")[1]).is_file()


def test_redis_keeps_an_append_only_file_and_flower_stays_on_loopback():
    assert "--appendonly" in COMPOSE["services"]["redis"]["command"]
    assert all(port.startswith("127.0.0.1:") for port in COMPOSE["services"]["flower"]["ports"])


def test_flower_conf_takes_basic_auth_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:s3cret")
    monkeypatch.setenv("FLOWER_ADDRESS", "0.0.0.0")
    conf = runpy.run_path(str(ROOT / "flower.conf"))
    assert conf["basic_auth"] == ["ops:s3cret"] and conf["address"] == "0.0.0.0"


def test_flower_conf_refuses_a_public_address_without_auth(monkeypatch):
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.setenv("FLOWER_ADDRESS", "0.0.0.0")
    with pytest.raises(SystemExit, match="FLOWER_BASIC_AUTH"):
        runpy.run_path(str(ROOT / "flower.conf"))


def test_dockerfile_copies_what_exists():
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
