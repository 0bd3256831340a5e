"""The contract shared by the producer and the workers (DESIGN §2).

Everything that crosses Redis is one of these models dumped with ``model_dump(mode="json")``.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vmqueue import sizes
from vmqueue.images import ALIASES as IMAGE_ALIASES
from vmqueue.images import IMAGES
from vmqueue.options import OPTIONS_MODELS, ProviderName, ProviderOptions, region_scope
from vmqueue.readiness import HostKey, ReadyVia, ReadyWhen, new_token, phone_home_config, phone_home_url
from vmqueue.sshkeys import SSHKeyField, SSHPublicKey
from vmqueue.userdata import PLAIN_LIMITS, cloud_configs, merge_user_data, sent_size

PROVIDERS: tuple[str, ...] = get_args(ProviderName)

# Providers that send the startup script as it is, and their limits in bytes. AWS, GCP and OCI send
# it wrapped or beside the SSH key: vmqueue.userdata.sent_size measures what they send.
USER_DATA_LIMIT_BYTES: dict[str, int] = PLAIN_LIMITS


# Ownership labels every VM carries, so leftovers can be found (DESIGN §3).
LABEL_MANAGED_BY = "managed-by"
LABEL_JOB = "vmqueue-job"
# A user label fleet files put on each of their VMs (producer/fleet.py); the job index serves it as ``fleet``.
LABEL_FLEET = "vmqueue-fleet"
RESERVED_LABELS = (LABEL_MANAGED_BY, LABEL_JOB)

_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The subset of label syntax every provider accepts (GCP is the strictest: lowercase values).
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_USER_LABELS = 20
MAX_DEADLINE_S = 86_400

# A job's deadline in seconds: refused at the producer when not positive (a VM would be created and
# destroyed at once) or beyond a day. The Python API, the HTTP API, fleet files and the CLI share it.
DeadlineS = Annotated[
    float, Field(gt=0, le=MAX_DEADLINE_S, description="seconds from enqueue until running (create) or gone")
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class VMStatus(StrEnum):
    """Normalized VM status; every adapter maps each raw state its API documents to one of these."""

    pending = "pending"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"
    terminating = "terminating"
    terminated = "terminated"
    error = "error"
    unknown = "unknown"


_NATIVE = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
MAX_FALLBACKS = 10


class Placement(BaseModel):
    """Another place to try when the provider has no capacity: a region (GCP: zone), a type, options.

    Each field left out is the spec's. ``options`` replace the spec's options key by key for this
    placement (a subnet, availability domain or zone of its own); a placement in another region
    must give every region-scoped option the spec sets (``VMSpec`` refuses it otherwise).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str | None = Field(None, min_length=1, max_length=128, pattern=_NATIVE)
    instance_type: str | None = Field(None, min_length=1, max_length=128, pattern=_NATIVE)
    size: str | None = Field(None, description="the portable size alias instance_type was given as")
    options: dict[str, Any] | None = Field(None, description="provider options replacing the spec's, key by key")

    @model_validator(mode="after")
    def _says_something(self) -> Placement:
        if self.region is None and self.instance_type is None and not self.options:
            raise ValueError("a fallback needs a region, an instance_type or options")
        return self


