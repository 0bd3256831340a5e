"""workers/gate.py: a few threads run step code at once; a thread waiting on its provider holds no slot."""

from __future__ import annotations

import threading

from vmqueue.settings import Settings
from workers import gate
from workers.calls import ProviderCalls
from workers.gate import StepGate

WAIT_S = 10.0  # a bound on a wait that should end at once, not a timing assertion


def _inside(
    step_gate: StepGate, threads: int, hold: threading.Event
) -> tuple[list[int], list[threading.Thread], threading.Semaphore]:
    """Start ``threads`` threads that each enter ``held`` and stay until ``hold`` is set; returns the
    most that were inside at once (a one-item list, updated as they enter), the threads, and a
    semaphore released once per thread that got in."""
    inside, most, lock = 0, [0], threading.Lock()
    entered = threading.Semaphore(0)

    def run() -> None:
        nonlocal inside
        with step_gate.held():
            with lock:
                inside += 1
                most[0] = max(most[0], inside)
            entered.release()
            hold.wait(WAIT_S)
            with lock:
                inside -= 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return most, workers, entered


def test_held_lets_only_its_slots_in_at_once() -> None:
    step_gate, hold = StepGate(2), threading.Event()
    most, workers, entered = _inside(step_gate, 6, hold)
    assert entered.acquire(timeout=WAIT_S) and entered.acquire(timeout=WAIT_S)  # two got in
    assert not entered.acquire(timeout=0.5)  # and no third while they hold their slots
    assert most[0] == 2
    hold.set()
    for worker in workers:
        worker.join(WAIT_S)
    assert most[0] == 2 and not any(w.is_alive() for w in workers)


def test_no_slots_means_no_gate() -> None:
    step_gate, hold = StepGate(0), threading.Event()
    most, workers, entered = _inside(step_gate, 5, hold)
    for _ in range(5):  # all five get in while none has left
        assert entered.acquire(timeout=WAIT_S)
    hold.set()
    for worker in workers:
        worker.join(WAIT_S)
    assert most[0] == 5


def test_a_provider_call_gives_the_slot_up_while_it_waits(monkeypatch) -> None:
    """With one slot, a step blocked in its provider call does not keep another step out."""
    step_gate = StepGate(1)
    monkeypatch.setattr(gate, "GATE", step_gate)
    monkeypatch.setattr("workers.calls.GATE", step_gate)
    in_call, other_ran = threading.Event(), threading.Event()

    def slow_provider() -> str:
        in_call.set()
        assert other_ran.wait(WAIT_S), "the other step never ran while this one waited on its provider"
        return "created"

    results = []

    def step() -> None:
        with step_gate.held():
            results.append(ProviderCalls("sim", None, Settings())(slow_provider))  # type: ignore[arg-type]

    first = threading.Thread(target=step)
    first.start()
    assert in_call.wait(WAIT_S)
    with step_gate.held():  # would block until the first step ends if the call kept its slot
        other_ran.set()
    first.join(WAIT_S)
    assert results == ["created"]


def test_held_is_reentrant_and_released_outside_a_slot_is_a_no_op() -> None:
    step_gate = StepGate(1)
    with step_gate.released():  # the tick's thread never took a slot
        pass
    with step_gate.held():
        with step_gate.held():  # the same thread again: no deadlock on its own slot
            with step_gate.released():
                with step_gate.held():
                    pass
    # every slot is back: another thread gets one at once
    got = []
    worker = threading.Thread(target=lambda: got.append(step_gate._slots.acquire(timeout=WAIT_S)))
    worker.start()
    worker.join(WAIT_S)
    assert got == [True]
