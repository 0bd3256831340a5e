"""Each provider's published API budget: named buckets, which HTTP requests each one meters, and the
headers in which the provider reports what is left. Pure data and parsing; ``workers/budget.py`` spends it.

A bucket is either a token bucket (``capacity`` tokens, ``refill_per_s`` back every second; EC2,
Hetzner, ARM) or a window of the ``limits`` library (``window="250/minute"``: moving, or fixed when
the provider resets at the start of each interval, like GCP). Every HTTP request is charged one
token in each bucket its ``classify`` names. The sources are in docs/providers/*.md.

A request is named by ``(method, target)``: the HTTP method and the URL path (query dropped) for
REST APIs, the operation (``ec2:RunInstances``) for AWS, whose every request is a POST.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from limits import parse

Request = tuple[str, str]  # (HTTP method, target)
# Batched reads may spend the part of a bucket above half its burst at this many seconds per token of
# it (Hetzner's full 3,600: 18 requests a second at first, a read of 1,000 servers about every second).
SURPLUS_SPEND_S = 100.0
# ... and at this many while VMs settle (the last read saw some run): a fleet's VMs boot within seconds
# of each other and reads are all that shortens their wait then; half the burst still stays untouched.
# Hetzner after 1,000 creates (800 above half): a read of 1,000 servers (20 pages) every 0.25 s, not 2.4 s.
SETTLING_SURPLUS_SPEND_S = 10.0


@dataclass(frozen=True)
class Bucket:
    """One metered budget. ``per_action``: one bucket per target (EC2 meters each API on its own)."""

    capacity: float = 0.0
    refill_per_s: float = 0.0
    window: str | None = None  # a ``limits`` string: "250/minute"
    fixed: bool = False  # a fixed window (refills at the start of each interval) instead of a moving one
    per_action: bool = False
    source: str = ""

    @property
    def kind(self) -> Literal["token", "window"]:
        return "window" if self.window else "token"

    def rate_per_s(self) -> float:
        """Sustained requests per second."""
        if self.window:
            item = parse(self.window)
            return item.amount / item.get_expiry()
        return self.refill_per_s

    def burst(self) -> float:
        return float(parse(self.window).amount) if self.window else self.capacity


@dataclass(frozen=True)
class Observation:
    """What a response's headers say is left of one budget.

    ``bucket``: a bucket of the profile (its model is corrected down to ``remaining``), or a policy of
    the provider's own that the profile does not know (``window_s`` then says when it refills).
    """

    bucket: str
    remaining: float
    reset_at: float | None = None  # epoch s when the provider says the budget is back
    window_s: float | None = None
    applies_to: str = ""  # for a policy of the provider's own: the class of requests it meters


@dataclass(frozen=True)
class Profile:
    provider: str
    buckets: Mapping[str, Bucket]
    classify: Callable[[str, str], tuple[str, ...]]
    # What one adapter call costs on the wire on a first attempt, for the simulated cloud's profiles.
    calls: Mapping[str, tuple[Request, ...]]
    page_size: int  # VMs per page of the batched read
    settle_reads: tuple[Request, ...] = ()  # extra requests per VM the batched read sees settle
    # Or, when cheaper in requests, these once per page of ``page_size`` resources of the VMs' group,
    # whatever the number of VMs settling (Azure lists the group's NICs and public IPs): ``settle_requests``.
    settle_lists: tuple[Request, ...] = ()
    headers: Callable[[str, str, Mapping[str, str]], list[Observation]] | None = None
    # The class of a request, for a provider policy reported by headers that names no bucket (Azure Compute).
    request_class: Callable[[str, str], str] = field(default=lambda method, target: "")

    def create_requests(self) -> tuple[Request, ...]:
        return tuple(self.calls.get("create", ()))

    def read_requests(self, vms: int) -> dict[tuple[str, str], int]:
        """What one batched read of ``vms`` VMs charges: (bucket, target if metered per action) -> requests.

        ``get_many``'s requests once per page of ``page_size`` VMs. An adapter whose list also pages
        through VMs nobody asked for (Azure by subscription) costs more than this counts; its headers
        then pace it (workers/budget.py).
        """
        pages = max(1, math.ceil(vms / self.page_size))
        spent: dict[tuple[str, str], int] = {}
        for method, target in self.calls.get("get_many", ()):
            for name in self.classify(method, target):
                key = (name, target if self.buckets[name].per_action else "")
                spent[key] = spent.get(key, 0) + pages
        return spent

    def settle_requests(self, settled: int, group: int) -> tuple[Request, ...]:
        """What one batched read that sees ``settled`` VMs settle sends to learn their addresses, in a
        group of ``group`` VMs: ``settle_reads`` for each, or ``settle_lists`` once per page of the group
        when that is fewer requests (a tie reads each VM, as the Azure adapter does)."""
        each = self.settle_reads * settled
        if not self.settle_lists or not settled:
            return each
        listed = self.settle_lists * max(1, math.ceil(group / self.page_size))
        return listed if len(listed) < len(each) else each

    def read_interval_s(
        self,
        vms: int,
        share: float,
        levels: Mapping[tuple[str, str], float] | None = None,
        surplus_spend_s: float = SURPLUS_SPEND_S,
    ) -> float:
        """Seconds between batched reads of ``vms`` VMs; 0.0 when no bucket meters them.

        The reads may spend ``share`` (0..1] of the sustained rate of every bucket they are charged to
        and, given ``levels`` (what each bucket holds now: tokens, or what is left of a window), the
        part of a bucket above half its burst at ``1/surplus_spend_s`` of it a second (``SURPLUS_SPEND_S``;
        ``SETTLING_SURPLUS_SPEND_S`` while VMs settle): a full budget reads often while VMs boot, a spent
        one falls back to the share, and reads never take a bucket below half its burst (that half and
        the rest of the refill stay for creates and deletes).
        """
        spent = self.read_requests(vms)
        levels = levels or {}
        intervals = []
        for key, n in spent.items():
            bucket = self.buckets[key[0]]
            surplus = max(0.0, levels.get(key, 0.0) - bucket.burst() / 2)
            rate = share * bucket.rate_per_s() + surplus / surplus_spend_s
            if rate > 0:
                intervals.append(n / rate)
        return max(intervals, default=0.0)

    def create_pace(self) -> tuple[float, float]:
        """(creates per second, burst) the profile's buckets allow, counting every request of a create."""
        per_bucket: dict[str, int] = {}
        for method, target in self.create_requests():
            for name in self.classify(method, target):
                per_bucket[name] = per_bucket.get(name, 0) + 1
        rate = min((self.buckets[n].rate_per_s() / k for n, k in per_bucket.items()), default=float("inf"))
        burst = min((self.buckets[n].burst() / k for n, k in per_bucket.items()), default=float("inf"))
        return rate, max(burst, 1.0)


