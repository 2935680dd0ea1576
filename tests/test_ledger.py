"""What every ledger backend does: reservations, settlements, window totals, expiry and reads.

Each test runs once per backend (the ``ledger_url`` fixture: SQLite, then PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement

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


def test_spend_filters_by_time_model_and_tags(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url)
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


def test_window_totals_follow_every_write(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
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


def test_new_budget_backfills_from_existing_rows(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
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


def test_expiry_charges_the_full_reservation_and_frees_no_room(ledger_url: str) -> None:
    clock = [NOW]
    ledger = kb.Ledger(ledger_url, clock=lambda: clock[0])
    budget = kb.Budget(daily="0.0001")  # 100_000 nanos
    slow = reservation("slow", projected=60_000)
    ledger.reserve(slow, [budget])
    clock[0] = NOW + timedelta(minutes=10)
    assert ledger.expire_stale() == 1
    [row] = ledger.calls(1)
    assert (row["status"], row["cost_nanos"], bool(row["estimated"])) == ("expired", 60_000, True)
    assert "full reservation" in row["note"]
    [daily] = ledger.status(budget)
    assert (daily.spent_usd, daily.reserved_usd) == (Decimal("0.00006"), 0)
    # The expired call may have been billed in full: its room is not handed to another call.
    with pytest.raises(kb.BudgetExceededError):
        ledger.reserve(reservation("next", projected=50_000, at=clock[0]), [budget])
    assert ledger.expire_stale() == 0  # expiring again charges nothing twice
    [daily] = ledger.status(budget)
    assert daily.spent_usd == Decimal("0.00006")


def test_real_settlement_replaces_the_expired_estimate_once(ledger_url: str) -> None:
    clock = [NOW]
    ledger = kb.Ledger(ledger_url, clock=lambda: clock[0])
    budget = kb.Budget(daily="1")
    slow = reservation("slow", projected=50_000)
    ledger.reserve(slow, [budget])
    clock[0] = NOW + timedelta(minutes=10)
    assert ledger.expire_stale() == 1
    real = Settlement(slow, "ok", 10, 0, 1, 42_000, False, 1, clock[0])
    assert ledger.settle(real) is True
    [row] = ledger.calls(1)
    assert (row["status"], row["cost_nanos"], bool(row["estimated"])) == ("ok", 42_000, False)
    [daily] = ledger.status(budget)
    assert daily.spent_usd == Decimal("0.000042") and daily.reserved_usd == 0
    assert ledger.settle(real) is False  # idempotent
    late_guess = Settlement(slow, "abandoned", 10, 0, 0, 50_000, True, 1, clock[0])
    assert ledger.settle(late_guess) is False  # a settled call is never re-estimated
    assert ledger.spend() == Decimal("0.000042")


def test_settlement_survives_json_round_trip() -> None:
    res = reservation("j", tags={"k": "v"})
    settlement = Settlement(res, "ok", 10, 2, 3, 999, True, 2, NOW, "req", 12, None, "note")
    assert Settlement.from_json(settlement.to_json()) == settlement


def test_contract_fields_are_stored_and_read_back(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url)
    res = Reservation(
        "cny",
        "kimi-k2.6",
        {},
        NOW,
        NOW + timedelta(minutes=5),
        9000,
        10,
        100,
        600,
        3000,
        currency="CNY",
    )
    ledger.reserve(res)
    usage = '{"prompt_tokens":10,"completion_tokens":1,"cached_tokens":2}'
    ledger.settle(
        Settlement(
            res,
            "ok",
            10,
            2,
            1,
            8000,
            False,
            1,
            NOW,
            fee_nanos=5000,
            cache_write_tokens=7,
            usage_json=usage,
        )
    )
    [row] = ledger.calls(1)
    assert (row["currency"], row["fee_nanos"], row["cache_write_tokens"], row["usage_json"]) == (
        "CNY",
        5000,
        7,
        usage,
    )
    assert row["cost_nanos"] == 8000  # the fee is part of the total charged


def test_settlement_with_contract_fields_survives_json_round_trip() -> None:
    res = Reservation(
        "j2",
        "kimi-k2.6",
        {"k": "v"},
        NOW,
        NOW + timedelta(minutes=5),
        1,
        1,
        1,
        1,
        1,
        currency="CNY",
    )
    settlement = Settlement(
        res, "ok", 1, 0, 1, 9, False, 1, NOW, fee_nanos=3, cache_write_tokens=4, usage_json="{}"
    )
    assert Settlement.from_json(settlement.to_json()) == settlement


def test_a_budget_counts_and_applies_to_its_own_currency_only(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
    usd = kb.Budget(daily="0.0001")  # 100_000 nanos
    cny = kb.Budget(daily="0.0001", currency="CNY")
    dollars = reservation("usd", projected=80_000)
    ledger.reserve(dollars, [usd, cny])
    ledger.settle(Settlement(dollars, "ok", 10, 0, 1, 70_000, False, 1, NOW))
    yuan = Reservation(
        "cny",
        "kimi-k2.6",
        {},
        NOW,
        NOW + timedelta(minutes=5),
        90_000,
        10,
        100,
        600,
        3000,
        currency="CNY",
    )
    ledger.reserve(yuan, [usd, cny])  # the USD budget's 70_000 spent does not count in CNY
    ledger.settle(Settlement(yuan, "ok", 10, 0, 1, 60_000, False, 1, NOW))
    assert ledger.spend() == Decimal("0.00007")
    assert ledger.spend(currency="CNY") == Decimal("0.00006")
    [usd_daily] = ledger.status(usd)
    [cny_daily] = ledger.status(cny)
    assert usd_daily.spent_usd == Decimal("0.00007")
    assert cny_daily.spent_usd == Decimal("0.00006")
    more_yuan = Reservation(
        "cny2",
        "kimi-k2.6",
        {},
        NOW,
        NOW + timedelta(minutes=5),
        50_000,
        10,
        100,
        600,
        3000,
        currency="CNY",
    )
    with pytest.raises(kb.BudgetExceededError):
        ledger.reserve(more_yuan, [usd, cny])  # 60_000 + 50_000 > the CNY cap
    ledger.reserve(reservation("usd2", projected=30_000), [usd, cny])  # fits the USD cap


def test_a_new_currency_budget_backfills_from_its_currency_only(ledger_url: str) -> None:
    ledger = kb.Ledger(ledger_url, clock=lambda: NOW)
    for call_id, currency, cost in (("u", "USD", 1_000), ("c", "CNY", 2_000)):
        res = Reservation(
            call_id,
            "kimi-k2.6",
            {},
            NOW,
            NOW + timedelta(minutes=5),
            9_000,
            1,
            1,
            1,
            1,
            currency=currency,
        )
        ledger.reserve(res)
        ledger.settle(Settlement(res, "ok", 1, 0, 1, cost, False, 1, NOW))
    [usd] = ledger.status(kb.Budget(total="1"))
    [cny] = ledger.status(kb.Budget(total="1", currency="CNY"))
    assert (usd.spent_usd, cny.spent_usd) == (Decimal("0.000001"), Decimal("0.000002"))
