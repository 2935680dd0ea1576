"""``kimi-budget report --html FILE``: one self-contained page of where the money went.

Spend per day stacked by model with the caps drawn, how much of each cap is used now, spend by
tag, what the cache saved, and the most expensive calls; one part per currency when a ledger has
more than one. Charts are inline SVG with native tooltips; the page has no script, no font, no
stylesheet or image from anywhere else, so it opens offline and can be mailed as one file.

The file is written atomically (a temporary file renamed into place). An existing file is only
replaced if kimi-budget wrote it (it starts with the page's marker); any other file is left
alone and the command says so.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from . import _figures
from ._chart import ChartDay, money_short

if TYPE_CHECKING:
    from .._config import FileConfig
    from ._figures import Cap, CurrencyFigures, Figures
    from ._report import ReportRow

__all__ = ["MARKER", "render_page", "write_report_page"]

MARKER = "<!-- kimi-budget report page -->"
NANOS = 1_000_000_000
# Okabe-Ito: tells apart for most colour-blind readers too.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
CAP_COLOUR = "#C0392B"
TAG_VALUES_SHOWN = 15  # per tag key, the costliest; the rest as one line
_SYMBOLS = {"USD": "$", "CNY": "¥"}

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0 auto; max-width: 1080px; padding: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.muted { color: #6e6e73; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #d2d2d7; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card b { display: block; font-size: 22px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { padding: 4px 12px 4px 0; border-bottom: 1px solid #ececf0; vertical-align: top; }
th { text-align: left; font-weight: 600; } td.nowrap { white-space: nowrap; }
.bar { background: #ececf0; width: 220px; height: 12px; border-radius: 3px; overflow: hidden; }
.bar span { display: block; height: 12px; background: #0072B2; }
.bar span.over { background: #C0392B; }
.legend span { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
          vertical-align: -1px; border-radius: 2px; }
svg text { font: 12px system-ui, sans-serif; fill: #3a3a3c; }
"""


def write_report_page(
    target: Path,
    ledger_option: Path | None,
    file: FileConfig,
    *,
    since: datetime | None,
    until: datetime | None,
    model: str | None,
    tags: Mapping[str, str],
    tz: str,
) -> None:
    """Gather the figures from the ledger and write the page to ``target`` (see the module)."""
    import click

    from .._config import resolve_budgets
    from ._app import UserError, open_ledger
    from ._progress import progress

    target = target.expanduser()
    _check_target(target, UserError)
    budgets = resolve_budgets(None, file)
    with open_ledger(ledger_option, file) as ledger:
        keys_and_models = 1 + len(
            _figures.models_spent(ledger, since=since, until=until, model=model, tags=tags, tz=tz)
        )
        with progress(keys_and_models + 8, "Reading the ledger") as step:
            figures = _figures.gather(
                ledger,
                budgets,
                since=since,
                until=until,
                model=model,
                tags=tags,
                tz=tz,
                now=datetime.now(timezone.utc),
                step=step,
            )
    page = render_page(figures)
    _write_atomically(target, page)
    total = sum(c.total.calls for c in figures.currencies)
    click.echo(f"Wrote {target} ({total:,} calls; open it in a browser, no network needed).")


def _check_target(target: Path, error: type[Exception]) -> None:
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise error(
            f"--html {target}: the folder {parent} does not exist; create it first or choose "
            "another place."
        )
    if target.is_dir():
        raise error(f"--html {target} is a folder; give a file name such as spend.html.")
    if target.exists() or target.is_symlink():
        try:
            with target.open("r", encoding="utf-8", errors="replace") as handle:
                head = handle.read(len(MARKER) + 64)
        except OSError as exc:
            raise error(f"--html {target} exists and cannot be read ({exc.strerror}).") from None
        if target.is_symlink() or MARKER not in head:
            raise error(
                f"--html {target} exists and was not written by kimi-budget; it is left alone. "
                "Choose another file name, or remove it first."
            )


