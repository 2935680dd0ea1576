"""Calendar windows roll over at midnight in the budget's time zone (issue 5, part 3).

Everything runs on an injected clock: the ledger's ``clock`` decides when a reservation is
made, which window it counts in, and what ``status`` reports. Expected instants are written
out from the calendar (and checked against ``zoneinfo``) rather than computed by the code
under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kimi_budget as kb
from kimi_budget._budget import format_utc, window_bounds, window_key
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.testing import MoonshotStandIn
from tests.fuzz_tally import tried

UTC = timezone.utc
NANO = timedelta(microseconds=1)
PROPERTY_EXAMPLES = 3000 if os.environ.get("KB_STRESS_SIZE", "").lower() == "full" else 300
USD = 10**9  # nano-dollars


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, instant: datetime | str) -> None:
        self.now = utc(instant) if isinstance(instant, str) else instant


@pytest.fixture
def clock() -> Clock:
    return Clock(utc("2026-01-01T12:00:00Z"))


@pytest.fixture
def ledger(ledger_url: str, clock: Clock) -> Iterator[kb.Ledger]:
    """A ledger of each backend (SQLite, PostgreSQL) on the test's clock."""
    with kb.Ledger(ledger_url, clock=clock) as led:
        yield led


_ids = iter(range(10**9))


def reserve(ledger: kb.Ledger, budget: kb.Budget, nanos: int, **tags: str) -> Reservation:
    now = ledger.clock()
    res = Reservation(
        call_id=f"c{next(_ids)}",
        model="kimi-k2.5",
        tags=tags,
        created_at=now,
        expires_at=now + timedelta(hours=2),
        projected_nanos=nanos,
        prompt_estimate=0,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )
    ledger.reserve(res, [budget])
    return res


def settle(ledger: kb.Ledger, res: Reservation, nanos: int) -> None:
    ledger.settle(
        Settlement(
            reservation=res,
            status="ok",
            prompt_tokens=0,
            cached_tokens=0,
            completion_tokens=nanos // 3000,
            cost_nanos=nanos,
            estimated=False,
            attempts=1,
            finished_at=ledger.clock(),
        )
    )


def spend(ledger: kb.Ledger, budget: kb.Budget, nanos: int) -> None:
    settle(ledger, reserve(ledger, budget, nanos), nanos)


def window(ledger: kb.Ledger, budget: kb.Budget, name: str) -> kb.ledger.WindowStatus:
    return next(s for s in ledger.status(budget) if s.window == name)


# (zone, local day, its first instant in UTC, its length in hours)
DAYS = [
    ("UTC", "2026-11-28", "2026-11-28T00:00:00Z", 24),
    ("Asia/Shanghai", "2026-11-28", "2026-11-27T16:00:00Z", 24),
    # Spring forward: 02:00 CET becomes 03:00 CEST, a 23-hour day.
    ("Europe/Berlin", "2026-03-29", "2026-03-28T23:00:00Z", 23),
    # Fall back: 03:00 CEST becomes 02:00 CET, a 25-hour day.
    ("Europe/Berlin", "2026-10-25", "2026-10-24T22:00:00Z", 25),
    ("America/New_York", "2026-03-08", "2026-03-08T05:00:00Z", 23),
    ("America/New_York", "2026-11-01", "2026-11-01T04:00:00Z", 25),
    # Chile moves its clocks at midnight: the day starts at 01:00 local, the first instant
    # that exists on that date.
    ("America/Santiago", "2026-09-06", "2026-09-06T04:00:00Z", 23),
    ("Asia/Kathmandu", "2026-06-15", "2026-06-14T18:15:00Z", 24),
]


