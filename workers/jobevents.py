"""Flower shows jobs, not only tasks: a job's task ends as the job ends.

A job's task id is its job id (the producer sends it so, and every later message of the job reuses
it), so Flower keeps one row per job: polls are retries of it. Without this module that row would
read ``SUCCESS`` with result ``None`` the moment the create was submitted, while the VM boots for a
minute more and may still fail; Flower's Failed filter would stay empty while jobs fail.

So a job task never reports success of its own (its requests are ``JobRequest``s, which send no
``task-succeeded`` of their own), and the one place every final state passes, the job store's
transition hook, sends the task event the job deserves, for the job's task id:

- ``task-succeeded`` with a short ``result``: ``running web-1 198.51.100.7``, ``gone 12345``,
  ``done web-1 running 198.51.100.7``; a create whose ``ready_when`` asks for more ends at
  ``ready web-1 198.51.100.7``, not at running;
- ``task-failed`` with ``exception`` (and ``result``, which Flower's search reads)
  ``capacity: no capacity in fsn1 (cx22)``, and the job's recent history as the ``traceback``;
- ``task-revoked`` for a cancelled job (Flower: ``REVOKED``).

``runtime`` is the job's age in seconds (enqueue to final state). One event per job as a rule; a
job task whose step ends with the job finished but sent nothing itself (its cleanup just ended,
which Flower showed as ``RETRY`` and lets override a final state; a job cancelled while queued, at
the producer; a duplicate message) says the final state again. The batched tick settles many jobs
in one task and sends one event for each, never a message.

Nothing secret is in these events: a VM name, an instance id, IPs, an error code and message and
the job's history lines, exactly what ``vmq job`` prints. Startup scripts are never in a job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from celery.events import EventDispatcher
from celery.signals import celeryd_after_setup
from celery.worker.request import Request

from vmqueue import keys
from vmqueue.jobstore import NOTIFY_BATCHES, TRANSITION_HOOKS, JobStore
from vmqueue.models import Job, JobKind, JobState
from workers.app import app

log = logging.getLogger("vmqueue.worker")

EVENTS_PER_PIPELINE = 1000
MAX_TEXT = 300  # characters of an error message Flower shows; the job keeps it whole
HISTORY_LINES = 12

_node: dict[str, str] = {}  # the worker's node name ("sim-123@host"), once it is set up
_sent = threading.local()  # per pool thread: the last job this thread sent a final event for


class JobRequest(Request):
    """The request of a job task: a step that ends is not the job ending, so no ``task-succeeded``.

    A step ends by returning; ending with Celery's ``Ignore`` instead (which sends no event either)
    made Celery build two ``ExceptionInfo``s per step, each copying the positions of every frame's
    code object (billiard on Python 3.11+): a fifth of a worker's CPU per create step on
    ``bench/inflight.py``. Every other event (received, started, retried, failed) passes as sent.
    """

    def send_event(self, type: str, **fields: Any) -> None:  # noqa: A002 - Celery's own signature
        if type != "task-succeeded":
            super().send_event(type, **fields)


class _Dispatcher:
    """One event dispatcher per worker process, shared by its threads under a lock.

    A dispatcher per event built a producer, a channel and a redis-py client each time; one kept
    open costs one publish per event. A dispatcher whose publish failed is closed and the event sent
    once more on a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a thread in ``batched`` sends under the lock it holds
        self._dispatcher: EventDispatcher | None = None

    def send(self, kind: str, **fields: Any) -> None:
        with self._lock:
            for attempt in (1, 2):  # a kept connection may have died since: once more on a new one
                try:
                    self._open().send(kind, **fields)
                    return
                except Exception:
                    self._drop()
                    if attempt == 2:
                        raise

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """The events this thread sends in the block leave in one pipeline when it ends (kombu's
        ``Producer.batch``), where each was a round trip; other threads' events wait for the block.
        A batch whose publish fails is logged and dropped: monitoring never breaks a job."""
        if not app.conf.worker_send_task_events:  # no events to send: no connection to open
            yield
            return
        with self._lock:
            batch = getattr(self._open().producer, "batch", None)  # kombu >= 5.7
            if batch is None:
                yield
                return
            body_done = False
            try:
                with batch(max_size=EVENTS_PER_PIPELINE):
                    yield
                    body_done = True
            except Exception:
                if not body_done:
                    raise
                log.warning("could not publish a batch of task events", exc_info=True)
                self._drop()

    def _open(self) -> EventDispatcher:
        if self._dispatcher is None:
            self._dispatcher = app.events.Dispatcher(
                app.connection_for_write(), hostname=_node.get("name"), buffer_while_offline=False
            )
        return self._dispatcher

    def _drop(self) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            _close_quietly(dispatcher)


def _close_quietly(dispatcher: EventDispatcher) -> None:
    try:
        dispatcher.close()
        dispatcher.connection.release()
    except Exception:  # noqa: BLE001 - the connection is already broken
        log.debug("could not close a broken event dispatcher", exc_info=True)


