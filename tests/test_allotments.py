"""Allotments: a process reserves budget for several calls in one transaction (SQLite).

What must hold: the cap (an allotment is reserved like any call, so no process can spend it
twice), exactness (every call ends as one row of its own; what an allotment did not hand out
goes back), and the rule on unknown bills when the process holding one dies (each call its
journal lists is charged in full; an unreadable journal costs the whole rest).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kimi_budget as kb
from kimi_budget._budget import window_key
from kimi_budget._money import to_usd
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger._allotments import CALLS, IDLE, MODEL, SHARE
from kimi_budget.ledger._sqlite import SQLiteLedger
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY
from tests.fuzz_tally import tried
from tests.test_money_properties import LEDGER_EXAMPLES, ZONES, recomputed

UTC = timezone.utc

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def reservation(
    call_id: str, at: datetime, projected: int = 1_000, *, team: str = "a", ttl: int = 600
) -> Reservation:
    return Reservation(
        call_id=call_id,
        model="kimi-k2.5",
        tags={"team": team},
        created_at=at,
        expires_at=at + timedelta(seconds=ttl),
        projected_nanos=projected,
        prompt_estimate=3,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )


def ok(res: Reservation, cost: int, at: datetime) -> Settlement:
    return Settlement(
        reservation=res,
        status="ok",
        prompt_tokens=1,
        cached_tokens=0,
        completion_tokens=1,
        cost_nanos=cost,
        estimated=False,
        attempts=1,
        finished_at=at,
    )


def raw_rows(ledger: SQLiteLedger) -> list[dict[str, Any]]:
    """Every row, settled or pending, read without a flush (a flush gives allotments back)."""
    cursor = ledger.conn.execute("SELECT * FROM calls_all")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        row["tags"] = json.loads(row["tags"])
    return rows


def allotment_rows(ledger: SQLiteLedger) -> list[dict[str, Any]]:
    return [r for r in raw_rows(ledger) if r["model"] == MODEL]


def assert_totals_are_the_rows(
    ledger: SQLiteLedger, budgets: list[kb.Budget], at: datetime
) -> None:
    """Every stored window total equals its rows, and no total is over its cap."""
    rows = raw_rows(ledger)
    stored = {
        (r[0], r[1], r[2], r[3]): (r[4], r[5])
        for r in ledger.conn.execute(
            "SELECT s.scope, s.tz, w.window, w.start, w.spent_nanos, w.reserved_nanos "
            "FROM window_totals w JOIN budget_scopes s ON s.id = w.scope_id"
        ).fetchall()
    }
    instants = {datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")) for r in rows}
    for budget in budgets:
        for window in budget.windows:
            for instant in instants | {at}:
                key = (
                    budget.scope_key,
                    budget.tz_name,
                    window,
                    window_key(window, instant, budget.tz),
                )
                expected = recomputed(rows, budget, window, instant)
                assert stored.get(key, (0, 0)) == expected, key
                assert sum(expected) <= budget.caps_nanos[window], ("over the cap", key)


def assert_every_call_in_flight_is_held(ledger: SQLiteLedger, in_flight: list[Reservation]) -> None:
    """A call on the wire keeps its budget: a row of its own (pending, or charged in full by
    an expiry), or its allotment's row, holding at least its share."""
    rows = {r["call_id"]: r for r in raw_rows(ledger)}
    for res in in_flight:
        if res.call_id in rows:
            continue
        assert res.allotment_id is not None, f"{res.call_id} has no row"
        allotment = rows.get(res.allotment_id)
        assert allotment is not None and allotment["status"] == "pending", (
            f"{res.call_id} is in flight, but its allotment is gone and it has no row"
        )
        assert allotment["projected_nanos"] >= res.projected_nanos


def traced_ledger(path: Path) -> tuple[SQLiteLedger, list[str]]:
    """A ledger whose SQL statements (the writer's too: same connection) are collected."""
    ledger = kb.Ledger(path)
    ledger._allotment_idle = 3600  # a loaded machine's slow call must not look idle
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    return ledger, statements


def reservation_inserts(statements: list[str]) -> int:
    return sum(s.startswith("INSERT INTO reservations") for s in statements)


