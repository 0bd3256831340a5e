"""HTTP requests on the wire per created VM and per status tick, for every adapter against its fake.

Each adapter runs in this process through its own SDK against the fake its tests use
(tests/providers/*_fake.py served by ``responses``; moto for AWS). Requests are counted by the
adapter's metering hook (workers/providers/metering.py: the SDK transport calls it once per attempt
of every request, pages and retries included), so a count is what the provider would meter.
  create    a first-attempt create (``first_attempt=True``) after one warm-up create (the SSH key
            and image lookups an adapter caches per process are paid once, by the warm-up)
  lost      a create whose first answer is lost after the API acted (the fake drops it), then the
            job's retry (``first_attempt=False``) until the adapter returns the VM: every request
  tick      one ``get_vms`` of --inflight VMs still on their way, in a project also holding 0 and
            --fleet long-lived vmqueue VMs; "ratio" is the dearer fleet tick ÷ the empty-project tick
  stuck     the same tick in another order: one VM in flight made first (two hours ago, by the
            adapter's clock where it has one), then the --fleet long-lived VMs, then the other
            --inflight - 1 (a read that walks the project newest first down to the oldest VM in
            flight pays for every VM made since)
  cold      (adapters that remember what they created) the stuck tick read by a fresh adapter, as a
            worker that created none of the VMs (another worker did, or it restarted) reads them
Goals (issue 15): create <= 1 request on every adapter (Azure: its NIC and public IP declared inside
the VM request); tick cost independent of the long-lived VMs (ratio 1.00).
  azure 2nd tick  Azure chooses between its subscription-wide list and one GET per VM by what each costs
            of the read budgets (a page weighs five GETs); a fresh process takes the list for one page
            until a list counted its pages: the second tick of one process (5 s or more after the
            first, as Compute's per-VM budget wants) shows the choice made with the count
  azure settle  one ``get_vms`` of --inflight VMs that all read running in it: their addresses come from
            their group's NIC and public IP lists (a page each), not 2 GETs per VM (3 before issue 15's
            lists); reads (GET) and writes (each VM's OS disk tagged, one PATCH) apart

    python -m bench.wire                           # 100 in flight, 0 and 5,000 long-lived
    python -m bench.wire --fleet 300 --inflight 10 # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from tests.providers.contract import RecordingMeter, parsed_key
from vmqueue.models import VMSpec

OWNED = "vmqueue"
SCRIPT = "#!/bin/sh\necho hello\n"


@dataclass
class Rig:
    """One adapter against its fake: how to make a spec, lose a create's answer and seed VMs."""

    provider: Any
    spec: Callable[[str], VMSpec]
    lose_create_answer: Callable[[], None]  # the next create write is acted on, its answer lost
    seed: Callable[[int, str, bool], list[str]]  # (count, name prefix, in flight) -> instance ids
    fresh: Callable[[], Any] | None = None  # another adapter on the same fake, knowing nothing yet
    fake: Any = None  # the fake itself, for a figure that sets its VMs' state (Azure's settle tick)


def _env(**values: str | None) -> ExitStack:
    """Set/unset environment variables for a rig's lifetime (the SDKs read credentials and endpoints)."""
    stack = ExitStack()
    saved = {k: os.environ.get(k) for k in values}

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stack.callback(restore)
    return stack


@contextmanager
def hetzner() -> Iterator[Rig]:
    import time

    import requests

    from tests.providers.fakehttp import mocked
    from tests.providers.hetzner_fake import BASE_URL, FakeHetzner
    from workers.providers.hetzner import HetznerProvider, batch_label

    fake = FakeHetzner()
    with _env(HCLOUD_ENDPOINT=None), mocked(fake, BASE_URL):
        provider = HetznerProvider(token="fake-" + "token")

        def spec(name: str) -> VMSpec:
            raw = {
                "provider": "hetzner",
                "name": name,
                "region": "fsn1",
                "instance_type": "cx22",
                "image": "ubuntu-24.04",
            }
            return provider.prepare_spec(VMSpec.model_validate(raw))

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            if in_flight:  # created through the adapter (unmetered), with the labels it gives
                key = parsed_key()
                ids = [
                    provider.create_vm(spec(f"{prefix}-{i}"), key, job_id=f"{prefix}-{i}", first_attempt=True)
                    for i in range(n)
                ]
                for vm in ids:  # on their way, not "initializing" (a read would look for a failed create)
                    fake.servers[int(vm.instance_id)]["status"] = "starting"
                fake._booting.clear()
                return [vm.instance_id for vm in ids]
            # Long-lived: created one to two hours ago (after a stuck VM, before the new ones), half of them
            # before batch labels existed.
            return [
                str(
                    fake.add_server(
                        f"{prefix}-{i}",
                        labels={"managed-by": OWNED, "vmqueue-job": f"{prefix}-{i}"}
                        | ({"vmqueue-batch": batch_label(time.time() - 3600 - 60 * (i % 60))} if i % 2 else {}),
                    )["id"]
                )
                for i in range(n)
            ]

        def lose() -> None:
            fake.fail("POST", "/servers", exc=requests.ReadTimeout("read timed out"), after=True)

        yield Rig(provider, spec, lose, seed, fresh=lambda: HetznerProvider(token="fake-" + "token"))


