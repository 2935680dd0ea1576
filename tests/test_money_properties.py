"""Properties of the money (issue 5, part 4): costs, and the totals the ledger keeps.

- A call's cost is exact, never negative, rises with every billed token count and falls as
  more of the prompt is served from the cache.
- Whatever sequence of reservations, settlements, refusals and expiries a ledger sees, every
  stored window total equals the sum of its rows, and a refusal happens only when the rows say
  the cap is really full.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kimi_budget as kb
from kimi_budget._budget import parse_utc, window_bounds
from kimi_budget._money import (
    call_cost_nanos,
    parse_usd,
    price_to_nanos_per_token,
    to_usd,
    usd_to_nanos_floor,
)
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.pricing import PriceTable
from tests.fuzz_tally import tried

UTC = timezone.utc
FULL = os.environ.get("KB_STRESS_SIZE", "").lower() == "full"
EXAMPLES = 1000 if FULL else 60
LEDGER_EXAMPLES = 300 if FULL else 25


# -- the cost of one call ----------------------------------------------------------------------

tokens = st.integers(min_value=-(10**6), max_value=10**9)
price = st.integers(min_value=0, max_value=10**6)  # nano-dollars per token


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    p=tokens,
    c=tokens,
    o=tokens,
    dp=st.integers(0, 10**6),
    do=st.integers(0, 10**6),
    hit=price,
    miss=price,
    out=price,
)
def test_cost_is_never_negative_and_monotone(
    p: int, c: int, o: int, dp: int, do: int, hit: int, miss: int, out: int
) -> None:
    tried(__name__)
    hit, miss = min(hit, miss), max(hit, miss)  # a cache hit never costs more than a miss

    def cost(p: int, c: int, o: int) -> int:
        return call_cost_nanos(
            prompt_tokens=p,
            cached_tokens=c,
            completion_tokens=o,
            cache_hit=hit,
            cache_miss=miss,
            output=out,
        )

    base = cost(p, c, o)
    assert isinstance(base, int) and base >= 0
    assert cost(p + dp, c, o) >= base  # more prompt never costs less
    assert cost(p, c, o + do) >= base  # more output never costs less
    assert cost(p, c + dp, o) <= base  # more of the prompt cached never costs more
    # Caching can only move a prompt between the two prices: bounded by all-hit and all-miss.
    pp, oo = max(p, 0), max(o, 0)
    assert pp * hit + oo * out <= base <= pp * miss + oo * out


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_cost_matches_the_price_document_exactly(data: st.DataObject) -> None:
    """For every built-in model, nano-dollar cost == the per-million Decimal formula."""
    tried(__name__)
    table = PriceTable.load()
    model = data.draw(st.sampled_from(sorted(table.models)))
    p = data.draw(st.integers(0, 10**8))
    c = data.draw(st.integers(0, p))
    o = data.draw(st.integers(0, 10**7))
    mp = table.get(model)
    usd = mp.per_million_usd()
    expected = ((p - c) * usd["cache_miss"] + c * usd["cache_hit"] + o * usd["output"]) / 10**6
    nanos = mp.cost_nanos(p, c, o)
    assert to_usd(nanos) == expected
    assert Decimal(nanos) == expected * 10**9  # exact: no rounding anywhere


@settings(max_examples=EXAMPLES, deadline=None)
@given(nanos=st.integers(0, 10**18))
def test_nanos_and_usd_round_trip(nanos: int) -> None:
    tried(__name__)
    usd = to_usd(nanos)
    assert usd_to_nanos_floor(usd) == nanos
    assert parse_usd(str(usd), what="x") == usd


@settings(max_examples=EXAMPLES, deadline=None)
@given(amount=st.decimals(min_value=0, max_value=10**6, places=12, allow_nan=False))
def test_caps_round_down(amount: Decimal) -> None:
    tried(__name__)
    floor = usd_to_nanos_floor(amount)
    assert Decimal(floor) <= amount * 10**9 < Decimal(floor + 1)


@settings(max_examples=EXAMPLES, deadline=None)
@given(thousandths=st.integers(0, 10**7))
def test_every_three_decimal_price_is_whole_nanos_per_token(thousandths: int) -> None:
    tried(__name__)
    per_million = Decimal(thousandths) / 1000
    assert price_to_nanos_per_token(per_million) == thousandths


@settings(max_examples=EXAMPLES, deadline=None)
@given(value=st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_float_caps_mean_their_decimal_text(value: float) -> None:
    tried(__name__)
    assert parse_usd(value, what="cap") == Decimal(str(value))


# -- the ledger's totals, under any sequence of operations ----------------------------------------

ZONES = ("UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York")
WINDOWS = ("hourly", "daily", "weekly", "monthly", "total")


def _matches(scope: dict[str, str], tags: dict[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in scope.items())


def recomputed(
    rows: list[dict[str, Any]], budget: kb.Budget, window: str, at: datetime
) -> tuple[int, int]:
    """(spent, reserved) of ``budget``'s window holding ``at``, summed from the rows."""
    start, end = window_bounds(window, at, budget.tz)
    spent = reserved = 0
    for row in rows:
        created = parse_utc(row["created_at"])
        if not _matches(budget.scope, row["tags"]) or not start <= created < end:
            continue
        if row["status"] == "pending":
            reserved += row["projected_nanos"]
        else:
            spent += row["cost_nanos"]
    return spent, reserved