def journals(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.allotment-*.jsonl"))


# -- the call path ---------------------------------------------------------------------------


def test_back_to_back_calls_share_one_reservation_transaction(
    ledger_path: Path, standin: MoonshotStandIn
) -> None:
    ledger, statements = traced_ledger(ledger_path)
    client = kb.OpenAI(
        api_key=KEY, base_url=standin.base_url, ledger=ledger, budget=kb.Budget(daily="100")
    )
    for _ in range(10):
        client.chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
    # The first call reserved alone; the second's transaction reserved it and an allotment
    # (its budgets and tags were the first's again); the eight others took shares.
    assert reservation_inserts(statements) == 3
    assert len(journals(ledger_path)) == 1
    ledger.conn.set_trace_callback(None)

    rows = ledger.calls(100)  # a read flushes: settlements written, the allotment given back
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert len({r["call_id"] for r in rows}) == 10
    assert ledger.pending() == [] and journals(ledger_path) == []
    [daily] = ledger.status(kb.Budget(daily="100"))
    assert daily.reserved_usd == 0 and daily.spent_usd == ledger.spend() > 0
    ledger.close()


def test_an_async_service_s_concurrent_calls_take_shares_on_the_loop(
    ledger_path: Path, standin: MoonshotStandIn
) -> None:
    ledger, statements = traced_ledger(ledger_path)

    async def main() -> None:
        client = kb.AsyncOpenAI(
            api_key=KEY, base_url=standin.base_url, ledger=ledger, budget=kb.Budget(daily="100")
        )
        for _ in range(2):  # alone, then with an allotment beside it
            await client.chat.completions.create(
                model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=20
            )
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=20
                )
                for _ in range(10)
            )
        )
        await client.close()

    asyncio.run(main())
    ledger.conn.set_trace_callback(None)
    assert reservation_inserts(statements) == 3
    rows = ledger.calls(100)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert ledger.pending() == [] and journals(ledger_path) == []
    ledger.close()