def _headers_lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# -- Hetzner: one bucket per project, refilled one request a second ------------------------------
def _hetzner_headers(method: str, target: str, headers: Mapping[str, str]) -> list[Observation]:
    h = _headers_lower(headers)
    remaining = _number(h.get("ratelimit-remaining"))
    return [] if remaining is None else [Observation("project", remaining)]


HETZNER = Profile(
    provider="hetzner",
    buckets={
        "project": Bucket(3600, 1.0, source="https://docs.hetzner.cloud/#rate-limiting"),
    },
    classify=lambda method, target: ("project",),
    calls={
        "create": (("POST", "/servers"),),
        "get": (("GET", "/servers/{id}"),),
        "get_many": (("GET", "/servers"),),
        "destroy": (("DELETE", "/servers/{id}"),),
        "list": (("GET", "/servers"),),
    },
    page_size=50,
    headers=_hetzner_headers,
)


# -- DigitalOcean: 250 a minute and 5,000 an hour per token; the hour is what the headers report ---
def _digitalocean_headers(method: str, target: str, headers: Mapping[str, str]) -> list[Observation]:
    h = _headers_lower(headers)
    remaining = _number(h.get("ratelimit-remaining"))
    if remaining is None:
        return []
    return [Observation("hour", remaining, reset_at=_number(h.get("ratelimit-reset")))]


DIGITALOCEAN = Profile(
    provider="digitalocean",
    buckets={
        "minute": Bucket(window="250/minute", source="https://docs.digitalocean.com/reference/api/#rate-limit"),
        "hour": Bucket(window="5000/hour", source="https://docs.digitalocean.com/reference/api/#rate-limit"),
    },
    classify=lambda method, target: ("minute", "hour"),
    calls={
        "create": (("POST", "/v2/droplets"),),
        "get": (("GET", "/v2/droplets/{id}"),),
        "get_many": (("GET", "/v2/droplets"),),
        "destroy": (("DELETE", "/v2/droplets/{id}"),),
        "list": (("GET", "/v2/droplets"),),
    },
    page_size=200,
    headers=_digitalocean_headers,
)