@pytest.mark.parametrize(("tz", "day", "start", "hours"), DAYS)
def test_a_daily_cap_resets_at_local_midnight(
    ledger: kb.Ledger, clock: Clock, tz: str, day: str, start: str, hours: int
) -> None:
    first = utc(start)
    end = first + timedelta(hours=hours)
    # The oracle itself is checked against zoneinfo: the end is the next local date's start.
    assert (end - NANO).astimezone(ZoneInfo(tz)).date().isoformat() == day
    assert end.astimezone(ZoneInfo(tz)).date() > (end - NANO).astimezone(ZoneInfo(tz)).date()

    budget = kb.Budget(daily="1", tz=tz)
    clock.set(first - NANO)  # the last instant of the previous day
    spend(ledger, budget, USD)
    clock.set(first)
    today = window(ledger, budget, "daily")
    assert (today.start, today.resets_at) == (first, end)
    assert (today.spent_usd, today.reserved_usd) == (Decimal(0), Decimal(0))

    clock.set(end - NANO)
    spend(ledger, budget, USD)  # the whole cap, on the day's last microsecond
    with pytest.raises(kb.BudgetExceededError) as refused:
        reserve(ledger, budget, 1)
    assert refused.value.window == "daily"
    assert refused.value.spent_usd == 1 and refused.value.reserved_usd == 0
    assert refused.value.resets_at == end.astimezone(ZoneInfo(tz)).isoformat(timespec="seconds")
    assert refused.value.resets_at.split("T")[1].startswith(("00:00:00", "01:00:00"))

    clock.set(end)
    tomorrow = window(ledger, budget, "daily")
    assert tomorrow.start == end and tomorrow.spent_usd == 0
    spend(ledger, budget, USD)  # the full cap is available again at once
    assert window(ledger, budget, "daily").spent_usd == 1


