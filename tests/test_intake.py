"""A worker's intake per create: what kombu and Celery cost around a step, checked as behaviour.

- kombu's Redis channel built a redis-py client per publish and per ack (vmqueue/broker.py);
- a job task's step ends by returning, and its ``JobRequest`` sends no ``task-succeeded`` of its
  own: the job's one success event comes from the job store's transition hook (workers/jobevents.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from bench.harness import sim_spec
from bench.probes import wait_for
from vmqueue.celery_config import make_celery
from vmqueue.models import JobState

pytestmark = pytest.mark.system


def test_a_channel_publishes_and_acks_on_one_redis_client(settings, monkeypatch) -> None:
    app = make_celery(settings)
    built: list[redis.Redis] = []
    init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    with app.connection_for_write() as connection:
        dispatcher = app.events.Dispatcher(connection, hostname="intake-test")
        dispatcher.send("worker-heartbeat")  # the channel and its client are made here
        monkeypatch.setattr(redis.Redis, "__init__", counting_init)
        for _ in range(30):  # a fanout publish each, as every Celery task event is
            dispatcher.send("worker-heartbeat")
        dispatcher.close()
    assert built == []  # kombu alone built one client per event: 30


@pytest.fixture
def task_events(settings) -> Iterator[list[dict]]:
    """Every Celery task event published while the test runs, as Flower's receiver sees them."""
    app = make_celery(settings)
    seen: list[dict] = []
    ready = threading.Event()
    connection = app.connection()
    receiver = app.events.Receiver(connection, handlers={"*": seen.append})

    def capture() -> None:
        ready.set()
        receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(5)
    yield seen
    receiver.should_stop = True
    thread.join(5)
    connection.release()


def test_a_job_task_sends_one_success_when_the_job_runs(sim_worker, provisioner, sim, ssh_key, task_events) -> None:
    sim.configure(boot_s=1.5)
    probe = provisioner.create_vm(sim_spec("intake-probe"), ssh_key)  # until the receiver hears events
    wait_for(lambda: any(e.get("uuid") == probe.id for e in task_events), 20, "the event receiver hears events")
    job = provisioner.wait(provisioner.create_vm(sim_spec("intake-1"), ssh_key).id, timeout_s=30)
    assert job.state == JobState.running
    mine = lambda kind: [e for e in task_events if e.get("uuid") == job.id and e["type"] == kind]  # noqa: E731
    wait_for(lambda: mine("task-succeeded"), 10, "the job's success event")
    wait_for(lambda: len(mine("task-started")) >= 1, 10, "the create step's start event")
    # The create step ended seconds before the VM ran: that step sent no success of its own.
    [succeeded] = mine("task-succeeded")
    assert succeeded["result"].startswith("running intake-1")