# -- AWS EC2: a token bucket per API action, per account and region --------------------------------
_EC2_THROTTLING = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"


def _aws_classify(method: str, target: str) -> tuple[str, ...]:
    service, _, action = target.partition(":")
    if service == "ssm":
        return ("ssm_get_parameter",) if action == "GetParameter" else ("ssm",)
    if action == "RunInstances":
        return ("run_instances",)
    if action.startswith(("Describe", "Get", "List", "Search")):
        return ("non_mutating",)
    return ("mutating",)


AWS = Profile(
    provider="aws",
    buckets={
        "run_instances": Bucket(5, 2.0, source=_EC2_THROTTLING),
        "non_mutating": Bucket(100, 20.0, per_action=True, source=_EC2_THROTTLING),
        "mutating": Bucket(200, 5.0, per_action=True, source=_EC2_THROTTLING),
        "ssm_get_parameter": Bucket(
            40, 40.0, source="https://docs.aws.amazon.com/general/latest/gr/ssm.html (GetParameter, 40 TPS)"
        ),
        "ssm": Bucket(40, 40.0, per_action=True, source="vmqueue's choice: as GetParameter"),
    },
    classify=_aws_classify,
    calls={
        "create": (("POST", "ec2:RunInstances"),),
        "get": (("POST", "ec2:DescribeInstances"),),
        "get_many": (("POST", "ec2:DescribeInstances"),),
        "destroy": (("POST", "ec2:TerminateInstances"),),
        "list": (("POST", "ec2:DescribeInstances"),),
    },
    page_size=200,
)


# -- GCP: per project, per minute, per group of methods; the quota refills at each minute's start --
_GCP_QUOTAS = "https://cloud.google.com/compute/docs/api-rate-limits"


def _gcp_classify(method: str, target: str) -> tuple[str, ...]:
    if method != "GET":
        return ("mutations",)
    if "/operations" in target:
        return ("operation_reads",)
    if target.endswith(("/instances", "/aggregated/instances")):
        return ("lists",)
    return ("reads",)


GCP = Profile(
    provider="gcp",
    buckets={
        "mutations": Bucket(window="1500/minute", fixed=True, source=_GCP_QUOTAS),
        "reads": Bucket(window="1500/minute", fixed=True, source=_GCP_QUOTAS),
        "lists": Bucket(window="1500/minute", fixed=True, source=_GCP_QUOTAS),
        "operation_reads": Bucket(window="1500/minute", fixed=True, source=_GCP_QUOTAS),
    },
    classify=_gcp_classify,
    calls={
        "create": (("POST", "/compute/v1/projects/p/zones/z/instances"),),
        "get": (("GET", "/compute/v1/projects/p/zones/z/instances/{name}"),),
        "get_many": (("GET", "/compute/v1/projects/p/aggregated/instances"),),
        "destroy": (("DELETE", "/compute/v1/projects/p/zones/z/instances/{name}"),),
        "list": (("GET", "/compute/v1/projects/p/aggregated/instances"),),
    },
    page_size=50,
)


# -- OCI: no per-API limits are published; a conservative budget of vmqueue's own -----------------
OCI = Profile(
    provider="oci",
    buckets={
        "requests": Bucket(10, 10.0, source="none published (PROVIDERS.md); vmqueue's conservative default"),
    },
    classify=lambda method, target: ("requests",),
    calls={
        "create": (("POST", "/20160918/instances"),),
        "get": (("GET", "/20160918/instances/{id}"),),
        "get_many": (("POST", "/20180409/resources"),),
        "destroy": (("DELETE", "/20160918/instances/{id}"),),
        "list": (("POST", "/20180409/resources"),),
    },
    page_size=50,
    settle_reads=(
        ("GET", "/20160918/instances/{id}"),
        ("GET", "/20160918/vnicAttachments"),
        ("GET", "/20160918/vnics/{id}"),
    ),
)


# -- Azure: ARM's token buckets per subscription (reads, writes, deletes), Compute's own policies --
_ARM_LIMITS = "https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling"
_AZURE_CLASSES = {"GET": "reads", "HEAD": "reads", "DELETE": "deletes"}
_POLICY = re.compile(r"^([^;]+?)(\d+)(Min|Sec|Hour)?;(\d+)$")
_WINDOW_UNITS_S = {"Sec": 1.0, "Min": 60.0, "Hour": 3600.0, None: 60.0}


