"""Fallback placements with options of their own, and portable size aliases (vmqueue/models.py, sizes.py).

The adapters' tests (tests/providers/) send a fallback placement's spec through the real SDK.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vmqueue import sizes
from vmqueue.models import VMSpec
from vmqueue.options import OPTIONS_MODELS
from vmqueue.sshkeys import throwaway_public_key

OCI = {
    "provider": "oci",
    "name": "web-1",
    "region": "us-phoenix-1",
    "instance_type": "VM.Standard.E4.Flex",
    "image": "ubuntu-22.04",
    "options": {
        "compartment_id": "ocid1.compartment.oc1..aaaa",
        "subnet_id": "ocid1.subnet.oc1.phx.aaaa",
        "availability_domain": "Uocm:PHX-AD-1",
        "ocpus": 1,
        "memory_gb": 8,
    },
}
AWS = {"provider": "aws", "name": "web-1", "region": "eu-central-1", "instance_type": "t3.micro", "image": "ami-1"}
ASHBURN = {"subnet_id": "ocid1.subnet.oc1.iad.bbbb", "availability_domain": "Uocm:US-ASHBURN-AD-1"}


def test_oci_region_change_keeping_region_scoped_options_is_refused():
    with pytest.raises(ValidationError, match="subnet_id, availability_domain name resources of us-phoenix-1"):
        VMSpec.model_validate({**OCI, "fallbacks": [{"region": "us-ashburn-1"}]})


def test_oci_fallback_carries_its_own_subnet_and_ad():
    spec = VMSpec.model_validate({**OCI, "fallbacks": [{"region": "us-ashburn-1", "options": ASHBURN}]})
    there = spec.at_placement(1)
    assert (there.region, there.options.subnet_id, there.options.availability_domain) == (
        "us-ashburn-1",
        ASHBURN["subnet_id"],
        ASHBURN["availability_domain"],
    )
    assert there.options.compartment_id == OCI["options"]["compartment_id"]  # not region-scoped: kept
    assert spec.at_placement(0).options.subnet_id == OCI["options"]["subnet_id"]


def test_failover_across_availability_domains_in_one_region():
    spec = VMSpec.model_validate({**OCI, "fallbacks": [{"options": {"availability_domain": "Uocm:PHX-AD-2"}}]})
    there = spec.at_placement(1)
    assert (there.region, there.instance_type, there.options.availability_domain) == (
        "us-phoenix-1",
        "VM.Standard.E4.Flex",
        "Uocm:PHX-AD-2",
    )


def test_aws_subnet_goes_to_another_region_only_replaced():
    spec = {**AWS, "options": {"subnet_id": "subnet-frankfurt"}}
    with pytest.raises(ValidationError, match="subnet_id name resources of eu-central-1"):
        VMSpec.model_validate({**spec, "fallbacks": [{"region": "eu-west-1"}]})
    ok = VMSpec.model_validate({**spec, "fallbacks": [{"region": "eu-west-1", "options": {"subnet_id": "subnet-x"}}]})
    assert ok.at_placement(1).options.subnet_id == "subnet-x"
    # Dropping it (the region's default subnet) is a choice too; so is an instance-type-only fallback.
    VMSpec.model_validate({**spec, "fallbacks": [{"region": "eu-west-1", "options": {"subnet_id": None}}]})
    VMSpec.model_validate({**spec, "fallbacks": [{"instance_type": "t3.small"}]})


@pytest.mark.parametrize(
    ("spec", "fallback_region"),
    [
        ({"provider": "digitalocean", "region": "nyc3", "instance_type": "s-1vcpu-1gb"}, "sfo3"),
        ({"provider": "aws", "region": "eu-central-1", "instance_type": "t3.micro"}, "eu-west-1"),
    ],
)
def test_cross_region_fallback_without_options_survives_a_round_trip(spec, fallback_region):
    """Written out (defaults included) and read back, as the job store does: defaults name no resource of
    the first region, so the spec still parses (a DigitalOcean job with a region fallback failed here)."""
    first = VMSpec.model_validate(
        {**spec, "name": "web-1", "image": "ubuntu-24.04", "fallbacks": [{"region": fallback_region}]}
    )
    again = VMSpec.model_validate(first.model_dump(mode="json"))
    assert again.at_placement(1).region == fallback_region


def test_gcp_zone_in_the_same_region_keeps_the_subnetwork():
    gcp = {**AWS, "provider": "gcp", "region": "us-central1-a", "instance_type": "e2-small"}
    gcp["options"] = {"subnetwork": "regions/us-central1/subnetworks/a"}
    VMSpec.model_validate({**gcp, "fallbacks": [{"region": "us-central1-b"}]})
    with pytest.raises(ValidationError, match="subnetwork"):
        VMSpec.model_validate({**gcp, "fallbacks": [{"region": "europe-west1-b"}]})


@pytest.mark.parametrize(
    ("fallback", "says"),
    [
        ({"options": {"subnet": "x"}}, r"fallbacks\[0\]\.options\.subnet: Extra inputs"),
        ({}, "a fallback needs"),
    ],
)
def test_bad_fallbacks_are_refused_naming_the_fallback(fallback, says):
    with pytest.raises(ValidationError, match=says):
        VMSpec.model_validate({**AWS, "fallbacks": [fallback]})


@pytest.mark.parametrize("provider", sorted(OPTIONS_MODELS))
@pytest.mark.parametrize("alias", list(sizes.ALIASES))
def test_every_alias_resolves_for_every_provider(provider, alias):
    region = {"hetzner": "fsn1", "gcp": "us-central1-a"}.get(provider, "r1")
    native, extra = sizes.resolve(provider, region, alias)
    assert native and not sizes.is_alias(native) or provider == "sim"
    if provider == "oci":
        want = sizes.ALIASES[alias]
        assert extra["ocpus"] * 2 >= want.vcpus and extra["memory_gb"] >= want.memory_gb


def test_alias_resolved_and_recorded_on_the_spec():
    spec = VMSpec.model_validate({**AWS, "instance_type": "2vcpu-4gb", "fallbacks": [{"instance_type": "4vcpu-8gb"}]})
    assert (spec.instance_type, spec.size) == ("t3.medium", "2vcpu-4gb")
    there = spec.at_placement(1)
    assert (there.instance_type, there.size) == ("t3.xlarge", "4vcpu-8gb")
    # What the job store keeps validates to the same spec: a stored native type is never resolved again.
    assert VMSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_oci_alias_sets_the_flex_shape_and_refuses_own_ocpus():
    options = {k: v for k, v in OCI["options"].items() if k not in ("ocpus", "memory_gb")}
    spec = VMSpec.model_validate({**OCI, "instance_type": "4vcpu-16gb", "options": options})
    assert (spec.instance_type, spec.options.ocpus, spec.options.memory_gb) == ("VM.Standard.E4.Flex", 2.0, 16.0)
    with pytest.raises(ValidationError, match="come from the size alias"):
        VMSpec.model_validate({**OCI, "instance_type": "4vcpu-16gb"})


def test_hetzner_alias_follows_the_location():
    hetzner = {**AWS, "provider": "hetzner", "instance_type": "2vcpu-4gb"}
    assert VMSpec.model_validate({**hetzner, "region": "fsn1"}).instance_type == "cx23"
    assert VMSpec.model_validate({**hetzner, "region": "ash"}).instance_type == "cpx22"
    spec = VMSpec.model_validate({**hetzner, "region": "fsn1", "fallbacks": [{"region": "ash"}]})
    assert spec.at_placement(1).instance_type == "cx23"  # a fallback without a type keeps the spec's native one
    spec = VMSpec.model_validate(
        {**hetzner, "region": "fsn1", "fallbacks": [{"region": "ash", "instance_type": "2vcpu-4gb"}]}
    )
    assert spec.at_placement(1).instance_type == "cpx22"


@pytest.mark.system
def test_producer_records_the_alias_on_the_job(provisioner):
    job = provisioner.create_vm({**AWS, "instance_type": "8vcpu-32gb", "region": "us-east-1"}, throwaway_public_key())
    stored = provisioner.get_job(job.id)
    assert (stored.spec.instance_type, stored.spec.size) == ("t3.2xlarge", "8vcpu-32gb")