class VMSpec(BaseModel):
    """What to create. ``options`` is parsed into the provider's own options model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName
    name: str = Field(description="hostname: lowercase letters, digits, hyphens; at most 63")
    region: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="provider-native: Hetzner location, DO region, AWS region, GCP zone, OCI region, Azure location",
    )
    instance_type: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description=f"a portable size ({', '.join(sizes.ALIASES)}) or a provider-native type",
    )
    size: str | None = Field(None, description="the portable size alias instance_type was given as, if any")
    image: str = Field(
        min_length=1,
        max_length=512,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$",
        description=f"a portable alias ({', '.join(IMAGE_ALIASES)}) or a provider-native image id",
    )
    labels: dict[str, str] = Field(default_factory=dict)
    options: ProviderOptions | None = None
    fallbacks: list[Placement] = Field(
        default_factory=list,
        max_length=MAX_FALLBACKS,
        description="tried in order when the provider reports no capacity (region and/or instance type)",
    )

    @field_validator("name")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not _HOSTNAME.match(value):
            raise ValueError(
                "must be a hostname: 1-63 lowercase letters, digits or hyphens, "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > MAX_USER_LABELS:
            raise ValueError(f"at most {MAX_USER_LABELS} labels")
        for key, value in labels.items():
            if key in RESERVED_LABELS:
                raise ValueError(f"label {key!r} is reserved for vmqueue's ownership labels")
            if not LABEL_KEY.match(key):
                raise ValueError(
                    f"label key {key!r}: 1-63 of a-z 0-9 _ -, starting with a letter (portable to all providers)"
                )
            if not LABEL_VALUE.match(value):
                raise ValueError(f"label {key!r} value {value!r}: 0-63 of a-z 0-9 _ - (portable to all providers)")
        return labels

    @model_validator(mode="before")
    @classmethod
    def _options_of_provider(cls, data: Any) -> Any:
        # Tag the options with the spec's provider, so they parse with that provider's model.
        if isinstance(data, dict) and data.get("provider") in OPTIONS_MODELS:
            data = _resolve_sizes(data)
            raw = data.get("options")
            if raw is None:
                data = {**data, "options": {"provider": data["provider"]}}
            elif isinstance(raw, dict):
                if raw.get("provider", data["provider"]) != data["provider"]:
                    raise ValueError(
                        f"options: given for {raw['provider']!r}, but the spec is for {data['provider']!r}"
                    )
                data = {**data, "options": {**raw, "provider": data["provider"]}}
        return data

    @model_validator(mode="after")
    def _image_exists(self) -> VMSpec:
        if self.image in IMAGE_ALIASES and self.image not in IMAGES[self.provider]:
            have = ", ".join(IMAGES[self.provider])
            raise ValueError(
                f"image: alias {self.image!r} has no {self.provider} image; use one of {have} or a native image id"
            )
        return self

    @model_validator(mode="after")
    def _flex_shapes(self) -> VMSpec:
        opts = self.options
        if self.provider == "oci" and self.instance_type.endswith(".Flex"):
            if opts is None or opts.ocpus is None or opts.memory_gb is None:  # type: ignore[union-attr]
                raise ValueError("options: OCI Flex shapes need options.ocpus and options.memory_gb")
        return self

    @model_validator(mode="after")
    def _fallbacks_carry_their_options(self) -> VMSpec:
        """Each fallback's options parse, and one in another region gives its own region-scoped options."""
        here = region_scope(self.provider, self.region)
        scoped = type(self.options).REGION_SCOPED if self.options is not None else ()
        set_here = self.options.model_fields_set if self.options is not None else set()
        for i, place in enumerate(self.fallbacks):
            try:
                there = self.at_placement(i + 1)
            except ValidationError as exc:
                said = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"fallbacks[{i}].options.{said}") from None
            if region_scope(self.provider, there.region) == here:
                continue
            # A default written out by a JSON round trip (the job store's) is set but names nothing.
            kept = [
                name
                for name in scoped
                if name in set_here
                and getattr(self.options, name) not in (None, [])
                and name not in (place.options or {})
            ]
            if kept:
                raise ValueError(
                    f"fallbacks[{i}] moves to {there.region}, but options {', '.join(kept)} name resources of "
                    f"{self.region}; give them for {there.region} in the fallback's options"
                )
        return self

    def at_placement(self, index: int) -> VMSpec:
        """The spec to send for placement ``index``: 0 is the spec itself, then each fallback in order.

        Raises ValueError (a pydantic ValidationError) when the fallback's options do not parse.
        """
        if index == 0:
            return self.model_copy(update={"fallbacks": []})
        place = self.fallbacks[index - 1]
        options = self.options
        if place.options:
            base = self.options.model_dump() if self.options is not None else {}
            options = OPTIONS_MODELS[self.provider].model_validate({**base, **place.options, "provider": self.provider})
        return self.model_copy(
            update={
                "region": place.region or self.region,
                "instance_type": place.instance_type or self.instance_type,
                "size": place.size if place.instance_type else self.size,
                "options": options,
                "fallbacks": [],
            }
        )

    def ownership_labels(self, job_id: str) -> dict[str, str]:
        """The user's labels plus the ownership labels every VM carries."""
        return {**self.labels, LABEL_MANAGED_BY: "vmqueue", LABEL_JOB: job_id}


