"""Typed per-provider options of a VMSpec, validated in the producer before anything is enqueued.

One model per provider; the adapter of that provider is the only reader. Unknown keys are refused
(``extra="forbid"``) so a typo fails at the producer instead of being silently ignored by a worker.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_Id = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]


class _Options(BaseModel):
    # ``provider`` is the union's tag: VMSpec fills it in, so errors read "options.aws.subnet_id".
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Options naming resources that live in one region: a fallback to another region must give its own.
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ()


class SimOptions(_Options):
    """The simulated cloud takes no options."""

    provider: Literal["sim"] = "sim"


class HetznerOptions(_Options):
    provider: Literal["hetzner"] = "hetzner"
    enable_ipv4: bool = Field(True, description="attach a primary public IPv4 (billed separately)")
    enable_ipv6: bool = Field(True, description="attach a primary public IPv6 /64")


class DigitalOceanOptions(_Options):
    provider: Literal["digitalocean"] = "digitalocean"
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ("vpc_uuid",)
    ipv6: bool = Field(True, description="enable public IPv6")
    vpc_uuid: str | None = Field(None, description="VPC to place the droplet in; default VPC of the region")
    monitoring: bool = Field(False, description="install the DigitalOcean metrics agent")


class AWSOptions(_Options):
    provider: Literal["aws"] = "aws"
    # Subnets and security groups belong to a VPC, key pairs to a region.
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ("subnet_id", "security_group_ids", "key_name")
    subnet_id: _Id | None = Field(None, description="subnet-...; default: the default VPC's default subnet")
    security_group_ids: list[_Id] = Field(default_factory=list, description="sg-... ids for the primary NIC")
    key_name: _Id | None = Field(
        None, description="an existing EC2 key pair; default: the key goes in through cloud-init"
    )
    associate_public_ip: bool = Field(True, description="ask for a public IPv4 on the primary NIC")
    root_volume_gb: int | None = Field(None, ge=8, le=16384)


class GCPOptions(_Options):
    provider: Literal["gcp"] = "gcp"
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ("subnetwork",)  # networks are global, subnetworks regional
    project: _Id | None = Field(None, description="default: GOOGLE_CLOUD_PROJECT, then the ADC project")
    network: _Id = "global/networks/default"
    subnetwork: _Id | None = None
    external_ip: bool = Field(True, description="ONE_TO_ONE_NAT access config for a public IPv4")
    ssh_user: str = Field("vmq", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="user of the ssh-keys entry")
    disk_size_gb: int | None = Field(None, ge=10, le=65536)


class OCIOptions(_Options):
    provider: Literal["oci"] = "oci"
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ("subnet_id", "availability_domain")
    compartment_id: _Id = Field(description="ocid1.compartment... (or the tenancy OCID)")
    subnet_id: _Id = Field(description="ocid1.subnet... of a subnet with an internet gateway")
    availability_domain: _Id = Field(description="e.g. 'Uocm:PHX-AD-1'")
    ocpus: float | None = Field(None, gt=0, le=512, description="required for *.Flex shapes")
    memory_gb: float | None = Field(None, gt=0, le=8192, description="required for *.Flex shapes")
    assign_public_ip: bool = True


# Azure refuses these admin names (and a few more) with InvalidParameter.
AZURE_RESERVED_ADMINS = frozenset(
    {"admin", "administrator", "root", "user", "test", "guest", "adm", "sys", "sa", "support", "owner"}
)


class AzureOptions(_Options):
    provider: Literal["azure"] = "azure"
    REGION_SCOPED: ClassVar[tuple[str, ...]] = ("subnet_id", "vnet_name", "subnet_name", "nsg_id")
    resource_group: str = Field(min_length=1, max_length=90, pattern=r"^[-\w._()]+$")
    # ARM ids start with "/subscriptions/", which the generic _Id pattern refuses.
    subnet_id: str | None = Field(
        None,
        pattern=r"(?i)^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/"
        r"virtualNetworks/[^/]+/subnets/[^/]+$",
        description="ARM id of the subnet; or vnet_name + subnet_name",
    )
    vnet_name: str | None = Field(None, pattern=r"^[\w.-]{2,64}$")
    subnet_name: str | None = Field(None, pattern=r"^[\w.-]{1,80}$")
    nsg_id: str | None = Field(
        None,
        pattern=r"(?i)^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/"
        r"networkSecurityGroups/[^/]+$",
        description="ARM id of a network security group allowing TCP 22 (default: the subnet's own)",
    )
    admin_username: str = Field("vmq", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    create_network: bool = Field(
        False, description="create the resource group, vnet/subnet and NSG if missing (never silently)"
    )

    @field_validator("admin_username")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in AZURE_RESERVED_ADMINS:
            raise ValueError(f"Azure refuses {value!r} as an admin name; pick another, e.g. 'vmq'")
        return value


OPTIONS_MODELS: dict[str, type[_Options]] = {
    "sim": SimOptions,
    "hetzner": HetznerOptions,
    "digitalocean": DigitalOceanOptions,
    "aws": AWSOptions,
    "gcp": GCPOptions,
    "oci": OCIOptions,
    "azure": AzureOptions,
}

ProviderOptions = Annotated[
    SimOptions | HetznerOptions | DigitalOceanOptions | AWSOptions | GCPOptions | OCIOptions | AzureOptions,
    Field(discriminator="provider"),
]
ProviderName = Literal["sim", "hetzner", "digitalocean", "aws", "gcp", "oci", "azure"]


def region_scope(provider: str, region: str) -> str:
    """The region whose resources ``region`` can use: a GCP zone's region (``us-central1-a`` ->
    ``us-central1``); elsewhere the region itself."""
    return region.rsplit("-", 1)[0] if provider == "gcp" and region.count("-") >= 2 else region
