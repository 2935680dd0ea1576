"""SIGKILL at every point of a call's life; the ledger recovers whole (issue 5, part 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import FULL, POINTS, Size, current_size, run_crashes

pytestmark = [
    pytest.mark.stress,
    # A hang guard: the reduced run takes a minute or more on a loaded 2-core machine.
    pytest.mark.timeout(3600 if current_size() is FULL else 900),
]


def test_killed_processes_leave_a_whole_ledger(tmp_path: Path, stress_size: Size) -> None:
    report = run_crashes(stress_size, tmp_path)
    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.integrity == "ok"
    assert set(report.kills_by_point) == {*POINTS, "random"}
    assert report.kills == len(POINTS) * stress_size.kills_per_point + stress_size.random_kills
    assert report.expired_rows > 0
    assert report.steady_calls == stress_size.steady_calls
