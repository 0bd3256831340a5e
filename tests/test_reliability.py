"""Issue 12: no lost, duplicated, leaked or stuck job under slow calls, backlogs, skewed clocks and
partial failures. One regression test per situation (the number in each test's comment).

Most drive the real ``JobRunner`` step by step in this process, against the session's real Redis
and the real sim adapter, so each situation is set up exactly (a call slower than its lease, a
clock behind); those that need a queue and a worker (a backlog, a destroy after a create) use real
worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis

from bench.harness import RedisServer, sim_spec
from producer.client import JobNotFound
from vmqueue import keys
from vmqueue.connection import REDIS_UNAVAILABLE, connect
from vmqueue.jobstore import JobStore
from vmqueue.models import CleanupState, Job, JobKind, JobState, VMSpec, utcnow
from vmqueue.settings import Settings, max_countdown_s
from vmqueue.sshkeys import SSHPublicKey
from vmqueue.sweep import SweepReport, SweepRequest
from workers.calls import SharedRateLimit
from workers.lifecycle import JobRunner, Next
from workers.providers.sim import SimProvider
from workers.rescue import stalled_jobs
from workers.sweeper import Sweeper

HETZNER = {"provider": "hetzner", "name": "web-1", "region": "fsn1", "instance_type": "cx22", "image": "ubuntu-24.04"}


@pytest.fixture
def cloud(redis_client: redis.Redis) -> SimProvider:
    return SimProvider(redis_client)


@pytest.fixture
def make_runner(settings: Settings, redis_client: redis.Redis, cloud: SimProvider) -> Callable[..., JobRunner]:
    def make(**overrides: object) -> JobRunner:
        tuned = settings.model_copy(update=overrides)
        return JobRunner(JobStore(connect(tuned), tuned), tuned, lambda _: cloud, SharedRateLimit(tuned), **{})

    return make


@pytest.fixture
def runner(make_runner: Callable[..., JobRunner]) -> JobRunner:
    return make_runner()


def record(runner: JobRunner, ssh_key: str, **fields: object) -> Job:
    """A create job as the producer records it (no message: the test runs its steps)."""
    job = Job(kind=JobKind.create, provider="sim", spec=VMSpec(**sim_spec("rel-1")), ssh_key=ssh_key, **fields)
    runner.store.add(job)
    return job


def drive(runner: JobRunner, job_id: str, kind: JobKind, steps: int = 40, sleep: bool = False) -> list[Next]:
    """Run the job's steps as its messages would, each with the sequence number the last one set."""
    outcomes: list[Next] = []
    seq = runner.store.due(job_id).seq if runner.store.due(job_id) else 0
    for _ in range(steps):
        outcome = runner.run(job_id, kind, seq)
        if outcome is None:
            break
        outcomes.append(outcome)
        seq = outcome.seq
        if sleep:
            time.sleep(min(outcome.countdown_s, 0.5))
    return outcomes


# -- 1 -----------------------------------------------------------------------------------------
def test_a_step_that_outlived_its_lease_changes_nothing(make_runner, cloud, sim, redis_client, ssh_key):
    # 1: the first delivery's create call outlives its lease (its worker stalled: the lease keeper
    # renews a live step's lease, so the test lets it run out) and then fails for good (no capacity,
    # as the call found it); meanwhile a second delivery took the lease and recorded the VM. The stale
    # step must not mark the job failed "with no VM" and leave the VM running.
    runner = make_runner(step_lease_s=0.5)
    job = record(runner, ssh_key)
    sim.configure(latency_ms=1500, full_regions="sim-1")
    stale: list[object] = []
    first = threading.Thread(target=lambda: stale.append(runner.run(job.id, JobKind.create, 0)))
    first.start()
    _wait(lambda: sim.calls().get("create", 0) >= 1, 10)  # the first step is inside its create call
    redis_client.delete(keys.lock_key(job.id))  # its lease ran out while its worker stalled
    sim.configure(latency_ms=0, full_regions="")
    second = runner.run(job.id, JobKind.create, 0)
    assert second is not None and runner.store.get(job.id).state == JobState.provisioning
    first.join(10)
    assert stale == [None]  # the stale step's outcome was dropped: no second chain
    after = runner.store.get(job.id)
    assert after.state == JobState.provisioning and after.error is None
    finished = _finish(runner, job.id)
    assert finished.state == JobState.running
    assert [vm["instance_id"] for vm in sim.existing_vms()] == [finished.instance_id]