@contextmanager
def digitalocean() -> Iterator[Rig]:
    import time

    import requests

    from tests.providers.digitalocean_fake import BASE_URL, FakeDigitalOcean
    from tests.providers.fakehttp import mocked
    from workers.providers.digitalocean import DigitalOceanProvider, batch_tag

    fake = FakeDigitalOcean()
    with _env(DIGITALOCEAN_ENDPOINT=None), mocked(fake, f"{BASE_URL}/v2"):
        provider = DigitalOceanProvider(token="fake-" + "token")

        def spec(name: str) -> VMSpec:
            raw = {"provider": "digitalocean", "name": name, "region": "nyc3", "instance_type": "s-1vcpu-1gb"}
            return provider.prepare_spec(VMSpec.model_validate({**raw, "image": "ubuntu-24.04"}))

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            if in_flight:  # created through the adapter (unmetered), with the tags it gives
                key = parsed_key()
                return [
                    provider.create_vm(
                        spec(f"{prefix}-{i}"), key, job_id=f"{prefix}-{i}", first_attempt=True
                    ).instance_id
                    for i in range(n)
                ]
            # Long-lived: created a day or more ago, one a minute, so in batches no tick lists.
            day_ago = time.time() - 86_400
            return [
                str(
                    fake.add_droplet(
                        f"{prefix}-{i}",
                        tags=[f"managed-by:{OWNED}", f"vmqueue-job:{prefix}-{i}", batch_tag(day_ago - 60 * i)],
                    )["id"]
                )
                for i in range(n)
            ]

        def lose() -> None:
            fake.fail("POST", "/droplets", exc=requests.ReadTimeout("read timed out"), after=True)

        yield Rig(provider, spec, lose, seed)


@contextmanager
def gcp() -> Iterator[Rig]:
    import requests
    import responses
    from google.auth.compute_engine import _metadata
    from google.auth.credentials import Credentials

    from tests.providers.gcp_fake import FakeCompute, serve_with_responses
    from workers.providers.gcp import GCPProvider

    project, zone = "example-project", "europe-west1-b"

    class FakeToken(Credentials):
        def refresh(self, request: Any) -> None:
            self.token = "fake-" + "token"

    fake = FakeCompute()
    home = tempfile.mkdtemp(prefix="vmq-wire-gcloud-")
    no_google = {"GOOGLE_APPLICATION_CREDENTIALS": None, "GOOGLE_CLOUD_PROJECT": None, "VMQ_GCP_ENDPOINT": None}
    with _env(**no_google, CLOUDSDK_CONFIG=home), responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        _metadata._NO_GCE_CHECK = True  # never probe the metadata server
        serve_with_responses(fake, rsps)
        provider = GCPProvider(FakeToken(), project=project)

        def spec(name: str) -> VMSpec:
            raw = {
                "provider": "gcp",
                "name": name,
                "region": zone,
                "instance_type": "e2-small",
                "image": "ubuntu-24.04",
            }
            return provider.prepare_spec(VMSpec.model_validate(raw))

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            status = "STAGING" if in_flight else "RUNNING"
            for i in range(n):
                fake.add_instance(project, zone, f"{prefix}-{i}", status=status, labels={"managed-by": OWNED})
            return [f"{project}/{zone}/{prefix}-{i}" for i in range(n)]

        def lose() -> None:
            url = f"https://compute.googleapis.com/compute/v1/projects/{project}/zones/{zone}/instances"

            def insert_then_drop(request: Any) -> tuple[int, dict, str]:
                from urllib.parse import parse_qsl, urlparse

                rsps.remove("POST", url)  # one answer lost; the retry reaches the fake
                parts = urlparse(request.url)
                fake.handle("POST", parts.path, dict(parse_qsl(parts.query)), json.loads(request.body))
                raise requests.ConnectionError("Connection reset by peer")

            rsps.add_callback("POST", url, callback=insert_then_drop)
            rsps.registered().insert(0, rsps.registered().pop())  # ahead of the fake's own routes

        yield Rig(provider, spec, lose, seed)