def rows_of(ledger: kb.Ledger) -> list[dict[str, Any]]:
    import json

    rows = ledger.calls(limit=10**6)
    for row in rows:
        row["tags"] = json.loads(row["tags"])
    return rows


operation = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.integers(0, 4_000),
        st.integers(0, 5_000),
        st.sampled_from(["a", "b"]),
        st.integers(0, 7_200),
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 50),
        st.integers(0, 5_000),
        st.sampled_from(["ok", "error", "abandoned", "interrupted", "expired"]),
        st.integers(0, 7_200),
    ),
    st.tuples(st.just("advance"), st.integers(0, 3 * 86_400)),
)


@settings(
    max_examples=LEDGER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(operation, min_size=1, max_size=40),
    tz=st.sampled_from(ZONES),
    start=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    ),
    caps=st.tuples(*[st.integers(500, 20_000) for _ in WINDOWS]),
    team_cap=st.integers(500, 10_000),
)
def test_window_totals_always_equal_the_rows(
    ops: list[tuple[Any, ...]], tz: str, start: datetime, caps: tuple[int, ...], team_cap: int
) -> None:
    tried(__name__)
    now = [start]
    hourly, daily, weekly, monthly, total = (to_usd(c) for c in caps)
    everyone = kb.Budget(
        hourly=hourly, daily=daily, weekly=weekly, monthly=monthly, total=total, tz=tz
    )
    team_a = kb.Budget(daily=to_usd(team_cap), scope={"team": "a"}, tz="Asia/Shanghai")
    budgets = [everyone, team_a]
    reservations: list[Reservation] = []
    final: dict[str, str] = {}  # call_id -> status as the model expects it
    with (
        tempfile.TemporaryDirectory() as tmp,
        kb.Ledger(Path(tmp) / "l.db", clock=lambda: now[0]) as ledger,
    ):
        for op in ops:
            if op[0] == "advance":
                now[0] += timedelta(seconds=op[1])
                continue
            if op[0] == "reserve":
                _, projected, prompt, team, ttl = op
                res = Reservation(
                    call_id=f"c{len(reservations)}-{projected}",
                    model="kimi-k2.5",
                    tags={"team": team},
                    created_at=now[0],
                    expires_at=now[0] + timedelta(seconds=ttl),
                    projected_nanos=projected,
                    prompt_estimate=prompt % 7,
                    price_cache_hit=100,
                    price_cache_miss=600,
                    price_output=3000,
                )
                ledger.expire_stale()  # so that the rows below are what reserve() will see
                rows = rows_of(ledger)
                fits = all(
                    sum(recomputed(rows, b, w, now[0])) + projected <= b.caps_nanos[w]
                    for b in budgets
                    if b.applies_to(res.tags)
                    for w in b.windows
                )
                try:
                    ledger.reserve(res, budgets)
                except kb.BudgetExceededError as refused:
                    assert not fits, f"false refusal: {refused}"
                    cap = refused.limit_usd
                    assert refused.spent_usd + refused.reserved_usd + refused.projected_usd > cap
                else:
                    assert fits, "a reservation that overshoots a cap was accepted"
                    reservations.append(res)
                    final[res.call_id] = "pending"
            else:
                _, which, cost, status, _ = op
                if not reservations:
                    continue
                res = reservations[which % len(reservations)]
                ledger.expire_stale()
                was = {r["call_id"]: r["status"] for r in rows_of(ledger)}[res.call_id]
                done = ledger.settle(
                    Settlement(
                        reservation=res,
                        status=status,
                        prompt_tokens=cost,
                        cached_tokens=0,
                        completion_tokens=0,
                        cost_nanos=cost,
                        estimated=False,
                        attempts=1,
                        finished_at=now[0],
                    )
                )
                expected = was == "pending" or (was == "expired" and status != "expired")
                assert done == expected, (was, status)
            check_totals(ledger, budgets, now[0])

        # Settle whatever is left: nothing may stay reserved, and spend() is the rows' sum.
        for res in reservations:
            ledger.settle(
                Settlement(
                    reservation=res,
                    status="ok",
                    prompt_tokens=1,
                    cached_tokens=0,
                    completion_tokens=0,
                    cost_nanos=600,
                    estimated=False,
                    attempts=1,
                    finished_at=now[0],
                )
            )
        check_totals(ledger, budgets, now[0])
        rows = rows_of(ledger)
        assert all(r["status"] != "pending" for r in rows)
        assert ledger.spend() == to_usd(sum(r["cost_nanos"] for r in rows))
        assert ledger.spend(tags={"team": "a"}) == to_usd(
            sum(r["cost_nanos"] for r in rows if r["tags"]["team"] == "a")
        )
        stored = ledger.db.execute("SELECT sum(reserved_nanos) FROM window_totals").fetchone()[0]
        assert (stored or 0) == 0


