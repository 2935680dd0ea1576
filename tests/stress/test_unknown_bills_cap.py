"""The cap holds when bills are unknown, under concurrency and crashes (issue 9).

Processes with threads make calls that leave their bills unknown in every way (a stream closed
after one chunk, dropped, never read; a read timeout after sending; answers without usage or
with malformed usage) while other processes are killed mid-stream, all under one daily cap.
The stand-in knows what it would bill for every request it generated for; that must never
exceed the cap, and the ledger must never have charged less.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._harness import FULL, Size, current_size, run_unknown_bills

pytestmark = [
    pytest.mark.stress,
    pytest.mark.timeout(3600 if current_size() is FULL else 180),
]


def test_server_billed_spend_never_exceeds_the_cap(tmp_path: Path, stress_size: Size) -> None:
    report = run_unknown_bills(stress_size, tmp_path)
    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.overshoot_nanos == 0
    assert report.billed_nanos <= report.cap_nanos <= report.spent_nanos + report.cap_nanos
    assert report.spent_nanos >= report.billed_nanos
    assert report.refused > 0 and report.kills > 0 and report.estimated_rows > 0
    assert set(report.kinds) == {
        "ok",
        "abandon",
        "drop",
        "unread",
        "timeout",
        "no-usage",
        "bad-usage",
    }
