"""The ledger file: created safely, migrated on open, never written through foreign files."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlite_utils

import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger.migrations._sqlite import APPLICATION_ID, MIGRATIONS

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def reservation(
    call_id: str,
    *,
    tags: dict[str, str] | None = None,
    projected: int = 1000,
    at: datetime = NOW,
    model: str = "kimi-k2.5",
) -> Reservation:
    return Reservation(
        call_id, model, tags or {}, at, at + timedelta(minutes=5), projected, 10, 100, 600, 3000
    )


def settle(ledger: kb.Ledger, res: Reservation, cost: int, status: str = "ok") -> None:
    ledger.settle(Settlement(res, status, 10, 0, 1, cost, False, 1, res.created_at))


def test_new_ledger_is_private_migrated_and_marked(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    assert oct(ledger_path.stat().st_mode & 0o777) == "0o600"
    db = sqlite_utils.Database(ledger_path)
    assert {"calls", "budget_scopes", "window_totals", "_kimi_budget_migrations"} <= set(
        db.table_names()
    )
    assert "calls_usd" in db.view_names()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    applied = [row[0] for row in db.execute("SELECT name FROM _kimi_budget_migrations")]
    assert applied == [name for name, _ in MIGRATIONS]
    ledger.close()
    kb.Ledger(ledger_path)  # reopening applies nothing twice
    assert db.execute("SELECT count(*) FROM _kimi_budget_migrations").fetchone()[0] == len(
        MIGRATIONS
    )


def test_ledger_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "spend.db"
    kb.Ledger(path)
    assert path.exists()


def test_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(kb.LedgerError, match="not a kimi-budget ledger"):
        kb.Ledger(path)
    assert path.read_bytes() == before


def test_corrupt_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(kb.LedgerError, match="not a readable kimi-budget ledger") as info:
        kb.Ledger(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_symlink_to_foreign_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    link = tmp_path / "ledger.db"
    link.symlink_to(target)
    with pytest.raises(kb.LedgerError, match="symbolic link"):
        kb.Ledger(link)
    assert target.read_text() == "do not touch"


def test_symlink_to_a_ledger_is_accepted(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    kb.Ledger(real).close()
    link = tmp_path / "link.db"
    link.symlink_to(real)
    kb.Ledger(link)


def test_directory_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(kb.LedgerError, match="is a directory"):
        kb.Ledger(tmp_path)


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(kb.LedgerError, match="Cannot create the ledger"):
        kb.Ledger(blocker / "sub" / "ledger.db")


def test_spend_filters_by_time_model_and_tags(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    a = reservation("a", tags={"project": "crawler", "env": "prod"})
    b = reservation(
        "b", tags={"project": "other"}, at=NOW + timedelta(days=1), model="moonshot-v1-8k"
    )
    c = reservation("c", tags={"project": "crawler"}, at=NOW + timedelta(days=2))
    pending = reservation("p", tags={"project": "crawler"})
    for res, cost in ((a, 1000), (b, 20_000), (c, 300)):
        ledger.reserve(res)
        settle(ledger, res, cost)
    ledger.reserve(pending)
    assert ledger.spend() == Decimal("0.0000213")
    assert ledger.spend(tags={"project": "crawler"}) == Decimal("0.0000013")
    assert ledger.spend(tags={"project": "crawler", "env": "prod"}) == Decimal("0.000001")
    assert ledger.spend(model="moonshot-v1-8k") == Decimal("0.00002")
    assert ledger.spend(since="2026-11-29") == Decimal("0.0000203")
    assert ledger.spend(since=NOW + timedelta(days=1), until="2026-11-30T00:00:00Z") == Decimal(
        "0.00002"
    )
    assert ledger.spend(tags={"project": "x' OR 1=1 --"}) == 0
    with pytest.raises(ValueError, match="not a date"):
        ledger.spend(since="yesterday-ish")


def test_window_totals_follow_every_write(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path, clock=lambda: NOW)
    crawler = kb.Budget(daily="1", monthly="10", scope={"project": "crawler"})
    everything = kb.Budget(daily="1", total="100")
    res = reservation("x", tags={"project": "crawler"}, projected=5000)
    ledger.reserve(res, [crawler, everything])
    assert [s.reserved_usd for s in ledger.status(crawler)] == [Decimal("0.000005")] * 2
    settle(ledger, res, 4000)
    other = reservation("y", tags={"project": "other"}, projected=7000)
    ledger.reserve(other, [crawler, everything])
    settle(ledger, other, 6000)
    assert [s.spent_usd for s in ledger.status(crawler)] == [Decimal("0.000004")] * 2
    assert [s.spent_usd for s in ledger.status(everything)] == [Decimal("0.00001")] * 2
    assert all(s.reserved_usd == 0 for s in ledger.status(everything))


def test_new_budget_backfills_from_existing_rows(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path, clock=lambda: NOW)
    for i in range(5):
        res = reservation(f"r{i}", at=NOW - timedelta(hours=i))
        ledger.reserve(res)
        settle(ledger, res, 1000)
    yesterday = reservation("old", at=NOW - timedelta(days=1))
    ledger.reserve(yesterday)
    settle(ledger, yesterday, 999_999)
    [daily, total] = ledger.status(kb.Budget(daily="1", total="1"))
    assert daily.spent_usd == Decimal("0.000005")
    assert total.spent_usd == Decimal("0.001004999")


def test_settle_after_expiry_replaces_the_estimate(ledger_path: Path) -> None:
    clock = [NOW]
    ledger = kb.Ledger(ledger_path, clock=lambda: clock[0])
    budget = kb.Budget(daily="1")
    slow = reservation("slow", projected=50_000)
    ledger.reserve(slow, [budget])
    clock[0] = NOW + timedelta(minutes=10)
    assert ledger.expire_stale() == 1
    [row] = ledger.calls(1)
    assert row["status"] == "expired" and row["cost_nanos"] == 10 * 600
    settle(ledger, slow, 42_000)
    [row] = ledger.calls(1)
    assert row["status"] == "ok" and row["cost_nanos"] == 42_000
    [daily] = ledger.status(budget)
    assert daily.spent_usd == Decimal("0.000042") and daily.reserved_usd == 0


def test_settlement_survives_json_round_trip() -> None:
    res = reservation("j", tags={"k": "v"})
    settlement = Settlement(res, "ok", 10, 2, 3, 999, True, 2, NOW, "req", 12, None, "note")
    assert Settlement.from_json(settlement.to_json()) == settlement


def test_calls_usd_view_is_readable_by_sqlite_utils(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    res = reservation("v")
    ledger.reserve(res)
    settle(ledger, res, 1_500_000)
    rows = list(sqlite_utils.Database(ledger_path)["calls_usd"].rows)
    assert rows[0]["cost_usd"] == pytest.approx(0.0015)
    assert rows[0]["model"] == "kimi-k2.5"
    assert os.stat(ledger_path).st_size > 0