def _write_atomically(target: Path, text: str) -> None:
    fd, scratch = tempfile.mkstemp(prefix=".kimi-budget-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(scratch, 0o644)
        os.replace(scratch, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


# -- the page ------------------------------------------------------------------------------------


def render_page(figures: Figures) -> str:
    """The whole page as one string (see the module docstring)."""
    e = html.escape
    zone = ZoneInfo(figures.tz)
    period = _period(figures)
    parts = [
        "<!DOCTYPE html>",
        MARKER,
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>Spend: {e(Path(figures.ledger).name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Where the money went</h1>",
        f'<p class="muted">Ledger {e(figures.ledger)} · {e(period)} · days in {e(figures.tz)} · '
        f"made {e(figures.generated_at.astimezone(zone).strftime('%Y-%m-%d %H:%M %Z'))}</p>",
    ]
    currencies = [c for c in figures.currencies if c.total.calls or c.caps]
    if not currencies:
        parts.append("<p>No settled calls match.</p>")
    for figures_of in currencies:
        parts.append(_currency_part(figures_of, zone, several=len(currencies) > 1))
    parts.append(
        '<p class="muted">Amounts are what Moonshot billed, summed exactly from the ledger; calls '
        "whose bill could not be read are charged their full reservation and counted as "
        "estimated. Reservations of calls still in flight are not spend and are not shown."
        "</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def _period(figures: Figures) -> str:
    zone = ZoneInfo(figures.tz)
    if not (figures.since or figures.until):
        text = "all calls"
    else:
        start = figures.since.astimezone(zone).strftime("%Y-%m-%d") if figures.since else "start"
        end = figures.until.astimezone(zone).strftime("%Y-%m-%d") if figures.until else "now"
        text = f"{start} to {end}"
    if figures.model:
        text += f", model {figures.model}"
    if figures.tags:
        text += ", tagged " + " ".join(f"{k}={v}" for k, v in figures.tags.items())
    return text


def _currency_part(c: CurrencyFigures, zone: ZoneInfo, *, several: bool) -> str:
    e = html.escape
    total = c.total
    without_cache = total.cost_nanos + total.savings_nanos
    out = []
    if several:
        out.append(f"<h2>{e(c.currency)}</h2>")
    out.append('<div class="cards">')
    for label, value in (
        ("spent", _money(total.cost_nanos, c.currency)),
        ("calls", f"{total.calls:,}"),
        ("saved by the cache", _money(total.savings_nanos, c.currency)),
        ("estimated calls", f"{total.estimated:,}"),
    ):
        out.append(
            f'<div class="card"><span class="muted">{e(label)}</span><b>{e(value)}</b></div>'
        )
    out.append("</div>")

    out.append("<h2>Spend per day, by model</h2>")
    out.append(_day_chart(c.days, c.daily_caps, c.currency))
    order = _model_order(c.days)
    out.append('<p class="legend">')
    for index, name in enumerate(order):
        out.append(
            f'<span><i class="swatch" style="background:{PALETTE[index % len(PALETTE)]}"></i>'
            f"{e(name)}</span>"
        )
    for cap in c.daily_caps:
        out.append(
            f'<span><i class="swatch" style="background:{CAP_COLOUR}"></i>'
            f"{e(cap.label)} {e(_money(cap.limit_nanos, c.currency))}</span>"
        )
    out.append("</p>")

    out.append("<h2>Caps now</h2>")
    if c.caps:
        out.append(_caps_table(c.caps, c.currency))
    else:
        out.append(
            '<p class="muted">No budget configured (KIMI_BUDGET_DAILY_USD=5, or a [budget] '
            "table in kimi-budget.toml).</p>"
        )

    out.append("<h2>Spend by tag</h2>")
    if not c.by_tag:
        out.append('<p class="muted">No call carries a tag.</p>')
    for key, rows in c.by_tag.items():
        out.append(f"<h3>{e(key)}</h3>")
        out.append(_share_table([key, "calls", "spend", ""], rows, total.cost_nanos, c.currency))

    out.append("<h2>Cache savings</h2>")
    out.append(
        f"<p>Cache hits cost {_money(total.savings_nanos, c.currency)} less than the same input "
        f"at the cache-miss price: without the cache, these calls would have cost "
        f"{_money(without_cache, c.currency)}"
        + (
            f": the cache cut the bill by {_percent(total.savings_nanos, without_cache)}.</p>"
            if total.savings_nanos
            else ".</p>"
        )
    )
    out.append(_savings_table(c.by_model, c.currency))

    out.append("<h2>The most expensive calls</h2>")
    out.append(_costliest_table(c.costliest, c.currency, zone))
    return "\n".join(out)


# -- the day chart (SVG) -------------------------------------------------------------------------


def _model_order(days: Sequence[ChartDay]) -> list[str]:
    totals: dict[str, int] = {}
    for day in days:
        for name, nanos in day.by_model.items():
            totals[name] = totals.get(name, 0) + nanos
    return sorted(totals, key=lambda m: (-totals[m], m))


def _nice_step(top: int) -> int:
    """A round tick step (1, 2 or 5 x 10^k nano-units) giving 4 to 8 ticks up to ``top``."""
    raw = max(top, 1) / 5
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return max(int(factor * power), 1)
    return max(int(10 * power), 1)  # pragma: no cover - the loop always returns


def _day_chart(days: Sequence[ChartDay], caps: Sequence[Cap], currency: str) -> str:
    e = html.escape
    if not days:
        return '<p class="muted">No settled calls match.</p>'
    order = _model_order(days)
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}
    slot = max(8.0, min(44.0, 760 / len(days)))
    left, right, top_pad, plot_h, bottom = 78, 150, 14, 260, 44
    width = left + slot * len(days) + right
    height = top_pad + plot_h + bottom
    highest = max([d.total for d in days] + [c.limit_nanos for c in caps] + [1])
    step = _nice_step(highest)
    ceiling = step * math.ceil(highest / step)

    def y(nanos: int) -> float:
        return top_pad + plot_h - plot_h * nanos / ceiling

    out = [
        f'<svg role="img" aria-label="Spend per day, stacked by model" '
        f'viewBox="0 0 {width:.0f} {height}" width="100%" style="max-width:{width:.0f}px" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    tick = 0
    while tick <= ceiling:
        ty = y(tick)
        out.append(
            f'<line x1="{left}" x2="{width - right + 8:.1f}" y1="{ty:.1f}" y2="{ty:.1f}" '
            'stroke="#ececf0"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">'
            f"{e(money_short(tick, currency))}</text>"
        )
        tick += step
    every = max(1, math.ceil(len(days) / 14))
    bar_w = max(slot * 0.72, 4.0)
    for i, day in enumerate(days):
        x = left + i * slot + (slot - bar_w) / 2
        base = 0
        for name in order:
            nanos = day.by_model.get(name, 0)
            if nanos <= 0:
                continue
            y_top, y_bottom = y(base + nanos), y(base)
            h = max(y_bottom - y_top, 0.8)
            out.append(
                f'<rect x="{x:.1f}" y="{y_bottom - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour[name]}"><title>{e(day.label)} {e(name)}: '
                f"{e(_money(nanos, currency))}</title></rect>"
            )
            base += nanos
        if i % every == 0:
            label = day.label[5:] if len(days) > 7 and len(day.label) == 10 else day.label
            out.append(
                f'<text x="{left + i * slot + slot / 2:.1f}" y="{top_pad + plot_h + 18}" '
                f'text-anchor="middle">{e(label)}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{left}" y1="{top_pad}" y2="{top_pad + plot_h}" stroke="#6e6e73"/>'
    )
    out.append(
        f'<line x1="{left}" x2="{width - right + 8:.1f}" y1="{top_pad + plot_h}" '
        f'y2="{top_pad + plot_h}" stroke="#6e6e73"/>'
    )
    for cap in caps:
        cy = y(cap.limit_nanos)
        out.append(
            f'<line x1="{left}" x2="{width - right + 8:.1f}" y1="{cy:.1f}" y2="{cy:.1f}" '
            f'stroke="{CAP_COLOUR}" stroke-width="2" stroke-dasharray="7 4">'
            f"<title>{e(cap.label)}: {e(_money(cap.limit_nanos, currency))}</title></line>"
        )
        out.append(
            f'<text x="{width - right + 12:.1f}" y="{cy + 4:.1f}" fill="{CAP_COLOUR}" '
            f'style="fill:{CAP_COLOUR}">{e(cap.label)} {e(money_short(cap.limit_nanos, currency))}'
            "</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


# -- tables --------------------------------------------------------------------------------------


def _caps_table(caps: Sequence[Cap], currency: str) -> str:
    e = html.escape
    rows = []
    for cap in caps:
        fraction = Decimal(cap.used_nanos) / cap.limit_nanos if cap.limit_nanos else Decimal(1)
        width = min(fraction, Decimal(1)) * 100
        over = ' class="over"' if fraction >= 1 else ""
        rows.append(
            f"<tr><td>{e(cap.label)}</td><td class=num>{e(_money(cap.limit_nanos, currency))}</td>"
            f"<td class=num>{e(_money(cap.used_nanos, currency))}</td>"
            f'<td><div class="bar"><span{over} style="width:{width:.1f}%"></span></div></td>'
            f"<td class=num>{e(_percent(cap.used_nanos, cap.limit_nanos))}</td></tr>"
        )
    return (
        "<table><tr><th>cap</th><th class=num>limit</th><th class=num>used now</th><th></th>"
        "<th class=num>%</th></tr>" + "".join(rows) + "</table>"
    )


def _share_table(
    headers: Sequence[str], rows: Sequence[ReportRow], total: int, currency: str
) -> str:
    e = html.escape
    biggest = max([r.cost_nanos for r in rows] + [1])
    body = []
    shown, rest = rows[:TAG_VALUES_SHOWN], rows[TAG_VALUES_SHOWN:]
    for row in shown:
        width = 100 * row.cost_nanos / biggest
        body.append(
            f"<tr><td>{e(row.key)}</td><td class=num>{row.calls:,}</td>"
            f"<td class=num>{e(_money(row.cost_nanos, currency))}</td>"
            f'<td><div class="bar"><span style="width:{width:.1f}%"></span></div></td>'
            f"<td class=num>{e(_percent(row.cost_nanos, total))}</td></tr>"
        )
    if rest:
        # A tag with many values (an id per job, say) would make the page endless.
        spent = sum(r.cost_nanos for r in rest)
        body.append(
            f'<tr><td class="muted">{len(rest):,} more values</td>'
            f"<td class=num>{sum(r.calls for r in rest):,}</td>"
            f"<td class=num>{e(_money(spent, currency))}</td><td></td>"
            f"<td class=num>{e(_percent(spent, total))}</td></tr>"
        )
    head = "".join(
        f"<th{' class=num' if i in (1, 2) else ''}>{e(h)}</th>" for i, h in enumerate(headers)
    )
    return f"<table><tr>{head}<th class=num>share</th></tr>{''.join(body)}</table>"


def _savings_table(rows: Sequence[ReportRow], currency: str) -> str:
    e = html.escape
    body = []
    for row in rows:
        hit_rate = _percent(row.input_hit, row.input_tokens)
        body.append(
            f"<tr><td>{e(row.key)}</td><td class=num>{row.input_hit:,}</td>"
            f"<td class=num>{row.input_miss:,}</td><td class=num>{e(hit_rate)}</td>"
            f"<td class=num>{e(_money(row.cost_nanos, currency))}</td>"
            f"<td class=num>{e(_money(row.savings_nanos, currency))}</td>"
            f"<td class=num>{e(_money(row.cost_nanos + row.savings_nanos, currency))}</td></tr>"
        )
    return (
        "<table><tr><th>model</th><th class=num>input from cache</th>"
        "<th class=num>input not cached</th><th class=num>hit rate</th>"
        "<th class=num>spent</th><th class=num>saved</th>"
        "<th class=num>without the cache</th></tr>" + "".join(body) + "</table>"
    )


def _costliest_table(rows: Sequence[Mapping[str, Any]], currency: str, zone: ZoneInfo) -> str:
    from ._tables import parse_stored

    e = html.escape
    if not rows:
        return '<p class="muted">No settled calls match.</p>'
    body = []
    for row in rows:
        when = parse_stored(row["created_at"]).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
        prompt, cached = row["prompt_tokens"] or 0, row["cached_tokens"] or 0
        usage = f"{prompt:,} in" + (f" ({cached:,} cached)" if cached else "")
        usage += f" / {row['completion_tokens'] or 0:,} out"
        cost = _money(int(row["cost_nanos"]), currency)
        if row["estimated"]:
            cost = "~" + cost + " (estimated)"
        tags = " ".join(f"{k}={v}" for k, v in row["tags"].items())
        note = row["error"] or row["note"] or ""
        body.append(
            f'<tr><td class="nowrap">{e(when)}</td><td class="nowrap">{e(row["model"])}</td>'
            f'<td>{e(row["status"])}</td><td class="num nowrap">{e(usage)}</td>'
            f'<td class="num nowrap">{e(cost)}</td><td>{e(tags)}</td>'
            f"<td>{e(note[:160])}</td></tr>"
        )
    return (
        "<table><tr><th>when</th><th>model</th><th>status</th><th class=num>tokens</th>"
        "<th class=num>cost</th><th>tags</th><th>note</th></tr>" + "".join(body) + "</table>"
    )


def _money(nanos: int, currency: str) -> str:
    """Exact: every nano-unit shown (``$0.0001512``)."""
    symbol = _SYMBOLS.get(currency, currency + " ")
    value = format((Decimal(abs(nanos)) / NANOS).normalize(), "f")
    return ("-" if nanos < 0 else "") + symbol + value


def _percent(part: int, whole: int) -> str:
    if not whole:
        return "–"
    return f"{100 * Decimal(part) / Decimal(whole):.1f}%"
