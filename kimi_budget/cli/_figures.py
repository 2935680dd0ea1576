"""What the spend chart and the HTML page show, read from a ledger through ``_report``'s queries.

Spend per day (or week, month) stacked by model, the caps that apply, spend by tag, cache
savings per model, and the most expensive calls. No SQL of its own, no drawing: ``_chart`` draws
in the terminal, ``_html`` writes the page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import _report as rp
from ._chart import ChartDay

if TYPE_CHECKING:
    from .._budget import Budget
    from ..ledger import Ledger

__all__ = [
    "Cap",
    "CurrencyFigures",
    "Figures",
    "budget_caps",
    "chart_days",
    "gather",
    "models_spent",
    "period_cap",
]

_WINDOW_OF = {"day": "daily", "week": "weekly", "month": "monthly"}


@dataclass(frozen=True)
class Cap:
    """A cap of a configured budget: which window, its limit, spent + reserved now, scope."""

    window: str
    limit_nanos: int
    used_nanos: int
    scope: Mapping[str, str]
    tz: str

    @property
    def label(self) -> str:
        scope = " ".join(f"{k}={v}" for k, v in self.scope.items())
        return f"{self.window} cap" + (f" ({scope})" if scope else "")


@dataclass
class CurrencyFigures:
    """Everything the page shows for one currency (amounts in nano-units of it)."""

    currency: str
    days: list[ChartDay]
    caps: list[Cap]
    by_model: list[rp.ReportRow]
    by_tag: dict[str, list[rp.ReportRow]]  # tag key -> one row per value
    costliest: list[dict[str, Any]]
    total: rp.ReportRow

    @property
    def daily_caps(self) -> list[Cap]:
        return [cap for cap in self.caps if cap.window == "daily"]


@dataclass
class Figures:
    ledger: str
    tz: str
    since: datetime | None
    until: datetime | None
    model: str | None
    tags: dict[str, str]
    generated_at: datetime
    currencies: list[CurrencyFigures] = field(default_factory=list)


def models_spent(
    ledger: Ledger,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
    tz: str = "UTC",
    currency: str | None = None,
) -> list[str]:
    """The models settled calls matching the filters went to, the costliest first."""
    report = rp.build_report(
        ledger,
        by="model",
        since=since,
        until=until,
        model=model,
        tags=tags,
        tz=tz,
        currency=currency,
    )
    return [row.key for row in report.rows]


def chart_days(
    ledger: Ledger,
    models: Sequence[str],
    *,
    by: str = "day",
    since: datetime | None = None,
    until: datetime | None = None,
    tags: Mapping[str, str] | None = None,
    tz: str = "UTC",
    currency: str | None = None,
    step: Callable[[int], None] | None = None,
) -> list[ChartDay]:
    """Spend per ``by`` bucket of each of ``models``; buckets with no spend in between included.

    One report per model (each exact, from the rollup when it can answer); ``step(1)`` is
    called after each, for a progress bar.
    """
    spend: dict[str, dict[str, int]] = {}
    for name in models:
        report = rp.build_report(
            ledger,
            by=by,
            since=since,
            until=until,
            model=name,
            tags=tags,
            tz=tz,
            currency=currency,
        )
        for row in report.rows:
            spend.setdefault(row.key, {})[name] = row.cost_nanos
        if step is not None:
            step(1)
    labels = _every_label(sorted(spend), by)
    return [ChartDay(label, spend.get(label, {})) for label in labels]


def _every_label(labels: Sequence[str], by: str) -> list[str]:
    """The labels from the first to the last, none skipped (days and weeks as dates)."""
    if len(labels) < 2:
        return list(labels)
    if by == "month":
        year, month = map(int, labels[0].split("-"))
        last = labels[-1]
        out = []
        while True:
            label = f"{year:04d}-{month:02d}"
            out.append(label)
            if label >= last:
                return out
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    stride = timedelta(days=7 if by == "week" else 1)
    first, last_day = date.fromisoformat(labels[0]), date.fromisoformat(labels[-1])
    known = set(labels)
    out, day = [], first
    while day <= last_day:
        out.append(day.isoformat())
        day += stride
    # A DST-shifted week start never lands off the stride, but keep any label seen regardless.
    return sorted(known.union(out))


def budget_caps(ledger: Ledger, budgets: Iterable[Budget], currency: str = "USD") -> list[Cap]:
    """The windowed caps of the budgets in ``currency`` (per-call caps are not spend)."""
    caps = []
    for budget in budgets:
        if getattr(budget, "currency", "USD") != currency:
            continue
        for window in ledger.status(budget):
            if window.window == "per_call":
                continue
            limit = int(window.limit_usd * 1_000_000_000)
            used = int((window.spent_usd + window.reserved_usd) * 1_000_000_000)
            caps.append(Cap(window.window, limit, used, dict(budget.scope), window.tz))
    return caps


def period_cap(caps: Sequence[Cap], by: str, tags: Mapping[str, str]) -> Cap | None:
    """The cap to draw across a chart of ``by`` buckets: the window's, of the budget whose scope
    the report's tag filter is (unscoped when there is no filter); the smallest if several."""
    window = _WINDOW_OF.get(by)
    fitting = [c for c in caps if c.window == window and dict(c.scope) == dict(tags)]
    return min(fitting, key=lambda c: c.limit_nanos) if fitting else None


def gather(
    ledger: Ledger,
    budgets: Sequence[Budget],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
    tz: str = "UTC",
    now: datetime,
    top: int = 10,
    step: Callable[[int], None] | None = None,
) -> Figures:
    """The page's figures, one part per currency the ledger's calls were billed in.

    A ledger in one currency is read as fast as the report reads it (from the rollup); with
    several, each currency's figures come from its own rows, never summed together.
    """
    figures = Figures(
        ledger=ledger.location,
        tz=tz,
        since=since,
        until=until,
        model=model,
        tags=dict(tags or {}),
        generated_at=now,
    )
    found = rp.currencies(ledger)
    for currency in found:
        only = currency if len(found) > 1 else None
        filters: dict[str, Any] = {
            "since": since,
            "until": until,
            "tags": tags,
            "tz": tz,
            "currency": only,
        }
        by_model = rp.build_report(ledger, by="model", model=model, **filters)
        by_tag = {}
        for key in rp.tag_keys(ledger):
            rows = rp.build_report(ledger, by=f"tag:{key}", model=model, **filters).rows
            if rows:
                by_tag[key] = rows
            if step is not None:
                step(1)
        days = chart_days(
            ledger, [row.key for row in by_model.rows], by="day", step=step, **filters
        )
        figures.currencies.append(
            CurrencyFigures(
                currency=currency,
                days=days,
                caps=budget_caps(ledger, budgets, currency),
                by_model=by_model.rows,
                by_tag=by_tag,
                costliest=rp.costliest_calls(
                    ledger,
                    limit=top,
                    since=since,
                    until=until,
                    model=model,
                    tags=tags,
                    currency=only,
                ),
                total=by_model.total,
            )
        )
    return figures