def attempt_key(job_id: str, placement: int) -> str:
    """The job id an adapter gets (its idempotency token and ``vmqueue-job`` label) for one placement.

    It changes only with the placement, so a failover never reuses the token of the attempt before.
    """
    return job_id if placement == 0 else f"{job_id}-p{placement}"


def job_id_of(label_value: str) -> str:
    """The job id behind a ``vmqueue-job`` label value (see ``attempt_key``)."""
    return re.sub(r"-p\d+$", "", label_value)


def _resolve_sizes(data: dict[str, Any]) -> dict[str, Any]:
    """Replace a portable size alias (the spec's and each fallback's) by the provider's type, keeping the
    alias in ``size``; an OCI alias also sets the Flex shape's ``ocpus`` and ``memory_gb`` options."""
    provider, region = data["provider"], data.get("region")
    alias = data.get("instance_type")
    if sizes.is_alias(alias) and isinstance(region, str):
        native, extra = sizes.resolve(provider, region, alias)
        options = data.get("options")
        options = options.model_dump() if isinstance(options, BaseModel) else dict(options or {})
        _refuse_overlap(extra, options, "options")
        data = {**data, "instance_type": native, "size": alias}
        if extra:
            data["options"] = {**options, **extra}
    fallbacks = data.get("fallbacks")
    if isinstance(fallbacks, list):
        data = {**data, "fallbacks": [_resolve_placement(provider, region, place) for place in fallbacks]}
    return data


def _resolve_placement(provider: str, spec_region: Any, place: Any) -> Any:
    if isinstance(place, BaseModel):
        place = place.model_dump(exclude_none=True)
    if not isinstance(place, dict) or not sizes.is_alias(place.get("instance_type")):
        return place
    region = place.get("region") or spec_region
    if not isinstance(region, str):
        return place
    native, extra = sizes.resolve(provider, region, place["instance_type"])
    options = dict(place.get("options") or {})
    _refuse_overlap(extra, options, "fallback options")
    resolved = {**place, "instance_type": native, "size": place["instance_type"]}
    if extra:
        resolved["options"] = {**options, **extra}
    return resolved


def _refuse_overlap(extra: dict[str, Any], options: dict[str, Any], where: str) -> None:
    given = [name for name in extra if options.get(name) is not None]
    if given:
        raise ValueError(
            f"{where}: {', '.join(given)} come from the size alias; give a native shape to set them yourself"
        )


def check_startup_script(
    provider: str,
    script: str | None,
    ssh_key: SSHPublicKey | None = None,
    options: Any = None,
    image: str = "",
) -> str | None:
    """Size and format check of a startup script (cloud-init user-data) for one provider.

    With ``ssh_key`` the size is that of what the provider's adapter sends (vmqueue.userdata: on AWS
    the MIME document with the key, on OCI the metadata with the key...); without, the script's own.
    """
    if script is None:
        return None
    if not script.strip():
        raise ValueError("startup_script is empty; omit it instead")
    if ssh_key is not None:
        native_image = IMAGES[provider].get(image, image) if provider in IMAGES else image
        size, limit, what = sent_size(provider, options, ssh_key, script, native_image)
        if size > limit:
            raise ValueError(
                f"startup_script is {size} bytes as sent to {provider} ({what}); "
                f"{provider} accepts at most {limit} bytes"
            )
    elif len(script.encode()) > USER_DATA_LIMIT_BYTES.get(provider, 16 * 1024):
        limit = USER_DATA_LIMIT_BYTES.get(provider, 16 * 1024)
        raise ValueError(f"startup_script is {len(script.encode())} bytes; {provider} accepts at most {limit} bytes")
    first = script.lstrip().split("\n", 1)[0].strip()
    if first.startswith("#cloud-config"):
        try:
            document = yaml.safe_load(script)
        except yaml.YAMLError as exc:
            # Only the problem and its place: PyYAML's own message quotes the script's lines.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"startup_script is #cloud-config but not valid YAML: {problem}{where}") from None
        if document is not None and not isinstance(document, dict):
            raise ValueError("startup_script is #cloud-config but its YAML is not a mapping")
    elif not (first.startswith("#!") or first.startswith("#include") or first.lower().startswith("content-type:")):
        raise ValueError(
            "startup_script must start with '#!' (a shell script), '#cloud-config', '#include' "
            "or a MIME 'Content-Type:' header, as cloud-init expects"
        )
    return script


