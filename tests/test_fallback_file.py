"""The fallback file: merged by the next write of any process, whole lines or an error,
a merge cut short finished by the next writer, no symlink followed on any of its paths."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger._sqlite import SQLiteLedger

NOW = datetime.now(timezone.utc)


def reservation(call_id: str, projected: int = 50_000) -> Reservation:
    return Reservation(
        call_id, "kimi-k2.5", {}, NOW, NOW + timedelta(days=1), projected, 10, 100, 600, 3000
    )


def settlement(res: Reservation, cost: int = 7_000) -> Settlement:
    return Settlement(res, "ok", 10, 0, 2, cost, False, 1, NOW)


def rows(ledger: kb.Ledger) -> dict[str, tuple[str, int]]:
    return {row["call_id"]: (row["status"], row["cost_nanos"]) for row in ledger.calls(100)}


@pytest.fixture
def caplog_kb(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="kimi_budget")
    return caplog


def test_the_next_write_of_another_process_merges_it(
    ledger_path: Path, caplog_kb: pytest.LogCaptureFixture
) -> None:
    budget = kb.Budget(daily="1")
    first = kb.Ledger(ledger_path)
    held = reservation("held")
    first.reserve(held, [budget])
    first.write_fallback(settlement(held), OSError("disk full"))
    assert "saved to" in caplog_kb.text and first.fallback_path.exists()
    # Another process, opened long before, writes next: it merges the file then.
    script = (
        "import sys, kimi_budget as kb\n"
        "from datetime import datetime, timedelta, timezone\n"
        "from kimi_budget.ledger import Reservation\n"
        "now = datetime.now(timezone.utc)\n"
        "ledger = kb.Ledger(sys.argv[1])\n"
        "sys.stdout.write('open\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
        "ledger.reserve(Reservation('other', 'kimi-k2.5', {}, now, now + timedelta(minutes=5),"
        " 1000, 1, 1, 1, 1))\n"
    )
    first.fallback_path.rename(first.fallback_path.with_name("aside"))  # not there at open
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(ledger_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "open\n"
    first.fallback_path.with_name("aside").rename(first.fallback_path)
    child.stdin.write("go\n")
    child.stdin.close()
    assert child.wait(30) == 0
    child.stdout.close()
    assert not first.fallback_path.exists()
    assert rows(first)["held"] == ("ok", 7_000)
    [daily] = first.status(budget)
    assert daily.spent_usd == Decimal("0.000007") and daily.reserved_usd == Decimal("0.000001")


def test_a_torn_line_is_an_error_kept_aside_and_the_rest_merged(
    ledger_path: Path, caplog_kb: pytest.LogCaptureFixture
) -> None:
    ledger = kb.Ledger(ledger_path)
    a, b, c = reservation("a"), reservation("b"), reservation("c")
    for res in (a, b, c):
        ledger.reserve(res)
    whole_a = settlement(a).to_json()
    torn_b = settlement(b).to_json()[:40]  # a writer cut short, no newline
    whole_c = settlement(c).to_json()
    # The torn fragment glued to the next writer's whole line, as O_APPEND would leave it.
    ledger.fallback_path.write_text(f"{whole_a}\n{torn_b}{whole_c}\n")
    ledger.expire_stale()  # any write merges
    assert not ledger.fallback_path.exists()
    found = rows(ledger)
    assert found["a"] == ("ok", 7_000) and found["c"] == ("ok", 7_000)
    assert found["b"] == ("pending", 0)  # its bill is lost: still reserved at its worst case
    [error] = [r for r in caplog_kb.records if "torn line" in r.getMessage()]
    assert error.levelname == "ERROR" and torn_b in error.getMessage()
    rejected = ledger.fallback_path.with_name(ledger.fallback_path.name + ".rejected")
    assert rejected.read_text() == torn_b + "\n"


def test_a_short_write_is_reported_as_not_saved(
    ledger_path: Path, caplog_kb: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = kb.Ledger(ledger_path)
    res = reservation("short")
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_write)
    ledger.write_fallback(settlement(res), OSError("disk full"))
    monkeypatch.undo()
    assert "saved to" not in caplog_kb.text
    [error] = [r for r in caplog_kb.records if "record it by hand" in r.getMessage()]
    assert error.levelname == "ERROR" and settlement(res).to_json() in error.getMessage()


def test_a_merge_cut_short_is_finished_by_the_next_writer(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = kb.Ledger(ledger_path)
    a, b = reservation("a"), reservation("b")
    for res in (a, b):
        ledger.reserve(res)
    for res in (a, b):
        ledger.write_fallback(settlement(res), OSError("locked"))

    def interrupted(self: SQLiteLedger, settlements: object) -> int:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the merge

    monkeypatch.setattr(SQLiteLedger, "_settle_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ledger.expire_stale()
    monkeypatch.undo()
    merging = ledger.fallback_path.with_name(ledger.fallback_path.name + ".merging")
    assert merging.exists() and not ledger.fallback_path.exists()
    assert rows(ledger)["a"][0] == "pending"
    other = kb.Ledger(ledger_path)  # the next writer (opening writes: it expires)
    assert not merging.exists()
    assert rows(other) == {"a": ("ok", 7_000), "b": ("ok", 7_000)}


def test_a_merge_that_died_after_its_commit_counts_once(ledger_path: Path) -> None:
    budget = kb.Budget(total="1")
    ledger = kb.Ledger(ledger_path)
    res = reservation("once")
    ledger.reserve(res, [budget])
    ledger.settle(settlement(res))
    # The merger committed, then was killed before removing its .merging file.
    merging = ledger.fallback_path.with_name(ledger.fallback_path.name + ".merging")
    merging.write_text(settlement(res).to_json() + "\n")
    ledger.expire_stale()
    assert not merging.exists()
    assert ledger.spend() == Decimal("0.000007")
    [total] = ledger.status(budget)
    assert total.spent_usd == Decimal("0.000007") and total.reserved_usd == 0


@pytest.mark.parametrize("where", ["fallback", "merging", "lock"])
def test_no_path_of_the_merge_follows_a_symlink(
    ledger_path: Path, where: str, caplog_kb: pytest.LogCaptureFixture
) -> None:
    ledger = kb.Ledger(ledger_path)
    res = reservation("s")
    ledger.reserve(res)
    victim = ledger_path.with_name("victim.txt")
    victim.write_text(settlement(res).to_json() + "\n")  # would merge, if it were followed
    suffix = {"fallback": "", "merging": ".merging", "lock": ".lock"}[where]
    link = ledger.fallback_path.with_name(ledger.fallback_path.name + suffix)
    link.symlink_to(victim)
    if where == "lock":
        ledger.fallback_path.write_text(settlement(res).to_json() + "\n")
    ledger.expire_stale()
    assert victim.read_text() == settlement(res).to_json() + "\n"
    assert rows(ledger)["s"] == ("pending", 0)  # nothing was merged through the link
    assert "symbolic link" in caplog_kb.text or "not a regular file" in caplog_kb.text
