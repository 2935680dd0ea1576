"""A window's stored key is its start, whatever instant of it (or of a neighbour) came before.

``window_key`` keeps the last window of each zone and kind and answers from it while the
instant is inside, which is right only because windows tile time. These tests ask for pairs
of instants around every UTC-offset change of awkward zones (30- and 60-minute DST shifts,
DST at midnight, a skipped day), so that a kept window is always asked about an instant near
its edges.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_budget import _budget
from kimi_budget._budget import format_utc, window_bounds, window_key

UTC = timezone.utc
ZONES = [
    "Europe/Berlin",
    "America/St_Johns",  # UTC-03:30 / -02:30
    "America/Santiago",  # DST changes at midnight
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Pacific/Chatham",  # UTC+12:45 / +13:45
    "Pacific/Apia",  # skipped a whole day in 2011
    "Asia/Kolkata",  # no DST, a half-hour offset
]
WINDOWS = ("hourly", "daily", "weekly", "monthly", "total")
STEP = timedelta(minutes=15)


def _offset_changes(tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The first quarter-hour at or after each change of ``tz``'s UTC offset."""
    changes = []
    instant, offset = start, start.astimezone(tz).utcoffset()
    while instant < end:
        instant += STEP
        now = instant.astimezone(tz).utcoffset()
        if now != offset:
            changes.append(instant)
            offset = now
    return changes


def _expected(window: str, instant: datetime, tz: ZoneInfo) -> str:
    return "" if window == "total" else format_utc(window_bounds(window, instant, tz)[0])


@pytest.mark.parametrize("zone", ZONES)
def test_keys_around_every_offset_change_are_the_windows_starts(zone: str) -> None:
    tz = ZoneInfo(zone)
    changes = _offset_changes(
        tz, datetime(2011, 1, 1, tzinfo=UTC), datetime(2013, 1, 1, tzinfo=UTC)
    )
    if zone != "Asia/Kolkata":
        assert changes, f"{zone} should change its offset in 2011-2012"
    # Also the ends of some calendar months and an ordinary midnight.
    probes = [*changes, datetime(2012, 3, 1, tzinfo=UTC), datetime(2012, 7, 1, tzinfo=UTC)]
    for change in probes:
        around = [change + k * STEP + timedelta(seconds=s) for k in range(-8, 9) for s in (-1, 0)]
        for first in around[::3]:
            for window in WINDOWS:
                _budget._CURRENT_WINDOW.clear()
                assert window_key(window, first, tz) == _expected(window, first, tz)
                for then in around:
                    assert window_key(window, then, tz) == _expected(window, then, tz), (
                        zone,
                        window,
                        first,
                        then,
                    )


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    window=st.sampled_from(WINDOWS),
    first=st.datetimes(
        min_value=datetime(2010, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    steps=st.lists(st.integers(min_value=-90 * 24 * 60, max_value=90 * 24 * 60), max_size=8),
)
def test_any_sequence_of_instants_gets_window_bounds_keys(
    zone: str, window: str, first: datetime, steps: list[int]
) -> None:
    tz = ZoneInfo(zone)
    instant = first
    for minutes in [0, *steps]:
        instant += timedelta(minutes=minutes)
        assert window_key(window, instant, tz) == _expected(window, instant, tz)


@settings(max_examples=300, deadline=None)
@given(
    instant=st.datetimes(
        min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    zone=st.sampled_from([*ZONES, "UTC"]),
)
def test_stored_times_are_fixed_width_utc_text(instant: datetime, zone: str) -> None:
    # The same instant in any zone is the same text, strftime's, and it parses back.
    text = format_utc(instant.astimezone(ZoneInfo(zone)))
    assert text == instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ") == format_utc(instant)
    assert len(text) == 27 and _budget.parse_utc(text) == instant