def check_phone_home(script: str | None, context: dict | None) -> str:
    """``ready_when=cloud_init`` needs a base URL the VMs can reach (``context["ready_base_url"]``,
    checked where the context is given: the producer) and a script without a phone_home of its own.
    Returns the user-data as it will be sent (with a stand-in token of the real one's length), whose
    size the caller checks."""
    base_url = (context or {}).get("ready_base_url", "https://unchecked.invalid")
    if not base_url:
        raise ValueError(
            "ready_when=cloud_init needs VMQ_READY_BASE_URL: the URL at which VMs reach vmqueue's HTTP API"
        )
    if any("phone_home" in doc for doc in cloud_configs(script)):
        raise ValueError("startup_script has a phone_home of its own; ready_when=cloud_init needs cloud-init's")
    return merge_user_data(script, phone_home_config(phone_home_url(base_url, uuid.uuid4().hex, new_token())))


class CreateRequest(BaseModel):
    """A create job's input, validated as a whole before anything is enqueued.

    Its errors never quote the input: a startup script may hold secrets, and a web backend logs
    ``str()`` of the error (``hide_input_in_errors``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    spec: VMSpec
    ssh_key: SSHKeyField
    startup_script: str | None = None
    ready_when: ReadyWhen = Field(ReadyWhen.running, description="running (default), ssh or cloud_init")
    ready_deadline_s: float | None = Field(None, gt=0, le=86_400, description="seconds from running to ready")
    ready_via: ReadyVia = Field(ReadyVia.public, description="the address SSH probes use: public or private")
    ssh_port: int | None = Field(
        None, ge=1, le=65535, description="the port SSH probes use (default: the VM's sshd port, 22 on stock images)"
    )

    @model_validator(mode="after")
    def _script_fits(self, info: ValidationInfo) -> CreateRequest:
        # ready_when=cloud_init: what is sent is the script with the phone_home merged in; measure that.
        script = self.startup_script
        if self.ready_when == ReadyWhen.cloud_init:
            script = check_phone_home(self.startup_script, info.context)
        # Every placement: options that decide the wrapping (an AWS key pair) may differ per placement.
        for index in range(len(self.spec.fallbacks) + 1):
            spec = self.spec.at_placement(index)
            try:
                check_startup_script(spec.provider, script, self.ssh_key, spec.options, spec.image)
            except ValueError as exc:
                if script is self.startup_script:
                    raise
                raise ValueError(f"{exc} (with the phone_home that ready_when=cloud_init adds)") from None
        return self


class InstanceRef(BaseModel):
    """A VM addressed by provider and native id, for get and destroy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName
    # Native ids: numbers, i-..., OCIDs, ARM ids (which start with "/" and may hold parentheses).
    instance_id: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z0-9/][A-Za-z0-9._:/@+()-]*$")


class VMInfo(BaseModel):
    provider: str
    instance_id: str
    name: str | None = None
    status: VMStatus
    provider_status: str | None = Field(None, description="the raw state string of the provider")
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    private_ipv4: str | None = None
    region: str | None = None
    instance_type: str | None = None
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    # Where the VM's sshd listens, when the provider knows (the sim: its host's sshd, VMQ_SIM_SSH_PORT);
    # None: wherever the image puts it, 22 on every stock image. SSH probes go here unless the job says.
    ssh_port: int | None = None


class JobKind(StrEnum):
    create = "create"
    destroy = "destroy"
    get = "get"