_dispatcher = _Dispatcher()


@celeryd_after_setup.connect
def _named(sender: str, **_: object) -> None:
    _node["name"] = sender


def summary(job: Job) -> str:
    """One line saying how the job ended: what Flower shows as its result."""
    vm = job.vm
    name = (job.spec.name if job.spec else None) or (vm.name if vm else None) or ""
    address = (vm.public_ipv4 or vm.public_ipv6 or vm.private_ipv4 or "") if vm else ""
    if job.state == JobState.failed:
        error = f"{job.error.code}: {job.error.message}" if job.error else "failed"
        return error if len(error) <= MAX_TEXT else error[: MAX_TEXT - 1] + "…"
    if job.state == JobState.cancelled:
        return " ".join(p for p in ("cancelled", name, job.instance_id or "") if p)
    if job.kind == JobKind.destroy:
        return " ".join(p for p in ("gone", job.instance_id) if p)
    if job.kind == JobKind.get:
        return " ".join(p for p in ("done", name, vm.status if vm else "", address) if p)
    return " ".join(p for p in (str(job.state), name, address) if p)


def final_event(job: Job) -> tuple[str, dict[str, Any]] | None:
    """The task event (type, fields) a job in a final state sends for its task id; ``None`` before
    (a running job whose ``ready_when`` asks for more is not final: its row ends at ``ready``)."""
    if not job.final:
        return None
    runtime = max((job.updated_at - job.created_at).total_seconds(), 0.0)
    text = summary(job)
    if job.state == JobState.failed:
        history = "\n".join(f"{e.at:%H:%M:%S} {e.line}" for e in job.history[-HISTORY_LINES:])
        return "task-failed", {"exception": text, "result": text, "traceback": history, "runtime": runtime}
    if job.state == JobState.cancelled:
        return "task-revoked", {"result": text, "terminated": False, "expired": False, "signum": None}
    return "task-succeeded", {"result": text, "runtime": runtime}


def send(job: Job) -> None:
    """Send the job's final task event, if it has one (one publish on the event exchange).

    It names the task and its arguments too: a job whose first step came in a ``vmq.create_many``
    message (``received``) gets its row's VM name from here."""
    event = final_event(job)
    if event is None or not app.conf.worker_send_task_events:
        return
    kind, fields = event
    name = job.spec.name if job.spec else None
    args = keys.task_argsrepr(job.kind, job.provider, job.id, name)
    _dispatcher.send(kind, uuid=job.id, name=keys.TASK_OF_KIND[job.kind], args=args, **fields)
    _sent.job_id = job.id


def received(job_ids: list[str], provider: str, parent_id: str | None) -> None:
    """Create jobs whose first steps arrived in a ``vmq.create_many`` message: give each the Flower
    row a message of its own would have (``task-received`` for its id, the job task's name; the VM's
    name follows with its final event). One pipeline for all."""
    if not app.conf.worker_send_task_events:
        return
    fields = {"name": keys.TASK_CREATE, "kwargs": "{}", "retries": 0, "eta": None, "expires": None}
    try:
        with _dispatcher.batched():
            for job_id in job_ids:
                args = keys.task_argsrepr(JobKind.create, provider, job_id)
                _dispatcher.send("task-received", uuid=job_id, root_id=parent_id, parent_id=parent_id, args=args,
                                 **fields)  # fmt: skip
    except Exception:  # noqa: BLE001 - monitoring must never break a job
        log.warning("could not send the task-received events of %d jobs", len(job_ids), exc_info=True)


def job_changed(job: Job) -> None:
    """The job store's transition hook: a job that reached a final state tells Flower.

    Readiness (``ready``, or ``ready_timeout``) is settled by a worker's readiness scanner, whose
    transitions run this hook like any step's; a job the HTTP API settled on cloud-init's phone-home
    is handed to a scanner, which runs the hooks for it (workers/lifecycle/ready.py ``ready_due``)."""
    if not job.final:
        return
    try:
        send(job)
    except Exception:  # noqa: BLE001 - monitoring must never break a job
        log.warning("job=%s provider=%s could not send its final task event", job.id, job.provider, exc_info=True)


def step_ended(job_id: str, store: JobStore, carried: bool = False) -> None:
    """A job task's step is over and sends no further message: end the task without an event.

    The job reached its final state in this step (the transition hook told Flower), or another chain
    carries it (``carried``: the tick watches its VM, so it is not finished), or the message was a
    duplicate. A job that is finished now without this step having said so gets its final event (one
    read of the record; not for a carried job: that read was a twentieth of a create step's CPU).
    """
    said, _sent.job_id = getattr(_sent, "job_id", None) == job_id, None
    if not said and not carried:
        job = store.get(job_id)
        if job is not None and job.finished:
            job_changed(job)


if job_changed not in TRANSITION_HOOKS:
    TRANSITION_HOOKS.append(job_changed)
    NOTIFY_BATCHES.append(_dispatcher.batched)  # the tick settling many jobs: their events in one pipeline