def test_an_allotment_is_at_most_an_eighth_of_the_room_and_none_near_the_cap(
    ledger_path: Path,
) -> None:
    budget = kb.Budget(daily="0.000100")  # 100,000 nanos
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        ledger.reserve_call(reservation("first", START, 1_000), [budget])
        assert allotment_rows(ledger) == []  # one call is not yet calls back to back
        ledger.reserve_call(reservation("second", START, 1_000), [budget])
        [allotment] = allotment_rows(ledger)
        # Room after the two calls: 98,000; an eighth of it is less than CALLS calls' worth.
        assert allotment["projected_nanos"] == min(CALLS * 1_000, 98_000 // SHARE) == 12_250

    with kb.Ledger(ledger_path.with_name("near.db"), clock=lambda: START) as near:
        near.reserve_call(reservation("big-1", START, 30_000), [budget])
        near.reserve_call(reservation("big-2", START, 30_000), [budget])
        # 40,000 left after them: an eighth (5,000) is not one more such call.
        assert allotment_rows(near) == []


def test_another_process_sees_the_whole_allotment_reserved(ledger_path: Path) -> None:
    budget = kb.Budget(daily="0.000100")
    holder = kb.Ledger(ledger_path, clock=lambda: START)
    holder.reserve_call(reservation("first", START, 8_000), [budget])
    second = holder.reserve_call(reservation("second", START, 8_000), [budget])
    assert second.allotment_id is None  # reserved alone, with the allotment beside it
    [allotment] = allotment_rows(holder)
    held = 16_000 + allotment["projected_nanos"]

    # Another process's check (its own transaction, without this process's give-back on a
    # refusal) counts all of the allotment as reserved.
    other = kb.Ledger(ledger_path, clock=lambda: START)
    room = 100_000 - held
    assert other._reserve(reservation("too-big", START, room + 1), [budget]) is not None
    assert other._reserve(reservation("fits", START, room), [budget]) is None
    holder.close()
    other.close()


def test_a_refusal_gives_back_this_process_s_unused_allotment_first(ledger_path: Path) -> None:
    budget = kb.Budget(daily="0.000100")
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        ledger.reserve_call(reservation("first", START, 1_000), [budget])
        ledger.reserve_call(reservation("second", START, 1_000), [budget])
        assert allotment_rows(ledger)
        # Fits only once the allotment's unused room is given back (both calls still hold).
        big = ledger.reserve_call(reservation("big", START, 98_000), [budget])
        assert big.allotment_id is None
        assert allotment_rows(ledger) == []
        assert_totals_are_the_rows(ledger, [budget], START)


def test_a_flush_shrinks_an_allotment_to_its_shares_in_flight(ledger_path: Path) -> None:
    budget = kb.Budget(daily="1")
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        ledger.reserve_call(reservation("first", START, 1_000), [budget])
        ledger.reserve_call(reservation("second", START, 1_000), [budget])
        share = ledger.reserve_call(reservation("third", START, 1_500), [budget])
        assert share.allotment_id is not None
        ledger.flush()  # what a read does: the unused room goes back, the share stays held
        [allotment] = allotment_rows(ledger)
        assert allotment["projected_nanos"] == 1_500
        assert_every_call_in_flight_is_held(ledger, [share])
        assert_totals_are_the_rows(ledger, [budget], START)
        assert ledger.reserve_call(reservation("fourth", START), [budget]).allotment_id is None

        ledger.settle(ok(share, 700, START))
        ledger.flush()
        assert allotment_rows(ledger) == [] and journals(ledger_path) == []
        assert_totals_are_the_rows(ledger, [budget], START)


def test_an_allotment_unused_for_a_while_goes_back_at_the_writer_s_upkeep(
    ledger_path: Path,
) -> None:
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        ledger.reserve_call(reservation("first", START), [])
        ledger.reserve_call(reservation("second", START), [])
        assert allotment_rows(ledger)
        ledger._upkeep()  # what the writer runs between batches: used a moment ago, kept
        assert allotment_rows(ledger)
        assert ledger._allotments is not None
        for allotment in ledger._allotments._held.values():
            allotment.used_at -= IDLE  # as if a second had passed without a call
        ledger._upkeep()
        assert allotment_rows(ledger) == [] and journals(ledger_path) == []


def test_a_share_is_only_taken_inside_the_allotment_s_windows(ledger_path: Path) -> None:
    now = [datetime(2026, 11, 30, 23, 59, 59, 500_000, tzinfo=UTC)]
    budget = kb.Budget(daily="1", tz="UTC")
    with kb.Ledger(ledger_path, clock=lambda: now[0]) as ledger:
        ledger.reserve_call(reservation("before", now[0]), [budget])
        ledger.reserve_call(reservation("with-allotment", now[0]), [budget])
        share = ledger.reserve_call(reservation("same-day", now[0]), [budget])
        assert share.allotment_id is not None
        now[0] += timedelta(seconds=1)  # the next day: the allotment is reserved in the last
        after = ledger.reserve_call(reservation("next-day", now[0]), [budget])
        assert after.allotment_id is None
        for res in (share, after):
            ledger.settle(ok(res, 500, now[0]))
        assert_totals_are_the_rows(ledger, [budget], now[0])


def test_a_budget_scope_registered_since_ends_the_allotment(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        first = ledger.reserve_call(reservation("first", START), [])
        ledger.reserve_call(reservation("second", START), [])
        assert ledger.reserve_call(reservation("third", START), []).allotment_id is not None
        # Another process starts checking a budget of its own, in a zone whose day ends at
        # another hour: its windows were not among those the allotment was made for.
        with kb.Ledger(ledger_path, clock=lambda: START) as other:
            team = kb.Budget(daily="1", scope={"team": "a"}, tz="Asia/Kolkata")
            other.reserve(reservation("other", START), [team])
        ledger._apply_batch([ok(first, 500, START)])  # the writer's next batch reads the scopes
        after = ledger.reserve_call(reservation("fourth", START), [])
        assert after.allotment_id is None


def test_a_retrying_share_pushes_its_allotment_s_expiry_out_never_in(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path, clock=lambda: START) as ledger:
        ledger.reserve_call(reservation("first", START), [])
        ledger.reserve_call(reservation("second", START), [])
        share = ledger.reserve_call(reservation("third", START), [])
        assert share.allotment_id is not None
        [allotment] = allotment_rows(ledger)
        expires = ledger.conn.execute(
            "SELECT expires_at FROM reservations WHERE call_id = ?", (share.held_by,)
        ).fetchone()[0]
        ledger.extend(share.held_by, START)  # earlier: ignored
        ledger.extend(share.held_by, START + timedelta(hours=2))
        later = ledger.conn.execute(
            "SELECT expires_at FROM reservations WHERE call_id = ?", (allotment["call_id"],)
        ).fetchone()[0]
        assert later > expires and later.startswith("2026-11-30T14:00:00")


# -- a process that dies holding an allotment ------------------------------------------------

DIES_HOLDING_AN_ALLOTMENT = """
import os, sys
from datetime import datetime, timedelta, timezone
import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement

now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
ledger = kb.Ledger(sys.argv[1], clock=lambda: now)
budget = kb.Budget(daily="1")
shares = []
for n in range(5):
    res = Reservation(
        call_id=f"call-{n}", model="kimi-k2.5", tags={"team": "a"}, created_at=now,
        expires_at=now + timedelta(seconds=600), projected_nanos=1_000 + n, prompt_estimate=3,
        price_cache_hit=100, price_cache_miss=600, price_output=3000,
    )
    shares.append(ledger.reserve_call(res, [budget]))
for res in shares[:2]:  # two calls end; three are on the wire when the process dies
    ledger.settle(Settlement(
        reservation=res, status="ok", prompt_tokens=1, cached_tokens=0, completion_tokens=1,
        cost_nanos=400, estimated=False, attempts=1, finished_at=now,
    ))
os._exit(0)  # no exit handlers: the allotment is never given back
"""


@pytest.mark.parametrize("journal", ["kept", "lost"])
def test_a_dead_process_s_allotment_charges_each_unsettled_call_in_full(
    ledger_path: Path, journal: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DIES_HOLDING_AN_ALLOTMENT, str(ledger_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [left] = journals(ledger_path)
    if journal == "lost":
        left.unlink()
    later = START + timedelta(hours=1)
    budget = kb.Budget(daily="1")
    with kb.Ledger(ledger_path, clock=lambda: later) as ledger:  # opening expires what is stale
        rows = {r["call_id"]: r for r in raw_rows(ledger)}
        assert [r for r in rows.values() if r["status"] == "pending"] == []
        assert rows["call-0"]["status"] == rows["call-1"]["status"] == "ok"
        if journal == "kept":
            # call-0 and call-1 reserved alone (the allotment beside call-1); call-2..4 were
            # shares of it.
            for n in (2, 3, 4):
                row = rows[f"call-{n}"]
                assert row["status"] == "expired" and row["estimated"] == 1
                assert row["cost_nanos"] == 1_000 + n  # its full reservation
            assert not any(r["model"] == MODEL for r in rows.values())  # the rest went back
        else:
            # Which calls were on the wire is unknown: all the allotment still held is charged.
            [lump] = [r for r in rows.values() if r["model"] == MODEL]
            assert lump["status"] == "expired" and lump["estimated"] == 1
            assert "journal" in lump["note"]
            assert lump["cost_nanos"] >= 1_002 + 1_003 + 1_004
            assert not any(f"call-{n}" in rows for n in (2, 3, 4))
        assert journals(ledger_path) == []
        assert_totals_are_the_rows(ledger, [budget], later)
        if journal == "kept":
            # The real bill of a call charged in full replaces the estimate when it arrives.
            share = rows["call-3"]
            res = reservation("call-3", START, 1_003)
            assert share["cost_nanos"] == 1_003
            assert ledger.settle(ok(res, 10, later)) is True
            assert (
                raw_rows(ledger)
                and {r["call_id"]: r["cost_nanos"] for r in raw_rows(ledger)}["call-3"] == 10
            )
            assert_totals_are_the_rows(ledger, [budget], later)


def test_a_forked_child_never_takes_its_parent_s_allotment(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path, clock=lambda: START)
    ledger.reserve_call(reservation("parent", START), [])
    ledger.reserve_call(reservation("parent-allots", START), [])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            share = ledger.reserve_call(reservation("child", START), [])
            os.write(write, b"share" if share.allotment_id else b"alone")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 10) == b"alone"
    assert ledger.reserve_call(reservation("parent-2", START), []).allotment_id is not None
    ledger.close()


# -- any sequence of calls, endings, crashes and expiries ------------------------------------------

reserve = st.tuples(st.just("reserve"), st.integers(1, 4_000), st.sampled_from("aaab"))
operation = st.one_of(
    # Mostly calls, with the same tags most of the time, so that allotments are made and
    # shared; time mostly passes by seconds (shares), sometimes by hours (windows end).
    reserve,
    reserve,
    reserve,
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 5_000)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 5_000)),
    st.tuples(st.just("advance"), st.one_of(st.integers(0, 1), st.integers(0, 2 * 3_600))),
    st.tuples(st.just("flush")),
    st.tuples(st.just("crash")),
)


