"""vmqueue's producer: the contract, the ``Provisioner`` client API and the ``vmq`` CLI."""

from producer.aclient import AsyncProvisioner
from producer.client import IdempotencyConflict, JobNotFound, JobTimeout, Provisioner
from vmqueue.events import JobChange
from vmqueue.models import Job, JobError, JobKind, JobState, VMInfo, VMSpec, VMStatus
from vmqueue.sshkeys import SSHPublicKey

__all__ = [
    "AsyncProvisioner",
    "IdempotencyConflict",
    "Job",
    "JobChange",
    "JobError",
    "JobKind",
    "JobNotFound",
    "JobState",
    "JobTimeout",
    "Provisioner",
    "SSHPublicKey",
    "VMInfo",
    "VMSpec",
    "VMStatus",
]
