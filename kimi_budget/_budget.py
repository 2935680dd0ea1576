"""The budget policy: which caps apply to a call, and the calendar windows they count over.

A ``Budget`` holds USD caps. ``per_call`` bounds one call's projected cost; the others bound the
spend in a calendar window (hour, day, ISO week starting Monday, month, or all time) in the
budget's time zone. ``scope`` limits the ledger rows (and calls) a budget applies to: a row
counts when its tags contain every ``key=value`` of the scope.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._money import check_cap, parse_usd, usd_to_nanos_floor

__all__ = ["WINDOWS", "Budget", "format_utc", "window_bounds"]

# Order matters: the narrowest window is checked (and reported) first.
WINDOWS = ("hourly", "daily", "weekly", "monthly", "total")
_CAPS = ("per_call", *WINDOWS)
UTC = timezone.utc


class Budget:
    """USD spending caps, each optional, over calendar windows in one time zone.

    >>> Budget(per_call="0.05", daily="5", monthly=100, tz="Asia/Shanghai")
    Budget(per_call='0.05', daily='5', monthly='100', tz='Asia/Shanghai')
    """

    __slots__ = (
        "_caps",
        "_caps_nanos",
        "_currency",
        "_scope",
        "_scope_key",
        "_tz",
        "_tz_name",
        "_windows",
    )

    def __init__(
        self,
        *,
        per_call: object = None,
        hourly: object = None,
        daily: object = None,
        weekly: object = None,
        monthly: object = None,
        total: object = None,
        tz: str = "UTC",
        scope: Mapping[str, str] | None = None,
        currency: str = "USD",
    ) -> None:
        given = dict(
            per_call=per_call,
            hourly=hourly,
            daily=daily,
            weekly=weekly,
            monthly=monthly,
            total=total,
        )
        self._caps = {
            name: check_cap(parse_usd(value, what=f"Budget {name}"), what=f"Budget {name}")
            for name, value in given.items()
            if value is not None
        }
        self._caps_nanos = {name: usd_to_nanos_floor(cap) for name, cap in self._caps.items()}
        # Read several times per guarded call: computed once (a Budget never changes).
        self._windows = tuple(name for name in WINDOWS if name in self._caps)
        if not isinstance(tz, str) or not tz:
            raise ValueError(f"Budget tz must be an IANA time zone name such as 'UTC', not {tz!r}.")
        try:
            self._tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"Budget tz {tz!r} is not a known IANA time zone; use a name such as "
                f"'UTC' or 'Asia/Shanghai'."
            ) from None
        self._tz_name = tz
        self._scope = canonical_tags(scope or {}, what="Budget scope")
        self._scope_key = tags_json(self._scope)
        if currency not in ("USD", "CNY"):
            raise ValueError(
                f"Budget currency must be 'USD' or 'CNY', not {currency!r}: caps count only the "
                f"calls priced in their currency."
            )
        self._currency = currency

    @property
    def caps(self) -> dict[str, Decimal]:
        """The caps that are set, in USD, narrowest first."""
        return dict(self._caps)  # built in _CAPS order; a copy, so a caller cannot change it

    @property
    def caps_nanos(self) -> dict[str, int]:
        return dict(self._caps_nanos)

    @property
    def windows(self) -> tuple[str, ...]:
        """The calendar windows this budget caps (``per_call`` is not a window)."""
        return self._windows

    @property
    def tz(self) -> ZoneInfo:
        return self._tz

    @property
    def tz_name(self) -> str:
        return self._tz_name

    @property
    def scope(self) -> dict[str, str]:
        return dict(self._scope)

    @property
    def scope_key(self) -> str:
        return self._scope_key

    @property
    def currency(self) -> str:
        """The currency of the caps; the budget counts and applies to calls in it only."""
        return self._currency

    def applies_to(self, tags: Mapping[str, str]) -> bool:
        return all(tags.get(key) == value for key, value in self._scope.items())

    def __repr__(self) -> str:
        parts = [f"{name}={str(cap)!r}" for name, cap in self.caps.items()]
        parts.append(f"tz={self._tz_name!r}")
        if self._scope:
            parts.append(f"scope={self._scope!r}")
        if self._currency != "USD":
            parts.append(f"currency={self._currency!r}")
        return f"Budget({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return (self._caps, self._tz_name, self._scope, self._currency) == (
            other._caps,
            other._tz_name,
            other._scope,
            other._currency,
        )

    def __hash__(self) -> int:
        return hash(
            (tuple(sorted(self._caps.items())), self._tz_name, self._scope_key, self._currency)
        )


def canonical_tags(tags: Mapping[str, Any], *, what: str = "tags") -> dict[str, str]:
    """Tags as a plain ``{str: str}`` dict sorted by key; other shapes are a clear error."""
    if not isinstance(tags, Mapping):
        raise ValueError(f"{what} must be a dict of strings such as {{'project': 'crawler'}}.")
    result: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what} keys must be non-empty strings, not {key!r}.")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ValueError(f"{what} value for {key!r} must be a string, not {value!r}.")
        result[key] = str(value)
    return dict(sorted(result.items()))


_TAGS_JSON: dict[tuple[tuple[str, str], ...], str] = {}


def tags_json(tags: Mapping[str, str]) -> str:
    """Tags as stored: compact JSON sorted by key (memoized: a client sends the same few)."""
    items = tuple(sorted(tags.items()))
    text = _TAGS_JSON.get(items)
    if text is None:
        text = json.dumps(dict(items), separators=(",", ":"), ensure_ascii=False)
        if len(_TAGS_JSON) >= 1024:
            _TAGS_JSON.clear()
        _TAGS_JSON[items] = text
    return text


def format_utc(instant: datetime) -> str:
    """An instant as fixed-width ISO 8601 UTC, so that text order is time order in SQLite.

    ``isoformat`` (a few times faster than ``strftime``: this runs on every call's path) of
    the UTC instant, ``+00:00`` cut: the same text as ``%Y-%m-%dT%H:%M:%S.%fZ``.
    """
    if instant.tzinfo is not UTC:
        instant = instant.astimezone(UTC)
    return instant.isoformat(timespec="microseconds")[:26] + "Z"


def parse_utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def window_bounds(window: str, instant: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The ``[start, end)`` of the calendar window holding ``instant``, as UTC datetimes.

    Windows are computed on the local calendar, so a day in Asia/Shanghai starts at 16:00 UTC
    and a day across a DST change lasts 23 or 25 hours.
    """
    if window == "total":
        return datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    local = instant.astimezone(tz)
    if window == "hourly":
        return _hour_bounds(instant, tz, local.utcoffset() or timedelta(0))
    day = local.date()
    if window == "daily":
        first, following = day, day + timedelta(days=1)
    elif window == "weekly":
        first = day - timedelta(days=day.weekday())
        following = first + timedelta(days=7)
    elif window == "monthly":
        first = day.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown window {window!r}")
    return _local_midnight(first, tz), _local_midnight(following, tz)


def _hour_bounds(instant: datetime, tz: ZoneInfo, offset: timedelta) -> tuple[datetime, datetime]:
    """The local clock hour holding ``instant``, cut where the zone's UTC offset changes.

    Computed in UTC with the instant's own offset, so the repeated local hour of a fall-back
    night is two windows, not one. A change of offset by a fraction of an hour (30 minutes in
    Australia/Lord_Howe) falls inside a clock hour: the window then ends (or starts) at the
    change, so that windows tile time without overlapping and hold at most one hour.
    """
    utc = instant.astimezone(UTC)
    start = (utc + offset).replace(minute=0, second=0, microsecond=0) - offset
    end = start + timedelta(hours=1)
    if _offset(start, tz) != offset:
        start = _offset_change(start, utc, tz)
    if _offset(end - _TICK, tz) != offset:
        end = _offset_change(utc, end - _TICK, tz)
    return start, end


_TICK = timedelta(microseconds=1)


def _offset(instant: datetime, tz: ZoneInfo) -> timedelta | None:
    return instant.astimezone(tz).utcoffset()


def _offset_change(before: datetime, after: datetime, tz: ZoneInfo) -> datetime:
    """The first instant in ``(before, after]`` with ``after``'s UTC offset (one change lies
    between them; zones change offset on a whole second)."""
    target = _offset(after, tz)
    low = before.replace(microsecond=0)
    high = after if after.microsecond == 0 else after.replace(microsecond=0) + timedelta(seconds=1)
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) // 2
        middle = middle.replace(microsecond=0)
        if _offset(middle, tz) == target:
            high = middle
        else:
            low = middle
    return high