def test_a_live_step_slower_than_its_lease_keeps_it(make_runner, sim, ssh_key):
    # 1: the other side of the fence: a step whose call outlives the lease but whose worker is alive
    # keeps the lease (renewed) and its outcome counts; no second delivery can take the job meanwhile.
    runner = make_runner(step_lease_s=0.5)
    job = record(runner, ssh_key)
    sim.configure(latency_ms=1200)
    outcome = runner.run(job.id, JobKind.create, 0)  # prepare and create: 2.4 s under a 0.5 s lease
    assert outcome is not None and runner.store.get(job.id).state == JobState.provisioning


def _finish(runner: JobRunner, job_id: str) -> Job:
    drive(runner, job_id, JobKind.create, steps=80, sleep=True)
    return runner.store.get(job_id)


# -- 2 -----------------------------------------------------------------------------------------
def test_cleanup_has_an_attempt_budget_of_its_own(runner, cloud, sim, ssh_key):
    # 2: a create that spent all its attempts failed with a VM; one 503 on the delete (after the
    # in-call retries) used to abandon the cleanup with the VM running.
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-2")), SSHPublicKey.parse(ssh_key), job_id="rel-2")
    job = record(
        runner,
        ssh_key,
        state=JobState.failed,
        cleanup=CleanupState.pending,
        instance_id=vm.instance_id,
        attempts=runner.settings.max_attempts,
        submitted_at=utcnow(),
    )
    job.phases.submit.failures = runner.settings.max_attempts - 1
    sim.configure(transient_rate=1.0)
    first = runner.run(job.id, JobKind.create, 0)
    assert first is not None and runner.store.get(job.id).cleanup == CleanupState.destroying
    sim.configure(transient_rate=0.0)
    done = _finish(runner, job.id)
    assert done.cleanup == CleanupState.done and done.phases.cleanup.failures == 1
    assert sim.existing_vms() == []


# -- 3 -----------------------------------------------------------------------------------------
def _destroy_job(runner: JobRunner, cloud: SimProvider, ssh_key: str) -> Job:
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-3")), SSHPublicKey.parse(ssh_key), job_id="rel-3")
    job = Job(kind=JobKind.destroy, provider="sim", instance_id=vm.instance_id)
    runner.store.add(job)
    return job


def _provisioning_job(runner: JobRunner, cloud: SimProvider, ssh_key: str) -> Job:
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-1")), SSHPublicKey.parse(ssh_key), job_id="rel-3")
    return record(runner, ssh_key, state=JobState.provisioning, instance_id=vm.instance_id, submitted_at=utcnow())


@pytest.mark.parametrize(
    ("setup", "kind", "phase"),
    [
        (_destroy_job, JobKind.destroy, "destroy"),  # e.g. Hetzner's 423 "locked" on every DELETE
        (lambda r, c, k: record(r, k), JobKind.create, "submit"),  # prepare_spec's image lookup fails
        (_provisioning_job, JobKind.create, "poll"),  # every read of a booting VM fails
    ],
    ids=["destroy", "prepare_spec", "poll"],
)
def test_a_phase_that_fails_forever_ends_within_its_attempts(make_runner, cloud, sim, ssh_key, setup, kind, phase):
    # 3: each of these retried forever with a 0-4 s backoff (about 3,500 calls an hour).
    runner = make_runner(call_attempts=1)
    job = setup(runner, cloud, ssh_key)
    own_calls = sum(sim.calls().values())  # the test's own create_vm, not the job's
    sim.configure(transient_rate=1.0)
    outcomes = drive(runner, job.id, kind, steps=30)
    ended = runner.store.get(job.id)
    assert ended.state == JobState.failed, [e.message for e in ended.history]
    assert ended.error.code == "transient" and f"after {runner.settings.max_attempts} {phase} attempts" in (
        ended.error.message
    )
    # Backoff grows: each wait is at least half its (growing) ceiling, never a run of near-zero waits.
    waits = [o.countdown_s for o in outcomes if o.countdown_s > 0][: runner.settings.max_attempts - 1]
    floors = [min(runner.settings.retry_max_s, runner.settings.retry_base_s * 2**n) / 2 for n in range(len(waits))]
    assert len(waits) == runner.settings.max_attempts - 1 and all(w >= f for w, f in zip(waits, floors, strict=True))
    # Every provider call went through ProviderCalls (the shared limit), prepare_spec included.
    calls = sum(v for k, v in sim.calls().items() if ":" not in k)
    assert ended.api_calls == calls - own_calls


