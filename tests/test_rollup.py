"""The usage rollup: always equal to a GROUP BY over the rows, and reports read from it are
the reports read from the rows.

The oracle here is Python over ``SELECT ... FROM calls``: it floors each ``created_at`` with
``datetime`` arithmetic, independently of the SQL that the triggers and the migration use.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kimi_budget as kb
from kimi_budget._budget import format_utc, parse_utc
from kimi_budget.cli._report import build_report, is_slot, list_calls, slot_of
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger.migrations import _sqlite as _migrations

UTC = timezone.utc
FULL = os.environ.get("KB_STRESS_SIZE", "").lower() == "full"
EXAMPLES = 300 if FULL else 25
MODELS = {  # nano-dollars per token: cache hit, cache miss, output
    "kimi-k2.5": (100, 600, 3000),
    "kimi-k3": (200, 1500, 7500),
    "moonshot-v1-8k": (200, 200, 2000),
}
TAG_SETS = [{}, {"project": "crawler"}, {"project": "chat", "team": "a"}, {"team": "a"}]
# Whole-hour, half-hour and quarter-hour offsets, DST and not, both sides of UTC.
ZONES = [
    "UTC",
    "Asia/Shanghai",
    "Asia/Kathmandu",
    "Asia/Kolkata",
    "America/St_Johns",
    "Australia/Adelaide",
    "Europe/London",
    "America/Los_Angeles",
    "Pacific/Chatham",
]


# -- the oracle ----------------------------------------------------------------------------------


def python_slot(created_at: str) -> str:
    try:
        instant = parse_utc(created_at)
    except ValueError:
        return created_at  # hand-written text keeps its own place
    return format_utc(instant.replace(minute=instant.minute // 15 * 15, second=0, microsecond=0))


def expected_rollup(conn: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[int, ...]]:
    totals: dict[tuple[str, str, str], list[int]] = {}
    for row in conn.execute(
        "SELECT created_at, model, tags, prompt_tokens, cached_tokens, completion_tokens, "
        "cost_nanos, estimated, price_cache_hit, price_cache_miss FROM calls "
        "WHERE status != 'pending'"
    ):
        created, model, tags, prompt, cached, completion, cost, estimated, hit, miss = row
        clamped = max(min(cached or 0, prompt or 0), 0)
        values = [1, prompt or 0, clamped, completion or 0, cost, clamped * (miss - hit), estimated]
        key = (python_slot(created), model, tags)
        current = totals.setdefault(key, [0] * len(values))
        for i, value in enumerate(values):
            current[i] += value
    return {key: tuple(values) for key, values in totals.items()}


def stored_rollup(conn: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[int, ...]]:
    return {
        (r[0], r[1], r[2]): tuple(r[3:])
        for r in conn.execute(
            "SELECT bucket, model, tags, calls, prompt_tokens, cached_tokens, "
            "completion_tokens, cost_nanos, savings_nanos, estimated FROM usage_rollup"
        )
    }


def assert_exact(ledger: kb.Ledger) -> None:
    stored = stored_rollup(ledger.conn)
    assert stored == expected_rollup(ledger.conn)
    assert all(values[0] > 0 for values in stored.values()), "no empty keys are left behind"


# -- writing calls -------------------------------------------------------------------------------


def reservation(
    when: datetime,
    *,
    model: str = "kimi-k2.5",
    tags: dict[str, str] | None = None,
    prompt: int = 1000,
    ttl: timedelta = timedelta(hours=1),
) -> Reservation:
    hit, miss, out = MODELS[model]
    return Reservation(
        call_id=uuid.uuid4().hex,
        model=model,
        tags=dict(tags or {}),
        created_at=when,
        expires_at=when + ttl,
        projected_nanos=prompt * miss + 1000 * out,
        prompt_estimate=prompt,
        price_cache_hit=hit,
        price_cache_miss=miss,
        price_output=out,
    )


def settlement(
    res: Reservation,
    *,
    status: str = "ok",
    prompt: int | None = 1000,
    cached: int | None = 0,
    completion: int | None = 100,
    estimated: bool = False,
) -> Settlement:
    cost = 0
    if prompt is not None:
        c = max(min(cached or 0, prompt), 0)
        cost = (
            c * res.price_cache_hit
            + (prompt - c) * res.price_cache_miss
            + (completion or 0) * res.price_output
        )
    return Settlement(
        reservation=res,
        status=status,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        cost_nanos=cost,
        estimated=estimated,
        attempts=1,
        finished_at=res.created_at + timedelta(seconds=3),
    )


def at(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc, arg-type]


# -- the rollup is exact on every write path -----------------------------------------------------


def test_schema_rollup_triggers_and_no_model_index(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        names = {(r[0], r[1]) for r in ledger.conn.execute("SELECT type, name FROM sqlite_master")}
        applied = [r[0] for r in ledger.conn.execute("SELECT name FROM _kimi_budget_migrations")]
    assert ("table", "usage_rollup") in names
    assert {n for t, n in names if t == "trigger"} == {
        "usage_rollup_insert",
        "usage_rollup_update_old",
        "usage_rollup_update_new",
        "usage_rollup_delete",
    }
    assert ("index", "calls_model_created_at") not in names
    assert ("index", "calls_created_at") in names
    assert applied == [name for name, _ in _migrations.MIGRATIONS]


def test_every_write_path_keeps_the_rollup_exact(ledger_path: Path) -> None:
    now = [at(2026, 11, 28, 6, 44, 59)]
    with kb.Ledger(ledger_path, clock=lambda: now[0]) as ledger:
        # A reservation in flight is not spend, and not in the rollup.
        pending = reservation(now[0], tags={"project": "crawler"})
        ledger.reserve(pending)
        assert stored_rollup(ledger.conn) == {}

        ok = reservation(now[0], tags={"project": "crawler"})
        ledger.reserve(ok)
        assert ledger.settle(settlement(ok, cached=400)) is True
        assert stored_rollup(ledger.conn) == {
            (
                "2026-11-28T06:30:00.000000Z",
                "kimi-k2.5",
                '{"project":"crawler"}',
            ): (1, 1000, 400, 100, 400 * 100 + 600 * 600 + 100 * 3000, 400 * 500, 0)
        }

        for status, prompt in [("error", None), ("abandoned", 500), ("cancelled", None)]:
            res = reservation(now[0], model="kimi-k3")
            ledger.reserve(res)
            ledger.settle(settlement(res, status=status, prompt=prompt, estimated=True))
        assert_exact(ledger)

        # Cached tokens over the prompt, or negative, are clamped as costs are.
        odd = reservation(now[0])
        ledger.reserve(odd)
        ledger.settle(settlement(odd, prompt=50, cached=80))
        odd2 = reservation(now[0])
        ledger.reserve(odd2)
        ledger.settle(settlement(odd2, prompt=50, cached=-5))
        assert_exact(ledger)

        # The pending reservation dies: the next write expires it at its estimated cost...
        now[0] += timedelta(hours=2)
        assert ledger.expire_stale() == 1
        assert_exact(ledger)
        expired_key = (
            python_slot(format_utc(pending.created_at)),
            "kimi-k2.5",
            '{"project":"crawler"}',
        )
        assert stored_rollup(ledger.conn)[expired_key][6] == 1  # one estimated call
        # ...and its real outcome, arriving late, replaces the estimate in place.
        assert ledger.settle(settlement(pending, cached=999, completion=7)) is True
        assert stored_rollup(ledger.conn)[expired_key][6] == 0
        assert_exact(ledger)


def test_settling_twice_changes_nothing(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        res = reservation(at(2026, 11, 2, 23, 59))
        ledger.reserve(res)
        assert ledger.settle(settlement(res))
        before = stored_rollup(ledger.conn)
        assert not ledger.settle(settlement(res))
        assert not ledger.settle(settlement(res, status="error", prompt=None))
        assert not ledger.settle(settlement(res, status="expired", estimated=True))
        assert stored_rollup(ledger.conn) == before
        assert_exact(ledger)


def test_an_expired_call_that_expires_again_changes_nothing(ledger_path: Path) -> None:
    now = [at(2026, 11, 2, 10)]
    with kb.Ledger(ledger_path, clock=lambda: now[0]) as ledger:
        res = reservation(now[0], ttl=timedelta(minutes=1))
        ledger.reserve(res)
        now[0] += timedelta(minutes=5)
        ledger.expire_stale()
        before = stored_rollup(ledger.conn)
        assert not ledger.settle(settlement(res, status="expired", prompt=1, estimated=True))
        assert stored_rollup(ledger.conn) == before
        assert_exact(ledger)


def test_fallback_settlements_are_merged_into_the_rollup(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        in_file = reservation(at(2026, 11, 3, 1, 14), tags={"team": "a"})
        ledger.reserve(in_file)
        # A reservation that never reached this file (its process wrote elsewhere first).
        missing = reservation(at(2026, 11, 3, 1, 15), model="kimi-k3", tags={"team": "a"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ledger.write_fallback(settlement(in_file, cached=10), OSError("disk full"))
            ledger.write_fallback(settlement(missing, cached=10), OSError("disk full"))
        assert stored_rollup(ledger.conn) == {}
    with kb.Ledger(ledger_path) as reopened:
        assert not reopened.fallback_path.exists()
        rollup = stored_rollup(reopened.conn)
        assert {key[0] for key in rollup} == {
            "2026-11-03T01:00:00.000000Z",
            "2026-11-03T01:15:00.000000Z",
        }
        assert sum(values[0] for values in rollup.values()) == 2
        assert_exact(reopened)


def test_rows_fixed_or_deleted_by_hand_move_the_rollup_too(ledger_path: Path) -> None:
    with kb.Ledger(ledger_path) as ledger:
        calls = []
        for minute in (0, 14, 15, 59):
            res = reservation(at(2026, 11, 4, 9, minute), tags={"project": "crawler"})
            ledger.reserve(res)
            ledger.settle(settlement(res))
            calls.append(res)
        conn = ledger.conn
        conn.execute("UPDATE calls SET model = 'kimi-k3' WHERE call_id = ?", (calls[0].call_id,))
        conn.execute("UPDATE calls SET cost_nanos = 1 WHERE call_id = ?", (calls[1].call_id,))
        conn.execute("DELETE FROM calls WHERE call_id = ?", (calls[2].call_id,))
        conn.execute(
            "UPDATE calls SET note = 'checked', expires_at = NULL WHERE call_id = ?",
            (calls[3].call_id,),
        )
        # A row written by hand in another ISO form keeps its own text as its slot.
        conn.execute(
            "INSERT INTO calls (call_id, created_at, model, tags, status, cost_nanos, "
            "price_cache_hit, price_cache_miss, price_output) "
            "VALUES ('by-hand', '2026-11-04 09:20', 'kimi-k2.5', '{}', 'ok', 5, 1, 2, 3)"
        )
        assert_exact(ledger)
        assert ("2026-11-04 09:20", "kimi-k2.5", "{}") in stored_rollup(conn)


# -- upgrading a ledger made before the rollup ---------------------------------------------------


def make_v1_ledger(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger as kimi-budget wrote it before m002 (every migration but the rollup applied:
    the columns of later migrations are written by today's code)."""
    without_rollup = [m for m in _migrations.MIGRATIONS if m[0] != "m002_usage_rollup"]
    with monkeypatch.context() as m:
        m.setattr(_migrations, "MIGRATIONS", without_rollup)
        with kb.Ledger(path) as ledger:
            names = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master")}
            assert "usage_rollup" not in names and "calls_model_created_at" in names
            for i in range(60):
                when = at(2026, 10, 30, 22) + timedelta(minutes=7 * i, seconds=i)
                res = reservation(
                    when,
                    model=list(MODELS)[i % 3],
                    tags=TAG_SETS[i % len(TAG_SETS)],
                    ttl=timedelta(days=36_500),  # those left pending stay pending
                )
                ledger.reserve(res)
                if i % 10 == 9:
                    continue  # still in flight: not spend, not in the rollup
                status = ["ok", "ok", "error", "abandoned", "expired"][i % 5]
                ledger.settle(
                    settlement(res, status=status, cached=i * 13 % 1200, estimated=i % 5 == 4)
                )
            ledger.conn.execute(
                "INSERT INTO calls (call_id, created_at, model, tags, status, cost_nanos, "
                "price_cache_hit, price_cache_miss, price_output) VALUES "
                "('by-hand', '2026-10-31T08:00:00+08:00', 'kimi-k2.5', '{}', 'ok', 5, 1, 2, 3)"
            )