@contextmanager
def oci() -> Iterator[Rig]:
    from tests.providers.oci_fake import AD, COMPARTMENT, IMAGE_2204, SUBNET, FakeOCI, served, signing_config
    from workers.providers.oci import OCIProvider

    config = signing_config()  # a signing key made per run, never stored
    with served(FakeOCI()) as fake:
        provider = OCIProvider(config=config)
        options = {
            "compartment_id": COMPARTMENT,
            "subnet_id": SUBNET,
            "availability_domain": AD,
            "ocpus": 1,
            "memory_gb": 8,
        }

        def spec(name: str) -> VMSpec:
            raw = {"provider": "oci", "name": name, "region": "us-phoenix-1", "instance_type": "VM.Standard.E4.Flex"}
            return VMSpec.model_validate({**raw, "image": IMAGE_2204, "options": options})

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            # One launch through the API, then copies of it (launching thousands would only time the fake).
            first = provider.create_vm(spec(f"{prefix}-0"), parsed_key(), job_id=f"{prefix}-0").instance_id
            template, ids = fake.instances[first], [first]
            template["lifecycleState"] = "PROVISIONING" if in_flight else "RUNNING"
            for i in range(1, n):
                clone = copy.deepcopy(template)
                clone["id"] = f"{first}x{i}"
                clone["displayName"] = f"{prefix}-{i}"
                fake.instances[clone["id"]] = clone
                ids.append(clone["id"])
            return ids[:n]

        def lose() -> None:
            fake.drop.append("POST /20160918/instances$")

        yield Rig(provider, spec, lose, seed)


@contextmanager
def azure() -> Iterator[Rig]:
    import time

    import responses
    from azure.core.credentials import AccessToken, AccessTokenInfo
    from requests.exceptions import ConnectionError as RequestsConnectionError

    from tests.providers.azure_fake import NSG_ID, SUB, SUBNET_ID, FakeARM
    from workers.providers.azure import AzureProvider

    class FakeCredential:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            return AccessToken("fake-token", int(time.time()) + 3600)

        def get_token_info(self, *scopes: str, **kwargs: Any) -> AccessTokenInfo:
            return AccessTokenInfo("fake-token", int(time.time()) + 3600)

    fake = FakeARM()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for method in ("GET", "PUT", "PATCH", "DELETE", "POST", "HEAD"):
            mock.add_callback(
                method, re.compile(r"https://management\.azure\.com/.*"), callback=fake.answer(RequestsConnectionError)
            )
        provider = AzureProvider(credential=FakeCredential(), subscription_id=SUB)
        provider.poll_s = 0.0  # the fake's operations finish after a number of reads, not of seconds
        options = {"resource_group": "vmq-rg", "subnet_id": SUBNET_ID, "nsg_id": NSG_ID}

        def spec(name: str) -> VMSpec:
            raw = {"provider": "azure", "name": name, "region": "westeurope", "instance_type": "Standard_B1s"}
            return VMSpec.model_validate(
                {**raw, "image": "Canonical:ubuntu-24_04-lts:server:latest", "options": options}
            )

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            first = provider.create_vm(spec(f"{prefix}-0"), parsed_key(), job_id=f"{prefix}-0").instance_id
            template = fake.get("/" + first)  # the adapter's id is the ARM id without its leading slash
            if not in_flight:  # long-lived: settled long ago (the list shows them running)
                template.pop("_reads_left", None)
                template.setdefault("properties", {})["provisioningState"] = "Succeeded"
            ids = [first]
            for i in range(1, n):
                clone = copy.deepcopy(template)
                clone["id"] = template["id"][: -len(f"{prefix}-0")] + f"{prefix}-{i}"
                clone["name"] = f"{prefix}-{i}"
                fake.resources[clone["id"].lower()] = clone
                ids.append(clone["id"].removeprefix("/"))
            return ids

        def lose() -> None:
            fake.drop.append("PUT /virtualMachines/")

        yield Rig(provider, spec, lose, seed, fake=fake)


