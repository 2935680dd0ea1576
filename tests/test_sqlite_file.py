"""The SQLite ledger file: created safely, migrated on open, never written through foreign
files, readable by any SQLite tool."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

import kimi_budget as kb
from kimi_budget.ledger.migrations._sqlite import APPLICATION_ID, MIGRATIONS
from tests.test_ledger import reservation, settle


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


def test_calls_usd_view_is_readable_by_sqlite_utils(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    res = reservation("v")
    ledger.reserve(res)
    settle(ledger, res, 1_500_000)
    rows = list(sqlite_utils.Database(ledger_path)["calls_usd"].rows)
    assert rows[0]["cost_usd"] == pytest.approx(0.0015)
    assert rows[0]["model"] == "kimi-k2.5"
    assert os.stat(ledger_path).st_size > 0
