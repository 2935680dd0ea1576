"""At most one transaction on the call path: settlements go to a background writer (which also
reads a returned call's bill), reads by the same process flush first, close() and exit flush,
and a crash with settlements queued leaves reservations that expire at their full worst case;
the async client reserves off the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import kimi_budget as kb
from kimi_budget._guard import Call
from kimi_budget.ledger import LateSettlement, Reservation, Settlement
from kimi_budget.ledger._sqlite import SQLiteLedger
from kimi_budget.ledger._writer import SettleWriter
from kimi_budget.ledger.migrations import _sqlite as migrations
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

NOW = datetime.now(timezone.utc)


def reservation(call_id: str, projected: int = 60_000, ttl: float = 86_400) -> Reservation:
    return Reservation(
        call_id,
        "kimi-k2.5",
        {},
        NOW,
        NOW + timedelta(seconds=ttl),
        projected,
        10,
        100,
        600,
        3000,
    )


def ok(res: Reservation, cost: int = 10_000) -> Settlement:
    return Settlement(res, "ok", 10, 0, 2, cost, False, 1, NOW)


def test_reads_of_the_same_process_see_queued_settlements(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
    budget = kb.Budget(daily="1")
    for i in range(20):
        res = reservation(f"c{i}")
        ledger.reserve(res, [budget])
        ledger.settle_later(ok(res))
    assert ledger.spend() == Decimal("0.0002")
    assert ledger.pending() == []
    [daily] = ledger.status(budget)
    assert (daily.spent_usd, daily.reserved_usd) == (Decimal("0.0002"), 0)
    assert {row["status"] for row in ledger.calls(50)} == {"ok"}


def test_settlements_gather_into_one_batch_and_a_flush_does_not_wait_for_the_linger() -> None:
    applied: list[list[str]] = []
    # An hour's linger: only a flush can have the batch written before the test times out.
    writer = SettleWriter(
        lambda batch: applied.append([s.reservation.call_id for s in batch]),
        lambda batch, exc: None,
        linger=3600,
    )
    for i in range(5):
        writer.submit(ok(reservation(f"c{i}")))
    assert writer.queued == 5
    assert writer.flush(timeout=60)
    assert applied == [[f"c{i}" for i in range(5)]]
    writer.close()


def test_a_batch_moves_each_window_total_once_by_the_sum_of_its_settlements(
    ledger_path: Path,
) -> None:
    ledger = kb.Ledger(ledger_path, clock=lambda: NOW)
    assert isinstance(ledger, SQLiteLedger)
    budget = kb.Budget(hourly="1", daily="1", total="1")
    settlements = []
    for i in range(30):
        res = reservation(f"c{i}", projected=60_000 + i)
        ledger.reserve(res, [budget])
        settlements.append(ok(res, cost=1_000 * i))
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    ledger._apply_batch(settlements)  # what the writer does with a queue of 30
    ledger.conn.set_trace_callback(None)
    assert sum("INTO window_totals" in sql for sql in statements) == 1
    spent = sum(1_000 * i for i in range(30))
    for window in ledger.status(budget):
        assert (window.spent_usd, window.reserved_usd) == (Decimal(spent) / 10**9, 0)
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("SELECT sum(cost_nanos) FROM calls").fetchone()[0] == spent


def test_a_refusal_flushes_queued_settlements_and_looks_again(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No writer thread: queued settlements wait until someone flushes.
    monkeypatch.setattr(SettleWriter, "_start", lambda self: None)
    ledger = kb.Ledger(ledger_path, clock=lambda: NOW)
    budget = kb.Budget(daily="0.0001")  # 100_000 nanos
    first = reservation("first")
    ledger.reserve(first, [budget])
    ledger.settle_later(ok(first))  # queued: 60_000 still reserved in the ledger
    stored = sqlite3.connect(ledger_path).execute("SELECT count(*) FROM reservations")
    assert stored.fetchone()[0] == 1
    ledger.reserve(reservation("second"), [budget])  # 60_000 + 60_000 > cap until flushed
    [daily] = ledger.status(budget)
    assert (daily.spent_usd, daily.reserved_usd) == (Decimal("0.00001"), Decimal("0.00006"))


def test_close_flushes(ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SettleWriter, "_start", lambda self: None)
    ledger = kb.Ledger(ledger_path)
    res = reservation("closing")
    ledger.reserve(res)
    ledger.settle_later(ok(res))
    ledger.close()
    row = sqlite3.connect(ledger_path).execute("SELECT status, cost_nanos FROM calls").fetchall()
    assert row == [("ok", 10_000)]


_CHILD = """
import os, signal, sys, time
from datetime import datetime, timedelta, timezone
import kimi_budget as kb
from kimi_budget._guard import Call
from kimi_budget.ledger import LateSettlement, Reservation, Settlement
from kimi_budget.ledger._sqlite import SQLiteLedger