@contextmanager
def aws() -> Iterator[Rig]:
    import boto3
    from moto import mock_aws

    from tests.providers.test_aws import ClientTokens
    from workers.providers.aws import AWSProvider

    region = "eu-central-1"
    fake_env = {
        "AWS_ACCESS_KEY_ID": "fake-" + "key-id",
        "AWS_SECRET_ACCESS_KEY": "fake-" + "secret",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": region,
    }
    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_DEFAULT_REGION")
    with _env(**fake_env, **dict.fromkeys(unset), VMQ_AWS_REGIONS=None), mock_aws():
        provider = AWSProvider(boto3.Session())
        ec2 = provider._client("ec2", region)

        class CountedTokens(ClientTokens):
            """EC2's ClientToken idempotency, which moto lacks. A replayed answer never reaches the
            transport here, but EC2 would be sent (and meter) that request: count it as one."""

            def before(self, params: dict, **kw: Any) -> Any:
                answer = super().before(params, **kw)
                if answer is not None:
                    provider.meter.before("POST", "ec2:RunInstances", region)
                return answer

        CountedTokens(ec2).remember_body(ec2)

        def spec(name: str) -> VMSpec:
            raw = {
                "provider": "aws",
                "name": name,
                "region": region,
                "instance_type": "t3.micro",
                "image": "ami-12c6146b",
            }
            return VMSpec.model_validate(raw)

        def seed(n: int, prefix: str, in_flight: bool) -> list[str]:
            tags = [{"ResourceType": "instance", "Tags": [{"Key": "managed-by", "Value": OWNED}]}]
            ids: list[str] = []
            while len(ids) < n:  # moto's run_instances, unmetered (the meter is not set yet)
                count = min(500, n - len(ids))
                out = ec2.run_instances(ImageId="ami-12c6146b", MinCount=count, MaxCount=count, TagSpecifications=tags)
                ids += [f"{region}/{i['InstanceId']}" for i in out["Instances"]]
            return ids

        def lose() -> None:
            from botocore.exceptions import ReadTimeoutError

            lost: list[int] = []

            def lose_first_answer(**_: Any) -> None:
                if not lost:
                    lost.append(1)
                    raise ReadTimeoutError(endpoint_url=f"https://ec2.{region}.amazonaws.com/")

            ec2.meta.events.register_last("after-call.ec2.RunInstances", lose_first_answer)

        yield Rig(provider, spec, lose, seed)


RIGS: dict[str, Callable[[], AbstractContextManager[Rig]]] = {
    "aws": aws,
    "azure": azure,
    "digitalocean": digitalocean,
    "gcp": gcp,
    "hetzner": hetzner,
    "oci": oci,
}
CREATE_GOAL: dict[str, int] = {}  # one request on every adapter (Azure's network inside its VM request)


def counted(rig: Rig, action: Callable[[], Any]) -> tuple[int, list[tuple[str, str]]]:
    meter = rig.provider.meter = RecordingMeter()
    try:
        action()
    finally:
        rig.provider.meter = type(rig.provider).meter  # back to the class default (no meter)
    return len(meter.sent), meter.requests()


def create_costs(name: str) -> dict[str, Any]:
    from workers.providers.errors import TransientError

    with RIGS[name]() as rig:
        key = parsed_key()
        rig.provider.create_vm(rig.spec("warm-0"), key, SCRIPT, job_id="warm-0", first_attempt=True)
        first, first_sent = counted(
            rig, lambda: rig.provider.create_vm(rig.spec("web-1"), key, SCRIPT, job_id="job-1", first_attempt=True)
        )

        def lost_then_retry() -> None:
            rig.lose_create_answer()
            try:
                rig.provider.create_vm(rig.spec("web-2"), key, SCRIPT, job_id="job-2", first_attempt=True)
                return  # the adapter adopted its VM within the call
            except TransientError:
                pass
            rig.provider.create_vm(rig.spec("web-2"), key, SCRIPT, job_id="job-2")

        lost, lost_sent = counted(rig, lost_then_retry)
    return {"create": first, "create_sent": first_sent, "lost": lost, "lost_sent": lost_sent}


def tick_cost(name: str, fleet: int, inflight: int, *, stuck_first: bool = False, cold: bool = False) -> int | None:
    """Requests of one ``get_vms`` of the VMs in flight; ``stuck_first``: one of them made before the fleet,
    two hours earlier by the adapter's clock; ``cold``: read by a fresh adapter (None: the rig has none)."""
    import time

    with RIGS[name]() as rig:
        if cold and rig.fresh is None:
            return None
        ids = []
        if stuck_first:
            clock = getattr(type(rig.provider), "clock", None)
            if clock is not None:
                rig.provider.clock = lambda: time.time() - 7200
            ids += rig.seed(1, "stuck", True)
            if clock is not None:
                del rig.provider.clock  # the class's again
        if fleet:
            rig.seed(fleet, "old", False)
        ids += rig.seed(inflight - len(ids), "new", True)
        if cold:
            assert rig.fresh is not None
            rig.provider = rig.fresh()
        sent, _ = counted(rig, lambda: rig.provider.get_vms(ids))
        return sent