# -- 4 -----------------------------------------------------------------------------------------
def test_a_rate_limit_hint_is_capped_by_the_deadline_and_the_visibility_timeout(runner, sim, ssh_key):
    # 4: a 429 whose reset is an hour away scheduled the step an hour later, past the job's deadline
    # and the visibility timeout (so Redis redelivered the message meanwhile).
    job = record(runner, ssh_key, deadline_s=20)
    sim.configure(rate_limit_rate=1.0, retry_after_s=3600)
    outcome = runner.run(job.id, JobKind.create, 0)
    assert outcome is not None and outcome.message
    assert outcome.countdown_s <= 20 and outcome.countdown_s <= max_countdown_s(runner.settings)


# -- 5 -----------------------------------------------------------------------------------------
@pytest.mark.system
def test_a_backlog_does_not_starve_the_tick(sim_worker_paused, worker_factory, provisioner, sim, ssh_key):
    # 5: 80 get jobs ahead in the queue of a worker with 2 threads; the tick's messages used to wait
    # behind them past their lease, so a VM that was up stayed "provisioning" until the queue drained.
    worker_factory("sim", concurrency=2)
    sim.configure(boot_s=0.5)
    job = provisioner.create_vm(sim_spec("rel-5"), ssh_key)
    _wait(lambda: provisioner.get_job(job.id).state == JobState.provisioning, 15)
    sim.configure(latency_ms=300)  # each get holds a thread 0.3 s: 80 of them take 12 s
    gets = [provisioner.get_vm("sim", "sim-999999").id for _ in range(80)]
    _wait(lambda: provisioner.get_job(job.id).state == JobState.running, 8)
    waiting = sum(not provisioner.get_job(g).finished for g in gets)
    assert waiting >= 20, f"the backlog drained first ({waiting} gets left): the test proves nothing"


def _wait(predicate: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        time.sleep(0.05)


# -- 6 -----------------------------------------------------------------------------------------
def test_a_worker_clock_behind_the_sender_does_not_drop_the_handed_back_step(make_runner, sim, ssh_key, monkeypatch):
    # 6: the tick hands a job back (its VM ended in error: cleanup) with a countdown-0 message; a
    # worker whose clock is 1 s behind the tick's took it for an early duplicate and dropped it.
    tickers: list[tuple[str, str]] = []
    handed: list[tuple] = []
    runner = make_runner()
    runner.start_ticker = lambda provider, token: tickers.append((provider, token))
    runner.start_job = lambda *args: handed.append(args)
    job = record(runner, ssh_key)
    sim.configure(error_rate=1.0, boot_s=0.1)
    first = runner.run(job.id, JobKind.create, 0)  # submitted; no tick ran yet, so it reads once itself
    watched = runner.run(job.id, JobKind.create, first.seq)
    assert watched is not None and not watched.message and tickers  # the tick carries the job now
    time.sleep(0.3)
    runner.tick("sim", tickers[0][1])
    assert len(handed) == 1 and handed[0][1] == 0  # a cleanup handed back, due at once
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 1.0)  # this worker's clock is 1 s behind
    runner.run(job.id, JobKind.create, *handed[0][2:])
    monkeypatch.undo()
    assert runner.store.get(job.id).cleanup == CleanupState.destroying


# -- 7 -----------------------------------------------------------------------------------------
def test_the_rescue_sends_again_only_what_was_really_lost(provisioner, redis_client, ssh_key):
    # 7: jobs still queued behind a long queue were re-sent on every sweep pass once older than the
    # visibility timeout (5 queued jobs -> 10 -> 15 -> 20 messages). No worker consumes vmq.hetzner here.
    jobs = [provisioner.create_vm({**HETZNER, "name": f"web-{i}"}, ssh_key) for i in range(5)]
    later = time.time() + 3600  # long past any grace
    assert list(stalled_jobs(provisioner.store, "hetzner", 0.0, now=later)) == []
    # One message really lost (as a SIGKILL between kombu's BRPOP and its unacked record loses it).
    lost = _job_of_message(redis_client.rpop("vmq.hetzner"))
    found = list(stalled_jobs(provisioner.store, "hetzner", 0.0, now=later))
    assert [s.job.id for s in found] == [lost] and lost in {j.id for j in jobs}
    assert not found[0].never_enqueued and found[0].seq == 0


def _job_of_message(raw: str) -> str:
    from workers.rescue import _job_ids

    [job_id] = _job_ids(raw)
    return job_id


