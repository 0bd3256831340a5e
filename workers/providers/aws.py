"""AWS EC2 through boto3; see the protocol in ``base.py`` and PROVIDERS.md "AWS EC2".

Instance ids are ``<region>/<i-...>`` (e.g. ``eu-central-1/i-0abc...``): an EC2 id does not name its
region and one worker serves VMs in every region, so the region travels with the id. A bare ``i-...``
is read in the default region (``AWS_REGION`` or ``AWS_DEFAULT_REGION``).

Credentials come from boto3's default chain. boto3 honours ``AWS_ENDPOINT_URL`` (all services) and
``AWS_ENDPOINT_URL_EC2`` / ``AWS_ENDPOINT_URL_SSM`` itself, which points a worker at a moto server.
``list_owned_vms`` reads the regions in ``VMQ_AWS_REGIONS`` (comma-separated), else the default one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from vmqueue.images import IMAGES
from vmqueue.models import LABEL_MANAGED_BY, VMInfo, VMSpec, VMStatus
from vmqueue.options import AWSOptions
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from vmqueue.userdata import AWS_USER_DATA_BYTES, aws_sent
from workers.providers.errors import (
    AuthError,
    CapacityError,
    InvalidSpecError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
    map_errors,
)
from workers.providers.lookups import Lookups
from workers.providers.metering import Metered, meter_botocore

# The SDK's retries are off: our task layer decides when to send again (PROVIDERS.md, DESIGN §4).
BOTO_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=60)
# DescribeInstances' largest page (MaxResults 5-1000, AWS EC2 API reference); the paginators follow
# NextToken across pages, so this sets only how many calls a long list takes.
LIST_PAGE_SIZE = 1000
VOLUME_PAGE_SIZE = 500  # DescribeVolumes' largest page (MaxResults 5-500)
FILTER_CHUNK = 200  # ids per DescribeInstances filter; conservative: no value limit is published for it (unverified)
CREDENTIAL_HINT = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (boto3's default chain)"

STATUS_MAP: dict[str, VMStatus] = {
    "pending": VMStatus.pending,
    "running": VMStatus.running,
    "stopping": VMStatus.stopping,
    "stopped": VMStatus.stopped,
    "shutting-down": VMStatus.terminating,
    "terminated": VMStatus.terminated,
}
# StateReason codes of an instance that died at launch rather than being terminated by someone.
LAUNCH_FAILURES = ("Server.", "Client.InternalError", "Client.InvalidSnapshot.NotFound", "Client.VolumeLimitExceeded")

# StateReason codes of an instance EC2 accepted and then ended for want of capacity (get_vm raises CapacityError;
# https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_StateReason.html).
CAPACITY_REASONS = ("Server.InsufficientInstanceCapacity",)

ERROR_CODES: dict[str, type[ProviderError]] = {
    "AuthFailure": AuthError,
    "UnauthorizedOperation": AuthError,
    "SignatureDoesNotMatch": AuthError,
    "OptInRequired": AuthError,
    "InvalidClientTokenId": AuthError,
    "ExpiredToken": AuthError,
    "AccessDeniedException": AuthError,
    "InvalidParameterValue": InvalidSpecError,
    "InvalidParameterCombination": InvalidSpecError,
    "InvalidParameter": InvalidSpecError,
    "MissingParameter": InvalidSpecError,
    "Unsupported": InvalidSpecError,
    "IdempotentParameterMismatch": InvalidSpecError,
    "VPCIdNotSpecified": InvalidSpecError,
    "ParameterNotFound": InvalidSpecError,
    "InvalidInstanceID.NotFound": NotFoundError,
    "InstanceLimitExceeded": QuotaExceededError,
    "VcpuLimitExceeded": QuotaExceededError,
    "AddressLimitExceeded": QuotaExceededError,
    "InsufficientInstanceCapacity": CapacityError,
    "InsufficientAddressCapacity": CapacityError,
    "RequestLimitExceeded": RateLimitedError,
    "Throttling": RateLimitedError,
    "ThrottlingException": RateLimitedError,
    "InternalError": TransientError,
    "Unavailable": TransientError,
    "ServiceUnavailable": TransientError,
}


def _map_error(exc: Exception) -> ProviderError:
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AuthError(f"no usable AWS credentials: {CREDENTIAL_HINT}", provider_code=type(exc).__name__)
    if isinstance(exc, NoRegionError):
        return AuthError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION", provider_code="NoRegionError")
    if isinstance(exc, ParamValidationError):
        return InvalidSpecError(str(exc), provider_code="ParamValidationError")
    if isinstance(exc, ConnectionError | HTTPClientError):
        return TransientError(str(exc), provider_code=type(exc).__name__)
    if not isinstance(exc, ClientError):
        return ProviderError(str(exc), provider_code=type(exc).__name__)
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", str(exc))
    meta = exc.response.get("ResponseMetadata", {})
    retry_after = meta.get("HTTPHeaders", {}).get("retry-after", "")
    if code == "VPCIdNotSpecified":
        message = f"{message}: this account has no default VPC in the region; set options.subnet_id"
    elif code == "IdempotentInstanceTerminated":
        message = f"{message}: the instance this job launched is terminated; not launching another under its token"
    cls = ERROR_CODES.get(code)
    if cls is None:
        if code.endswith((".Malformed", ".NotFound")):  # a subnet, group, AMI or key pair the spec names
            cls = InvalidSpecError
        elif meta.get("HTTPStatusCode", 0) >= 500:
            cls = TransientError
        else:
            cls = ProviderError
    return cls(message, provider_code=code, retry_after_s=float(retry_after) if retry_after.isdigit() else None)


class AWSProvider(Metered):
    """EC2 instances; see the ``Provider`` protocol."""

    name = "aws"

    def __init__(
        self,
        session: boto3.Session | None = None,
        *,
        endpoint_url: str | None = None,
        default_region: str | None = None,
        list_regions: list[str] | None = None,
    ):
        self._session = session
        self._images = Lookups()  # alias -> today's AMI, per region (workers/providers/lookups.py)
        self._endpoint_url = endpoint_url  # None: boto3 reads AWS_ENDPOINT_URL[_EC2|_SSM] itself
        # boto3 reads only AWS_DEFAULT_REGION; AWS_REGION is what most tooling sets.
        self.default_region = default_region or os.getenv("AWS_REGION") or os.getenv("AWS_DEFAULT_REGION")
        env_regions = [r.strip() for r in os.getenv("VMQ_AWS_REGIONS", "").split(",") if r.strip()]
        self.list_regions = list_regions or env_regions or [r for r in (self.default_region,) if r]
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._root_devices: dict[tuple[str, str], str] = {}  # (region, AMI) -> its root device name

    def _client(self, service: str, region: str) -> Any:
        """One client per service and region, made on first use.

        Clients are thread-safe, sessions are not: the threads pool creates them under a lock.
        """
        with self._lock:
            if (service, region) not in self._clients:
                self._session = self._session or boto3.Session()
                client = self._session.client(
                    service, region_name=region, endpoint_url=self._endpoint_url, config=BOTO_CONFIG
                )
                # Every attempt on the wire is charged to the account's budget in that region (workers/budget.py).
                meter_botocore(client, lambda: self.meter, region)
                self._clients[service, region] = client
            return self._clients[service, region]

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        """Resolve an image alias to today's AMI through its public SSM parameter, once per region and hour."""
        parameter = IMAGES["aws"].get(spec.image)
        if parameter is None:
            return spec

        def lookup() -> str:
            with map_errors(_map_error):
                return self._client("ssm", spec.region).get_parameter(Name=parameter)["Parameter"]["Value"]

        return spec.model_copy(update={"image": self._images.get((spec.region, parameter), lookup)})

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        opts = spec.options if isinstance(spec.options, AWSOptions) else AWSOptions()
        # The bytes the producer measured (vmqueue.userdata), so a script it let through fits here too.
        user_data = aws_sent(opts, ssh_key, startup_script)
        if user_data and len(user_data.encode()) > AWS_USER_DATA_BYTES:
            raise InvalidSpecError(f"user-data with the SSH key is over EC2's {AWS_USER_DATA_BYTES} bytes")
        tags = [{"Key": k, "Value": v} for k, v in {"Name": spec.name, **spec.ownership_labels(job_id)}.items()]
        nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": opts.associate_public_ip}
        if opts.subnet_id:
            nic["SubnetId"] = opts.subnet_id
        if opts.security_group_ids:
            nic["Groups"] = list(opts.security_group_ids)
        params: dict[str, Any] = {
            "ImageId": spec.image,
            "InstanceType": spec.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": _client_token(job_id),
            "NetworkInterfaces": [nic],
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
        }
        if user_data:
            params["UserData"] = user_data
        if opts.key_name:
            params["KeyName"] = opts.key_name
        ec2 = self._client("ec2", spec.region)
        with map_errors(_map_error):
            if opts.root_volume_gb:
                # The AMI's root device name never changes, so retries still send identical parameters, and
                # it is looked up once per AMI and region per process.
                if (device := self._root_devices.get((spec.region, spec.image))) is None:
                    images = ec2.describe_images(ImageIds=[spec.image])["Images"]
                    image = next((i for i in images if i.get("ImageId") == spec.image), None)
                    if image is None:
                        raise InvalidSpecError(
                            f"no AMI {spec.image} in {spec.region}", provider_code="InvalidAMIID.NotFound"
                        )
                    device = image["RootDeviceName"]
                    self._root_devices[spec.region, spec.image] = device
                ebs = {"VolumeSize": opts.root_volume_gb, "VolumeType": "gp3", "DeleteOnTermination": True}
                params["BlockDeviceMappings"] = [{"DeviceName": device, "Ebs": ebs}]
            instance = ec2.run_instances(**params)["Instances"][0]
        return _vm_info(spec.region, instance)

    def get_vm(self, instance_id: str) -> VMInfo:
        region, native_id = self._split_id(instance_id)
        with map_errors(_map_error):
            reservations = self._client("ec2", region).describe_instances(InstanceIds=[native_id])["Reservations"]
        # Only the instance asked for: an answer holding others (a filter, a proxy, a fake) must not stand in.
        instances = [i for r in reservations for i in r["Instances"] if i.get("InstanceId") == native_id]
        if not instances:
            raise NotFoundError(f"no EC2 instance {native_id} in {region}", provider_code="InvalidInstanceID.NotFound")
        instance = instances[0]
        reason = instance.get("StateReason") or {}
        if instance["State"]["Name"] in ("shutting-down", "terminated") and reason.get("Code") in CAPACITY_REASONS:
            # Accepted, then ended by EC2 for want of capacity: nothing of it lives on, another placement may work.
            raise CapacityError(
                f"EC2 ended {native_id} at launch: {reason.get('Message') or reason['Code']}",
                provider_code=reason["Code"],
            )
        return _vm_info(region, instance)

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """DescribeInstances with an ``instance-id`` filter: one call per region per ``FILTER_CHUNK`` ids.

        A filter, unlike ``InstanceIds``, skips an unknown id instead of failing the whole call with
        ``InvalidInstanceID.NotFound``, so one vanished VM does not blind the read of the others. The
        paginator follows a NextToken should EC2 split an answer. Keys are the ids as the caller gave
        them (``<region>/<i-...>`` or a bare ``i-...``).
        """
        by_region: dict[str, dict[str, str]] = {}  # region -> native id -> the caller's id
        for instance_id in instance_ids:
            try:
                region, native_id = self._split_id(instance_id)
            except InvalidSpecError:
                continue  # a bare id without a default region: get_vm says why; here it must not sink the batch
            by_region.setdefault(region, {})[native_id] = instance_id
        found: dict[str, VMInfo] = {}
        for region, asked in by_region.items():
            natives = list(asked)
            paginator = self._client("ec2", region).get_paginator("describe_instances")
            for start in range(0, len(natives), FILTER_CHUNK):
                chunk = natives[start : start + FILTER_CHUNK]
                with map_errors(_map_error):
                    pages = paginator.paginate(
                        Filters=[{"Name": "instance-id", "Values": chunk}],
                        PaginationConfig={"PageSize": LIST_PAGE_SIZE},
                    )
                    for page in pages:
                        for instance in (i for r in page["Reservations"] for i in r["Instances"]):
                            if (caller_id := asked.get(instance["InstanceId"])) is not None:
                                found[caller_id] = _vm_info(region, instance)
        return found

    def destroy_vm(self, instance_id: str) -> None:
        """Terminate; the root volume goes with it (DeleteOnTermination). Unknown or gone: success."""
        region, native_id = self._split_id(instance_id)
        try:
            with map_errors(_map_error):
                self._client("ec2", region).terminate_instances(InstanceIds=[native_id])
        except NotFoundError:
            return None

    def list_owned_vms(self) -> list[VMInfo]:
        """One filtered DescribeInstances per region in ``list_regions``, every page."""
        pages = self._owned_pages("describe_instances", LIST_PAGE_SIZE)
        return [_vm_info(region, i) for region, page in pages for r in page["Reservations"] for i in r["Instances"]]

    def _split_id(self, instance_id: str) -> tuple[str, str]:
        region, _, native_id = instance_id.rpartition("/")
        region = region or self.default_region
        if not region:
            raise InvalidSpecError(
                f"instance id {instance_id!r} names no region: use '<region>/<i-...>' or set AWS_REGION"
            )
        return region, native_id

    def list_owned_extras(self) -> list[OwnedResource]:
        """EBS volumes tagged managed-by=vmqueue (a create tags its instance's volumes too), one filtered
        DescribeVolumes per region in ``list_regions``, every page (NextToken). A root volume goes with
        its instance (DeleteOnTermination); one left ``available`` is attached to nothing."""
        found: list[OwnedResource] = []
        for region, page in self._owned_pages("describe_volumes", VOLUME_PAGE_SIZE):
            for volume in page["Volumes"]:
                attached = [a["InstanceId"] for a in volume.get("Attachments", []) if a.get("State") != "detached"]
                found.append(
                    OwnedResource(
                        provider=self.name,
                        kind="volume",
                        resource_id=f"{region}/{volume['VolumeId']}",
                        labels={t["Key"]: t["Value"] for t in volume.get("Tags", [])},
                        attached_to=f"{region}/{attached[0]}" if attached else None,
                        created_at=volume.get("CreateTime"),
                    )
                )
        return found

    def _owned_pages(self, operation: str, page_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(region, page) for every page of a ``tag:managed-by=vmqueue`` filtered describe call, in each
        region of ``list_regions`` (the paginator follows NextToken)."""
        if not self.list_regions:
            raise AuthError("no AWS region to list: set VMQ_AWS_REGIONS, AWS_REGION or AWS_DEFAULT_REGION")
        for region in self.list_regions:
            with map_errors(_map_error):
                paginator = self._client("ec2", region).get_paginator(operation)
                owned = [{"Name": f"tag:{LABEL_MANAGED_BY}", "Values": ["vmqueue"]}]
                for page in paginator.paginate(Filters=owned, PaginationConfig={"PageSize": page_size}):
                    yield region, page

    def delete_extra(self, resource: OwnedResource) -> None:
        """DeleteVolume; a volume already gone is success (InvalidVolume.NotFound)."""
        if resource.kind != "volume":
            raise InvalidSpecError(f"aws creates no {resource.kind} beside an instance: nothing to delete")
        region, volume_id = self._split_id(resource.resource_id)
        try:
            with map_errors(_map_error):
                self._client("ec2", region).delete_volume(VolumeId=volume_id)
        except InvalidSpecError as exc:
            if exc.provider_code != "InvalidVolume.NotFound":
                raise


def _client_token(job_id: str) -> str:
    """The job's ClientToken: ASCII, at most 64 characters, the same on every retry."""
    token = f"vmq-{job_id}"
    return token if len(token) <= 64 and token.isascii() else "vmq-" + hashlib.sha256(job_id.encode()).hexdigest()[:60]


def _vm_info(region: str, instance: dict[str, Any]) -> VMInfo:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    raw = instance["State"]["Name"]
    status = STATUS_MAP.get(raw, VMStatus.unknown)
    if raw == "terminated" and instance.get("StateReason", {}).get("Code", "").startswith(LAUNCH_FAILURES):
        status = VMStatus.error
    # Addresses of the primary interface (device index 0, EC2's eth0) whatever the order of the list.
    primary = next(
        (n for n in instance.get("NetworkInterfaces") or [] if (n.get("Attachment") or {}).get("DeviceIndex") == 0), {}
    )
    ipv6 = instance.get("Ipv6Address") or next(iter(primary.get("Ipv6Addresses", [])), {}).get("Ipv6Address")
    return VMInfo(
        provider="aws",
        instance_id=f"{region}/{instance['InstanceId']}",
        name=tags.pop("Name", None),
        status=status,
        provider_status=raw,
        public_ipv4=(primary.get("Association") or {}).get("PublicIp") or instance.get("PublicIpAddress"),
        public_ipv6=ipv6,
        private_ipv4=primary.get("PrivateIpAddress") or instance.get("PrivateIpAddress"),
        region=region,
        instance_type=instance.get("InstanceType"),
        image=instance.get("ImageId"),
        labels=tags,
        created_at=instance.get("LaunchTime"),
    )