def _azure_class(method: str, target: str) -> str:
    return _AZURE_CLASSES.get(method, "writes")


def _azure_headers(method: str, target: str, headers: Mapping[str, str]) -> list[Observation]:
    h = _headers_lower(headers)
    found = []
    for name in ("reads", "writes", "deletes"):
        remaining = _number(h.get(f"x-ms-ratelimit-remaining-subscription-{name}"))
        if remaining is not None:
            found.append(Observation(name, remaining))
    # "Microsoft.Compute/PutVM3Min;239,Microsoft.Compute/PutVM30Min;1199": Compute's own windows.
    for policy in filter(None, (p.strip() for p in h.get("x-ms-ratelimit-remaining-resource", "").split(","))):
        if match := _POLICY.match(policy):
            window_s = float(match[2]) * _WINDOW_UNITS_S[match[3]]
            found.append(
                Observation(
                    f"{match[1]}{match[2]}{match[3] or ''}",
                    float(match[4]),
                    window_s=window_s,
                    applies_to=_azure_class(method, target),
                )
            )
    return found


AZURE = Profile(
    provider="azure",
    buckets={
        "reads": Bucket(250, 25.0, source=_ARM_LIMITS),
        "writes": Bucket(200, 10.0, source=_ARM_LIMITS),
        "deletes": Bucket(200, 10.0, source=_ARM_LIMITS),
    },
    classify=lambda method, target: (_azure_class(method, target),),
    calls={
        "create": (("PUT", "/virtualMachines/{name}"),),  # its NIC and public IP declared inside it
        "get": (
            ("GET", "/virtualMachines/{name}"),
            ("GET", "/networkInterfaces/{nic}"),
            ("GET", "/publicIPAddresses/{pip}"),
        ),
        "get_many": (("GET", "/providers/Microsoft.Compute/virtualMachines"),),
        "destroy": (("DELETE", "/virtualMachines/{name}"), ("GET", "/virtualMachines/{name}")),
        "list": (("GET", "/providers/Microsoft.Compute/virtualMachines"),),
    },
    page_size=1000,  # the VM list's; ARM publishes none for the NIC and public IP lists: taken alike here
    # A VM seen settled: its NIC's GET and its public IP's (the VM's model is the list's), or, for two or
    # more in one read, the group's NIC list and public IP list (workers/providers/azure.py ``_settle``).
    settle_reads=(
        ("GET", "/networkInterfaces/{nic}"),
        ("GET", "/publicIPAddresses/{pip}"),
    ),
    settle_lists=(
        ("GET", "/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces"),
        ("GET", "/resourceGroups/{rg}/providers/Microsoft.Network/publicIPAddresses"),
    ),
    headers=_azure_headers,
    request_class=_azure_class,
)


# -- the simulated cloud's own default: generous, one bucket ---------------------------------------
SIM = Profile(
    provider="sim",
    buckets={"requests": Bucket(500, 500.0, source="vmqueue's simulated cloud")},
    classify=lambda method, target: ("requests",),
    calls={
        "prepare": (("GET", "prepare"),),  # prepare_spec's image lookup, an API call like AWS's SSM read
        "create": (("POST", "create"),),
        "get": (("GET", "get"),),
        "get_many": (("GET", "get_many"),),
        "destroy": (("DELETE", "destroy"),),
        "list": (("GET", "list"),),
    },
    page_size=1000,
)

PROFILES: dict[str, Profile] = {p.provider: p for p in (SIM, HETZNER, DIGITALOCEAN, AWS, GCP, OCI, AZURE)}


def parse_bucket(text: str, like: Bucket | None = None) -> Bucket:
    """A bucket override: ``"5@2/s"`` (a token bucket of 5 refilled 2 a second) or a ``limits`` window
    (``"250/minute"``; fixed if the bucket it replaces is). Raises ``ValueError`` naming the forms."""
    text = text.strip()
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*@\s*(\d+(?:\.\d+)?)\s*/\s*s", text):
        return Bucket(float(match[1]), float(match[2]), per_action=bool(like and like.per_action), source="override")
    try:
        parse(text)
    except ValueError as exc:
        raise ValueError(f"bucket {text!r}: use '<capacity>@<refill>/s' or a limits window like '250/minute'") from exc
    return Bucket(
        window=text, fixed=bool(like and like.fixed), per_action=bool(like and like.per_action), source="override"
    )


def seconds_until(epoch_s: float | None) -> float | None:
    return None if epoch_s is None else max(0.0, epoch_s - time.time())
