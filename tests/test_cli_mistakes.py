"""What the command line does with people's mistakes and with files that are not its own.

Reading commands never write; a path typed by hand never grows folders; absurd caps and
malformed URLs are refused with the reason; messages speak the command line's words; the
``calls`` listing lines up and says which error a failed call had, without secrets; a refusal
by a cap that cannot reset does not tell anyone to wait.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import kimi_budget as kb
from kimi_budget._exceptions import BudgetExceededError
from kimi_budget.cli import cli
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY
from tests.test_cli import assert_user_error, at, record

READING = (["report"], ["report", "--by", "day", "--chart"], ["status"], ["calls"])


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


# -- reading commands never write ----------------------------------------------------------------


@pytest.mark.parametrize("command", READING)
def test_an_empty_file_is_not_made_a_ledger(command: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    empty = folder / "empty.db"
    empty.touch()
    result = invoke(*command, "--ledger", str(empty))
    assert_user_error(result, str(empty), "empty file", "not a kimi-budget ledger")
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in folder.iterdir()) == ["empty.db"]


@pytest.mark.parametrize("command", READING)
def test_someone_elses_database_is_left_as_it_is(command: list[str], tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.close()
    before = snapshot(tmp_path)
    result = invoke(*command, "--ledger", str(theirs))
    assert_user_error(result, str(theirs), "not a kimi-budget ledger")
    assert snapshot(tmp_path) == before
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n", encoding="utf-8")
    assert_user_error(invoke(*command, "--ledger", str(text)), "not a SQLite database")
    assert text.read_text(encoding="utf-8") == "not a database at all\n"


def test_reading_a_ledger_leaves_its_file_unchanged(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        record(ledger, at(2026, 11, 1, 9), tags={"team": "research"})
        record(ledger, at(2026, 11, 2, 9), model="kimi-k2-thinking")
        # A reservation long past its expiry: a writer would settle it as expired on open.
        record(ledger, at(2026, 11, 2, 10), settle=False)
    before = snapshot(ledger_path.parent)
    for command in READING:
        result = invoke(*command, "--ledger", str(ledger_path), env={"KIMI_BUDGET_DAILY_USD": "1"})
        assert result.exit_code == 0, result.output
    after = snapshot(ledger_path.parent)
    # SQLite's own shared-memory index may appear beside a WAL database that is read (and an
    # empty -wal with it); the ledger itself is byte for byte what it was.
    empty = hashlib.sha256(b"").hexdigest()
    assert after.pop("ledger.db-wal", empty) == empty
    after.pop("ledger.db-shm", None)
    before.pop("ledger.db-shm", None)
    assert after == before
    with sqlite3.connect(f"{ledger_path.as_uri()}?mode=ro", uri=True) as conn:
        # calls_all: the settled calls and the reservations in flight (their own table).
        statuses = sorted(row[0] for row in conn.execute("SELECT status FROM calls_all"))
    conn.close()
    assert statuses == ["ok", "ok", "pending"]


# -- paths, caps and URLs ------------------------------------------------------------------------


def test_demo_in_a_missing_folder_names_it_and_makes_none(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "demo.db"
    result = invoke("demo", "--ledger", str(target))
    assert_user_error(result, "--ledger", f"the folder {tmp_path / 'no' / 'such'} does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", READING)
def test_a_ledger_in_a_missing_folder_is_not_suggested_to_the_demo(
    command: list[str], tmp_path: Path
) -> None:
    target = tmp_path / "gone" / "x.db"
    result = invoke(*command, "--ledger", str(target))
    assert_user_error(result, f"the folder {tmp_path / 'gone'} does not exist")
    assert "kimi-budget demo" not in result.stderr


def test_demo_in_an_existing_folder_still_works(tmp_path: Path) -> None:
    result = invoke("demo", "--ledger", str(tmp_path / "demo.db"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.db").exists()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1e400", "more than kimi-budget can count"),
        ("9223372037", "more than kimi-budget can count"),
        ("0.0000000001", "less than one nano-dollar"),
        ("1E-30", "less than one nano-dollar"),
    ],
)
def test_absurd_caps_are_refused_with_the_reason(
    value: str, reason: str, ledger_path: Path
) -> None:
    with pytest.raises(ValueError, match=reason):
        kb.Budget(daily=value)
    kb.Ledger(ledger_path).close()
    result = invoke("status", "--ledger", str(ledger_path), env={"KIMI_BUDGET_DAILY_USD": value})
    assert_user_error(result, "KIMI_BUDGET_DAILY_USD", reason)


def test_sensible_caps_at_the_edges_are_kept() -> None:
    assert kb.Budget(daily="0.000000001").caps_nanos["daily"] == 1
    assert kb.Budget(total="9223372036").caps["total"] == Decimal("9223372036")
    assert kb.Budget(daily="0").caps_nanos["daily"] == 0


@pytest.mark.parametrize("url", ["not-a-url", "http://", "ftp://api.moonshot.ai/v1", "https://:80"])
def test_balance_with_a_malformed_url_says_so(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONSHOT_API_KEY", KEY)
    result = invoke("balance", "--base-url", url)
    assert_user_error(result, "--base-url", "is not a URL")
    assert KEY not in result.output


def test_library_words_become_command_line_words(tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("someone's file\n", encoding="utf-8")
    link = tmp_path / "link.db"
    link.symlink_to(stranger)
    result = invoke("demo", "--ledger", str(link))
    assert_user_error(result, "--ledger")
    assert "ledger=" not in result.stderr
    assert stranger.read_text(encoding="utf-8") == "someone's file\n"


# -- the calls listing ---------------------------------------------------------------------------


def _error_row(ledger: kb.Ledger, error: str) -> None:
    when = at(2026, 11, 3, 12)
    reservation = Reservation(
        call_id=uuid.uuid4().hex,
        model="kimi-k2.5",
        tags={},
        created_at=when,
        expires_at=when + timedelta(hours=1),
        projected_nanos=5_000_000,
        prompt_estimate=10,
        price_cache_hit=150,
        price_cache_miss=600,
        price_output=3000,
    )
    ledger.reserve(reservation)
    ledger.settle(
        Settlement(
            reservation=reservation,
            status="error",
            prompt_tokens=None,
            cached_tokens=None,
            completion_tokens=None,
            cost_nanos=0,
            estimated=False,
            attempts=3,
            finished_at=when + timedelta(seconds=1),
            error=error,
        )
    )


def test_calls_line_up_their_costs_and_name_the_error(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with kb.Ledger(ledger_path) as ledger:
        record(ledger, at(2026, 11, 1, 9), prompt=200_000, cached=150_000, completion=3000)
        record(ledger, at(2026, 11, 2, 9), prompt=12, completion=3)
        record(ledger, at(2026, 11, 2, 10), prompt=800, status="abandoned", estimated=True)
        _error_row(ledger, f"HTTP 401 invalid_authentication_error: bad key {KEY}")
    monkeypatch.setenv("MOONSHOT_API_KEY", KEY)
    result = invoke("calls", "--ledger", str(ledger_path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    ends = {m.end() for m in (re.search(r"~?\$[\d.]+", line) for line in lines) if m}
    assert len(ends) == 1, result.stdout  # every cost ends in the same column
    error_line = next(line for line in lines if " error " in line)
    assert "HTTP 401 invalid_authentication_error" in error_line
    assert KEY not in result.stdout and "***" in error_line


# -- refusals that cannot wait -------------------------------------------------------------------


def _refusal(window: str, limit: str, spent: str = "0") -> str:
    return str(
        BudgetExceededError(
            window=window,
            limit_usd=Decimal(limit),
            spent_usd=Decimal(spent),
            reserved_usd=Decimal(0),
            projected_usd=Decimal("0.01"),
            model="kimi-k2.6",
            resets_at=None if window == "total" else "2026-12-01T00:00:00+00:00",
        )
    )


def test_refusals_say_to_wait_only_when_waiting_helps() -> None:
    assert "wait for the window to reset" in _refusal("daily", "1", "0.995")
    total = _refusal("total", "1", "0.995")
    assert "wait" not in total and "never resets" in total
    for window in ("daily", "total", "per_call"):
        zero = _refusal(window, "0")
        assert "wait" not in zero and "reset" not in zero and "$0" in zero
        assert "blocks every call" in zero


@pytest.mark.parametrize(
    ("budget", "says"),
    [({"total": "0.0001"}, "never resets"), ({"daily": "0"}, "blocks every call")],
)
def test_a_real_refusal_by_a_cap_that_cannot_reset(
    budget: dict[str, Any], says: str, ledger_path: Path
) -> None:
    with MoonshotStandIn(api_key=KEY) as server:
        client = kb.OpenAI(
            api_key=KEY, base_url=server.base_url, ledger=ledger_path, budget=kb.Budget(**budget)
        )
        with pytest.raises(kb.BudgetExceededError) as refused:
            client.chat.completions.create(
                model="kimi-k2.5",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=1000,
            )
        client.close()
        assert server.chat_requests == []
    assert says in str(refused.value) and "wait" not in str(refused.value)
    assert os.environ.get("MOONSHOT_API_KEY") is None