def azure_second_tick(fleet: int, inflight: int) -> int:
    """Requests of the second ``get_vms`` of one Azure adapter, as if 5 s or more after the first (each VM
    read alone is read again): the first listed the subscription, counting its pages, when the VMs in
    flight weighed more than one page; the second reads whichever way costs less of the read budgets."""
    with RIGS["azure"]() as rig:
        if fleet:
            rig.seed(fleet, "old", False)
        ids = rig.seed(inflight, "new", True)
        rig.provider.get_vms(ids)
        rig.provider.vm_read_gap_s = 0.0  # the next tick comes after the gap (no timing in a count)
        sent, _ = counted(rig, lambda: rig.provider.get_vms(ids))
        return sent


def azure_settle_tick(settling: int) -> tuple[int, int]:
    """(reads, writes) of one Azure ``get_vms`` in which ``settling`` VMs read running at once."""
    with RIGS["azure"]() as rig:
        ids = [
            rig.provider.create_vm(rig.spec(f"web-{i}"), parsed_key(), job_id=f"job-{i}").instance_id
            for i in range(settling)
        ]
        for vm_id in ids:
            vm = rig.fake.get("/" + vm_id)
            vm["properties"]["provisioningState"], vm["_power"] = "Succeeded", "PowerState/running"
        _, sent = counted(rig, lambda: rig.provider.get_vms(ids))
        reads = sum(method == "GET" for method, _ in sent)
        return reads, len(sent) - reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", choices=sorted(RIGS), help="(repeatable; default all)")
    parser.add_argument("--fleet", type=int, default=5000, help="long-lived vmqueue VMs (default 5000)")
    parser.add_argument("--inflight", type=int, default=100, help="VMs in flight in the tick (default 100)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    names = args.adapter or sorted(RIGS)

    figures: dict[str, dict[str, Any]] = {}
    if not args.json:
        print(f"requests on the wire; tick: {args.inflight} VMs in flight, 0 vs {args.fleet} long-lived vmqueue VMs")
        print(
            f"  {'adapter':<13} {'create':>6} {'goal':>4} {'lost':>5} {'tick@0':>7} {'tick@fleet':>10}"
            f" {'stuck@0':>8} {'stuck@fleet':>11} {'cold@0':>7} {'cold@fleet':>10}  ratio"
        )
    for name in names:
        row = create_costs(name)
        row["tick_empty"] = tick_cost(name, 0, args.inflight)
        row["tick_fleet"] = tick_cost(name, args.fleet, args.inflight)
        row["stuck_empty"] = tick_cost(name, 0, args.inflight, stuck_first=True)
        row["stuck_fleet"] = tick_cost(name, args.fleet, args.inflight, stuck_first=True)
        row["cold_empty"] = tick_cost(name, 0, args.inflight, stuck_first=True, cold=True)
        row["cold_fleet"] = tick_cost(name, args.fleet, args.inflight, stuck_first=True, cold=True)
        pairs = [("tick_fleet", "tick_empty"), ("stuck_fleet", "stuck_empty"), ("cold_fleet", "cold_empty")]
        row["ratio"] = max(row[f] / max(1, row[e]) for f, e in pairs if row[f] is not None)
        figures[name] = row
        if not args.json:
            goal = CREATE_GOAL.get(name, 1)
            mark = "" if row["create"] <= goal else "  (create over goal)"
            cold = [("-" if row[k] is None else row[k]) for k in ("cold_empty", "cold_fleet")]
            print(
                f"  {name:<13} {row['create']:>6} {goal:>4} {row['lost']:>5} {row['tick_empty']:>7}"
                f" {row['tick_fleet']:>10} {row['stuck_empty']:>8} {row['stuck_fleet']:>11} {cold[0]:>7}"
                f" {cold[1]:>10}  {row['ratio']:.2f} (goal 1.00){mark}",
                flush=True,
            )
    if "azure" in figures:
        steady = {
            "tick_empty": azure_second_tick(0, args.inflight),
            "tick_fleet": azure_second_tick(args.fleet, args.inflight),
        }
        figures["azure"]["second_tick"] = steady
        reads, writes = azure_settle_tick(args.inflight)
        figures["azure"]["settle_tick"] = {"reads": reads, "writes": writes}
        if not args.json:
            print(
                f"  azure 2nd tick (>= 5 s later, with the 1st's page count): {steady['tick_empty']} @0,"
                f" {steady['tick_fleet']} @fleet"
            )
            print(
                f"  azure settle tick ({args.inflight} VMs read running at once): {reads} reads"
                f" (their group's NIC and public IP lists), {writes} writes (OS disk tags)"
            )
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