class JobState(StrEnum):
    queued = "queued"  # recorded and enqueued; no worker has acted on it yet
    submitting = "submitting"  # create: the provider call is being sent (safe to repeat: idempotent)
    provisioning = "provisioning"  # create: the provider returned an instance id; polling until running
    running = "running"  # create: the VM runs (final, unless ready_when asks for more: see Job.awaiting_ready)
    ready = "ready"  # create with ready_when ssh or cloud_init: the VM is usable (final)
    destroying = "destroying"  # destroy: the delete call is sent or being sent; polling until gone
    gone = "gone"  # destroy: the provider no longer has the VM (final)
    done = "done"  # get: the VM was read (final)
    failed = "failed"  # any kind: ended in error, see Job.error (final)
    # any kind: taken back by its owner (final); a create whose VM exists also has a cleanup
    cancelled = "cancelled"


FINAL_STATES = frozenset(
    {JobState.running, JobState.ready, JobState.gone, JobState.done, JobState.failed, JobState.cancelled}
)

# Every allowed state change; the job store refuses the rest (compare-and-set).
# -> cancelled: queued by the producer (no worker acted yet); submitting, provisioning and running by
# the worker that holds the job's lease, at a check before it calls the provider (Job.cancel).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset(
        {JobState.submitting, JobState.destroying, JobState.done, JobState.failed, JobState.cancelled}
    ),
    JobState.submitting: frozenset({JobState.submitting, JobState.provisioning, JobState.failed, JobState.cancelled}),
    # provisioning -> submitting: a capacity failover after the provider reported the VM never came to be.
    JobState.provisioning: frozenset(
        {JobState.provisioning, JobState.running, JobState.failed, JobState.submitting, JobState.cancelled}
    ),
    # A destroy is cancellable only while queued: once destroying, its delete may be on the wire.
    JobState.destroying: frozenset({JobState.destroying, JobState.gone, JobState.failed}),
    # A running create's owner may still take the request back: the VM is destroyed (cleanup).
    # -> ready / failed: only while the job awaits readiness (ready_when ssh or cloud_init;
    # ``transition_allowed`` checks it).
    JobState.running: frozenset({JobState.cancelled, JobState.ready, JobState.failed}),
    JobState.ready: frozenset({JobState.cancelled}),
    JobState.gone: frozenset(),
    JobState.done: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}

# The ways out of ``running`` that exist only while a job awaits readiness (ready_when ssh/cloud_init).
READINESS_EXITS = frozenset({JobState.ready, JobState.failed})


def transition_allowed(before: JobState, to: JobState, awaiting_ready: bool) -> bool:
    """Whether the table allows ``before -> to`` for a job that does (or does not) await readiness:
    a plain running job (ready_when=running) never becomes ready or failed."""
    if to not in TRANSITIONS[before]:
        return False
    return awaiting_ready or before != JobState.running or to not in READINESS_EXITS


class CleanupState(StrEnum):
    """Destroy-on-failure of a create job whose VM exists (DESIGN §3: no VM outlives its job)."""

    pending = "pending"  # the job failed with a VM; the destroy is scheduled
    destroying = "destroying"  # destroy sent; waiting for the provider to report it gone
    done = "done"  # the VM is gone
    failed = "failed"  # the destroy itself failed; see the history, the sweeper will find it
    skipped = "skipped"  # destroy_on_failure was off


class JobError(BaseModel):
    code: str = Field(description="auth, invalid_spec, not_found, quota_exceeded, capacity, rate_limited, ...")
    message: str
    retryable: bool = False
    provider_code: str | None = None


class CancelRequest(BaseModel):
    """Who took a job back and when; recorded by ``Provisioner.cancel``, acted on by the job's worker."""

    by: str = Field(min_length=1, max_length=200, description="who asked: a user, an API key's name, a service")
    at: datetime = Field(default_factory=utcnow)
    reason: str = Field("", max_length=500)
    # When a worker ran the transition hooks (metrics, webhooks) for the cancel: a queued job's cancel
    # is written by the producer, whose process has no hooks; the job's next message reports it.
    reported_at: datetime | None = None


