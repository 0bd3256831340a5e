"""Many jobs at once: a job store's lease, read and fenced write for a whole batch, a round trip each.

The tick (workers/lifecycle/settle.py) settles every job whose VM its batched read saw running.
Job by job that cost six round trips per job (its lease with its record, the compare-and-set, the
unwatch, the create's end, the release), each with a reply to parse on the tick's one thread, and
the last VMs of a big batch boot within seconds of each other. Here each of those is one pipeline
for the whole batch, and every write is still fenced by its own job's lease exactly as
``JobStore.update`` fences it: a job whose lease was lost changes nothing, the others still go through.

A friend of ``JobStore``: it uses the store's scripts, record cache and lease keeper, so a batch
write is the very write ``update`` makes (same script, same event, same index entries).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from vmqueue import keys
from vmqueue.jobstore import Due, InvalidTransition, JobStore, cas_arguments, queue_create_ended
from vmqueue.models import Job


@dataclass
class Held:
    """A job whose lease a batch took: the lease ``token``, the record as read (``raw``, and parsed:
    ``job``, None when there is no such job) and its next step as noted (``due``)."""

    job_id: str
    token: str
    raw: str | None
    job: Job | None
    due: Due | None


@dataclass
class Writes:
    """What ``JobBatch.update`` did, per job id.

    ``written``: the job as written (``raws``: its record). ``stale``: nothing written, the record
    changed since the batch read it (the caller does that job the ordinary way, which reads it
    afresh). ``refused``: nothing written, the lease was lost (another delivery acts on the job) or
    the change is not allowed.
    """

    written: dict[str, Job] = field(default_factory=dict)
    raws: dict[str, str] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class JobBatch:
    """Leases, fenced compare-and-sets, create ends and releases of many jobs, one pipeline each."""

    def __init__(self, store: JobStore):
        self.store = store

    def acquire(self, job_ids: Iterable[str], lease_s: float) -> dict[str, Held]:
        """Take the lease of each job and read its record and due, in one round trip.

        Returns the jobs whose lease is now ours (job id -> ``Held``); a job whose lease another
        holder has is left out, untouched.
        """
        ids = list(job_ids)
        tokens = [uuid.uuid4().hex for _ in ids]
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id, token in zip(ids, tokens, strict=True):
            pipe.set(keys.lock_key(job_id), token, nx=True, px=int(lease_s * 1000))
            pipe.get(keys.job_key(job_id))
            pipe.get(keys.due_key(job_id))
        replies = pipe.execute()
        held = {}
        for i, (job_id, token) in enumerate(zip(ids, tokens, strict=True)):
            acquired, raw, due = replies[3 * i : 3 * i + 3]
            if acquired:
                held[job_id] = Held(job_id, token, raw, self.store._parse(job_id, raw), Due.parse(due))
        return held

    @contextlib.contextmanager
    def kept(self, held: Iterable[Held], lease_s: float) -> Iterator[None]:
        """Renew the leases of ``held`` while the block runs (``LeaseKeeper``), as ``JobStore.fenced`` does."""
        pairs = [(h.job_id, h.token) for h in held]
        for job_id, token in pairs:
            self.store._keeper.hold(job_id, token, lease_s)
        try:
            yield
        finally:
            for job_id, token in pairs:
                self.store._keeper.drop(job_id, token)

    def update(self, changes: dict[str, tuple[Held, Callable[[Job], None]]], lease_s: float) -> Writes:
        """Apply each change (job id -> (its ``Held``, the change)) to the record as the batch read it:
        one pipeline of compare-and-sets, each fenced by its own job's lease (``lease_s``: how long a
        lease that ran out with nobody acting since is taken back for, as in ``JobStore.update``).

        Runs no transition hook: the caller calls ``JobStore.notify`` for each job written. Each
        ``Held.job`` is changed in place (parsed once); one not written gets its record as read back.
        """
        writes = Writes()
        pending: list[tuple[str, Job, str]] = []  # (job id, the job as written, its record)
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id, (held, change) in changes.items():
            try:
                job, new_raw, event, ops = self.store._change(job_id, held.job, change)
            except InvalidTransition:
                held.job = Job.model_validate_json(held.raw)  # undo what the change did
                writes.refused.append(job_id)
                continue
            script_keys, args = cas_arguments(
                job_id, held.raw, new_raw, event, self.store.settings, ops, held.token, lease_s
            )
            self.store._cas(keys=script_keys, args=args, client=pipe)
            pending.append((job_id, job, new_raw))
        if not pending:
            return writes
        for (job_id, job, new_raw), done in zip(pending, pipe.execute(), strict=True):
            held = changes[job_id][0]
            if done == 1:
                self.store._remember(job_id, new_raw)
                writes.written[job_id] = job
                writes.raws[job_id] = new_raw
            else:  # nothing written: the job as read is what an ordinary step starts from
                held.job = Job.model_validate_json(held.raw)
                (writes.refused if done == -1 else writes.stale).append(job_id)
        return writes

    def create_ended(self, job_ids: Iterable[str], vm_lives: bool) -> None:
        """``JobStore.create_ended`` for each job, in one round trip."""
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in job_ids:
            queue_create_ended(pipe, job_id, vm_lives, self.store.ttl_s)
        if len(pipe):
            pipe.execute()

    def release(self, held: Iterable[Held]) -> None:
        """Give back each lease that is still ours (noting no next step), in one round trip."""
        pipe = self.store.redis.pipeline(transaction=False)
        for h in held:
            self.store._release(keys=[keys.lock_key(h.job_id)], args=[h.token], client=pipe)
        if len(pipe):
            pipe.execute()
