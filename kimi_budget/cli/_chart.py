"""Spend per day as a bar chart in the terminal: ``kimi-budget report --by day --chart``.

One line per day, the bar stacked by model, the daily cap drawn as a vertical line across the
days, so a day over the cap shows at a glance. It fits the terminal (80 columns and up). On a
terminal the models are coloured blocks; when the output is not a terminal (a pipe, a file) it
is plain ASCII, one character per model, explained by the legend.

This module only draws: the figures come from ``_spend``. It imports neither openai nor the
ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import click

__all__ = ["DAY_LABEL_WIDTH", "ChartDay", "money_short", "spend_chart"]

NANOS = 1_000_000_000
DAY_LABEL_WIDTH = 10  # YYYY-MM-DD
# Plain text: a character per model that reads apart from its neighbours.
_PLAIN_FILLS = ("#", "=", "+", "%", "o", "*", ":")
_FANCY_COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red", "white")
_MAX_SERIES = len(_PLAIN_FILLS)  # more models than this: the smallest are one "other" series
_SYMBOLS = {"USD": "$", "CNY": "¥"}


@dataclass(frozen=True)
class ChartDay:
    """One day of the chart: its label and what each model cost that day (nano-units)."""

    label: str
    by_model: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_model.values())


def money_short(nanos: int, currency: str = "USD") -> str:
    """An amount for a chart: cents from 1 unit up, else 3 significant digits (``$0.000978``)."""
    symbol = _SYMBOLS.get(currency, currency + " ")
    value = Decimal(abs(nanos)) / NANOS
    if value >= 1:
        text = format(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP), "f")
    elif value == 0:
        text = "0"
    else:
        exponent = value.adjusted() - 2  # three significant digits, no trailing zeros
        rounded = value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_UP)
        text = format(rounded.normalize(), "f")
    return ("-" if nanos < 0 else "") + symbol + text


def _series(days: Sequence[ChartDay]) -> tuple[list[str], dict[str, str]]:
    """The models in the order they are stacked (biggest first), and which fold into "other"."""
    totals: dict[str, int] = {}
    for day in days:
        for model, nanos in day.by_model.items():
            totals[model] = totals.get(model, 0) + nanos
    ranked = sorted(totals, key=lambda m: (-totals[m], m))
    if len(ranked) <= _MAX_SERIES:
        return ranked, {m: m for m in ranked}
    kept = ranked[: _MAX_SERIES - 1]
    mapping = {m: (m if m in kept else "other") for m in ranked}
    return [*kept, "other"], mapping


def spend_chart(
    days: Sequence[ChartDay],
    *,
    cap_nanos: int | None = None,
    cap_label: str = "daily cap",
    currency: str = "USD",
    width: int = 80,
    fancy: bool = False,
) -> str:
    """The chart as text, at most ``width`` columns wide (ANSI colours only if ``fancy``)."""
    if not days:
        return "No settled calls match."
    order, fold = _series(days)
    stacks = []
    for day in days:
        merged: dict[str, int] = {}
        for model, nanos in day.by_model.items():
            merged[fold[model]] = merged.get(fold[model], 0) + max(nanos, 0)
        stacks.append(merged)
    totals = [sum(stack.values()) for stack in stacks]
    amounts = [money_short(total, currency) for total in totals]
    amount_width = max(len(a) for a in amounts)
    bar_width = max(width - DAY_LABEL_WIDTH - 1 - 1 - amount_width - 1, 10)
    cap = cap_nanos if cap_nanos is not None and cap_nanos >= 0 else None
    top = max([*totals, cap or 0, 1])
    cap_column = None if cap is None else min(round(cap * bar_width / top), bar_width)

    def cells(nanos: int) -> int:
        return round(nanos * bar_width / top)

    lines = []
    if cap_column is not None and cap is not None:
        mark = f"{cap_label} {money_short(cap, currency)}"
        lead = DAY_LABEL_WIDTH + 1 + cap_column
        if lead + 2 + len(mark) <= width:
            lines.append(" " * lead + "v " + mark)
        else:
            lines.append(" " * max(lead - len(mark) - 1, 0) + mark + " v")
    for day, stack, amount in zip(days, stacks, amounts, strict=True):
        row: list[str] = []  # one entry per cell, already styled
        before = 0
        for index, model in enumerate(order):
            nanos = stack.get(model, 0)
            if not nanos:
                continue
            start, end = cells(before), cells(before + nanos)
            before += nanos
            fill = _fill(index, fancy)
            row.extend([fill] * (end - start))
        if not row and sum(stack.values()) > 0:
            # Too small to round to a cell, yet not nothing: one cell of its biggest model.
            biggest = max(stack, key=lambda m: stack[m])
            row.append(_fill(order.index(biggest), fancy))
        row.extend(" " * (bar_width + 1 - len(row)))
        if cap_column is not None:
            row[cap_column] = _cap_mark(
                fancy, over=len(row) > cap_column and row[cap_column] != " "
            )
        lines.append(
            f"{day.label:<{DAY_LABEL_WIDTH}} {''.join(row)} {amount:>{amount_width}}".rstrip()
        )
    legend = []
    for index, model in enumerate(order):
        spent = sum(stack.get(model, 0) for stack in stacks)
        legend.append(f"{_fill(index, fancy)} {model} {money_short(spent, currency)}")
    if cap_column is not None:
        legend.append(f"{_cap_mark(fancy, over=False)} {cap_label}")
    lines.append("")
    lines.extend(_wrap(legend, width))
    return "\n".join(lines)


def _fill(index: int, fancy: bool) -> str:
    if fancy:
        return click.style("█", fg=_FANCY_COLOURS[index % len(_FANCY_COLOURS)])
    return _PLAIN_FILLS[index % len(_PLAIN_FILLS)]


def _cap_mark(fancy: bool, *, over: bool) -> str:
    if fancy:
        return click.style("│", fg="red", bold=True, reverse=over)
    return "|"


def _wrap(items: Sequence[str], width: int) -> list[str]:
    """Legend entries on as few lines as fit ``width`` (measured without colour codes)."""
    lines: list[str] = []
    current, length = "", 0
    for item in items:
        visible = len(click.unstyle(item))
        if current and length + 3 + visible > width:
            lines.append(current)
            current, length = "", 0
        current = f"{current}   {item}" if current else item
        length = length + 3 + visible if length else visible
    if current:
        lines.append(current)
    return lines
