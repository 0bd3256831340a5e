"""AWS adapter through the real boto3: moto for EC2/SSM state, botocore events for what moto lacks.

moto ignores ClientToken, so ``ClientTokens`` adds EC2's documented idempotency on top of it; error
responses are EC2's XML error documents served at the HTTP layer (``before-send``), under the retry loop.
"""

from __future__ import annotations

import base64
import email
import io
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
import yaml
from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.stub import ANY, Stubber
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ssm.models import Parameter, ssm_backends

from tests.providers.cloudinit_schema import assert_cloud_init_accepts, phone_home_scripts
from tests.providers.contract import AdapterContract, RecordingMeter
from vmqueue.images import IMAGES
from vmqueue.models import VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.userdata import sent_size
from workers.providers import aws
from workers.providers.aws import STATUS_MAP, AWSProvider
from workers.providers.errors import (
    AuthError,
    CapacityError,
    InvalidSpecError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
)

REGION = "eu-central-1"
SCRIPT = "#!/bin/sh\necho hello > /tmp/hello\n"


@pytest.fixture(autouse=True)
def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Obviously fake credentials, no profile files, no metadata service, no endpoint from the outside."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL_SSM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-" + "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-" + "secret")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("VMQ_AWS_REGIONS", raising=False)


@pytest.fixture(scope="module")
def session() -> boto3.Session:
    """Shared, so botocore loads the EC2 model once per module rather than once per test."""
    return boto3.Session()


@pytest.fixture
def provider(session: boto3.Session, monkeypatch: pytest.MonkeyPatch) -> Iterator[AWSProvider]:
    # The tests' own boto3.client(...) calls use that session too: moto would give each test a fresh
    # default session, which loads the EC2 and SSM models again (a fifth of this module's time).
    with mock_aws(config={"core": {"reset_boto3_session": False}}):
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
        yield AWSProvider(session)


def make_spec(image: str = "ami-12c6146b", **update: Any) -> VMSpec:
    fields = {"provider": "aws", "name": "web-1", "region": REGION, "instance_type": "t3.micro", "image": image}
    return VMSpec(**{**fields, "labels": {"team": "infra"}, **update})


def publish_ami(alias: str, region: str = REGION, ec2: Any = None) -> str:
    """Put a real moto AMI under the alias's public SSM parameter, which moto does not ship."""
    ec2 = ec2 or boto3.client("ec2", region_name=region)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    name = IMAGES["aws"][alias]
    # moto refuses put_parameter under /aws/, so write to the backend the way moto loads its own.
    ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters[name].append(
        Parameter(
            account_id=DEFAULT_ACCOUNT_ID,
            name=name,
            value=ami,
            parameter_type="String",
            description=None,
            allowed_pattern=None,
            keyid=None,
            last_modified_date=datetime.now(UTC).timestamp(),
            version=1,
            data_type="aws:ec2:image",
        )
    )
    return ami


def all_instances(region: str = REGION) -> list[dict[str, Any]]:
    pages = boto3.client("ec2", region_name=region).describe_instances()["Reservations"]
    return [i for r in pages for i in r["Instances"]]


class _Raw(io.BytesIO):
    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.getvalue()


