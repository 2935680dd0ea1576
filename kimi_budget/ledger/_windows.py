"""Window totals: the policy both backends share.

A budget checks its caps against per-window totals, not against the rows: every write adds its
amounts to one ``(scope, window, start)`` total per window of every budget scope the call's tags
match, so a check reads a few rows however large the ledger grows. What a backend stores is
``spent`` (settled cost) and ``reserved`` (projected cost of calls in flight) per total.

This module decides which totals a call touches, whether a reservation fits, and how a cap is
reported; a backend only reads and upserts the totals it is told to, inside its transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from .._budget import Budget, format_utc, window_bounds, window_key
from .._money import to_usd
from ._backend import budget_currency
from ._records import Reservation, WindowStatus

if TYPE_CHECKING:
    from .._exceptions import BudgetExceededError

__all__ = [
    "Scope",
    "applicable",
    "as_utc_text",
    "backfill_range",
    "check_per_call",
    "first_window_end",
    "refusal",
    "room",
    "scope_for",
    "total_rows",
    "window_status",
]

UTC = timezone.utc
TotalRow = tuple[int, str, str, int, int]  # (scope_id, window, start key, spent, reserved)


@dataclass(frozen=True, slots=True)
class Scope:
    """A (tags, time zone, currency) some budget used, with the windows kept for it."""

    id: int
    tags: dict[str, str]
    tz: ZoneInfo
    windows: tuple[str, ...]
    currency: str = "USD"

    @classmethod
    def from_row(cls, id: int, scope: str, tz: str, windows: str, currency: str) -> Scope:
        windows_ = tuple(json.loads(windows))
        return cls(id, json.loads(scope), ZoneInfo(tz), windows_, currency)

    def matches(self, tags: Mapping[str, str], currency: str = "USD") -> bool:
        """Whether a call with ``tags`` in ``currency`` counts in this scope's totals."""
        return currency == self.currency and all(
            tags.get(key) == value for key, value in self.tags.items()
        )

    def keys(self, windows: Sequence[str], instant: datetime) -> list[tuple[str, str]]:
        """``(window, start key)`` of each window holding ``instant``."""
        return [(window, window_key(window, instant, self.tz)) for window in windows]


def scope_for(scopes: Sequence[Scope], budget: Budget) -> Scope | None:
    currency = budget_currency(budget)
    return next(
        (
            s
            for s in scopes
            if s.tags == budget.scope and s.tz.key == budget.tz_name and s.currency == currency
        ),
        None,
    )


def applicable(budgets: Sequence[Budget], reservation: Reservation) -> list[Budget]:
    """The budgets a call is checked against: its tags in their scope, its currency theirs."""
    tags = reservation.tags
    return [
        budget
        for budget in budgets
        if budget_currency(budget) == reservation.currency and budget.applies_to(tags)
    ]


def total_rows(
    scopes: Sequence[Scope],
    tags: Mapping[str, str],
    instant: datetime,
    *,
    spent: int,
    reserved: int,
    currency: str = "USD",
) -> list[TotalRow]:
    """The totals a call made at ``instant`` with ``tags`` moves, and by how much."""
    if not spent and not reserved:
        return []
    return [
        (scope.id, window, window_key(window, instant, scope.tz), spent, reserved)
        for scope in scopes
        if scope.matches(tags, currency)
        for window in scope.windows
    ]


def check_per_call(reservation: Reservation, budgets: Sequence[Budget]) -> None:
    """Refuse a call whose projection alone exceeds a per-call cap (no ledger needed)."""
    for budget in budgets:
        cap = budget.caps_nanos.get("per_call")
        if cap is not None and reservation.projected_nanos > cap:
            from .._exceptions import BudgetExceededError  # see ledger_error()

            raise BudgetExceededError(
                window="per_call",
                limit_usd=budget.caps["per_call"],
                spent_usd=Decimal(0),
                reserved_usd=Decimal(0),
                projected_usd=to_usd(reservation.projected_nanos),
                model=reservation.model,
                scope=budget.scope,
                currency=budget.currency,
            )


def refusal(
    budget: Budget, reservation: Reservation, totals: Mapping[str, tuple[int, int]]
) -> BudgetExceededError | None:
    """The first window cap of ``budget`` the reservation would exceed, narrowest first.

    ``totals`` maps each of the budget's windows to its ``(spent, reserved)`` now.
    """
    instant = reservation.created_at
    projected = reservation.projected_nanos
    for window in budget.windows:
        spent, reserved = totals[window]
        if spent + reserved + projected <= budget.caps_nanos[window]:
            continue
        end = window_bounds(window, instant, budget.tz)[1]
        from .._exceptions import BudgetExceededError  # see ledger_error()

        return BudgetExceededError(
            window=window,
            limit_usd=budget.caps[window],
            spent_usd=to_usd(spent),
            reserved_usd=to_usd(reserved),
            projected_usd=to_usd(projected),
            model=reservation.model,
            scope=budget.scope,
            currency=budget.currency,
            resets_at=None
            if window == "total"
            else end.astimezone(budget.tz).isoformat(timespec="seconds"),
        )
    return None


def room(budget: Budget, reservation: Reservation, totals: Mapping[str, tuple[int, int]]) -> int:
    """What the tightest window cap of ``budget`` has left once ``reservation`` is in it."""
    projected = reservation.projected_nanos
    return min(budget.caps_nanos[w] - sum(totals[w]) - projected for w in budget.windows)


def first_window_end(
    scopes: Sequence[Scope], tags: Mapping[str, str], currency: str, instant: datetime
) -> datetime | None:
    """The first end, after ``instant``, of a window holding it in any scope ``tags`` count
    in (None: only all-time windows). Totals a call moves are those of its windows: a
    reservation made for ``instant`` stands for calls made before then only."""
    ends = [
        window_bounds(window, instant, scope.tz)[1]
        for scope in scopes
        if scope.matches(tags, currency)
        for window in scope.windows
        if window != "total"
    ]
    return min(ends, default=None)


def window_status(
    budget: Budget, now: datetime, totals: Mapping[str, tuple[int, int]]
) -> list[WindowStatus]:
    """Each cap of ``budget`` at ``now``, given its windows' ``(spent, reserved)``."""
    result: list[WindowStatus] = []
    for name, cap in budget.caps.items():
        if name == "per_call":
            result.append(
                WindowStatus(
                    name, cap, Decimal(0), Decimal(0), None, None, budget.scope, budget.tz_name
                )
            )
            continue
        spent, reserved = totals.get(name, (0, 0))
        start, end = window_bounds(name, now, budget.tz)
        result.append(
            WindowStatus(
                name,
                cap,
                to_usd(spent),
                to_usd(reserved),
                None if name == "total" else start,
                None if name == "total" else end,
                budget.scope,
                budget.tz_name,
            )
        )
    return result


def backfill_range(window: str, now: datetime, budget: Budget) -> tuple[str, str] | None:
    """The ``created_at`` range ``[start, end)`` a new window total sums (None: all rows)."""
    if window == "total":
        return None
    start, end = window_bounds(window, now, budget.tz)
    return format_utc(start), format_utc(end)


def as_utc_text(value: datetime | str) -> str:
    """A date/time argument (ISO text, aware or naive-as-UTC datetime) as ledger UTC text."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{value!r} is not a date or time; use ISO 8601 such as 2026-11-01 or "
                f"2026-11-01T08:00:00+08:00."
            ) from None
        value = parsed
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return format_utc(value)
