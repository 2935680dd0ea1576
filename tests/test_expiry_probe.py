"""A reservation left by a dead process is expired within about a second, never freed early.

``reserve`` looks for expired reservations at most once a second of the ledger's clock (the
look is a query on every call otherwise). In between, a reservation past its expiry still
counts as reserved: the cap can only be stricter for that moment, never looser.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import kimi_budget as kb
from kimi_budget.ledger import Reservation, new_call_id

UTC = timezone.utc
START = datetime(2026, 1, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(ledger_path: Path, clock: Clock) -> Iterator[kb.Ledger]:
    with kb.Ledger(ledger_path, clock=clock) as led:
        yield led


def _reservation(now: datetime, *, lasts: float, nanos: int = 1_000_000) -> Reservation:
    return Reservation(
        call_id=new_call_id(),
        model="kimi-k2.6",
        tags={},
        created_at=now,
        expires_at=now + timedelta(seconds=lasts),
        projected_nanos=nanos,
        prompt_estimate=10,
        price_cache_hit=1,
        price_cache_miss=1,
        price_output=1,
    )


def _statuses(ledger: kb.Ledger) -> dict[str, str]:
    # calls_all: settled calls and the reservations in flight (their own table since m005).
    rows = ledger.conn.execute("SELECT call_id, status FROM calls_all")  # type: ignore[attr-defined]
    return dict(rows.fetchall())


def test_expired_reservations_are_settled_within_a_second_of_the_clock(
    ledger: kb.Ledger, clock: Clock
) -> None:
    budget = kb.Budget(daily="0.0025")  # room for two 1,000,000-nano reservations
    dead = _reservation(START, lasts=0.2)
    ledger.reserve(dead, [budget])
    clock.now = START + timedelta(seconds=0.5)  # the dead call is past its expiry
    first = _reservation(clock.now, lasts=600)
    ledger.reserve(first, [budget])
    assert _statuses(ledger)[dead.call_id] == "pending"  # looked for less than a second ago
    # Still reserved: a third reservation does not fit yet.
    with pytest.raises(kb.BudgetExceededError):
        ledger.reserve(_reservation(clock.now, lasts=600), [budget])
    clock.now = START + timedelta(seconds=1.01)
    ledger.reserve(_reservation(clock.now, lasts=600))
    assert _statuses(ledger)[dead.call_id] == "expired"


def test_a_clock_that_goes_back_looks_again(ledger: kb.Ledger, clock: Clock) -> None:
    dead = _reservation(START - timedelta(hours=1), lasts=1)
    clock.now = START
    ledger.reserve(_reservation(clock.now, lasts=600))
    clock.now = START - timedelta(minutes=30)  # set back (a test clock, an NTP step)
    ledger.reserve(dead)
    clock.now = START - timedelta(minutes=30) + timedelta(seconds=0.2)
    ledger.reserve(_reservation(clock.now, lasts=600))
    assert _statuses(ledger)[dead.call_id] == "pending"  # looked 0.2 s ago (clock time)
    clock.now = START - timedelta(minutes=60)
    ledger.reserve(_reservation(clock.now, lasts=600))
    # The clock went back again: looked again, but the dead call's expiry is still ahead.
    assert _statuses(ledger)[dead.call_id] == "pending"
    clock.now = START + timedelta(hours=1)
    ledger.reserve(_reservation(clock.now, lasts=600))
    assert _statuses(ledger)[dead.call_id] == "expired"
