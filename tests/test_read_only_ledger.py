"""A ledger the user may read but not write: read without creating, migrating, expiring or
merging anything; every write is one clear LedgerError."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger import _sqlite as sqlite_backend
from kimi_budget.ledger.migrations import _sqlite as migrations

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def reservation(call_id: str, projected: int = 50_000, ttl: int = 5) -> Reservation:
    return Reservation(
        call_id, "kimi-k2.5", {}, NOW, NOW + timedelta(minutes=ttl), projected, 10, 100, 600, 3000
    )


def make_ledger(path: Path) -> None:
    """A ledger with a settled call, a stale reservation and an unmerged fallback line."""
    with kb.Ledger(path, clock=lambda: NOW) as ledger:
        done = reservation("done")
        ledger.reserve(done, [kb.Budget(daily="1")])
        ledger.settle(Settlement(done, "ok", 10, 0, 1, 9_000, False, 1, NOW))
        ledger.reserve(reservation("stale", projected=20_000))
        late = reservation("late")
        ledger.reserve(late)
        ledger.write_fallback(
            Settlement(late, "ok", 10, 0, 1, 3_000, False, 1, NOW), OSError("locked")
        )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_reads_change_nothing(ledger_path: Path) -> None:
    make_ledger(ledger_path)
    before = snapshot(ledger_path.parent)
    later = NOW + timedelta(hours=1)  # "stale" is past its expiry now
    with kb.Ledger(ledger_path, read_only=True, clock=lambda: later) as ledger:
        assert ledger.read_only
        assert ledger.spend() == Decimal("0.000009")
        assert {row["call_id"] for row in ledger.pending()} == {"stale", "late"}
        assert len(ledger.calls(10)) == 3
        [daily] = ledger.status(kb.Budget(daily="1"))
        # The stale reservation is not expired, but it counts at its full worst case.
        assert daily.spent_usd + daily.reserved_usd == Decimal("0.000079")
        with pytest.raises(kb.LedgerError, match="read-only") as info:
            ledger.reserve(reservation("new"))
        assert "\n" not in str(info.value)
        with pytest.raises(kb.LedgerError, match="read-only"):
            ledger.expire_stale()
    after = snapshot(ledger_path.parent)
    # The fallback file is still there, unmerged; the ledger's bytes are the same. (SQLite
    # may add its -shm/-wal index files beside a ledger in a folder we may write.)
    assert after["ledger.db.fallback.jsonl"] == before["ledger.db.fallback.jsonl"]
    assert after["ledger.db"] == before["ledger.db"]


def test_a_missing_ledger_is_not_created(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    with pytest.raises(kb.LedgerError, match="no ledger"):
        kb.Ledger(folder / "nothing.db", read_only=True)
    assert not folder.exists()


def test_an_old_ledger_is_read_without_migrating(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = sqlite3.connect(ledger_path, isolation_level=None)
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
        migrations.apply_migrations(old)  # the schema an older kimi-budget made
    old.execute(
        "INSERT INTO calls (call_id, created_at, model, tags, status, cost_nanos, "
        "price_cache_hit, price_cache_miss, price_output) VALUES "
        "('x', '2026-11-28T10:00:00.000000Z', 'kimi-k2.5', '{}', 'ok', 5000, 1, 2, 3)"
    )
    old.close()
    with kb.Ledger(ledger_path, read_only=True, clock=lambda: NOW) as ledger:
        assert ledger.spend() == Decimal("0.000005")
        assert ledger.spend(currency="CNY") == 0
        [daily] = ledger.status(kb.Budget(daily="1"))
        assert daily.spent_usd == Decimal("0.000005")
    applied = sqlite3.connect(ledger_path).execute("SELECT name FROM _kimi_budget_migrations")
    assert [row[0] for row in applied] == ["m001_calls", "m002_usage_rollup"]


def test_a_ledger_the_user_may_not_write_opens_read_only(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_ledger(ledger_path)
    # As root every file is writable: stand in for the permission check itself.
    monkeypatch.setattr(sqlite_backend, "_writable", lambda path: False)
    with kb.Ledger(ledger_path) as ledger:
        assert ledger.read_only and ledger.spend() == Decimal("0.000009")
        with pytest.raises(kb.LedgerError, match="may read this file but not write it"):
            ledger.reserve(reservation("new"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_file_opens_read_only(ledger_path: Path) -> None:
    make_ledger(ledger_path)
    ledger_path.chmod(0o444)
    with kb.Ledger(ledger_path) as ledger:
        assert ledger.read_only and ledger.spend() == Decimal("0.000009")


@pytest.mark.parametrize("command", [["report"], ["status"], ["calls"]])
def test_reading_commands_open_the_ledger_read_only(ledger_path: Path, command: list[str]) -> None:
    from kimi_budget.cli import cli

    make_ledger(ledger_path)
    before = snapshot(ledger_path.parent)
    result = CliRunner().invoke(cli, [*command, "--ledger", str(ledger_path)])
    assert result.exit_code == 0, result.output
    after = snapshot(ledger_path.parent)
    assert after["ledger.db"] == before["ledger.db"]
    assert after["ledger.db.fallback.jsonl"] == before["ledger.db.fallback.jsonl"]