def _local_midnight(day: Any, tz: ZoneInfo) -> datetime:
    # A zone whose DST starts at midnight has no 00:00 that day: zoneinfo reads the missing
    # time with the offset before the change, which lands on the first instant that exists.
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


# The window each (zone, window) was last asked about: (start, end, key). Calls come in time
# order, so nearly every lookup is one range check.
_CURRENT_WINDOW: dict[tuple[ZoneInfo, str], tuple[datetime, datetime, str]] = {}


def window_key(window: str, instant: datetime, tz: ZoneInfo) -> str:
    """The stored key of the window holding ``instant``: its UTC start, or '' for all time.

    Every ledger write needs these keys (several per call), so the last window of each zone
    and kind is kept with its bounds, and an instant inside them gets its key with two
    comparisons. Windows tile time (an hour is cut where the zone's UTC offset changes), so
    every instant in ``[start, end)`` has that same window: the answer is always
    ``window_bounds``' own.
    """
    if window == "total":
        return ""
    memo = (tz, window)
    current = _CURRENT_WINDOW.get(memo)
    if current is not None and current[0] <= instant < current[1]:
        return current[2]
    start, end = window_bounds(window, instant, tz)
    key = format_utc(start)
    _CURRENT_WINDOW[memo] = (start, end, key)
    return key
