"""Which currencies a ledger holds: every report asks first, so it must not read every row.

A report shows one section per currency and never adds CNY to USD. Finding the currencies used
to be a ``SELECT DISTINCT`` over the whole table (a quarter of a second at a million rows);
it is now a loose scan of a partial index that holds the non-USD rows only.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import kimi_budget as kb
from kimi_budget.cli._report import currencies
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.ledger._backend import OTHER_CURRENCIES_SQL

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _settle(ledger: kb.Ledger, call_id: str, currency: str) -> None:
    res = Reservation(
        call_id, "kimi-k2.6", {}, NOW, NOW + timedelta(minutes=5), 9_000, 1, 1, 1, 1,
        currency=currency,
    )
    ledger.reserve(res, [])
    ledger.settle(Settlement(res, "ok", 1, 0, 1, 1_000, False, 1, NOW))


@pytest.mark.parametrize(
    ("billed", "listed"),
    [
        ([], ["USD"]),
        (["USD", "USD"], ["USD"]),
        (["CNY"], ["CNY"]),
        (["CNY", "USD", "CNY"], ["USD", "CNY"]),
        (["EUR", "CNY", "USD"], ["USD", "CNY", "EUR"]),
    ],
)
def test_the_currencies_listed_are_those_billed_usd_first(
    ledger_url: str, billed: list[str], listed: list[str]
) -> None:
    with kb.Ledger(ledger_url, clock=lambda: NOW) as ledger:
        for i, currency in enumerate(billed):
            _settle(ledger, f"call-{i}", currency)
        assert currencies(ledger) == listed


def test_a_reservation_in_flight_lists_no_currency(ledger_url: str) -> None:
    with kb.Ledger(ledger_url, clock=lambda: NOW) as ledger:
        _settle(ledger, "usd", "USD")
        ledger.reserve(
            Reservation(
                "in-flight", "kimi-k2.6", {}, NOW, NOW + timedelta(minutes=5), 9_000, 1, 1, 1, 1,
                currency="CNY",
            ),
            [],
        )
        assert currencies(ledger) == ["USD"]


def test_the_listing_reads_the_partial_index_not_the_table(ledger_path: Path) -> None:
    kb.Ledger(ledger_path).close()
    conn = sqlite3.connect(ledger_path)
    try:
        plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + OTHER_CURRENCIES_SQL)]
    finally:
        conn.close()
    searches = [step for step in plan if "calls" in step]
    assert searches, plan
    assert all("USING INDEX calls_other_currencies" in step for step in searches), plan