class WebhookDelivery(BaseModel):
    """One attempt to deliver a webhook (workers/webhooks.py), as recorded on the job."""

    event: str = Field(description="job.running, job.failed, job.gone, job.done, job.cancelled")
    attempt: int
    at: datetime = Field(default_factory=utcnow)
    outcome: str = Field(description="delivered, retrying, gave_up, or refused (the URL or its address is not allowed)")
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


MAX_DELIVERIES = 30


def message_detail(state: str, message: str) -> str:
    """A history message without a leading repeat of its state: what it adds to the state (``""``
    for ``running`` / ``running``, ``capacity: ...`` for ``failed`` / ``failed: capacity: ...``)."""
    return re.sub(rf"^{re.escape(state)}(?![\w-])[\s:]*", "", message)


class JobEvent(BaseModel):
    at: datetime = Field(default_factory=utcnow)
    state: JobState
    message: str = ""

    @property
    def detail(self) -> str:
        """What the message adds to the state (``message_detail``)."""
        return message_detail(self.state, self.message)

    @property
    def line(self) -> str:
        """The event as a history line reads after its time: the state, a colon, then the message, the state
        said once (``running``, not ``running running``; ``failed: capacity: ...``, not ``failed
        failed: capacity: ...``). A message that begins with the state is the line as it stands."""
        if self.detail != self.message:
            return self.message
        # A colon between them: "gone: the provider reports the VM deleted", not one run-on sentence.
        return f"{self.state}: {self.message}" if self.message else str(self.state)


MAX_HISTORY = 50


class Phase(StrEnum):
    """A stretch of a job with its own attempt budget and deadline (``Job.phases``)."""

    submit = "submit"  # create: prepare_spec and the create call, per placement
    poll = "poll"  # create: reads until the VM runs
    cleanup = "cleanup"  # create that failed with a VM: delete and read until gone
    destroy = "destroy"  # destroy job: delete and read until gone
    get = "get"  # get job: one read


class PhaseBudget(BaseModel):
    """How much of one phase's budget a job has used: failed provider calls, and when it began."""

    failures: int = Field(0, description="retryable failures so far; the phase fails at VMQ_MAX_ATTEMPTS")
    started_at: datetime | None = None


class Phases(BaseModel):
    """One budget per phase, so a create that used all its attempts still leaves its cleanup a full one.

    A later phase (cancel, readiness) adds a field here and spends it through the lifecycle's
    ``FailureSteps._call_failed(job, exc, count, phase)``.
    """

    submit: PhaseBudget = Field(default_factory=PhaseBudget)
    poll: PhaseBudget = Field(default_factory=PhaseBudget)
    cleanup: PhaseBudget = Field(default_factory=PhaseBudget)
    destroy: PhaseBudget = Field(default_factory=PhaseBudget)
    get: PhaseBudget = Field(default_factory=PhaseBudget)

    def of(self, phase: Phase) -> PhaseBudget:
        return getattr(self, phase.value)