def check_totals(ledger: kb.Ledger, budgets: list[kb.Budget], at: datetime) -> None:
    rows = rows_of(ledger)
    by_key = {
        (r[0], r[1], r[2], r[3]): (r[4], r[5])
        for r in ledger.db.execute(
            "SELECT s.scope, s.tz, w.window, w.start, w.spent_nanos, w.reserved_nanos "
            "FROM window_totals w JOIN budget_scopes s ON s.id = w.scope_id"
        ).fetchall()
    }
    from kimi_budget._budget import tags_json, window_key

    for budget in budgets:
        # Every window a row falls in, not just the current one.
        instants = {parse_utc(r["created_at"]) for r in rows} | {at}
        for window in budget.windows:
            for instant in instants:
                key = (
                    budget.scope_key,
                    budget.tz_name,
                    window,
                    window_key(window, instant, budget.tz),
                )
                if key not in by_key:
                    # Never registered or never written: only right if the rows sum to zero.
                    assert recomputed(rows, budget, window, instant) == (0, 0), key
                    continue
                assert by_key[key] == recomputed(rows, budget, window, instant), key
        assert tags_json(budget.scope) == budget.scope_key


def test_reserve_then_settle_leaves_totals_exact(ledger_path: Path) -> None:
    """The plainest form of the property, by hand: three calls, one window of each kind."""
    now = datetime(2026, 5, 31, 23, 59, tzinfo=UTC)
    budget = kb.Budget(hourly="1", daily="1", weekly="1", monthly="1", total="1", tz="UTC")
    with kb.Ledger(ledger_path, clock=lambda: now) as ledger:
        costs = [123_456_789, 1, 0]
        for n, cost in enumerate(costs):
            res = Reservation(
                call_id=f"x{n}",
                model="kimi-k2.5",
                tags={},
                created_at=now,
                expires_at=now + timedelta(hours=1),
                projected_nanos=200_000_000,
                prompt_estimate=0,
                price_cache_hit=100,
                price_cache_miss=600,
                price_output=3000,
            )
            ledger.reserve(res, [budget])
            ledger.settle(
                Settlement(
                    reservation=res,
                    status="ok",
                    prompt_tokens=0,
                    cached_tokens=0,
                    completion_tokens=0,
                    cost_nanos=cost,
                    estimated=False,
                    attempts=1,
                    finished_at=now,
                )
            )
        for status in ledger.status(budget):
            assert status.spent_usd == Decimal("0.12345679"), status
            assert status.reserved_usd == 0
            assert status.remaining_usd == Decimal("0.87654321")
