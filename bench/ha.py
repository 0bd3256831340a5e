"""Chaos scenario HA: the Redis master is SIGKILLed mid-run and Sentinel promotes a replica.

It runs on a cluster of its own (a Sentinel-managed Redis: one master, two replicas, three
sentinels; two sim workers), because every other scenario runs on one plain redis-server:

    python -m bench.chaos --only HA

N creates run to ``running`` first; then N more creates and N destroys of the first VMs run while
the master is killed. Counted: every job ends, no job lost, exactly one VM per running create, no
VM left of a destroyed one, nothing destroyed by a sweeper that runs every few seconds with a short
delay (it would destroy any VM whose record the failover lost), and how long after the kill jobs
finished again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from bench.cluster import Cluster, ClusterConfig
from bench.harness import sim_spec
from bench.probes import Sim, wait_for
from vmqueue.models import JobState
from vmqueue.sshkeys import throwaway_public_key

if TYPE_CHECKING:
    from bench.chaos import Result, Sizes

DESCRIPTION = (
    "the Redis master is SIGKILLed mid-run (Sentinel, 2 replicas, 3 sentinels, 2 workers): every job ends, "
    "one VM per running job, no job lost, no VM destroyed by the sweeper"
)
SWEEP_DELAY_S = 2.0  # short on purpose: a VM whose record the failover lost would be destroyed


def run(_cluster: Cluster | None, sizes: Sizes, workdir=None) -> Result:
    from bench.chaos import Result, _states

    result = Result("HA")
    env = {"VMQ_REDIS_WAIT_REPLICAS": "1"}
    with Cluster(_config(workdir, env)) as ha:
        ha.sim.configure(boot_s=sizes.boot_s, boot_jitter_s=sizes.boot_jitter_s)
        key = throwaway_public_key()
        first = [ha.provisioner.create_vm(sim_spec(f"ha-a-{i}"), key).id for i in range(sizes.jobs)]
        ready = ha.wait_finished(first, sizes.timeout_s)
        instances = [j.instance_id for j in ready if j is not None and j.state == JobState.running]
        ha.redis_server.wait_healthy()

        sweeps = _Sweeper(ha)
        sweeps.start()
        second: list[str] = []
        destroys: list[str] = []
        producer_errors: list[str] = []

        def produce() -> None:  # creates and destroys interleaved, straight through the failover
            for i, instance in enumerate(instances):
                try:
                    second.append(ha.provisioner.create_vm(sim_spec(f"ha-b-{i}"), key).id)
                    destroys.append(ha.provisioner.destroy_vm("sim", instance).id)
                except Exception as exc:  # noqa: BLE001 - a producer that gave up: counted
                    producer_errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(sizes.kill_every_s / 20)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        time.sleep(sizes.kill_every_s * 2)  # the run is under way: creates sent, deletes in flight
        in_flight = ha.unfinished(second + destroys)
        killed = ha.redis_server.kill_master()
        killed_at = time.monotonic()
        ha.redis_server.wait_promoted(killed, 60)
        promoted_s = time.monotonic() - killed_at
        done_before = ha.unfinished(second + destroys)
        moved_s = _first_progress(ha, second + destroys, killed_at, sizes.timeout_s)
        producer.join(sizes.timeout_s)
        ids = second + destroys
        jobs = ha.wait_finished(ids, sizes.timeout_s)
        sweeps.stop()

        running = {j.id for j in jobs if j is not None and j.kind == "create" and j.state == JobState.running}
        per_job = Counter(Sim.job_of(vm) for vm in ha.sim.existing_vms())
        left_of_destroyed = [i for i in instances if i in {vm.get("instance_id") for vm in ha.sim.existing_vms()}]
        result.job_ids = ids
        result.figures.update(
            jobs=len(first) + len(ids),
            in_flight_at_kill=in_flight,
            unfinished_after_promotion=done_before,
            promoted_after_s=round(promoted_s, 1),
            jobs_moved_again_after_s=round(moved_s, 1) if moved_s is not None else None,
            states=_states(jobs),
            producer_errors=len(producer_errors),
            sweeps=sweeps.passes,
            swept_destroyed=sweeps.destroyed,
        )
        result.check(in_flight > 0, f"jobs were in flight when the master was killed ({in_flight})")
        result.check(not producer_errors, f"producers rode out the failover ({producer_errors[:1] or 'no errors'})")
        result.check(all(j is not None for j in jobs), f"no job lost ({sum(j is None for j in jobs)} missing)")
        result.check(all(j is not None and j.finished for j in jobs), f"every job ended ({_states(jobs)})")
        result.check(
            all(per_job[job] == 1 for job in running) and len(running) == len(second),
            f"exactly one VM per running create ({len(running)}/{len(second)} running)",
        )
        result.check(not left_of_destroyed, f"no VM left of a destroyed one ({len(left_of_destroyed)} left)")
        result.check(
            sweeps.passes > 0 and sweeps.destroyed == 0, f"the sweeper destroyed nothing ({sweeps.passes} passes)"
        )
    return result


def _config(workdir, env: dict[str, str]) -> ClusterConfig:
    return ClusterConfig(workers=2, concurrency=16, rate_limit_per_s=200, workdir=workdir, env=env, sentinel=True)


def _first_progress(ha: Cluster, ids: list[str], since: float, timeout_s: float) -> float | None:
    """Seconds from the kill until a job finished after it (the pipeline moves again)."""
    before = ha.unfinished(ids)
    try:
        wait_for(lambda: ha.unfinished(ids) < before, timeout_s, "a job finishes after the failover", 0.1)
    except TimeoutError:
        return None
    return time.monotonic() - since


class _Sweeper:
    """The periodic sweeper with a short delay, in a thread: counts what its passes destroyed."""

    def __init__(self, ha: Cluster, every_s: float = 3.0):
        self.ha, self.every_s = ha, every_s
        self.passes = 0
        self.destroyed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)

    def _loop(self) -> None:
        from producer.sweep import SweepTimeout, request_sweep, wait_report
        from vmqueue.sweep import Action, SweepRequest

        while not self._stop.wait(self.every_s):
            request = SweepRequest(provider="sim", delay_s=SWEEP_DELAY_S)
            try:
                request_sweep(self.ha.provisioner.celery, request)
                report = wait_report(self.ha.client, request.id, 60)
            except (SweepTimeout, Exception):  # noqa: BLE001 - a pass lost in the failover; the next one comes
                continue
            self.passes += 1
            self.destroyed += sum(o.action == Action.destroyed for o in report.orphans)