def test_an_old_ledger_is_backfilled_in_place(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_v1_ledger(ledger_path, monkeypatch)
    with kb.Ledger(ledger_path) as ledger:
        applied = [r[0] for r in ledger.conn.execute("SELECT name FROM _kimi_budget_migrations")]
        assert sorted(applied) == sorted(name for name, _ in _migrations.MIGRATIONS)
        rollup = stored_rollup(ledger.conn)
        assert sum(values[0] for values in rollup.values()) == 55
        assert_exact(ledger)
        indexes = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master")}
        assert "calls_model_created_at" not in indexes
        # From then on the triggers keep it exact.
        res = reservation(at(2026, 11, 1, 0, 0))
        ledger.reserve(res)
        ledger.settle(settlement(res))
        assert_exact(ledger)
    with kb.Ledger(ledger_path) as again:  # reopening does not backfill twice
        assert_exact(again)


def test_the_migration_sql_floors_like_python() -> None:
    conn = sqlite3.connect(":memory:")
    texts = [
        "2026-11-28T06:44:59.999999Z",
        "2026-11-28T06:45:00.000000Z",
        "2026-11-28T06:00:00.000000Z",
        "2026-11-28T06:14:59.999999Z",
        "2026-11-28T06:15:00.000000Z",
        "2026-11-28T06:29:00.000000Z",
        "2026-11-28T06:59:59.000000Z",
        "2026-11-28 06:44",
        "2026-11-28 06:44:00.000000Z",
        "2026-11-28T06:4x:00.000000Z",
        "2026-11-28",
        "",
    ]
    for text in texts:
        (sql,) = conn.execute(f"SELECT {_migrations._slot(':t')}", {"t": text}).fetchone()
        assert sql == python_slot(text) == slot_of(text)
        assert is_slot(sql) == (len(text) == 27 and text[10] == "T" and "x" not in text)


# -- a random history, checked after every step --------------------------------------------------

operation = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.integers(0, 3 * 86_400),  # seconds after the start
        st.sampled_from(sorted(MODELS)),
        st.integers(0, len(TAG_SETS) - 1),
        st.sampled_from([60, 3_600]),  # the reservation's lifetime
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 40),
        st.sampled_from(["ok", "error", "abandoned", "interrupted", "cancelled"]),
        st.integers(0, 3_000),  # prompt
        st.integers(-10, 4_000),  # cached
        st.booleans(),  # usage known
    ),
    st.tuples(st.just("advance"), st.integers(0, 7_200)),
    st.tuples(st.just("fallback"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("reopen")),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(operation, min_size=1, max_size=30),
    start=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    ),
)
def test_the_rollup_always_equals_the_rows(ops: list[tuple[Any, ...]], start: datetime) -> None:
    now = [start]
    reservations: list[Reservation] = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = Path(tmp) / "l.db"
        ledger = kb.Ledger(path, clock=lambda: now[0])
        try:
            for op in ops:
                if op[0] == "reserve":
                    _, offset, model, tags, ttl = op
                    res = reservation(
                        start + timedelta(seconds=offset),
                        model=model,
                        tags=TAG_SETS[tags],
                        ttl=timedelta(seconds=ttl),
                    )
                    ledger.reserve(res)
                    reservations.append(res)
                elif op[0] == "settle" and reservations:
                    _, index, status, prompt, cached, known = op
                    res = reservations[index % len(reservations)]
                    ledger.settle(
                        settlement(
                            res,
                            status=status,
                            prompt=prompt if known else None,
                            cached=cached if known else None,
                            completion=prompt // 3 if known else None,
                            estimated=not known,
                        )
                    )
                elif op[0] == "advance":
                    now[0] += timedelta(seconds=op[1])
                    ledger.expire_stale()
                elif op[0] == "fallback":
                    _, index, unknown = op
                    if unknown or not reservations:
                        # A settlement whose reservation this file never saw.
                        res = reservation(start + timedelta(seconds=index * 97), model="kimi-k3")
                    else:
                        res = reservations[index % len(reservations)]
                    ledger.write_fallback(settlement(res, cached=index), OSError("full"))
                elif op[0] == "reopen":
                    ledger.close()
                    ledger = kb.Ledger(path, clock=lambda: now[0])
                assert_exact(ledger)
        finally:
            ledger.close()


