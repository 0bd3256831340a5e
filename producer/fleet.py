"""Fleet files: many VMs across providers in one YAML file, validated as a whole before anything runs.

```yaml
fleet: web-demo                 # the fleet's name: part of every VM's idempotency key and label
defaults:                       # any VM field; a VM's own value wins (labels and options merge)
  provider: sim
  region: sim-1
  instance_type: small
  image: ubuntu-24.04
  ssh_key: ~/.ssh/id_ed25519.pub   # a file (relative to this file) or a key line
  script: init.sh                  # a startup script file (relative to this file)
  labels: {team: web}
  ttl_s: 86400                     # each VM is destroyed a day after apply created it (or expires_at:)
  ready_when: ssh               # apply waits until sshd answers (or cloud_init: until cloud-init is done)
vms:
  - name: web                   # with count: web-1, web-2, web-3
    count: 3
  - name: db-1
    instance_type: large
    labels: {role: db}
```

``load_fleet`` reports every problem at once, each with the line of the file it comes from: the
file is composed into a YAML node tree beside the data, and each pydantic error location is walked
down that tree to the node it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.submit import expiry
from vmqueue.models import LABEL_FLEET, CreateRequest, DeadlineS, Placement, VMSpec
from vmqueue.options import ProviderName
from vmqueue.readiness import ReadyVia, ReadyWhen

# Every VM of a fleet carries LABEL_FLEET, so the fleet's VMs can be found at the provider and in the job index.
MAX_COUNT = 1000
_KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-")  # a value starting like this is a key line, not a path


class VMFields(BaseModel):
    """What a VM entry and the fleet's ``defaults`` may set."""

    model_config = ConfigDict(extra="forbid")

    provider: ProviderName | None = None
    region: str | None = None
    instance_type: str | None = None
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    ssh_key: str | None = Field(None, description="public key file (relative to the fleet file) or key line")
    script: str | None = Field(None, description="startup script file, relative to the fleet file")
    deadline_s: DeadlineS | None = None
    fallbacks: list[Placement] | None = Field(
        None, description="placements to try in order when the provider has no capacity (region, instance_type)"
    )
    destroy_on_failure: bool | None = Field(None, description="destroy the VM of a failed create (default: true)")
    ttl_s: float | None = Field(None, gt=0, description="destroy the VM this many seconds after apply created it")
    expires_at: datetime | None = Field(None, description="destroy the VM at this time (with a zone: ...Z)")
    ready_when: ReadyWhen | None = Field(None, description="running (default), ssh or cloud_init: what apply waits for")
    ready_deadline_s: float | None = Field(None, gt=0, description="seconds from running to ready, else fail")
    ready_via: ReadyVia | None = Field(None, description="public (default) or private: the address SSH probes use")
    ssh_port: int | None = Field(None, ge=1, le=65535, description="the port SSH probes use (default: the VM's, 22)")


