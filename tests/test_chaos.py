"""The chaos suite, small: R1-R6 of bench/chaos.py on a cluster of this module's own.

Its own redis-server (R2 restarts it) and its own sim workers (R1 and R6 SIGKILL them), so the
session's Redis and sim worker never see the chaos. Figures are printed (``-s``); the tests assert
only what each scenario counted, never how long it took.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.chaos import RUNNERS, Sizes, run
from bench.cluster import Cluster, ClusterConfig

pytestmark = [pytest.mark.system, pytest.mark.timeout(150)]

SMALL = Sizes(
    jobs=16,
    kills=2,
    kill_every_s=1.5,
    boot_s=0.8,
    boot_jitter_s=0.8,
    outage_s=2.0,
    deadline_s=2.0,
    flower_pages=5,
    timeout_s=90.0,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # A low shared limit, so R3's burst of creates really meets it.
    config = ClusterConfig(workers=2, concurrency=8, rate_limit_per_s=5, workdir=tmp_path_factory.mktemp("chaos"))
    with Cluster(config) as started:
        yield started


@pytest.mark.parametrize("scenario", sorted(RUNNERS))
def test_scenario(cluster: Cluster, scenario: str) -> None:
    result = run(cluster, scenario, SMALL)
    print(result.render())
    assert result.ok, result.render()