def test_shanghai_resets_at_1600_utc_through_the_client(ledger_path: Path) -> None:
    """A cap set in Asia/Shanghai resets at 16:00 UTC, seen by a real client call."""
    clock = Clock(utc("2026-11-28T15:59:00Z"))
    budget = kb.Budget(daily="0.0001", tz="Asia/Shanghai")
    with MoonshotStandIn(api_key="sk-tz-0123456789") as server:
        client = kb.OpenAI(
            api_key="sk-tz-0123456789",
            base_url=server.base_url,
            ledger=kb.Ledger(ledger_path, clock=clock),
            budget=budget,
            max_retries=0,
        )
        ask: dict[str, Any] = dict(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
        client.chat.completions.create(**ask)
        spent = client.ledger.spend()
        assert Decimal("0.00005") < spent <= Decimal("0.0001")
        clock.set("2026-11-28T15:59:59.999999Z")
        with pytest.raises(kb.BudgetExceededError) as refused:
            client.chat.completions.create(**ask)
        assert refused.value.resets_at == "2026-11-29T00:00:00+08:00"
        assert len(server.chat_requests) == 1  # the refusal never reached the server

        clock.set("2026-11-28T16:00:00Z")
        client.chat.completions.create(**ask)
        assert len(server.chat_requests) == 2
        day = window(client.ledger, budget, "daily")
        assert day.start == utc("2026-11-28T16:00:00Z")
        assert day.spent_usd == client.ledger.spend() - spent
        client.close()


@pytest.mark.parametrize(
    ("tz", "last_sunday", "next_monday_utc", "hours"),
    [
        ("UTC", "2026-11-29T23:59:59Z", "2026-11-30T00:00:00Z", 168),
        ("Asia/Shanghai", "2026-11-29T15:59:59Z", "2026-11-29T16:00:00Z", 168),
        # The week holding Berlin's fall-back Sunday has 169 hours.
        ("Europe/Berlin", "2026-10-25T22:59:59Z", "2026-10-25T23:00:00Z", 169),
        ("America/New_York", "2026-03-09T03:59:59Z", "2026-03-09T04:00:00Z", 167),
    ],
)
def test_a_weekly_cap_resets_on_monday_midnight(
    ledger: kb.Ledger, clock: Clock, tz: str, last_sunday: str, next_monday_utc: str, hours: int
) -> None:
    budget = kb.Budget(weekly="2", tz=tz)
    clock.set(last_sunday)
    assert clock().astimezone(ZoneInfo(tz)).strftime("%a") == "Sun"
    week = window(ledger, budget, "weekly")
    assert week.start is not None and week.resets_at is not None
    assert week.resets_at == utc(next_monday_utc)
    assert week.resets_at - week.start == timedelta(hours=hours)
    assert week.start.astimezone(ZoneInfo(tz)).strftime("%a %H:%M") == "Mon 00:00"
    spend(ledger, budget, 2 * USD)
    with pytest.raises(kb.BudgetExceededError):
        reserve(ledger, budget, 1)
    clock.set(next_monday_utc)
    assert window(ledger, budget, "weekly").spent_usd == 0
    spend(ledger, budget, 2 * USD)


@pytest.mark.parametrize(
    ("tz", "last_instant", "hours_in_month"),
    [
        ("America/New_York", "2026-02-01T04:59:59.999999Z", 31 * 24),  # January ends
        ("America/New_York", "2026-03-01T04:59:59.999999Z", 28 * 24),  # February, not leap
        ("America/New_York", "2028-03-01T04:59:59.999999Z", 29 * 24),  # February, leap year
        ("America/New_York", "2026-04-01T03:59:59.999999Z", 31 * 24 - 1),  # DST starts
        ("America/New_York", "2027-01-01T04:59:59.999999Z", 31 * 24),  # the year ends
        ("Europe/Berlin", "2026-10-31T22:59:59.999999Z", 31 * 24 + 1),  # DST ends
        ("Asia/Shanghai", "2026-04-30T15:59:59.999999Z", 30 * 24),
    ],
)
def test_a_monthly_cap_resets_at_the_first_local_midnight_of_the_month(
    ledger: kb.Ledger, clock: Clock, tz: str, last_instant: str, hours_in_month: int
) -> None:
    budget = kb.Budget(monthly="3", daily="3", tz=tz)
    clock.set(last_instant)
    month = window(ledger, budget, "monthly")
    assert month.start is not None and month.resets_at is not None
    assert month.resets_at == clock() + NANO
    assert month.resets_at - month.start == timedelta(hours=hours_in_month)
    assert month.start.astimezone(ZoneInfo(tz)).day == 1
    assert month.resets_at.astimezone(ZoneInfo(tz)).strftime("%d %H:%M") == "01 00:00"
    spend(ledger, budget, 3 * USD)
    with pytest.raises(kb.BudgetExceededError) as refused:
        reserve(ledger, budget, 1)
    assert refused.value.window == "daily"  # the narrowest full window is the one reported
    clock.set(clock() + NANO)
    assert window(ledger, budget, "monthly").spent_usd == 0
    spend(ledger, budget, 3 * USD)


def test_the_repeated_hour_of_a_fall_back_night_is_two_hourly_windows(
    ledger: kb.Ledger, clock: Clock
) -> None:
    """02:00-03:00 happens twice in Berlin on 2026-10-25; each occurrence has its own cap."""
    budget = kb.Budget(hourly="1", daily="10", tz="Europe/Berlin")
    clock.set("2026-10-25T00:30:00Z")  # 02:30 CEST
    first = window(ledger, budget, "hourly")
    assert (first.start, first.resets_at) == (
        utc("2026-10-25T00:00:00Z"),
        utc("2026-10-25T01:00:00Z"),
    )
    spend(ledger, budget, USD)
    with pytest.raises(kb.BudgetExceededError):
        reserve(ledger, budget, 1)
    clock.set("2026-10-25T01:30:00Z")  # 02:30 CET, the same wall-clock time an hour later
    second = window(ledger, budget, "hourly")
    assert second.start == utc("2026-10-25T01:00:00Z") and second.spent_usd == 0
    spend(ledger, budget, USD)
    assert window(ledger, budget, "daily").spent_usd == 2


def test_hourly_windows_follow_a_half_hour_zone(ledger: kb.Ledger, clock: Clock) -> None:
    budget = kb.Budget(hourly="1", tz="Asia/Kolkata")  # UTC+05:30
    clock.set("2026-06-01T10:29:59Z")
    spend(ledger, budget, USD)
    assert window(ledger, budget, "hourly").resets_at == utc("2026-06-01T10:30:00Z")
    clock.set("2026-06-01T10:30:00Z")
    assert window(ledger, budget, "hourly").spent_usd == 0


def test_a_call_counts_in_the_window_it_was_reserved_in(ledger: kb.Ledger, clock: Clock) -> None:
    """Reserved at 23:59:59 and settled after midnight: the old day is charged, the new one is
    free, and the reservation is released where it was taken."""
    budget = kb.Budget(daily="1", monthly="5", tz="Europe/Berlin")
    clock.set("2026-03-28T22:59:59Z")  # 23:59:59 CET, the eve of the DST change
    res = reserve(ledger, budget, USD)
    assert window(ledger, budget, "daily").reserved_usd == 1
    clock.set("2026-03-28T23:00:01Z")
    today = window(ledger, budget, "daily")
    assert (today.spent_usd, today.reserved_usd) == (Decimal(0), Decimal(0))
    assert window(ledger, budget, "monthly").reserved_usd == 1
    settle(ledger, res, USD // 2)
    month = window(ledger, budget, "monthly")
    assert (month.spent_usd, month.reserved_usd) == (Decimal("0.5"), Decimal(0))
    assert window(ledger, budget, "daily").spent_usd == 0
    clock.set("2026-03-28T22:00:00Z")
    yesterday = window(ledger, budget, "daily")
    assert (yesterday.spent_usd, yesterday.reserved_usd) == (Decimal("0.5"), Decimal(0))


def test_the_total_cap_never_resets(ledger: kb.Ledger, clock: Clock) -> None:
    budget = kb.Budget(total="1", tz="Asia/Shanghai")
    spend(ledger, budget, USD)
    for later in ("2026-01-02T00:00:00Z", "2027-06-01T00:00:00Z", "2036-01-01T00:00:00Z"):
        clock.set(later)
        with pytest.raises(kb.BudgetExceededError) as refused:
            reserve(ledger, budget, 1)
        assert refused.value.resets_at is None
        assert window(ledger, budget, "total").spent_usd == 1


def test_budgets_in_two_zones_share_a_ledger(ledger: kb.Ledger, clock: Clock) -> None:
    """Each zone keeps its own days: at 16:00 UTC Shanghai starts a new day, London does not."""
    shanghai = kb.Budget(daily="1", tz="Asia/Shanghai")
    london = kb.Budget(daily="1", tz="Europe/London")
    clock.set("2026-07-01T15:30:00Z")
    res = reserve(ledger, shanghai, USD // 2)
    ledger.reserve(Reservation(**{**_fields(res), "call_id": "both"}), [shanghai, london])
    settle(ledger, res, USD // 2)
    clock.set("2026-07-01T16:30:00Z")
    assert window(ledger, shanghai, "daily").reserved_usd == 0
    assert window(ledger, shanghai, "daily").spent_usd == 0
    assert window(ledger, london, "daily").reserved_usd == Decimal("0.5")
    assert window(ledger, london, "daily").spent_usd == Decimal("0.5")


def test_a_per_call_only_budget_reserves(ledger: kb.Ledger) -> None:
    """A budget with no window has no totals to read (this raised StopIteration once)."""
    res = reserve(ledger, kb.Budget(per_call="1"), USD)
    settle(ledger, res, USD)
    with pytest.raises(kb.BudgetExceededError) as refused:
        reserve(ledger, kb.Budget(per_call="1"), USD + 1)
    assert refused.value.window == "per_call"


def _fields(res: Reservation) -> dict[str, Any]:
    return {name: getattr(res, name) for name in Reservation.__dataclass_fields__}


# -- window arithmetic, for any instant in awkward zones ---------------------------------------


ZONES = [
    "UTC",
    "Asia/Shanghai",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",  # DST changes at midnight
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Asia/Kathmandu",  # UTC+05:45
    "Pacific/Chatham",  # UTC+12:45 / +13:45
    "Pacific/Apia",  # skipped a whole day in 2011
]
instants = st.datetimes(
    min_value=datetime(2010, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None)
@given(instant=instants, tz_name=st.sampled_from(ZONES))
def test_calendar_windows_start_at_local_midnight(instant: datetime, tz_name: str) -> None:
    tried(__name__)
    tz = ZoneInfo(tz_name)
    local = instant.astimezone(tz)
    for name in ("daily", "weekly", "monthly"):
        start, end = window_bounds(name, instant, tz)
        assert start <= instant < end
        # The window starts on the first instant of a new local date, and ends on the next.
        before, first = (start - NANO).astimezone(tz), start.astimezone(tz)
        assert before.date() < first.date()
        assert (end - NANO).astimezone(tz).date() < end.astimezone(tz).date()
        assert window_bounds(name, end, tz)[0] == end  # windows tile time, no gap, no overlap
        if name == "daily":
            assert first.date() == local.date()
        elif name == "weekly":
            assert first.weekday() == 0 and 0 <= (local.date() - first.date()).days < 7
        else:
            assert (first.year, first.month, first.day) == (local.year, local.month, 1)
        assert window_key(name, instant, tz) == format_utc(start)


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None)
@given(instant=instants, tz_name=st.sampled_from(ZONES))
def test_hourly_windows_hold_their_instant(instant: datetime, tz_name: str) -> None:
    tried(__name__)
    tz = ZoneInfo(tz_name)
    start, end = window_bounds("hourly", instant, tz)
    assert start <= instant < end and end - start <= timedelta(hours=1)
    # Windows tile time: the next one starts where this one ends, the previous one ends here.
    assert window_bounds("hourly", end, tz)[0] == end
    assert window_bounds("hourly", start - NANO, tz)[1] == start
    # One UTC offset throughout; a full clock hour unless the offset changes at an edge.
    assert start.astimezone(tz).utcoffset() == (end - NANO).astimezone(tz).utcoffset()
    on_the_hour = start.astimezone(tz).minute == 0 and start.astimezone(tz).second == 0
    assert (
        on_the_hour or (start - NANO).astimezone(tz).utcoffset() != start.astimezone(tz).utcoffset()
    )
    assert window_key("hourly", instant, tz) == format_utc(start)


@pytest.mark.parametrize(
    ("instant", "start", "end"),
    [
        # Lord Howe Island leaves DST on 2026-04-05: 02:00 +11:00 becomes 01:30 +10:30.
        ("2026-04-04T14:45:00Z", "2026-04-04T14:00:00Z", "2026-04-04T15:00:00Z"),
        ("2026-04-04T15:10:00Z", "2026-04-04T15:00:00Z", "2026-04-04T15:30:00Z"),  # 01:40 again
        ("2026-04-04T15:40:00Z", "2026-04-04T15:30:00Z", "2026-04-04T16:30:00Z"),
        # It enters DST on 2026-10-04: 02:00 +10:30 becomes 02:30 +11:00.
        ("2026-10-03T15:10:00Z", "2026-10-03T14:30:00Z", "2026-10-03T15:30:00Z"),
        ("2026-10-03T15:45:00Z", "2026-10-03T15:30:00Z", "2026-10-03T16:00:00Z"),  # 02:45
        ("2026-10-03T16:10:00Z", "2026-10-03T16:00:00Z", "2026-10-03T17:00:00Z"),
    ],
)
def test_hourly_windows_across_a_30_minute_dst_shift(instant: str, start: str, end: str) -> None:
    tz = ZoneInfo("Australia/Lord_Howe")
    assert window_bounds("hourly", utc(instant), tz) == (utc(start), utc(end))
    assert window_key("hourly", utc(instant), tz) == format_utc(utc(start))


def test_an_hourly_cap_across_a_30_minute_dst_shift(ledger_path: Path) -> None:
    clock = Clock(utc("2026-04-04T14:45:00Z"))  # 01:45 +11:00, half an hour before the shift
    budget = kb.Budget(hourly="0.01", tz="Australia/Lord_Howe")
    with kb.Ledger(ledger_path, clock=clock) as led:
        spend(led, budget, 9_000_000)
        clock.set("2026-04-04T14:55:00Z")
        with pytest.raises(kb.BudgetExceededError) as refused:
            spend(led, budget, 2_000_000)
        # The clock hour 01:00-02:00 (+11:00) ends at the shift, at 15:00 UTC: 01:30 +10:30.
        assert refused.value.resets_at == "2026-04-05T01:30:00+10:30"
        clock.set("2026-04-04T15:10:00Z")  # 01:40 +10:30: a new window, [15:00, 15:30)
        spend(led, budget, 9_000_000)
        hour = window(led, budget, "hourly")
        assert hour.spent_usd == Decimal("0.009")
        assert (hour.start, hour.resets_at) == (
            utc("2026-04-04T15:00:00Z"),
            utc("2026-04-04T15:30:00Z"),
        )