# -- reports from the rollup are the reports from the rows ---------------------------------------


@pytest.fixture(scope="module")
def history() -> Iterator[Path]:
    """A ledger with calls spread over three months, at every minute of the hour."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.db"
        now = [at(2026, 9, 25)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with kb.Ledger(path, clock=lambda: now[0]) as ledger:
                for i in range(700):
                    when = at(2026, 9, 25) + timedelta(minutes=181 * i + i % 17, seconds=i % 60)
                    now[0] = when
                    res = reservation(
                        when,
                        model=sorted(MODELS)[i % 3],
                        tags=TAG_SETS[i % len(TAG_SETS)],
                        ttl=timedelta(days=1000) if i % 50 == 7 else timedelta(hours=1),
                    )
                    ledger.reserve(res)
                    if i % 50 == 7:
                        continue  # stays in flight
                    if i % 31 == 3:
                        now[0] = when + timedelta(hours=2)
                        ledger.expire_stale()  # expired, estimated
                        if i % 2:
                            continue
                    status = ["ok", "ok", "ok", "error", "abandoned"][i % 5]
                    ledger.settle(
                        settlement(res, status=status, cached=i * 37 % 1500, prompt=200 + i)
                    )
                ledger.conn.execute(
                    "INSERT INTO calls (call_id, created_at, model, tags, status, cost_nanos, "
                    "price_cache_hit, price_cache_miss, price_output) VALUES ('by-hand', "
                    "'2026-10-15T09:07:00+00:00', 'kimi-k2.5', ?, 'ok', 5, 1, 2, 3)",
                    ('{"team":"a"}',),
                )
                assert_exact(ledger)
        yield path


def local_midnight(day: int, tz: str) -> datetime:
    from zoneinfo import ZoneInfo

    from kimi_budget.cli._report import _midnight

    return _midnight((at(2026, 9, 20) + timedelta(days=day)).date(), ZoneInfo(tz))


when_ = st.one_of(
    st.none(),
    st.tuples(st.just("midnight"), st.integers(0, 100)),
    st.tuples(st.just("slot"), st.integers(0, 100 * 96)),
    st.tuples(st.just("any"), st.integers(0, 100 * 86_400)),
    # Just after a slot's start, where the first call of the history sits (2026-09-25 00:00).
    st.tuples(st.just("near"), st.sampled_from([1, 999_999, 1_000_000, 59_000_000])),
)


def resolve(when: tuple[str, int] | None, tz: str) -> datetime | None:
    if when is None:
        return None
    kind, n = when
    if kind == "midnight":
        return local_midnight(n, tz)
    if kind == "slot":
        return at(2026, 9, 20) + timedelta(minutes=15 * n)
    if kind == "near":
        return at(2026, 9, 25) + timedelta(microseconds=n)
    return at(2026, 9, 20) + timedelta(seconds=n)


@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    by=st.sampled_from(["day", "week", "month", "model", "tag:project", "tag:team", "total"]),
    tz=st.sampled_from(ZONES),
    since=when_,
    until=when_,
    model=st.sampled_from([None, *sorted(MODELS), "nope"]),
    tags=st.sampled_from([None, *TAG_SETS]),
)
def test_reports_from_the_rollup_equal_reports_from_the_rows(
    history: Path,
    by: str,
    tz: str,
    since: tuple[str, int] | None,
    until: tuple[str, int] | None,
    model: str | None,
    tags: dict[str, str] | None,
) -> None:
    start, end = resolve(since, tz), resolve(until, tz)
    with kb.Ledger(history) as ledger:
        kwargs: dict[str, Any] = dict(by=by, since=start, until=end, model=model, tags=tags, tz=tz)
        auto = build_report(ledger, **kwargs)
        rows = build_report(ledger, source="rows", **kwargs)
        spent = ledger.spend(since=start, until=end, model=model, tags=tags)
        in_flight = [
            r[0]
            for r in ledger.conn.execute(
                "SELECT projected_nanos, created_at, model, tags FROM calls_all "
                "WHERE status = 'pending'"
            )
            if (start is None or r[1] >= format_utc(start))
            and (end is None or r[1] < format_utc(end))
            and (model is None or r[2] == model)
            and all(json.loads(r[3]).get(k) == v for k, v in (tags or {}).items())
        ]
    assert rows.source == "rows"
    on_slots = all(v is None or is_slot(format_utc(v)) for v in (start, end))
    assert auto.source == ("rollup" if on_slots else "rows")
    assert auto.to_json() == rows.to_json()
    assert auto.total.cost_nanos == spent * 10**9
    assert (auto.pending_calls, auto.pending_nanos) == (len(in_flight), sum(in_flight))


def test_the_rollup_answers_quarter_hour_zones_and_cli_dates(history: Path) -> None:
    with kb.Ledger(history) as ledger:
        for tz in ("Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns"):
            for by in ("day", "week", "month"):
                since, until = local_midnight(10, tz), local_midnight(60, tz)
                kwargs: dict[str, Any] = dict(by=by, tz=tz, since=since, until=until)
                report = build_report(ledger, source="rollup", **kwargs)
                assert report.source == "rollup" and report.rows
                assert report.to_json() == build_report(ledger, source="rows", **kwargs).to_json()


def test_slot_boundaries() -> None:
    assert is_slot("2026-11-28T06:45:00.000000Z")
    assert is_slot("2026-11-28T00:00:00.000000Z")
    for text in (
        "2026-11-28T06:45:00.000001Z",
        "2026-11-28T06:45:01.000000Z",
        "2026-11-28T06:44:00.000000Z",
        "2026-11-28T06:50:00.000000Z",
        "2026-11-28T06:45:00.000000",
        "999-11-28T06:45:00.000000Z",
        "2026-11-28",
    ):
        assert not is_slot(text), text
    # Just past a slot's start is not on the grid: the rows answer, and the call exactly at
    # the slot's start is left out as the rows leave it out.
    with kb.Ledger(Path(tempfile.mkdtemp()) / "edge.db") as ledger:
        res = reservation(at(2026, 11, 28, 6, 45))
        ledger.reserve(res)
        ledger.settle(settlement(res))
        since = at(2026, 11, 28, 6, 45) + timedelta(microseconds=1)
        report = build_report(ledger, by="total", since=since)
        assert report.source == "rows" and report.rows == []
        assert build_report(ledger, by="total", since=since - timedelta(microseconds=1)).rows


def test_days_off_the_slots_are_answered_from_the_rows(tmp_path: Path) -> None:
    """Kolkata kept local mean time (+05:53:28) until 1854: its days then began off the grid."""
    with kb.Ledger(tmp_path / "old.db") as ledger:
        for day in range(3):
            res = reservation(at(1850, 3, 1 + day, 12))
            ledger.reserve(res)
            ledger.settle(settlement(res))
        report = build_report(ledger, by="day", tz="Asia/Kolkata")
        assert report.source == "rows"
        assert [row.key for row in report.rows] == ["1850-03-01", "1850-03-02", "1850-03-03"]
        with pytest.raises(ValueError, match="rollup cannot answer"):
            build_report(ledger, by="day", tz="Asia/Kolkata", source="rollup")
        assert build_report(ledger, by="day", tz="UTC").source == "rollup"


def test_the_cli_report_reads_the_rollup_by_primary_key(history: Path) -> None:
    """What makes a million rows fast: ranges of the rollup's key, never a scan of the calls."""
    with kb.Ledger(history) as ledger:
        for by in ("day", "model"):
            statements: list[str] = []
            ledger.conn.set_trace_callback(statements.append)
            report = build_report(
                ledger,
                by=by,
                tz="Asia/Shanghai",
                since=local_midnight(10, "Asia/Shanghai"),
                tags={"project": "crawler"},
            )
            ledger.conn.set_trace_callback(None)
            assert report.source == "rollup" and report.rows
            plans = [
                step[3]
                for sql in statements
                if sql.lstrip().startswith("SELECT")
                for step in ledger.conn.execute("EXPLAIN QUERY PLAN " + sql)
            ]
            # The calls table is read only through the partial index of the few rows with
            # fees or batches (migration m005); in-flight reservations have their own table.
            on_calls = [step for step in plans if re.search(r"\bcalls\b", step)]
            assert all("calls_extra_charges" in s for s in on_calls), plans
            assert any("reservations" in step for step in plans), plans
            if by == "day":
                assert any(
                    "SEARCH usage_rollup USING PRIMARY KEY (bucket>? AND bucket<?)" in s
                    for s in plans
                ), plans


