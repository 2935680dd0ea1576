"""The concurrency run on PostgreSQL: processes, threads and asyncio share one cap on a server
that is restarted in the middle of the run (issue 12). Full size:
``python tests/stress/run.py --full --backend postgresql``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_cluster import Cluster, PostgresUnavailable, Server

from ._harness import FULL, Size, current_size, run_concurrency

pytestmark = [
    pytest.mark.stress,
    pytest.mark.timeout(3600 if current_size() is FULL else 300),
]


@pytest.fixture
def restartable_server(postgres_server: Server) -> Iterator[Server]:
    """A cluster of this test's own: restarting it disturbs no other test."""
    try:
        cluster = Cluster.temporary()
    except PostgresUnavailable as exc:
        pytest.skip(f"needs PostgreSQL's server binaries to restart a server ({exc})")
    server = Server(cluster.url, cluster, owned=True)
    yield server
    server.close()


def test_cap_holds_and_every_call_is_one_row_across_a_server_restart(
    tmp_path: Path, stress_size: Size, restartable_server: Server
) -> None:
    cluster = restartable_server.cluster
    assert cluster is not None
    url = restartable_server.create_database()
    report = run_concurrency(stress_size, tmp_path, ledger=url, restart=cluster.restart)
    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.restarts == 1
    assert report.overshoot_nanos <= 0
    assert report.lost_rows == 0 and report.duplicate_rows == 0
    assert report.spent_nanos == report.billed_nanos
    assert report.refused > 0 and report.ok > 0
    assert report.stream_rows > 0
