"""The Provider protocol every adapter implements (documented stubs; adapters say "see the protocol").

An adapter knows nothing of Celery or the job store: it turns one call into provider API calls and
maps what comes back into ``VMInfo`` and the error taxonomy (``errors.py``). It never waits for a
VM to boot; the tasks poll ``get_vm``. Its SDK is imported lazily and its SDK retries are off.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from vmqueue.images import IMAGES
from vmqueue.models import VMInfo, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import OwnedResource
from workers.providers.errors import InvalidSpecError


@runtime_checkable
class Provider(Protocol):
    """One cloud. Raw states map to ``VMStatus`` through a table at the top of each adapter."""

    name: str

    def prepare_spec(self, spec: VMSpec) -> VMSpec:
        """Fix every create parameter once, before the first create call.

        Resolves a portable image alias to the native id (e.g. the AMI an SSM parameter names). The
        job store keeps the result, so every retry of the create sends the identical request.
        """
        ...

    def create_vm(
        self,
        spec: VMSpec,
        ssh_key: SSHPublicKey,
        startup_script: str | None = None,
        *,
        job_id: str,
        first_attempt: bool = False,
    ) -> VMInfo:
        """Ask the provider for one VM and return at once with its native ``instance_id``.

        Exactly one VM per ``job_id``, however often this runs (redelivery, lost answers): the
        adapter follows its provider's idempotency recipe and adopts a VM that carries the job's
        ownership label. The startup script goes in as cloud-init user-data; the SSH key the
        provider's way; labels are ``spec.ownership_labels(job_id)``.
        """
        ...

    def get_vm(self, instance_id: str) -> VMInfo:
        """One targeted read. Raises ``NotFoundError`` when the provider has no such VM."""
        ...

    def destroy_vm(self, instance_id: str) -> None:
        """Start deleting the VM and what the adapter created with it. Already gone = success."""
        ...

    def list_owned_vms(self) -> list[VMInfo]:
        """VMs that carry ``managed-by=vmqueue``, in one filtered list call where the API has one,
        following the API's pagination to the last page."""
        ...

    def list_owned_extras(self) -> list[OwnedResource]:
        """Every other resource the adapter creates with a VM that can outlive it, carrying
        ``managed-by=vmqueue`` (every page), with what it is attached to. An adapter whose extras all
        go with their VM (the provider deletes them with it) returns ``[]`` and says why."""
        ...

    def delete_extra(self, resource: OwnedResource) -> None:
        """Delete one resource ``list_owned_extras`` returned; already gone = success. Raises the
        taxonomy (a resource still in use: ``TransientError``, a later pass tries again)."""
        ...


# The statuses that end a create's wait. An adapter whose batched list is coarser than ``get_vm``
# (no IPs, say) reads a VM in one of these once more through ``get_vm``, since its VMInfo becomes the job's.
SETTLED_STATUSES: frozenset[VMStatus] = frozenset(
    {VMStatus.running, VMStatus.error, VMStatus.terminated, VMStatus.terminating}
)


@runtime_checkable
class BatchReads(Protocol):
    """Optional: adapters whose API reads many VMs in one call (coalesced polling, workers/watchlist.py)."""

    def get_vms(self, instance_ids: list[str]) -> dict[str, VMInfo]:
        """The VMs of ``instance_ids`` that exist, in as few calls as the API allows; absent = not found."""
        ...


def resolve_alias(provider: str, spec: VMSpec) -> VMSpec:
    """``prepare_spec`` for providers whose alias table holds the native image name itself."""
    if spec.image not in IMAGES[provider] and spec.image in ("ubuntu-22.04", "ubuntu-24.04", "debian-12"):
        raise InvalidSpecError(f"{provider} has no image for alias {spec.image!r}")
    native = IMAGES[provider].get(spec.image)
    return spec.model_copy(update={"image": native}) if native else spec