class Job(BaseModel):
    """A job as the job store keeps it; the startup script is stored beside it, never in it."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind
    provider: ProviderName
    state: JobState = JobState.queued
    spec: VMSpec | None = None
    ssh_key: str | None = None  # public key line; not a secret
    has_startup_script: bool = False
    instance_id: str | None = None
    vm: VMInfo | None = None
    error: JobError | None = None
    attempts: int = 0
    api_calls: int = 0
    placement: int = 0  # which of spec's placements is being tried: 0 the spec, then its fallbacks
    # What is sent to the provider for the current placement, fixed once by the adapter's prepare_spec
    # (e.g. the AMI an alias resolved to), so every retry sends the identical request.
    prepared_spec: VMSpec | None = None
    polls: int = 0
    created_at: datetime = Field(default_factory=utcnow)  # recorded by the producer: the deadline counts from here
    updated_at: datetime = Field(default_factory=utcnow)
    # Set once the job's first message is published; until then the record is not runnable and the
    # rescue fails it instead of sending it (a publish that failed in a Redis outage).
    enqueued_at: datetime | None = None
    submitted_at: datetime | None = None  # the create call was first sent
    delete_sent_at: datetime | None = None  # the delete call went out (destroy job, or cleanup of a create)
    # First NotFound of the VM before any read saw it: confirmed by later reads (eventual consistency).
    not_found_since: datetime | None = None
    deadline_s: DeadlineS = 600.0  # counted from enqueue (created_at): time in the queue counts
    phases: Phases = Field(default_factory=Phases)
    destroy_on_failure: bool = True
    cleanup: CleanupState | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None  # fingerprint of the request, for idempotency-key reuse checks
    # Set once by Provisioner.cancel; the job ends ``cancelled`` at the worker's next check.
    cancel: CancelRequest | None = None
    # Create only: when the VM is destroyed by an ordinary destroy job (Provisioner.extend moves it).
    expires_at: datetime | None = None
    expiry_job_id: str | None = None  # the destroy job expiry enqueued (set once it fired; no extend after)
    expired_at: datetime | None = None  # when that destroy job was enqueued
    vm_destroyed_by: str | None = None  # create only: the destroy job that found this job's VM gone
    callback_url: str | None = None  # webhooks go here (vmqueue/webhooks.py)
    webhooks: list[WebhookDelivery] = Field(default_factory=list)  # every delivery attempt, last MAX_DELIVERIES
    history: list[JobEvent] = Field(default_factory=list)
    # Readiness (vmqueue/readiness.py): what ends a create, and the phases on the way there.
    ready_when: ReadyWhen = ReadyWhen.running
    ready_deadline_s: float = 600.0  # from running_at
    ready_via: ReadyVia = ReadyVia.public
    ssh_port: int | None = None  # None: the VM's sshd port (VMInfo.ssh_port), else 22; see probe_port
    running_at: datetime | None = None  # the worker saw the provider report the VM running
    ready_at: datetime | None = None  # ready_when was met (ssh answered, cloud-init phoned home)
    phoned_home_at: datetime | None = None  # cloud-init's post arrived (possibly before running was seen)
    host_keys: list[HostKey] = Field(default_factory=list)
    # ready_when=cloud_init: the digest of the phone-home token, set by the producer; the job store
    # writes it beside the record (keys.ready_token_key), never into it.
    _ready_token_digest: str | None = PrivateAttr(default=None)

    @property
    def awaiting_ready(self) -> bool:
        """Running, and ``ready_when`` asks for more: the job goes on to ``ready`` (or fails)."""
        return self.state == JobState.running and self.ready_when != ReadyWhen.running

    @property
    def probe_port(self) -> int:
        """The port SSH readiness probes use: the job's ``ssh_port``, else the port the VM reports its
        sshd on (``VMInfo.ssh_port``: the sim's), else 22."""
        return self.ssh_port or (self.vm.ssh_port if self.vm else None) or 22

    @property
    def final(self) -> bool:
        """In a state the job never leaves."""
        return self.state in FINAL_STATES and not self.awaiting_ready

    @property
    def succeeded(self) -> bool:
        """Ended as asked: running (or ready, when ready_when asks for more), gone, done; not failed or cancelled."""
        return self.final and self.state not in (JobState.failed, JobState.cancelled)

    @property
    def cancel_pending(self) -> bool:
        """A cancel was asked for but the job's worker has not acted on it yet."""
        return self.cancel is not None and self.state != JobState.cancelled

    @property
    def deadline_at(self) -> datetime:
        """When the job's deadline passes: ``deadline_s`` after it was recorded (queue time counts)."""
        return self.created_at + timedelta(seconds=self.deadline_s)

    @property
    def finished(self) -> bool:
        return (
            self.final
            and self.cleanup not in (CleanupState.pending, CleanupState.destroying)
            and not self.cancel_pending
        )

    @property
    def vm_lives(self) -> bool:
        """A create whose VM exists (or may, while booting): provisioning, running, or failed or
        cancelled with a cleanup not done yet (or skipped, or failed); not once a destroy job took it."""
        if self.kind != JobKind.create or self.instance_id is None or self.vm_destroyed_by is not None:
            return False
        if self.state in (JobState.provisioning, JobState.running, JobState.ready):
            return True
        return self.cleanup is not None and self.cleanup != CleanupState.done

    def record(self, message: str) -> None:
        self.history.append(JobEvent(state=self.state, message=message))
        del self.history[:-MAX_HISTORY]