def serve_error(client: Any, operation: str, status: int, code: str, message: str, headers: dict | None = None) -> list:
    """Answer ``operation`` with EC2's XML error document at the HTTP layer; returns the list of sent requests."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>5d2c-fake</RequestID></Response>"
    ).encode()
    sent: list = []

    def answer(request: Any, **_: Any) -> AWSResponse:
        sent.append(request)
        return AWSResponse(
            request.url, status, {"Content-Type": "text/xml;charset=UTF-8", **(headers or {})}, _Raw(body)
        )

    client.meta.events.register_first(f"before-send.ec2.{operation}", answer)
    return sent


class ClientTokens:
    """EC2's ClientToken semantics over moto: same token + same parameters -> the first answer;
    same token + other parameters -> IdempotentParameterMismatch (moto would launch again)."""

    def __init__(self, client: Any):
        self.seen: dict[str, tuple[dict, Any, dict]] = {}
        client.meta.events.register("before-call.ec2.RunInstances", self.before)
        client.meta.events.register("after-call.ec2.RunInstances", self.after)

    def before(self, params: dict, **_: Any) -> tuple[Any, dict] | None:
        body = params["body"]
        if body["ClientToken"] not in self.seen:
            return None
        first_body, http, parsed = self.seen[body["ClientToken"]]
        if first_body == body:
            return http, parsed
        error = {
            "Code": "IdempotentParameterMismatch",
            "Message": "Arguments on this idempotent request are inconsistent",
        }
        return AWSResponse(params["url"], 400, {}, _Raw(b"")), {"Error": error, "ResponseMetadata": {}}

    def after(self, http_response: Any, parsed: dict, context: dict, model: Any, **_: Any) -> None:
        body = context.get("vmq_body")
        if http_response.status_code == 200 and body is not None:
            self.seen.setdefault(body["ClientToken"], (body, http_response, parsed))

    def remember_body(self, client: Any) -> None:
        def keep(params: dict, context: dict, **_: Any) -> None:
            context["vmq_body"] = dict(params["body"])

        client.meta.events.register_first("before-call.ec2.RunInstances", keep)


def with_client_tokens(provider: AWSProvider) -> ClientTokens:
    ec2 = provider._client("ec2", REGION)
    tokens = ClientTokens(ec2)
    tokens.remember_body(ec2)
    return tokens


def describe_calls(provider: AWSProvider, *regions: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(region, Filters) of every DescribeInstances the provider's clients of ``regions`` send from now on."""
    calls: list[tuple[str, list[dict[str, Any]]]] = []
    for region in regions:

        def record(params: dict, region: str = region, **_: Any) -> None:
            calls.append((region, params.get("Filters", [])))

        provider._client("ec2", region).meta.events.register("before-parameter-build.ec2.DescribeInstances", record)
    return calls


def described(state: str, **extra: Any) -> dict[str, Any]:
    """A DescribeInstances answer in the shape of botocore's EC2 model."""
    instance = {
        "InstanceId": "i-0abc1234def567890",
        "InstanceType": "t3.micro",
        "ImageId": "ami-0123456789abcdef0",
        "State": {"Name": state, "Code": 0},
        "PrivateIpAddress": "172.31.5.6",
        "LaunchTime": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        "Tags": [{"Key": "Name", "Value": "web-1"}, {"Key": "managed-by", "Value": "vmqueue"}],
        **extra,
    }
    return {"Reservations": [{"ReservationId": "r-0abc", "Instances": [instance]}]}