# -- 8 -----------------------------------------------------------------------------------------
def test_one_idempotency_key_at_one_instant_gives_every_caller_the_job(provisioner, ssh_key):
    # 8: 20 callers with one key: some got JobNotFound (HTTP 404 from POST /vms), since the key was
    # bound before the record was written.
    def call(key: str, barrier: threading.Barrier, got: list[object]) -> None:
        barrier.wait()
        try:
            got.append(provisioner.create_vm(HETZNER, ssh_key, idempotency_key=key).id)
        except JobNotFound as exc:
            got.append(exc)

    for round_ in range(5):
        barrier, got = threading.Barrier(20), []
        threads = [threading.Thread(target=call, args=(f"order-{round_}", barrier, got)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 20 and all(isinstance(g, str) for g in got), got
        assert len(set(got)) == 1


def test_a_failed_submission_frees_its_idempotency_key(provisioner, monkeypatch, ssh_key):
    # 8: a failed submission leaves no key bound to it, so the caller's retry makes a new job.
    def broker_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(provisioner.celery, "send_task", broker_down)
    with pytest.raises(ConnectionError):
        provisioner.create_vm(HETZNER, ssh_key, idempotency_key="order-8")
    monkeypatch.undo()
    retried = provisioner.create_vm(HETZNER, ssh_key, idempotency_key="order-8")
    assert retried.state == JobState.queued and retried.enqueued_at is not None


# -- 9 -----------------------------------------------------------------------------------------
def test_a_record_whose_publish_failed_is_failed_not_sent_by_the_rescue(provisioner, monkeypatch, ssh_key):
    # 9: the record is written, the publish fails and so does marking the job failed (one outage):
    # the caller hears "failed" and retries; the rescue used to send the old record too (two VMs).
    def broker_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker unreachable")

    def store_down(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(provisioner.celery, "send_task", broker_down)
    monkeypatch.setattr(provisioner.store, "transition", store_down)
    with pytest.raises(ConnectionError):
        provisioner.create_vm(HETZNER, ssh_key, idempotency_key="order-9")
    monkeypatch.undo()
    (orphan_id,) = [k.removeprefix(keys.JOB_PREFIX) for k in provisioner.store.redis.scan_iter(f"{keys.JOB_PREFIX}*")]
    sent: list[str] = []
    sweeper = Sweeper(
        provisioner.store, SimProvider(provisioner.store.redis), lambda *a: [], lambda j, s: sent.append(j)
    )
    sweeper.stalled_after_s = -3600.0  # as if a visibility timeout had passed
    report = SweepReport(id="t", provider="hetzner", dry_run=False, delay_s=0)
    sweeper._rescue(SweepRequest(provider="hetzner"), report)
    assert sent == [] and report.never_enqueued == [orphan_id]
    failed = provisioner.get_job(orphan_id)
    assert failed.state == JobState.failed and failed.error.code == "enqueue_failed"
    # ... and its key is free again.
    assert provisioner.create_vm(HETZNER, ssh_key, idempotency_key="order-9").id != orphan_id


# -- 10 ----------------------------------------------------------------------------------------
def test_the_sim_answers_a_known_token_with_its_vm_whatever_its_capacity(cloud, sim, ssh_key):
    # 10: the sim checked capacity before the idempotency token.
    key = SSHPublicKey.parse(ssh_key)
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-10")), key, job_id="job-10")
    sim.configure(full_regions="sim-1")
    assert cloud.create_vm(VMSpec(**sim_spec("rel-10")), key, job_id="job-10").instance_id == vm.instance_id


def test_a_create_whose_answer_was_lost_finds_its_vm_before_failing_over(make_runner, sim, ssh_key):
    # 10: the create's answer was lost (the VM exists), the retry met "no capacity" and the job
    # failed over (or failed) while the first VM lived on. Here the provider honours no token, as a
    # provider whose idempotency is by name or label does not.
    runner = make_runner(call_attempts=1)
    job = record(runner, ssh_key)
    sim.configure(lost_response_rate=1.0, honour_token="false")
    retry = runner.run(job.id, JobKind.create, 0)
    assert retry is not None and runner.store.get(job.id).state == JobState.submitting
    sim.configure(lost_response_rate=0.0, full_regions="sim-1")
    done = _finish(runner, job.id)
    assert done.state == JobState.running and done.placement == 0
    assert [vm["instance_id"] for vm in sim.existing_vms()] == [done.instance_id]


# -- 11 ----------------------------------------------------------------------------------------
def test_not_found_right_after_create_is_confirmed_before_gone(runner, cloud, sim, ssh_key):
    # 11: EC2 answers InvalidInstanceID.NotFound to Terminate and Describe just after RunInstances;
    # the destroy job ended "gone" while the instance booted on.
    sim.configure(invisible_s=1.5)
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-11")), SSHPublicKey.parse(ssh_key), job_id="rel-11")
    job = Job(kind=JobKind.destroy, provider="sim", instance_id=vm.instance_id)
    runner.store.add(job)
    drive(runner, job.id, JobKind.destroy, steps=80, sleep=True)
    assert runner.store.get(job.id).state == JobState.gone
    assert sim.existing_vms() == []


def test_not_found_of_a_vm_its_create_saw_running_is_real_at_once(make_runner, sim, ssh_key):
    # 11, the other side: a VM a read showed running is known to reads, so its NotFound after the
    # delete is "gone" at once; it waited out the whole consistency window (`vmq demo`: 30 s a destroy).
    runner = make_runner(not_found_grace_s=300)
    sim.configure(destroy_s=0)  # gone at the delete: no read of this destroy job sees it
    created = record(runner, ssh_key)
    drive(runner, created.id, JobKind.create, steps=80, sleep=True)
    assert runner.store.get(created.id).running_at is not None
    job = Job(kind=JobKind.destroy, provider="sim", instance_id=runner.store.get(created.id).instance_id)
    runner.store.add(job)
    drive(runner, job.id, JobKind.destroy, steps=40, sleep=True)
    assert runner.store.get(job.id).state == JobState.gone  # 40 steps of at most 0.5 s, not 300 s
    assert sim.existing_vms() == []


def test_a_create_that_ran_then_failed_believes_the_not_found_of_its_own_vm(make_runner, sim, ssh_key):
    # 11, the newcomer's run: a create failed with ready_timeout after its VM ran, and its cleanup
    # (destroy-on-failure) waited out the 30 s window as if the VM were unknown to reads.
    runner = make_runner(not_found_grace_s=300)
    sim.configure(destroy_s=0, unreachable_rate=1.0)  # gone at the delete; sshd never answers
    created = record(runner, ssh_key, ready_when="ssh")
    drive(runner, created.id, JobKind.create, steps=80, sleep=True)
    job = runner.store.get(created.id)
    assert job.running_at is not None and job.awaiting_ready
    assert runner.ready_due(created.id, time.time(), deadline=time.time() - 1)  # the readiness deadline passed
    drive(runner, created.id, JobKind.create, steps=40, sleep=True)
    job = runner.store.get(created.id)
    assert job.state == JobState.failed and job.error.code == "ready_timeout"
    assert job.cleanup == CleanupState.done  # 40 steps of at most 0.5 s, not 300 s
    assert sim.existing_vms() == []


# -- 12 ----------------------------------------------------------------------------------------
@pytest.mark.system
def test_a_create_record_learns_its_vm_was_destroyed_and_expires(sim_worker, provisioner, redis_client, ssh_key):
    # 12: after destroy_vm, the create job still said "running" and its record never expired.
    created = provisioner.wait(provisioner.create_vm(sim_spec("rel-12"), ssh_key).id, timeout_s=30)
    assert redis_client.ttl(keys.job_key(created.id)) == -1  # a live VM's record never expires
    gone = provisioner.wait(provisioner.destroy_vm("sim", created.instance_id).id, timeout_s=30)
    assert gone.state == JobState.gone
    # The destroy step tells the create job right after it wrote "gone": wait for that write.
    _wait(lambda: provisioner.get_job(created.id).vm_destroyed_by, 10)
    after = provisioner.get_job(created.id)
    assert after.vm_destroyed_by == gone.id
    assert 0 < redis_client.ttl(keys.job_key(created.id)) <= provisioner.settings.job_ttl_s


# -- 13 ----------------------------------------------------------------------------------------
def test_a_deadline_counts_the_time_spent_in_the_queue(runner, sim, ssh_key):
    # 13: a create with a 5 s deadline that waited 17 s for a worker was still created.
    job = record(runner, ssh_key, deadline_s=5, created_at=utcnow() - timedelta(seconds=17))
    assert runner.run(job.id, JobKind.create, 0) is None
    failed = runner.store.get(job.id)
    assert failed.state == JobState.failed and failed.error.code == "deadline_exceeded"
    assert sim.calls().get("create", 0) == 0 and sim.existing_vms() == []


# -- 14 ----------------------------------------------------------------------------------------
@pytest.fixture
def replica() -> Iterator[RedisServer]:
    server = RedisServer(aof=False)
    server.start()
    client = redis.Redis(port=server.port)
    client.replicaof("127.0.0.1", 1)  # a replica of nothing reachable: read-only, like a demoted primary
    yield server
    server.cleanup()


def test_readonly_redis_is_a_lost_connection_not_an_internal_error(replica):
    # 14: READONLY (a replica promoted, the old primary demoted) ended the job's chain as an internal
    # error. It is retried like a lost connection: here the server is promoted within the retries.
    client = connect(Settings(redis_url=replica.url))
    with pytest.raises(redis.exceptions.ReadOnlyError) as info:
        redis.Redis(port=replica.port).set("k", "v")
    assert isinstance(info.value, REDIS_UNAVAILABLE)  # what a worker's step retries instead of failing
    threading.Timer(0.5, lambda: redis.Redis(port=replica.port).replicaof("NO", "ONE")).start()
    assert client.set("k", "v")
    assert client.get("k") == "v"


def test_a_wait_for_the_own_api_budget_spends_no_attempt(settings, cloud, sim, ssh_key):
    """Issue 15: a request vmqueue's own budget holds back (``vmq_throttle``: nothing was sent) is a wait,
    not a failed attempt. A destroy behind a backlog of creates that fill DigitalOcean's windows met it at
    each retry and failed after ``max_attempts``; it now waits (within its deadline) and then runs."""
    tuned = settings.model_copy(update={"budget": {"sim.requests": "1@0.01/s"}, "deadline_s": 600.0})
    limit = SharedRateLimit(tuned)  # metered as in a worker: every request of the sim through the budget
    runner = JobRunner(JobStore(connect(tuned), tuned), tuned, limit.metered(lambda _: cloud), limit)
    job = _destroy_job(runner, cloud, ssh_key)
    runner.limit.acquire("sim", "DELETE", "destroy")  # the budget's one token goes elsewhere
    outcomes = drive(runner, job.id, JobKind.destroy, steps=runner.settings.max_attempts + 3)
    waiting = runner.store.get(job.id)
    assert waiting.state != JobState.failed, [e.message for e in waiting.history]
    assert waiting.phases.destroy.failures == 0 and len(outcomes) == runner.settings.max_attempts + 3
    assert all(o.countdown_s > 1.0 for o in outcomes)  # each a wait for the bucket's refill, not a backoff
    assert "no attempt spent" in waiting.history[-1].message
    limit = SharedRateLimit(settings)  # the budget is back (the published one)
    runner = JobRunner(JobStore(connect(settings), settings), settings, limit.metered(lambda _: cloud), limit)
    done = _finish_destroy(runner, job.id)
    assert done.state == JobState.gone, [e.message for e in done.history]


def _finish_destroy(runner: JobRunner, job_id: str) -> Job:
    drive(runner, job_id, JobKind.destroy, steps=80, sleep=True)
    return runner.store.get(job_id)


def test_a_create_whose_vm_a_destroy_job_took_before_it_ran_ends_without_a_second_delete(runner, cloud, sim, ssh_key):
    """A newcomer destroyed a VM while its create waited for a status read (the reads yield to a
    DigitalOcean backlog): the create failed ``vm_vanished`` and its cleanup sent a second DELETE.
    Its VM was destroyed on purpose: it says so (``vm_destroyed``) and cleans up nothing."""
    vm = cloud.create_vm(VMSpec(**sim_spec("rel-4")), SSHPublicKey.parse(ssh_key), job_id="rel-4")
    job = record(
        runner, ssh_key, state=JobState.provisioning, instance_id=vm.instance_id, submitted_at=utcnow(),
        vm_destroyed_by="d" * 32,  # as JobStore._vm_gone writes it when the destroy job finds the VM gone
    )  # fmt: skip
    cloud.destroy_vm(vm.instance_id)
    deletes = sim.calls().get("destroy", 0)
    drive(runner, job.id, JobKind.create, steps=5)
    ended = runner.store.get(job.id)
    assert ended.state == JobState.failed and ended.error.code == "vm_destroyed", ended.error
    assert "destroy job " + "d" * 32 in ended.error.message and ended.cleanup is None
    assert sim.calls().get("destroy", 0) == deletes  # no cleanup DELETE after the destroy job's own
