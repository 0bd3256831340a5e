"""The tick settles the jobs whose VM it saw running all at once (workers/lifecycle/settle.py,
vmqueue/jobbatch.py): a few round trips for the whole batch, with every guarantee of settling them
one by one (a busy lease skips the job, a lost lease changes nothing, a cancel still ends the job).

Drives the real ``JobRunner`` in this process against the session's real Redis and the sim adapter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from bench.harness import sim_spec
from vmqueue import keys
from vmqueue.connection import connect
from vmqueue.jobbatch import JobBatch
from vmqueue.jobstore import TRANSITION_HOOKS, JobStore
from vmqueue.models import CancelRequest, CleanupState, Job, JobKind, JobState, VMSpec
from vmqueue.settings import Settings
from workers.calls import SharedRateLimit
from workers.lifecycle import JobRunner
from workers.providers.sim import SimProvider


@pytest.fixture
def ticking(settings: Settings, redis_client: redis.Redis, sim) -> Iterator[tuple[JobRunner, list, list]]:
    """A runner with a tick chain (the ticks it starts and the jobs it hands back are recorded)."""
    sim.configure(boot_s=0.2)
    tickers: list[tuple[str, str]] = []
    handed: list[tuple] = []
    runner = JobRunner(
        JobStore(connect(settings), settings),
        settings,
        lambda _: SimProvider(redis_client),
        SharedRateLimit(settings),
        start_ticker=lambda provider, token: tickers.append((provider, token)),
        start_job=lambda *args: handed.append(args),
    )
    yield runner, tickers, handed


@pytest.fixture
def transitions() -> Iterator[list[tuple[str, JobState]]]:
    """Every (job id, state) the transition hooks see in this process."""
    seen: list[tuple[str, JobState]] = []

    def hook(job: Job) -> None:
        seen.append((job.id, job.state))

    TRANSITION_HOOKS.append(hook)
    yield seen
    TRANSITION_HOOKS.remove(hook)


def watched_jobs(runner: JobRunner, ssh_key: str, n: int, **fields: object) -> list[str]:
    """``n`` create jobs submitted and on the watch list, their VMs booting."""
    ids = []
    for i in range(n):
        job = Job(kind=JobKind.create, provider="sim", spec=VMSpec(**sim_spec(f"st-{i}")), ssh_key=ssh_key, **fields)
        runner.store.add(job)
        seq = 0
        while runner.store.get(job.id).state != JobState.provisioning:
            outcome = runner.run(job.id, JobKind.create, seq)
            assert outcome is not None
            seq = outcome.seq
            time.sleep(min(outcome.countdown_s, 0.5))
        ids.append(job.id)
    assert set(j for j, _ in runner.watch.members("sim").values()) == set(ids)
    return ids


def tick(runner: JobRunner, tickers: list) -> None:
    time.sleep(0.3)  # the VMs boot (sim boot_s 0.2)
    runner.tick("sim", tickers[0][1])


def running_lines(job: Job) -> int:
    return sum(1 for entry in job.history if entry.state == JobState.running)


def test_a_busy_job_is_left_untouched_for_the_next_tick_and_the_others_settle(ticking, ssh_key, transitions):
    runner, tickers, handed = ticking
    ids = watched_jobs(runner, ssh_key, 4)
    transitions.clear()
    busy = ids[1]
    redis_ = runner.store.redis
    redis_.set(keys.lock_key(busy), "another-holder", px=60_000)  # its own chain acts on it now
    before = redis_.get(keys.job_key(busy))
    tick(runner, tickers)
    assert redis_.get(keys.job_key(busy)) == before  # untouched
    assert redis_.get(keys.lock_key(busy)) == "another-holder"
    settled = [j for j in ids if j != busy]
    for job_id in settled:
        job = runner.store.get(job_id)
        assert job.state == JobState.running and job.running_at is not None and job.polls == 1
        assert running_lines(job) == 1
        assert redis_.ttl(keys.job_key(job_id)) == -1  # its VM lives: the record never expires
        assert not redis_.exists(keys.script_key(job_id), keys.lock_key(job_id))
    assert sorted(transitions) == sorted((j, JobState.running) for j in settled)  # each hook once
    assert [j for j, _ in runner.watch.members("sim").values()] == [busy]
    redis_.delete(keys.lock_key(busy))  # its holder is done
    runner.tick("sim", tickers[0][1])
    assert runner.store.get(busy).state == JobState.running and running_lines(runner.store.get(busy)) == 1
    assert (busy, JobState.running) in transitions and len(transitions) == 4
    assert not runner.watch.members("sim") and not handed


def test_a_tick_costs_the_same_round_trips_for_many_running_vms_as_for_a_few(ticking, ssh_key, monkeypatch):
    # Job by job, every VM seen running cost six round trips on the tick's one thread.
    runner, tickers, _ = ticking
    pool = runner.store.redis.connection_pool
    taken = [0]
    real = pool.get_connection

    def counted(*args: object, **kwargs: object):
        if threading.current_thread() is threading.main_thread():  # not the lease keeper's renewals
            taken[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counted)
    trips: list[int] = []
    for n in (1, 2, 8):  # the first tick loads the batch's scripts into Redis
        watched_jobs(runner, ssh_key, n)
        before = taken[0]
        tick(runner, tickers)
        trips.append(taken[0] - before)
        assert not runner.watch.members("sim")
    assert trips[1] == trips[2] <= 8  # renew, members, leases, writes, unwatch, create ends, releases


def test_a_cancel_pending_job_in_the_batch_ends_cancelled_and_is_handed_back_for_its_cleanup(
    ticking, ssh_key, transitions
):
    runner, tickers, handed = ticking
    ids = watched_jobs(runner, ssh_key, 3)
    transitions.clear()
    cancelled = ids[0]
    runner.store.update(cancelled, lambda j: setattr(j, "cancel", CancelRequest(by="alice")))
    tick(runner, tickers)
    job = runner.store.get(cancelled)
    assert job.state == JobState.cancelled and job.cleanup == CleanupState.pending and running_lines(job) == 1
    assert [h[0] for h in handed] == [cancelled] and handed[0][1] == 0  # its cleanup runs in its own chain
    assert [runner.store.get(j).state for j in ids[1:]] == [JobState.running] * 2
    assert [s for j, s in transitions if j == cancelled] == [JobState.running, JobState.cancelled]


def test_a_record_changed_under_the_batch_is_settled_from_its_fresh_record(ticking, ssh_key, monkeypatch):
    # A cancel lands between the batch's read and its write: that job's compare-and-set finds the
    # record changed and writes nothing; the job is settled the ordinary way, cancel included.
    runner, tickers, handed = ticking
    ids = watched_jobs(runner, ssh_key, 3)
    late = ids[2]
    acquire = JobBatch.acquire

    def acquire_then_cancel(self: JobBatch, job_ids, lease_s: float):
        held = acquire(self, job_ids, lease_s)
        other = JobStore(connect(runner.settings), runner.settings)  # the producer, unfenced
        other.update(late, lambda j: setattr(j, "cancel", CancelRequest(by="bob")))
        return held

    monkeypatch.setattr(JobBatch, "acquire", acquire_then_cancel)
    tick(runner, tickers)
    job = runner.store.get(late)
    assert job.state == JobState.cancelled and job.cancel.by == "bob" and running_lines(job) == 1
    assert [h[0] for h in handed] == [late]
    assert [runner.store.get(j).state for j in ids[:2]] == [JobState.running] * 2


def test_a_ready_when_ssh_job_settled_in_a_batch_goes_on_the_readiness_schedule(ticking, ssh_key):
    runner, tickers, _ = ticking
    ids = watched_jobs(runner, ssh_key, 2, ready_when="ssh")
    tick(runner, tickers)
    redis_ = runner.store.redis
    for job_id in ids:
        job = runner.store.get(job_id)
        assert job.state == JobState.running and job.awaiting_ready
        assert redis_.hexists(keys.READY_TARGETS, job_id) and redis_.zscore(keys.READY_DUE, job_id) is not None
        assert not redis_.exists(keys.lock_key(job_id))


def test_a_batch_write_whose_lease_was_lost_changes_nothing_and_the_others_go_through(ticking, ssh_key):
    runner, _, _ = ticking
    ids = watched_jobs(runner, ssh_key, 3)
    batch = JobBatch(runner.store)
    held = batch.acquire(ids, 60)
    assert set(held) == set(ids)
    lost = ids[0]
    redis_ = runner.store.redis
    redis_.set(keys.lock_key(lost), "another-delivery", px=60_000)  # the lease ran out; another took it
    before = redis_.get(keys.job_key(lost))

    def polled(job: Job) -> None:
        job.polls += 10

    writes = batch.update({j: (held[j], polled) for j in ids}, 60)
    assert writes.refused == [lost] and not writes.stale and set(writes.written) == set(ids[1:])
    assert redis_.get(keys.job_key(lost)) == before
    assert [runner.store.get(j).polls for j in ids[1:]] == [10, 10]
    batch.release(held.values())
    assert redis_.get(keys.lock_key(lost)) == "another-delivery"  # not ours: left alone
    assert not redis_.exists(*(keys.lock_key(j) for j in ids[1:]))


def test_a_batch_acquire_leaves_out_busy_jobs(ticking, ssh_key):
    runner, _, _ = ticking
    ids = watched_jobs(runner, ssh_key, 2)
    runner.store.redis.set(keys.lock_key(ids[0]), "x", px=60_000)
    held = JobBatch(runner.store).acquire([*ids, "no-such-job"], 60)
    assert set(held) == {ids[1], "no-such-job"} and held["no-such-job"].job is None
    assert held[ids[1]].job.id == ids[1] and held[ids[1]].raw is not None


def test_a_tick_that_yields_its_read_still_reads_the_batch_once_a_deadline_passed(ticking, ssh_key, monkeypatch):
    """Review of the reads' yield (``Budget.read_yield_s``): while the batched read waited for creates
    booked into later windows, every VM past its deadline was read alone, one request each in the very
    windows the wait leaves to the creates (250 overdue DigitalOcean droplets: a minute's budget). One
    batched read sees them all."""
    runner, tickers, _ = ticking
    ids = watched_jobs(runner, ssh_key, 3, deadline_s=1.0)
    monkeypatch.setattr(runner.limit, "read_yield_s", lambda *args: 30.0)
    reads: list[str] = []
    for name in ("get_vm", "get_vms"):
        real = getattr(SimProvider, name)
        monkeypatch.setattr(SimProvider, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    deadline = max(d for _, d in runner.watch.members("sim").values())
    time.sleep(max(0.0, deadline - time.time()) + 0.3)  # past every deadline, the VMs booted
    runner.tick("sim", tickers[0][1])
    assert reads == ["get_vms"]
    assert [runner.store.get(j).state for j in ids] == [JobState.running] * 3