class TestAWS(AdapterContract):
    def test_user_data_with_phone_home_passes_cloud_init_schema(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        """ready_when=cloud_init: the user-data sent (the SSH key merged in as well), whatever the user's
        script format, passes cloud-init's schema."""
        ec2 = boto3.client("ec2", region_name=REGION)
        sent = []
        for i, script in enumerate(phone_home_scripts().values()):
            vm = provider.create_vm(make_spec(name=f"web-{i}"), key, script, job_id=f"job-{i}")
            raw = ec2.describe_instance_attribute(InstanceId=vm.instance_id.split("/")[1], Attribute="userData")
            sent.append(base64.b64decode(raw["UserData"]["Value"]).decode())
        assert all(key.openssh in data for data in sent)
        assert_cloud_init_accepts(sent)

    def test_meter_sees_every_request(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        """Each attempt on the wire passes the meter first, named <service>:<Operation> in its region."""
        meter = provider.meter = RecordingMeter()
        wire: list[str] = []
        ec2 = provider._client("ec2", REGION)
        # before-send is the last event before the wire (moto answers from it): the event names the operation.
        ec2.meta.events.register_first(
            "before-send", lambda event_name, **_: wire.append(f"ec2:{event_name.split('.')[-1]}")
        )
        vm = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        provider.get_vm(vm.instance_id)
        provider.get_vms([vm.instance_id])
        provider.destroy_vm(vm.instance_id)

        assert [target for _, target, _ in meter.sent] == wire
        assert wire == ["ec2:RunInstances", "ec2:DescribeInstances", "ec2:DescribeInstances", "ec2:TerminateInstances"]
        assert {scope for _, _, scope in meter.sent} == {REGION}
        assert [t for _, t, _, _ in meter.answers] == wire

    def test_create_sends_key_script_and_labels(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        vm = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        region, native_id = vm.instance_id.split("/")
        assert (region, vm.status, vm.name) == (REGION, VMStatus.pending, "web-1")
        ec2 = boto3.client("ec2", region_name=REGION)
        raw = ec2.describe_instance_attribute(InstanceId=native_id, Attribute="userData")["UserData"]["Value"]
        # Exactly the bytes the producer measured against EC2's 16 KiB (vmqueue.userdata).
        assert len(base64.b64decode(raw)) == sent_size("aws", None, key, SCRIPT).size
        parts = email.message_from_bytes(base64.b64decode(raw)).get_payload()
        assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config"]
        assert parts[0].get_payload(decode=True).decode() == SCRIPT
        keys = parts[1].get_payload(decode=True).decode()
        assert keys.startswith("#cloud-config\n") and yaml.safe_load(keys) == {"ssh_authorized_keys": [key.openssh]}
        instance = all_instances()[0]
        assert {t["Key"]: t["Value"] for t in instance["Tags"]} == {
            "Name": "web-1",
            "team": "infra",
            "managed-by": "vmqueue",
            "vmqueue-job": "job-1",
        }
        assert instance["ClientToken"] == "vmq-job-1" and "KeyName" not in instance

    def test_create_with_named_key_pair_sends_script_alone(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        boto3.client("ec2", region_name=REGION).create_key_pair(KeyName="ops")
        vm = provider.create_vm(make_spec(options={"key_name": "ops"}), key, SCRIPT, job_id="job-1")
        raw = boto3.client("ec2", region_name=REGION).describe_instance_attribute(
            InstanceId=vm.instance_id.split("/")[1], Attribute="userData"
        )["UserData"]["Value"]
        assert base64.b64decode(raw).decode() == SCRIPT and all_instances()[0]["KeyName"] == "ops"

    def test_create_sends_network_options(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        stub = Stubber(provider._client("ec2", REGION))
        options = {"subnet_id": "subnet-0abc", "security_group_ids": ["sg-1", "sg-2"], "associate_public_ip": False}
        nic = {
            "DeviceIndex": 0,
            "AssociatePublicIpAddress": False,
            "SubnetId": "subnet-0abc",
            "Groups": ["sg-1", "sg-2"],
        }
        expected = {
            "ImageId": "ami-12c6146b",
            "InstanceType": "t3.micro",
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": "vmq-job-1",
            "NetworkInterfaces": [nic],
            "TagSpecifications": ANY,
            "UserData": ANY,
        }
        stub.add_response(
            "run_instances", {"Instances": described("pending")["Reservations"][0]["Instances"]}, expected
        )
        with stub:
            provider.create_vm(make_spec(options=options), key, None, job_id="job-1")
        stub.assert_no_pending_responses()

    def test_create_at_a_fallback_region_sends_its_own_subnet(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        """The fallback region's subnet goes to that region, not the first region's."""
        subnets = {}
        for region in (REGION, "eu-west-1"):
            ec2 = boto3.client("ec2", region_name=region)
            vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
            subnets[region] = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24")["Subnet"]["SubnetId"]
        fallback = {"region": "eu-west-1", "options": {"subnet_id": subnets["eu-west-1"]}}
        spec = make_spec(options={"subnet_id": subnets[REGION]}, fallbacks=[fallback])

        vm = provider.create_vm(spec.at_placement(1), key, None, job_id="job-1-p1")

        assert vm.instance_id.startswith("eu-west-1/") and not all_instances(REGION)
        [instance] = all_instances("eu-west-1")
        assert instance["SubnetId"] == subnets["eu-west-1"]

    def test_create_sizes_root_volume_on_the_amis_root_device(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        ami = publish_ami("ubuntu-24.04")
        provider.create_vm(make_spec(image=ami, options={"root_volume_gb": 30}), key, None, job_id="job-1")
        [mapping] = all_instances()[0]["BlockDeviceMappings"]
        root = boto3.client("ec2", region_name=REGION).describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
        volume = boto3.client("ec2", region_name=REGION).describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])
        assert mapping["DeviceName"] == root and volume["Volumes"][0]["Size"] == 30

    def test_create_resolves_image_alias(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        ami = publish_ami("ubuntu-24.04")
        prepared = provider.prepare_spec(make_spec(image="ubuntu-24.04"))
        assert prepared.image == ami
        assert provider.prepare_spec(make_spec(image="ami-0native")).image == "ami-0native"
        provider.create_vm(prepared, key, None, job_id="job-1")
        assert all_instances()[0]["ImageId"] == ami
        with pytest.raises(InvalidSpecError) as err:  # not published in this region
            provider.prepare_spec(make_spec(image="debian-12"))
        assert err.value.provider_code == "ParameterNotFound"

    def test_image_alias_is_looked_up_once_per_region(self, provider: AWSProvider) -> None:
        # A lookup per create was one SSM request per VM for an answer that changes every few weeks.
        ami = publish_ami("ubuntu-24.04")
        meter = provider.meter = RecordingMeter()
        images = {provider.prepare_spec(make_spec(image="ubuntu-24.04", name=f"web-{i}")).image for i in range(3)}
        assert images == {ami}
        assert [target for _, target, _ in meter.sent] == ["ssm:GetParameter"]

    def test_create_twice_same_job_one_vm(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        with_client_tokens(provider)
        first = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        again = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        other = provider.create_vm(make_spec(name="web-2"), key, SCRIPT, job_id="job-2")
        assert first.instance_id == again.instance_id != other.instance_id
        assert len(all_instances()) == 2

    def test_create_changed_request_same_job_is_invalid_spec(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        with_client_tokens(provider)
        provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        with pytest.raises(InvalidSpecError) as err:
            provider.create_vm(make_spec(instance_type="t3.large"), key, SCRIPT, job_id="job-1")
        assert err.value.provider_code == "IdempotentParameterMismatch"
        assert len(all_instances()) == 1

    def test_create_lost_answer_one_vm(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        with_client_tokens(provider)
        lost: list[int] = []

        def lose_first_answer(**_: Any) -> None:
            if not lost:
                lost.append(1)
                raise ReadTimeoutError(endpoint_url=f"https://ec2.{REGION}.amazonaws.com/")

        provider._client("ec2", REGION).meta.events.register_last("after-call.ec2.RunInstances", lose_first_answer)
        with pytest.raises(TransientError):
            provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert len(all_instances()) == 1  # EC2 acted; only the answer was lost
        vm = provider.create_vm(make_spec(), key, SCRIPT, job_id="job-1")
        assert [i["InstanceId"] for i in all_instances()] == [vm.instance_id.split("/")[1]]

    @pytest.mark.parametrize(
        ("raw", "reason", "expected"),
        [(raw, None, status) for raw, status in STATUS_MAP.items()]
        + [
            ("terminated", "Server.InternalError", VMStatus.error),
            ("terminated", "Client.VolumeLimitExceeded", VMStatus.error),
            ("terminated", "Client.UserInitiatedShutdown", VMStatus.terminated),
            ("hibernating", None, VMStatus.unknown),
        ],
    )
    def test_get_maps_every_documented_state(
        self, provider: AWSProvider, raw: str, reason: str | None, expected: VMStatus
    ) -> None:
        extra = {"StateReason": {"Code": reason, "Message": reason}} if reason else {}
        with Stubber(provider._client("ec2", REGION)) as stub:
            stub.add_response("describe_instances", described(raw, **extra), {"InstanceIds": ["i-0abc1234def567890"]})
            vm = provider.get_vm(f"{REGION}/i-0abc1234def567890")
        assert (vm.status, vm.provider_status, vm.instance_id) == (expected, raw, f"{REGION}/i-0abc1234def567890")

    def test_get_public_and_private_ips(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        created = provider.create_vm(make_spec(), key, None, job_id="job-1")
        vm = provider.get_vm(created.instance_id)  # moto: running, with a public IP, on the next read
        instance = all_instances()[0]
        assert vm.status == VMStatus.running and vm.labels["vmqueue-job"] == "job-1"
        assert (vm.public_ipv4, vm.private_ipv4) == (instance["PublicIpAddress"], instance["PrivateIpAddress"])
        with Stubber(provider._client("ec2", REGION)) as stub:
            answer = described("running", PublicIpAddress="203.0.113.7", Ipv6Address="2001:db8::7")
            stub.add_response("describe_instances", answer)
            vm = provider.get_vm("i-0abc1234def567890")  # a bare id reads in AWS_REGION
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == ("203.0.113.7", "2001:db8::7", "172.31.5.6")
        assert vm.created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) and vm.name == "web-1"

    def test_get_multi_nic_reads_device_index_0(self, provider: AWSProvider) -> None:
        """A secondary interface (device index 1, private only) listed before eth0: eth0's addresses."""
        eth1 = {
            "NetworkInterfaceId": "eni-0second",
            "Attachment": {"DeviceIndex": 1, "Status": "attached"},
            "PrivateIpAddress": "10.1.9.9",
            "Ipv6Addresses": [],
        }
        eth0 = {
            "NetworkInterfaceId": "eni-0primary",
            "Attachment": {"DeviceIndex": 0, "Status": "attached"},
            "Association": {"PublicIp": "203.0.113.7"},
            "PrivateIpAddress": "172.31.5.6",
            "Ipv6Addresses": [{"Ipv6Address": "2001:db8::7"}],
        }
        answer = described("running", PublicIpAddress="203.0.113.7", NetworkInterfaces=[eth1, eth0])
        with Stubber(provider._client("ec2", REGION)) as stub:
            stub.add_response("describe_instances", answer)
            vm = provider.get_vm(f"{REGION}/i-0abc1234def567890")
        assert (vm.public_ipv4, vm.public_ipv6, vm.private_ipv4) == ("203.0.113.7", "2001:db8::7", "172.31.5.6")

    def test_get_keeps_to_the_requested_id(self, provider: AWSProvider) -> None:
        """An answer holding another instance first: the one asked for, or not found."""
        [reservation] = described("running", PublicIpAddress="203.0.113.7")["Reservations"]
        asked = reservation["Instances"][0]
        other = {**asked, "InstanceId": "i-0fffffffffffffff0", "PublicIpAddress": "198.51.100.1"}
        with Stubber(provider._client("ec2", REGION)) as stub:
            stub.add_response("describe_instances", {"Reservations": [{**reservation, "Instances": [other, asked]}]})
            stub.add_response("describe_instances", {"Reservations": [{**reservation, "Instances": [other]}]})
            vm = provider.get_vm(f"{REGION}/i-0abc1234def567890")
            with pytest.raises(NotFoundError):
                provider.get_vm(f"{REGION}/i-0abc1234def567890")
        assert (vm.instance_id, vm.public_ipv4) == (f"{REGION}/i-0abc1234def567890", "203.0.113.7")

    def test_async_capacity_failure_raises_capacity(self, provider: AWSProvider) -> None:
        """Accepted, then terminated by EC2 for want of capacity: get_vm raises CapacityError (the failover's
        signal); the batched read reports the VM in error instead, so one VM cannot sink the batch."""
        reason = {"Code": "Server.InsufficientInstanceCapacity", "Message": "Server.InsufficientInstanceCapacity"}
        answer = described("terminated", StateReason=reason)
        with Stubber(provider._client("ec2", REGION)) as stub:
            stub.add_response("describe_instances", answer)
            stub.add_response("describe_instances", answer)
            with pytest.raises(CapacityError) as caught:
                provider.get_vm(f"{REGION}/i-0abc1234def567890")
            batch = provider.get_vms([f"{REGION}/i-0abc1234def567890"])
        assert caught.value.provider_code == "Server.InsufficientInstanceCapacity"
        assert batch[f"{REGION}/i-0abc1234def567890"].status is VMStatus.error

    def test_get_without_public_ip(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        spec = make_spec(options={"associate_public_ip": False})
        vm = provider.get_vm(provider.create_vm(spec, key, None, job_id="job-1").instance_id)
        assert vm.status == VMStatus.running and vm.public_ipv4 is None and vm.public_ipv6 is None
        assert vm.private_ipv4

    def test_get_unknown_raises_not_found(self, provider: AWSProvider, monkeypatch: pytest.MonkeyPatch) -> None:
        with pytest.raises(NotFoundError) as err:
            provider.get_vm(f"{REGION}/i-0123456789abcdef0")
        assert err.value.provider_code == "InvalidInstanceID.NotFound"
        monkeypatch.delenv("AWS_REGION")
        with pytest.raises(InvalidSpecError, match="AWS_REGION"):
            AWSProvider().get_vm("i-0123456789abcdef0")

    def test_destroy(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        vm = provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert provider.destroy_vm(vm.instance_id) is None
        assert provider.get_vm(vm.instance_id).status in (VMStatus.terminating, VMStatus.terminated)
        assert [i["State"]["Name"] for i in all_instances()] == ["terminated"]

    def test_destroy_twice(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        vm = provider.create_vm(make_spec(), key, None, job_id="job-1")
        provider.destroy_vm(vm.instance_id)
        assert provider.destroy_vm(vm.instance_id) is None

    def test_destroy_unknown_id(self, provider: AWSProvider) -> None:
        assert provider.destroy_vm(f"{REGION}/i-0123456789abcdef0") is None

    @pytest.mark.parametrize(
        ("status", "code", "expected"),
        [
            (401, "AuthFailure", AuthError),
            (403, "UnauthorizedOperation", AuthError),
            (400, "InvalidParameterValue", InvalidSpecError),
            (400, "InvalidAMIID.NotFound", InvalidSpecError),
            (400, "InvalidSubnetID.NotFound", InvalidSpecError),
            (400, "InvalidAMIID.Malformed", InvalidSpecError),
            (400, "IdempotentParameterMismatch", InvalidSpecError),
            (400, "InstanceLimitExceeded", QuotaExceededError),
            (400, "VcpuLimitExceeded", QuotaExceededError),
            (500, "InsufficientInstanceCapacity", CapacityError),
            (503, "RequestLimitExceeded", RateLimitedError),
            (500, "InternalError", TransientError),
            (503, "Unavailable", TransientError),
            (502, "SomethingNew", TransientError),
            (400, "IdempotentInstanceTerminated", ProviderError),
            (400, "SomethingNew", ProviderError),
        ],
    )
    def test_errors_map_to_taxonomy(
        self, provider: AWSProvider, key: SSHPublicKey, status: int, code: str, expected: type
    ) -> None:
        serve_error(provider._client("ec2", REGION), "RunInstances", status, code, f"{code} happened")
        with pytest.raises(ProviderError) as err:
            provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert type(err.value) is expected
        assert (err.value.provider_code, err.value.message.startswith(f"{code} happened")) == (code, True)

    def test_no_default_vpc_names_subnet_option(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        serve_error(provider._client("ec2", REGION), "RunInstances", 400, "VPCIdNotSpecified", "No default VPC")
        with pytest.raises(InvalidSpecError, match="options.subnet_id"):
            provider.create_vm(make_spec(), key, None, job_id="job-1")

    def test_connection_error_is_transient(self, provider: AWSProvider) -> None:
        def refuse(**_: Any) -> None:
            raise EndpointConnectionError(endpoint_url=f"https://ec2.{REGION}.amazonaws.com/")

        provider._client("ec2", REGION).meta.events.register_first("before-send.ec2.DescribeInstances", refuse)
        with pytest.raises(TransientError):
            provider.get_vm(f"{REGION}/i-0123456789abcdef0")

    def test_rate_limited_carries_retry_after(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        # EC2 sends no Retry-After (the task's backoff decides); one in the answer is honoured.
        serve_error(
            provider._client("ec2", REGION), "RunInstances", 503, "RequestLimitExceeded", "Request limit exceeded."
        )
        with pytest.raises(RateLimitedError) as err:
            provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert err.value.retry_after_s is None and err.value.retryable
        serve_error(
            provider._client("ec2", REGION),
            "DescribeInstances",
            503,
            "Throttling",
            "Rate exceeded",
            {"Retry-After": "7"},
        )
        with pytest.raises(RateLimitedError) as err:
            provider.get_vm(f"{REGION}/i-0123456789abcdef0")
        assert err.value.retry_after_s == 7.0

    def test_missing_credentials_auth_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        provider = AWSProvider()

        def no_network(**_: Any) -> None:
            raise AssertionError("a request was sent without credentials")

        provider._client("ec2", REGION).meta.events.register_first("before-send", no_network)
        with pytest.raises(AuthError, match="AWS_ACCESS_KEY_ID") as err:
            provider.get_vm(f"{REGION}/i-0123456789abcdef0")
        assert "AWS_PROFILE" in str(err.value)

    @pytest.mark.parametrize(("status", "code"), [(503, "RequestLimitExceeded"), (500, "InsufficientInstanceCapacity")])
    def test_sdk_retries_off(self, provider: AWSProvider, key: SSHPublicKey, status: int, code: str) -> None:
        sent = serve_error(provider._client("ec2", REGION), "RunInstances", status, code, "try later")
        with pytest.raises(ProviderError):
            provider.create_vm(make_spec(), key, None, job_id="job-1")
        assert len(sent) == 1

    def test_get_vms_reads_many_in_few_calls(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        running = provider.create_vm(make_spec(name="web-1"), key, None, job_id="job-1").instance_id
        booting = provider.create_vm(make_spec(name="web-2"), key, None, job_id="job-2").instance_id
        gone = provider.create_vm(make_spec(name="web-3"), key, None, job_id="job-3").instance_id
        west = provider.create_vm(make_spec(name="web-4", region="us-west-2"), key, None, job_id="job-4").instance_id
        provider.destroy_vm(gone)
        # moto answers running from the first read; put one back in pending, as EC2 shows a booting VM.
        ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(booting.split("/")[1])._state.name = "pending"
        unknown = f"{REGION}/i-0123456789abcdef0"
        bare = running.split("/")[1]  # a bare id reads in AWS_REGION and keys the answer as given
        calls = describe_calls(provider, REGION, "us-west-2")

        vms = provider.get_vms([bare, booting, gone, unknown, west])

        assert set(vms) == {bare, booting, gone, west}
        assert vms[bare].instance_id == running and vms[bare].status == VMStatus.running
        assert vms[bare].public_ipv4 == next(i for i in all_instances() if i["InstanceId"] == bare)["PublicIpAddress"]
        assert (vms[booting].status, vms[gone].status, vms[west].status) == (
            VMStatus.pending,
            VMStatus.terminated,
            VMStatus.running,
        )
        # One DescribeInstances per region, the ids as an instance-id filter (an unknown id fails no call).
        assert sorted((region, sorted(f["Values"])) for region, [f] in calls) == [
            (REGION, sorted(i.split("/")[-1] for i in (bare, booting, gone, unknown))),
            ("us-west-2", [west.split("/")[1]]),
        ]
        calls.clear()
        assert provider.get_vms([f"{REGION}/i-{n:017x}" for n in range(401)]) == {}
        assert [len(f["Values"]) for _, [f] in calls] == [200, 200, 1]

    def test_get_vms_matches_get_vm(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        vm_id = provider.create_vm(make_spec(), key, None, job_id="job-1").instance_id
        batched = provider.get_vms([vm_id])[vm_id]
        single = provider.get_vm(vm_id)
        assert batched == single
        assert batched.status == VMStatus.running and batched.public_ipv4 and batched.private_ipv4

    def test_list_owned_vms(self, provider: AWSProvider, key: SSHPublicKey, session: boto3.Session) -> None:
        owned = {
            provider.create_vm(make_spec(name=f"web-{n}"), key, None, job_id=f"job-{n}").instance_id for n in (1, 2)
        }
        boto3.client("ec2", region_name=REGION).run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
        vms = provider.list_owned_vms()
        assert {vm.instance_id for vm in vms} == owned and len(all_instances()) == 3
        assert {vm.labels["managed-by"] for vm in vms} == {"vmqueue"}
        assert AWSProvider(session, list_regions=["us-west-2"]).list_owned_vms() == []

    def test_lists_follow_every_page(
        self, provider: AWSProvider, key: SSHPublicKey, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Issue 13 (6): five instances, two a page (MaxResults): three pages, every one read.
        monkeypatch.setattr(aws, "LIST_PAGE_SIZE", 2)
        ours = {
            provider.create_vm(make_spec(name=f"web-{n}"), key, None, job_id=f"job-{n}").instance_id for n in range(5)
        }
        pages: list[str | None] = []
        provider._client("ec2", REGION).meta.events.register(
            "before-parameter-build.ec2.DescribeInstances", lambda params, **_: pages.append(params.get("NextToken"))
        )
        assert {vm.instance_id for vm in provider.list_owned_vms()} == ours
        assert len(pages) == 3 and pages[0] is None and all(pages[1:])
        assert set(provider.get_vms(sorted(ours))) == ours

    def test_list_owned_extras(self, provider: AWSProvider, key: SSHPublicKey) -> None:
        # Issue 13 (5): volumes carry the ownership tags; one left available is attached to nothing.
        vm = provider.create_vm(make_spec(), key, None, job_id="job-1")
        ec2 = boto3.client("ec2", region_name=REGION)
        tags = [{"Key": "managed-by", "Value": "vmqueue"}, {"Key": "vmqueue-job", "Value": "job-9"}]
        left = ec2.create_volume(
            AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
        )["VolumeId"]
        ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8)  # untagged: not ours
        extras = {r.resource_id: r for r in provider.list_owned_extras()}
        assert (
            extras[f"{REGION}/{left}"].attached_to is None
            and extras[f"{REGION}/{left}"].labels["vmqueue-job"] == "job-9"
        )
        assert [r.attached_to for r in extras.values() if r.attached_to] == [vm.instance_id]  # the root volume
        provider.delete_extra(extras[f"{REGION}/{left}"])
        provider.delete_extra(extras[f"{REGION}/{left}"])  # already gone: success
        assert f"{REGION}/{left}" not in {r.resource_id for r in provider.list_owned_extras()}

    def test_endpoint_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
        assert AWSProvider()._client("ec2", REGION).meta.endpoint_url == "http://127.0.0.1:5000"
        assert AWSProvider()._client("ssm", REGION).meta.endpoint_url == "http://127.0.0.1:5000"


@pytest.mark.system
def test_system_create_and_destroy_through_a_worker(worker_factory: Any, provisioner: Any, ssh_key: str) -> None:
    """Producer -> Redis -> a real Celery worker whose boto3 talks to a moto server through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    from vmqueue.models import JobState

    with socket.socket() as probe:  # a free loopback port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        ami = publish_ami("ubuntu-24.04", ec2=ec2)  # the server runs in this process: same backends
        worker_factory(
            "aws",
            {
                "AWS_ACCESS_KEY_ID": "fake-" + "key-id",
                "AWS_SECRET_ACCESS_KEY": "fake-" + "secret",
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
        job = provisioner.wait(provisioner.create_vm(make_spec(image="ubuntu-24.04"), ssh_key, SCRIPT).id, timeout_s=60)
        assert job.state == JobState.running, job.error
        assert job.instance_id.startswith(f"{REGION}/i-") and job.vm.image == ami and job.vm.public_ipv4
        [instance] = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        assert {t["Key"]: t["Value"] for t in instance["Tags"]}["vmqueue-job"] == job.id

        gone = provisioner.wait(provisioner.destroy_vm("aws", job.instance_id).id, timeout_s=60)
        assert gone.state == JobState.gone, gone.error
        assert (
            ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]["State"][
                "Name"
            ]
            == "terminated"
        )
    finally:
        server.stop()


def test_first_attempt_create_costs_one_request_root_volume_included(provider: AWSProvider, key: SSHPublicKey) -> None:
    """The AMI's root device is looked up once per AMI and region: later creates send RunInstances alone."""
    ami = publish_ami("ubuntu-24.04")
    spec = make_spec(image=ami, options={"root_volume_gb": 30})
    provider.create_vm(spec, key, None, job_id="job-0", first_attempt=True)
    meter = provider.meter = RecordingMeter()
    provider.create_vm(spec.model_copy(update={"name": "web-2"}), key, None, job_id="job-1", first_attempt=True)
    assert [target for _, target, _ in meter.sent] == ["ec2:RunInstances"]