@settings(
    max_examples=2 * LEDGER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(operation, min_size=10, max_size=60),
    tz=st.sampled_from(ZONES),
    daily=st.integers(20_000, 400_000),
    team_cap=st.integers(20_000, 200_000),
)
def test_totals_stay_the_rows_and_under_the_caps_whatever_happens(
    ops: list[tuple[Any, ...]], tz: str, daily: int, team_cap: int
) -> None:
    """Calls through allotments, settlements, time passing, flushes and processes dying with
    allotments held (their memory lost, their journals kept): after every step each window
    total is its rows and no cap is exceeded; in the end, each call is exactly one row."""
    tried(__name__)
    now = [START]
    budgets = [
        kb.Budget(hourly=to_usd(daily // 4), daily=to_usd(daily), tz=tz),
        kb.Budget(daily=to_usd(team_cap), scope={"team": "a"}, tz="Asia/Shanghai"),
    ]
    in_flight: list[Reservation] = []
    accepted: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l.db"
        ledgers = [SQLiteLedger(path, clock=lambda: now[0])]
        for n, op in enumerate(ops):
            ledger = ledgers[-1]
            if op[0] == "reserve":
                res = reservation(f"c{n}", now[0], op[1], team=op[2], ttl=300)
                try:
                    recorded = ledger.reserve_call(res, budgets)
                except kb.BudgetExceededError:
                    pass
                else:
                    in_flight.append(recorded)
                    accepted.add(res.call_id)
            elif op[0] == "settle" and in_flight:
                res = in_flight.pop(op[1] % len(in_flight))
                # A bill within its projection (the caps hold for what was projected), written
                # as the background writer writes a batch (``settle()`` would flush first).
                ledger._apply_batch([ok(res, op[2] % (res.projected_nanos + 1), now[0])])
            elif op[0] == "advance":
                now[0] += timedelta(seconds=op[1])
            elif op[0] == "flush":
                ledger.flush()
            elif op[0] == "crash":
                # The process dies: its allotments' memory is gone, their rows and journals stay.
                assert ledger._allotments is not None
                ledger._allotments.after_fork()
                ledgers.append(SQLiteLedger(path, clock=lambda: now[0]))
                ledger.close()
            ledgers[-1].expire_stale()  # what any process's next write would do
            assert_totals_are_the_rows(ledgers[-1], budgets, now[0])
            assert_every_call_in_flight_is_held(ledgers[-1], in_flight)
        ledger = ledgers[-1]
        for res in in_flight:
            ledger.settle(ok(res, 1, now[0]))
        now[0] += timedelta(days=2)
        ledger.expire_stale()
        ledger.flush()
        rows = raw_rows(ledger)
        assert [r for r in rows if r["status"] == "pending"] == []
        assert [r for r in rows if r["model"] == MODEL] == []
        assert sorted(r["call_id"] for r in rows) == sorted(accepted)
        assert_totals_are_the_rows(ledger, budgets, now[0])
        assert journals(path) == []
        ledger.close()


def test_the_report_tells_an_allotment_from_calls_in_flight(ledger_path: Path) -> None:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    running = kb.Ledger(ledger_path, clock=lambda: START)
    budget = kb.Budget(daily="1")
    for n in range(3):  # alone, with an allotment beside it, then a share of it
        running.reserve_call(reservation(f"call-{n}", START, 1_000), [budget])
    [allotment] = allotment_rows(running)
    assert running._allotments is not None
    running._allotments.after_fork()  # as if another process, still running, held it
    runner = CliRunner()
    data = json.loads(runner.invoke(cli, ["report", "--ledger", str(ledger_path), "--json"]).output)
    assert (data["pending_calls"], data["pending_allotments"]) == (2, 1)
    assert data["pending_reserved_usd"] == str(to_usd(2_000 + allotment["projected_nanos"]))
    text = runner.invoke(cli, ["report", "--ledger", str(ledger_path)]).output
    assert "2 calls in flight and 1 allotment held by a running process" in text
    running.close()