# -- the latest calls of a model -----------------------------------------------------------------


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from([*sorted(MODELS), "nope"]),
    limit=st.integers(1, 300),
    since=when_,
    until=when_,
    tags=st.sampled_from([None, *TAG_SETS]),
)
def test_latest_calls_of_a_model_match_a_scan(
    history: Path,
    model: str,
    limit: int,
    since: tuple[str, int] | None,
    until: tuple[str, int] | None,
    tags: dict[str, str] | None,
) -> None:
    start, end = resolve(since, "UTC"), resolve(until, "UTC")
    with kb.Ledger(history) as ledger:
        got = list_calls(ledger, limit=limit, since=start, until=end, model=model, tags=tags)
        rows = ledger.conn.execute(
            "SELECT id, created_at, model, tags FROM calls_all"  # settled and in flight
        ).fetchall()
    low = format_utc(start) if start else ""
    high = format_utc(end) if end else "\uffff"
    wanted = sorted(
        (
            (created, ident)
            for ident, created, m, t in rows
            if m == model
            and low <= created < high
            and all(json.loads(t).get(k) == v for k, v in (tags or {}).items())
        ),
        reverse=True,
    )[:limit]
    assert [(row["created_at"], row["id"]) for row in got] == wanted


def test_latest_calls_before_a_time_inside_a_slot(ledger_path: Path) -> None:
    """The slot holding ``until`` also holds later calls: they must not count toward the limit."""
    with kb.Ledger(ledger_path) as ledger:
        for when in (at(2026, 11, 28, 5), at(2026, 11, 28, 6, 45), at(2026, 11, 28, 6, 50)):
            res = reservation(when, model="kimi-k3")
            ledger.reserve(res)
            ledger.settle(settlement(res))
        until = at(2026, 11, 28, 6, 47)
        got = list_calls(ledger, limit=2, until=until, model="kimi-k3")
        assert [row["created_at"] for row in got] == [
            "2026-11-28T06:45:00.000000Z",
            "2026-11-28T05:00:00.000000Z",
        ]
        # A model whose only call is in that last part-slot: no whole slot before it counts.
        res = reservation(at(2026, 11, 28, 6, 46), model="moonshot-v1-8k")
        ledger.reserve(res)
        ledger.settle(settlement(res))
        got = list_calls(ledger, limit=5, until=until, model="moonshot-v1-8k")
        assert [row["created_at"] for row in got] == ["2026-11-28T06:46:00.000000Z"]
        pending = reservation(at(2026, 11, 28, 6, 46), model="kimi-k3")
        ledger.reserve(pending)
        got = list_calls(ledger, limit=1, until=until, model="kimi-k3")
        assert [row["status"] for row in got] == ["pending"]
