"""Listing and the job index: filters, paging, the index following every write, no key scans."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from vmqueue import jobindex
from vmqueue.jobindex import JobQuery
from vmqueue.models import Job, JobKind, JobState, VMInfo, VMSpec, VMStatus


def make(store, name: str, provider: str = "sim", labels: dict | None = None, **fields) -> Job:
    spec = VMSpec(provider=provider, name=name, region="r-1", instance_type="t", image="debian-12", labels=labels or {})
    job = Job(kind=JobKind.create, provider=provider, spec=spec, **fields)
    return store.add(job)


def run_to(store, job: Job, state: JobState) -> Job:
    """Take a create along the table's path to ``state`` (what a worker would write)."""
    path = [JobState.submitting, JobState.provisioning, JobState.running]
    for step in path[: path.index(state) + 1] if state in path else [state]:
        fields = {"instance_id": f"i-{job.id[:8]}"} if step == JobState.provisioning else {}
        if step == JobState.running:
            fields["vm"] = VMInfo(provider=job.provider, instance_id=f"i-{job.id[:8]}", status=VMStatus.running)
        job = store.transition(job.id, step, **fields)
    return job


def walk(list_page, query, limit: int) -> list[str]:
    ids, cursor = [], None
    while True:
        page = list_page(query, limit=limit, cursor=cursor)
        ids += [job.id for job in page.jobs]
        assert len(page.jobs) <= limit
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


def commands(redis_client, *names: str) -> int:
    stats = redis_client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in names)


def test_filters_and_pages_newest_first(provisioner, redis_client):
    store = provisioner.store
    jobs = []
    for i in range(60):
        labels = {"team": "web" if i % 2 else "db", "vmqueue-fleet": "f1" if i % 3 == 0 else "f2"}
        jobs.append(make(store, f"vm-{i % 4}", provider="sim" if i % 5 else "aws", labels=labels))
    failed = {job.id for job in jobs[::4]}
    for job_id in failed:
        store.transition(job_id, JobState.failed, "x")
    newest_first = [job.id for job in reversed(jobs)]

    def expect(keep) -> list[str]:
        return [job_id for job_id, job in zip(newest_first, reversed(jobs), strict=True) if keep(job)]

    assert walk(provisioner.list_jobs, {}, 7) == newest_first
    assert walk(provisioner.list_jobs, {"state": "failed"}, 4) == expect(lambda j: j.id in failed)
    assert walk(provisioner.list_jobs, {"state": "queued", "provider": "aws"}, 3) == expect(
        lambda j: j.id not in failed and j.provider == "aws"
    )
    assert walk(provisioner.list_jobs, {"labels": {"team": "web"}, "fleet": "f1"}, 5) == expect(
        lambda j: j.spec.labels["team"] == "web" and j.spec.labels["vmqueue-fleet"] == "f1"
    )
    assert walk(provisioner.list_jobs, {"name": "vm-2", "kind": "create"}, 50) == expect(
        lambda j: j.spec.name == "vm-2"
    )
    middle = jobs[30].created_at
    since = walk(provisioner.list_jobs, {"since": middle, "until": jobs[40].created_at}, 4)
    assert since == expect(lambda j: middle <= j.created_at <= jobs[40].created_at)
    assert walk(provisioner.list_jobs, {"labels": {"team": "none"}}, 5) == []
    assert walk(provisioner.list_jobs, {"state": "running"}, 5) == []


def test_a_sparse_intersection_walks_many_chunks_and_pages_through_them(provisioner):
    # Two filter sets of ~150 each that share only every 13th job: the walk spans several chunks.
    store = provisioner.store
    jobs = [make(store, f"vm-{i}", provider="aws" if i % 2 or i % 13 == 0 else "sim") for i in range(300)]
    for job in jobs[::2]:
        store.transition(job.id, JobState.failed, "x")
    expect = [j.id for i, j in reversed(list(enumerate(jobs))) if i % 2 == 0 and i % 13 == 0]
    assert walk(provisioner.list_jobs, {"state": "failed", "provider": "aws"}, 3) == expect
    assert walk(provisioner.list_jobs, {"state": "failed", "provider": "aws"}, 100) == expect