path, how = sys.argv[1], sys.argv[2]
if how == "killed":
    # The writer never gets to write: the process dies with its settlements queued.
    SQLiteLedger._apply_batch = lambda self, batch: time.sleep(3600)
now = datetime.now(timezone.utc)
ledger = kb.Ledger(path)
budget = kb.Budget(daily="0.0002")
for i in range(3):
    res = Reservation(f"{how}-{i}", "kimi-k2.5", {}, now, now + timedelta(seconds=60),
                      60_000, 10, 100, 600, 3000)
    ledger.reserve(res, [budget])
    ledger.settle_later(Settlement(res, "ok", 10, 0, 2, 10_000, False, 1, now))
if how == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
# "exits": no close(), no flush by hand; interpreter exit must write them.
"""


def test_exit_flushes_queued_settlements(ledger_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ledger_path), "exits"], timeout=60)
    assert done.returncode == 0
    with kb.Ledger(ledger_path) as ledger:
        assert ledger.pending() == []
        assert ledger.spend() == Decimal("0.00003")


def test_a_crash_with_queued_settlements_expires_them_at_their_worst_case(
    ledger_path: Path,
) -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ledger_path), "killed"], timeout=60)
    assert done.returncode == -9
    budget = kb.Budget(daily="0.0002")
    with kb.Ledger(ledger_path) as ledger:
        # Nothing queued was written: the three reservations still hold their worst case.
        assert len(ledger.pending()) == 3
        [daily] = ledger.status(budget)
        assert daily.reserved_usd == Decimal("0.00018")
    later = datetime.now(timezone.utc) + timedelta(minutes=2)
    with kb.Ledger(ledger_path, clock=lambda: later) as ledger:
        rows = ledger.calls(10)
        assert {(r["status"], r["cost_nanos"], r["estimated"]) for r in rows} == {
            ("expired", 60_000, 1)
        }
        [daily] = ledger.status(budget)
        assert (daily.spent_usd, daily.reserved_usd) == (Decimal("0.00018"), 0)


def test_pending_rows_of_an_older_ledger_move_to_the_reservations(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = sqlite3.connect(ledger_path, isolation_level=None)
    before = [m for m in migrations.MIGRATIONS if m[0] != "m006_reservations"]
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", before)
        migrations.apply_migrations(old)
    expires = (NOW + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    created = NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    old.execute(
        "INSERT INTO calls (call_id, created_at, model, tags, status, projected_nanos, "
        "prompt_estimate, price_cache_hit, price_cache_miss, price_output, estimated, "
        "expires_at) VALUES ('old-pending', ?, 'kimi-k2.5', '{}', 'pending', 70000, 10, 100, "
        "600, 3000, 1, ?)",
        (created, expires),
    )
    old.close()
    with kb.Ledger(ledger_path, clock=lambda: NOW) as ledger:
        [pending] = ledger.pending()
        assert (pending["call_id"], pending["projected_nanos"]) == ("old-pending", 70_000)
        stored = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        assert stored == 0  # calls holds settled calls only
        [row] = ledger.conn.execute("SELECT call_id, status FROM calls_all").fetchall()
        assert row == ("old-pending", "pending")
        res = reservation("old-pending", projected=70_000)
        assert ledger.settle(ok(res)) is True
        assert ledger.spend() == Decimal("0.00001") and ledger.pending() == []


def test_the_async_client_waits_for_a_locked_ledger_off_the_loop(
    ledger_path: Path, standin: MoonshotStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = kb.Ledger(ledger_path, busy_timeout=10)
    tries: list[bool] = []  # whether each try on the loop reserved
    try_reserve_call = SQLiteLedger.try_reserve_call

    def spy(self: SQLiteLedger, *args: Any) -> Reservation | None:
        recorded = try_reserve_call(self, *args)
        tries.append(recorded is not None)
        return recorded

    monkeypatch.setattr(SQLiteLedger, "try_reserve_call", spy)
    holder = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction

    async def main() -> str | None:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger)
        calling = asyncio.ensure_future(
            client.chat.completions.create(
                model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        )
        for _ in range(10_000):  # loop turns, not time: until the reserve was tried
            if tries or calling.done():
                break
            await asyncio.sleep(0.001)
        # This runs only because the reserve did not hold the loop: it ends the other
        # transaction, which is what lets the reserve (in a worker thread) finish at all.
        assert tries == [False]
        holder.execute("ROLLBACK")
        response = await calling
        await client.close()
        return response.choices[0].message.content

    assert asyncio.run(main())
    assert ledger.pending() == [] and len(ledger.calls(5)) == 1
    holder.close()
    ledger.close()


def test_an_unlocked_ledger_is_reserved_on_the_loop_without_a_thread(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    assert ledger.try_reserve(reservation("now"), [kb.Budget(daily="1")]) is True
    holder = sqlite3.connect(ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    assert ledger.try_reserve(reservation("later"), [kb.Budget(daily="1")]) is False
    holder.execute("ROLLBACK")
    holder.close()
    assert [row["call_id"] for row in ledger.pending()] == ["now"]


def test_a_settlement_written_just_after_a_refusal_lets_the_call_through(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call projected at 150_000 nanos and billed 10_000: while its settlement is queued, its
    # reservation holds the 150_000, and a 100_000 call does not fit a 200_000 cap. The writer
    # commits the settlement right after the check refused (no longer queued then): the
    # refusal is stale, and the check must be made again, which lets the call through.
    # The writer takes the settlement but waits to write it until the check has refused
    # (patched before the ledger exists: its writer keeps the method it was given).
    gate = threading.Event()
    apply_batch = SQLiteLedger._apply_batch

    def gated(self: SQLiteLedger, batch: Any) -> None:
        gate.wait(30)
        apply_batch(self, batch)

    monkeypatch.setattr(SQLiteLedger, "_apply_batch", gated)
    ledger = kb.Ledger(ledger_path, clock=lambda: NOW)
    budget = kb.Budget(daily="0.0002")
    first = reservation("first", projected=150_000)
    ledger.reserve(first, [budget])
    ledger.settle_later(ok(first, cost=10_000))
    real = SQLiteLedger._reserve
    checks: list[bool] = []

    def writer_commits_just_after(self: SQLiteLedger, *args: Any, **kwargs: Any) -> Any:
        refusal = real(self, *args, **kwargs)
        checks.append(refusal is not None)
        gate.set()
        self._settler.flush()  # the writer commits now, after the check
        return refusal

    monkeypatch.setattr(SQLiteLedger, "_reserve", writer_commits_just_after)
    ledger.reserve(reservation("second", projected=100_000), [budget])
    assert checks == [True, False]
    [daily] = ledger.status(budget)
    assert (daily.spent_usd, daily.reserved_usd) == (Decimal("0.00001"), Decimal("0.0001"))


def test_a_returned_call_s_bill_is_read_by_the_writer_not_the_caller(
    ledger_path: Path, standin: MoonshotStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers: list[str] = []
    bill_of = Call._bill_of

    def spy(self: Call, result: Any) -> Any:
        readers.append(threading.current_thread().name)
        return bill_of(self, result)

    monkeypatch.setattr(Call, "_bill_of", spy)
    client = kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=kb.Ledger(ledger_path))
    response = client.chat.completions.create(
        model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert response.usage is not None
    client.ledger.flush()
    assert readers == ["kimi-budget settle writer"]
    [row] = client.ledger.calls(5)
    assert row["status"] == "ok" and not row["estimated"]
    assert row["completion_tokens"] == response.usage.completion_tokens
    client.close()


def test_a_late_settlement_that_cannot_be_worked_out_costs_the_full_reservation(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
    res = reservation("late")
    ledger.reserve(res, [kb.Budget(daily="1")])

    def broken() -> Settlement:
        raise ValueError("a bug of ours")

    ledger.settle_later(LateSettlement(res, broken))
    [row] = ledger.calls(5)
    assert row["status"] == "ok" and row["estimated"] == 1
    assert row["cost_nanos"] == res.projected_nanos
    assert "could not read the bill" in row["note"]
    assert "a bug of ours" in caplog.text
    assert ledger.pending() == []
    ledger.close()
