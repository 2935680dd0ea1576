"""Processes, threads and asyncio share one ledger and one daily cap (issue 5, part 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import FULL, Size, current_size, run_concurrency

pytestmark = [
    pytest.mark.stress,
    # A hang guard: the reduced run takes a minute or more on a loaded 2-core machine.
    pytest.mark.timeout(3600 if current_size() is FULL else 900),
]


def test_cap_holds_and_every_call_is_one_row(tmp_path: Path, stress_size: Size) -> None:
    report = run_concurrency(stress_size, tmp_path)
    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.overshoot_nanos <= 0
    assert report.lost_rows == 0 and report.duplicate_rows == 0
    assert report.spent_nanos == report.billed_nanos
    # The run really exercised what it claims to: retries, cache hits, streams and refusals.
    assert report.refused > 0 and report.ok > 0
    assert report.retried_rows > 0
    assert report.cache_hit_rows > 0
    assert report.stream_rows > 0
    assert report.server_requests > report.ok