class VMEntry(VMFields):
    name: str = Field(min_length=1, description="the VM's hostname; with count, NAME-1 ... NAME-<count>")
    count: int | None = Field(None, ge=1, le=MAX_COUNT)


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: str = Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$", description="the fleet's name")
    defaults: VMFields = Field(default_factory=VMFields)
    vms: list[VMEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Problem:
    line: int | None  # 1-based line in the fleet file
    where: str
    message: str

    def format(self, path: Path) -> str:
        at = f"{path}:{self.line}" if self.line else str(path)
        return f"{at}: {self.where}: {self.message}" if self.where else f"{at}: {self.message}"


class FleetError(ValueError):
    """The fleet file is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.where))
        super().__init__("\n".join(p.format(path) for p in self.problems))


@dataclass(frozen=True)
class FleetVM:
    """One VM of the fleet, fully validated and ready to enqueue."""

    ident: str  # "<provider>/<name>": the VM's identity inside its fleet
    request: CreateRequest
    deadline_s: float | None
    line: int | None
    ttl_s: float | None = None
    expires_at: datetime | None = None
    destroy_on_failure: bool | None = None

    @property
    def name(self) -> str:
        return self.request.spec.name

    @property
    def provider(self) -> str:
        return self.request.spec.provider


@dataclass(frozen=True)
class Fleet:
    name: str
    path: Path
    vms: list[FleetVM]


def load_fleet(path: Path) -> Fleet:
    """Read and validate a fleet file; raises ``FleetError`` listing every problem with its line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetError(path, [Problem(None, "", f"cannot read the fleet file: {exc.strerror or exc}")]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise FleetError(path, [Problem(mark.line + 1 if mark else None, "", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict) or root is None:
        raise FleetError(path, [Problem(1, "", "a fleet file is a mapping with 'fleet', 'defaults' and 'vms'")])
    problems: list[Problem] = []
    skip: dict[int, set[str]] = {}
    try:
        parsed = FleetFile.model_validate(data)
        entries = list(enumerate(parsed.vms))
    except ValidationError as exc:
        problems = [_problem(root, e["loc"], e["msg"]) for e in exc.errors()]
        parsed, entries, skip = _valid_part(data, exc)
    if parsed is not None:
        problems += _expand(parsed, entries, root, path, vms := [], skip)
    if problems:
        raise FleetError(path, list(dict.fromkeys(problems)))
    return Fleet(parsed.fleet, path, vms)


_DEFAULTS = -1  # the key of the defaults' invalid fields in ``_valid_part``'s answer


def _valid_part(
    data: dict, exc: ValidationError
) -> tuple[FleetFile | None, list[tuple[int, VMEntry]], dict[int, set[str]]]:
    """The file without its invalid fields, so the rest of each entry is checked too (an invalid
    ``ready_when`` must not hide a missing ``instance_type``: all problems at once). Returns the
    header, the entries still valid enough to check (by index), and by entry index the fields left
    out (``_DEFAULTS``: of the defaults), whose problems were reported already."""
    invalid: dict[int, set[str]] = {}
    for error in exc.errors():
        loc = error["loc"]
        if loc[:1] == ("vms",) and len(loc) > 2 and isinstance(loc[1], int):
            invalid.setdefault(loc[1], set()).add(str(loc[2]))
        elif loc[:1] == ("vms",) and len(loc) == 2:
            invalid.setdefault(loc[1], set()).add("*")  # the entry is no mapping: nothing to check
        elif loc[:1] == ("defaults",) and len(loc) > 1:
            invalid.setdefault(_DEFAULTS, set()).add(str(loc[1]))
        else:
            return None, [], {}  # the fleet's name or the list itself is broken: nothing to expand reliably
    defaults = VMFields.model_validate(_without(data.get("defaults") or {}, invalid.get(_DEFAULTS, set())))
    entries = []
    for index, raw in enumerate(data["vms"]):
        if "*" in invalid.get(index, ()):
            continue
        try:
            entries.append((index, VMEntry.model_validate(_without(raw, invalid.get(index, set())))))
        except ValidationError:  # its name was what is invalid: the rest has no VM to name
            continue
    # Every error is inside an entry or the defaults, so the fleet's name is valid as it stands.
    return FleetFile.model_construct(fleet=data["fleet"], defaults=defaults), entries, invalid


def _without(raw: dict, fields: set[str]) -> dict:
    return {key: value for key, value in raw.items() if key not in fields}


def _expand(
    parsed: FleetFile,
    entries: list[tuple[int, VMEntry]],
    root: yaml.Node,
    path: Path,
    vms: list[FleetVM],
    skip: dict[int, set[str]] | None = None,
) -> list[Problem]:
    """Turn entries into validated VMs (appended to ``vms``); returns the problems found. ``skip``, by
    entry index (``_DEFAULTS``: the defaults): fields left out as invalid, not to be reported again
    (as "required", say)."""
    problems: list[Problem] = []
    files = _Files(path.parent)
    seen: dict[str, int | None] = {}
    skip = skip or {}
    for index, entry in entries:
        # An entry's own invalid fields, and the defaults' ones it does not set itself.
        skipped = skip.get(index, set()) | (skip.get(_DEFAULTS, set()) - entry.model_fields_set)
        fields = _merge(parsed.defaults, entry)
        names = [f"{entry.name}-{n}" for n in range(1, entry.count + 1)] if entry.count else [entry.name]
        entry_line = _line(root, ("vms", index))
        where = f"vms[{index}]"
        inputs: dict[str, Any] = {}
        for field, loader in (("ssh_key", files.key), ("script", files.script)):
            try:
                inputs[field] = loader(fields[field])
            except ValueError as exc:
                if field not in skipped:
                    problems.append(_field_problem(root, index, entry, field, str(exc)))
        for name in names:
            spec = {
                "provider": fields["provider"],
                "name": name,
                "region": fields["region"],
                "instance_type": fields["instance_type"],
                "image": fields["image"],
                "labels": {**fields["labels"], LABEL_FLEET: parsed.fleet},
                "options": fields["options"],
                "fallbacks": fields["fallbacks"],
            }
            spec = {k: v for k, v in spec.items() if v is not None}  # unset reads "missing", not "not a string"
            try:
                # The spec on its own first: its problems show even when the key file is missing.
                valid = VMSpec.model_validate(spec)
                if len(inputs) < 2:
                    break
                request = CreateRequest(
                    spec=valid,
                    ssh_key=inputs["ssh_key"],
                    startup_script=inputs["script"],
                    ready_when=fields["ready_when"] or ReadyWhen.running,
                    ready_deadline_s=fields["ready_deadline_s"],
                    ready_via=fields["ready_via"] or ReadyVia.public,
                    ssh_port=fields["ssh_port"],
                )
            except ValidationError as exc:
                for error in exc.errors():
                    if _request_loc(error)[:1] not in {(field,) for field in skipped}:
                        problems.append(_request_problem(root, index, entry, name, error))
                break  # the members of a group share every field but the name: one report is enough
            ident = f"{request.spec.provider}/{name}"
            if ident in seen:
                problems.append(Problem(entry_line, where, f"{ident} is already defined on line {seen[ident]}"))
                continue
            seen[ident] = entry_line
            try:
                expiry(fields["ttl_s"], fields["expires_at"])
            except ValueError as exc:
                problems.append(Problem(entry_line, where, str(exc)))
                break
            vms.append(
                FleetVM(
                    ident, request, fields["deadline_s"], entry_line, fields["ttl_s"], fields["expires_at"],
                    fields["destroy_on_failure"],
                )
            )  # fmt: skip
    return problems


def _merge(defaults: VMFields, entry: VMEntry) -> dict[str, Any]:
    merged = defaults.model_dump()
    merged.update({k: v for k, v in entry.model_dump(exclude={"name", "count"}).items() if v is not None})
    merged["labels"] = {**defaults.labels, **entry.labels}
    merged["options"] = {**defaults.options, **entry.options}
    if entry.ttl_s is not None or entry.expires_at is not None:  # the entry's expiry replaces the defaults'
        merged["ttl_s"], merged["expires_at"] = entry.ttl_s, entry.expires_at
    return merged


class _Files:
    """Reads the key and script files a fleet names, once each, relative to the fleet file."""

    def __init__(self, base: Path):
        self.base = base
        self._cache: dict[str, str] = {}

    def key(self, value: str | None) -> str:
        if value is None:
            raise ValueError("no ssh_key: set one on the VM or in defaults (a .pub file or a key line)")
        if value.startswith(_KEY_PREFIXES):
            return value
        return self._read(value, "ssh_key file")

    def script(self, value: str | None) -> str | None:
        return None if value is None else self._read(value, "script file")

    def _read(self, value: str, what: str) -> str:
        if value not in self._cache:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else self.base / path
            try:
                self._cache[value] = path.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
        return self._cache[value]


# -- error locations -> file lines ----------------------------------------------------------------
_REQUEST_FIELDS = {"ssh_key": "ssh_key", "startup_script": "script"}


def _request_loc(error: dict) -> tuple:
    """A ``CreateRequest`` error's location in fleet-file terms: ``spec.region`` is ``region``,
    ``startup_script`` is ``script``."""
    loc = tuple(error["loc"])
    if loc[:1] == ("spec",):
        return loc[1:]
    if loc[:1] and loc[0] in _REQUEST_FIELDS:
        return (_REQUEST_FIELDS[loc[0]], *loc[1:])
    return loc


def _request_problem(root: yaml.Node, index: int, entry: VMEntry, name: str, error: dict) -> Problem:
    """A contract error of one VM, placed on the line of the entry (or default) that set the field."""
    loc = _request_loc(error)
    field = str(loc[0]) if loc else ""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required: set it on the VM or in defaults"
    where = f"vms[{index}] ({name})" + (f".{'.'.join(str(p) for p in loc)}" if loc else "")
    if field and field in entry.model_fields_set:
        line = _line(root, ("vms", index, *loc))
    elif field and _find(root, ("defaults", field)) is not None:
        line = _line(root, ("defaults", *loc))
    else:
        line = _line(root, ("vms", index))
    return Problem(line, where, message)


def _field_problem(root: yaml.Node, index: int, entry: VMEntry, field: str, message: str) -> Problem:
    if field in entry.model_fields_set or _find(root, ("defaults", field)) is None:
        return Problem(_line(root, ("vms", index, field)), f"vms[{index}].{field}", message)
    return Problem(_line(root, ("defaults", field)), f"defaults.{field}", message)


def _problem(root: yaml.Node, loc: tuple, message: str) -> Problem:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return Problem(_line(root, loc), where, message.removeprefix("Value error, "))


def _find(node: yaml.Node, loc: tuple) -> yaml.Node | None:
    for part in loc:
        node = _child(node, part)
        if node is None:
            return None
    return node


def _line(node: yaml.Node, loc: tuple) -> int:
    """The line of the deepest node ``loc`` reaches; parts the tree lacks are skipped, because pydantic
    adds its own (a union's tag such as ``options.sim``) and a missing field's place is its parent."""
    line = node.start_mark.line + 1
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue
        key_line = _key_line(node, part)
        node = child
        line = key_line if key_line is not None else node.start_mark.line + 1
    return line


def _child(node: yaml.Node, part: object) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == str(part):
                return value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def _key_line(node: yaml.Node, part: object) -> int | None:
    # A mapping's value may start on the next line; the key's own line is where a reader looks.
    if isinstance(node, yaml.MappingNode):
        for key, _value in node.value:
            if key.value == str(part):
                return key.start_mark.line + 1
    return None