def test_every_write_moves_the_job_in_the_index(provisioner, redis_client):
    store = provisioner.store
    job = make(store, "web-1")
    assert redis_client.zscore("vmq:idx:state:queued", job.id) is not None
    job = run_to(store, job, JobState.running)
    assert redis_client.zscore("vmq:idx:state:queued", job.id) is None
    assert [j.id for j in provisioner.list_jobs({"state": "running"}).jobs] == [job.id]
    assert [j.id for j in provisioner.list_vms().jobs] == [job.id]  # a VM that lives
    assert redis_client.hget("vmq:idx:instances", f"sim/{job.instance_id}") == job.id

    # A destroy job that finds the VM gone tells the create job, which leaves the VM list.
    gone = store.add(Job(kind=JobKind.destroy, provider="sim", instance_id=job.instance_id))
    store.transition(gone.id, JobState.destroying)
    store.transition(gone.id, JobState.gone)
    assert provisioner.get_job(job.id).vm_destroyed_by == gone.id
    assert provisioner.list_vms().jobs == [] and redis_client.hlen("vmq:idx:instances") == 0
    # The same through the WATCH/MULTI path (a process that never saw the record: no cached copy).
    other = type(store)(store.redis, provisioner.settings)
    other.transition(make(store, "web-2").id, JobState.failed, "x")
    assert len(provisioner.list_jobs({"state": "failed"}).jobs) == 1


def test_the_newest_page_is_served_without_scanning_keys(provisioner, redis_client):
    for i in range(300):
        make(provisioner.store, f"vm-{i}")
    before = commands(redis_client, "scan", "keys")
    page = provisioner.list_jobs({"state": "queued"}, limit=50)
    assert len(page.jobs) == 50 and page.next_cursor
    assert commands(redis_client, "scan", "keys") == before


def test_an_expired_record_leaves_the_index(provisioner, redis_client):
    store = provisioner.store
    kept, lost = make(store, "kept", labels={"team": "a"}), make(store, "lost", labels={"team": "a"})
    redis_client.delete(f"vmq:job:{lost.id}")  # as if its TTL ran out
    assert [j.id for j in provisioner.list_jobs({"labels": {"team": "a"}}).jobs] == [kept.id]
    # The query forgot it everywhere (from vmq:idx:of), not only in the sets it walked.
    assert all(redis_client.zscore(key, lost.id) is None for key in redis_client.scan_iter("vmq:idx:*", _type="zset"))
    # The trim does the same for records nobody lists, past the job TTL.
    third = make(store, "third")
    redis_client.delete(f"vmq:job:{third.id}")
    assert jobindex.trim(redis_client, older_than=time.time() + 1) == 1
    assert redis_client.zscore("vmq:idx:all", third.id) is None and redis_client.hget("vmq:idx:of", third.id) is None


def test_bad_filters_are_refused_with_the_reason(provisioner):
    with pytest.raises(ValidationError, match="provider"):
        provisioner.list_jobs({"provider": "nimbus"})
    with pytest.raises(ValidationError, match="state"):
        provisioner.list_jobs({"state": "exploded"})
    with pytest.raises(ValidationError, match="label"):
        provisioner.list_jobs({"labels": {"Team": "x"}})
    with pytest.raises(ValidationError, match="since is after until"):
        now = datetime.now(UTC)
        provisioner.list_jobs({"since": now, "until": now - timedelta(seconds=1)})
    with pytest.raises(ValueError, match="limit must be 1..1000"):
        provisioner.list_jobs(limit=0)
    with pytest.raises(ValueError, match="cursor"):
        provisioner.list_jobs(cursor="yesterday")
    assert JobQuery(since=datetime(2030, 1, 1)).since.tzinfo == UTC  # no zone: UTC
