"""How the ``kimi-budget`` command prints what it read: money, tokens, tables, CSV, JSON rows.

Pure functions of their arguments: no ledger, no SQL (that is ``_report``). Money arrives as
integer nano-dollars or exact ``Decimal`` and leaves as plain text without exponent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from .._money import to_usd

if TYPE_CHECKING:
    from ..ledger import WindowStatus
    from ._report import Report

UTC = timezone.utc


# -- money and numbers ---------------------------------------------------------------------------


def usd(nanos: int) -> str:
    """Exact USD text without exponent: ``136200`` -> ``'0.0001362'``, 10 USD -> ``'10'``."""
    return format(to_usd(nanos), "f")


def dollars(nanos: int) -> str:
    return ("-$" if nanos < 0 else "$") + usd(abs(nanos))


def money(nanos: int, currency: str = "USD") -> str:
    """Exact amount with its sign: ``$0.0001362``, ``¥6.5``; other currencies by their code."""
    symbol = {"USD": "$", "CNY": "¥"}.get(currency, currency + " ")
    return ("-" if nanos < 0 else "") + symbol + usd(abs(nanos))


def dollars_usd(amount: Decimal) -> str:
    """A Decimal USD amount as ``$`` text without exponent (``Decimal('1E+1')`` -> ``$10``)."""
    return ("-$" if amount < 0 else "$") + format(abs(amount), "f")


def per_million(nanos_per_token: int) -> str:
    """A per-token price as the pricing document writes it: USD per million, 2+ decimals."""
    value = Decimal(nanos_per_token) / 1000
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def tokens(n: int) -> str:
    return f"{n:,}"


def parse_stored(text: str) -> datetime:
    """A stored UTC timestamp (``format_utc`` text, or any ISO form written by hand)."""
    from .._budget import parse_utc

    try:
        return parse_utc(text)
    except ValueError:  # a row written by hand in another ISO form still has a place
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_calls(
    rows: Sequence[Mapping[str, Any]], zone: ZoneInfo, secrets: Sequence[str] = ()
) -> list[str]:
    """The calls one per line, like ``llm logs``, in columns: the costs line up on the right.

    An error or a note comes last, with any of ``secrets`` taken out.
    """
    from .._redact import redact

    cells = []
    for row in rows:
        when = parse_stored(row["created_at"]).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
        usage, cost, extra = "", "", []
        if row["status"] == "pending":
            usage, cost = "in flight", f"${row['projected_usd']}"
            extra.append("reserved")
        else:
            prompt, cached = row["prompt_tokens"], row["cached_tokens"]
            if prompt is not None:
                hit = f" ({tokens(cached)} cached)" if cached else ""
                usage = f"{tokens(prompt)} in{hit} / {tokens(row['completion_tokens'] or 0)} out"
            cost = f"${row['cost_usd']}"
            if row["estimated"]:
                cost = "~" + cost
                extra.append("(estimated)")
        if row["stream"]:
            extra.append("stream")
        if (row["attempts"] or 0) > 1:
            extra.append(f"{row['attempts']} attempts")
        if row["tags"]:
            extra.append(" ".join(f"{k}={v}" for k, v in row["tags"].items()))
        problem = row["error"] or row["note"]
        if problem:
            extra.append(f"- {_one_line(redact(str(problem), tuple(secrets)), 100)}")
        cells.append([when, row["status"], row["model"], usage, cost, "  ".join(extra)])
    return table(["", "", "", "", "", ""], cells, right=(4,)).split("\n")[1:]


def used_fraction(window: WindowStatus) -> Decimal:
    used = window.spent_usd + window.reserved_usd
    if window.limit_usd <= 0:
        return Decimal(1) if used > 0 or window.limit_usd == 0 else Decimal(0)
    return used / window.limit_usd


def percent(fraction: Decimal) -> str:
    return str((fraction * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)) + "%"


def bar(fraction: Decimal, width: int = 20) -> str:
    filled = min(int(fraction * width), width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def local_time(instant: datetime | None, tz: str) -> str | None:
    if instant is None:
        return None
    return instant.astimezone(ZoneInfo(tz)).isoformat(timespec="seconds")


def until_text(instant: datetime, now: datetime) -> str:
    seconds = max(int((instant - now).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"in {days}d {hours}h"
    if hours:
        return f"in {hours}h {minutes}m"
    return f"in {minutes}m"


def window_json(window: WindowStatus) -> dict[str, Any]:
    return {
        "window": window.window,
        "limit_usd": format(window.limit_usd, "f"),
        "spent_usd": format(window.spent_usd, "f"),
        "reserved_usd": format(window.reserved_usd, "f"),
        "remaining_usd": format(window.remaining_usd, "f"),
        "used_percent": percent(used_fraction(window))[:-1],
        "window_start": local_time(window.start, window.tz),
        "resets_at": local_time(window.resets_at, window.tz),
    }


def pending_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "call_id": row["call_id"],
        "model": row["model"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "reserved_usd": usd(int(row["projected_nanos"])),
        "attempts": row["attempts"],
        "tags": json.loads(row["tags"] or "{}"),
    }


# -- tables and CSV ------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns listed in ``right`` are right-aligned (numbers)."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(row) for row in text_rows)])


def to_csv(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


REPORT_CSV_HEADERS = (
    "key",
    "calls",
    "input_cache_hit_tokens",
    "input_cache_miss_tokens",
    "output_tokens",
    "spend_usd",
    "cache_savings_usd",
    "estimated_calls",
)


def report_csv_rows(report: Report) -> list[list[Any]]:
    return [
        [
            row.key,
            row.calls,
            row.input_hit,
            row.input_miss,
            row.output_tokens,
            usd(row.cost_nanos),
            usd(row.savings_nanos),
            row.estimated,
        ]
        for row in report.rows
    ]


def report_table(report: Report) -> str:
    """The human form of a report: a table, its total, and what it does not count."""
    key_header = {"day": "day", "week": "week of", "month": "month", "total": ""}.get(
        report.by, report.by
    )
    if not report.rows:
        return "No settled calls match." + _pending_note(report)
    body = [
        [
            row.key,
            tokens(row.calls),
            tokens(row.input_hit),
            tokens(row.input_miss),
            tokens(row.output_tokens),
            money(row.cost_nanos, report.currency),
            money(row.savings_nanos, report.currency),
        ]
        for row in report.rows
    ]
    t = report.total
    if report.by != "total":
        body.append(
            [
                "TOTAL",
                tokens(t.calls),
                tokens(t.input_hit),
                tokens(t.input_miss),
                tokens(t.output_tokens),
                money(t.cost_nanos, report.currency),
                money(t.savings_nanos, report.currency),
            ]
        )
    headers = [key_header, "calls", "input hit", "input miss", "output", "spend", "cache saved"]
    text = table(headers, body, right=(1, 2, 3, 4, 5, 6))
    notes = []
    if t.estimated:
        notes.append(
            f"{t.estimated} call{'s' if t.estimated != 1 else ''} with an estimated cost "
            f"(no usage arrived; see `kimi-budget calls`)."
        )
    if report.fee_nanos:
        notes.append(
            f"Of the spend, {money(report.fee_nanos, report.currency)} is $web_search fees "
            f"(per call, on top of tokens)."
        )
    if report.batch_calls:
        n = report.batch_calls
        notes.append(
            f"Of the spend, {money(report.batch_nanos, report.currency)} is {n} Batch API "
            f"batch{'es' if n != 1 else ''} (tag api=batch; `kimi-budget calls` shows each)."
        )
    pending = _pending_note(report).strip()
    if pending:
        notes.append(pending)
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _pending_note(report: Report) -> str:
    held = []
    if n := report.pending_calls:
        held.append(f"{n} call{'s' if n != 1 else ''} in flight")
    if n := report.pending_allotments:
        by = "a running process" if n == 1 else "running processes"
        held.append(f"{n} allotment{'s' if n != 1 else ''} held by {by}")
    if not held:
        return ""
    return (
        f"\n{' and '.join(held)}, {dollars(report.pending_nanos)} reserved, "
        f"not counted (see `kimi-budget status`)."
    )


def describe_filters(report: Report) -> str:
    return describe(report.since, report.until, report.model, report.tags, report.tz)


def describe(
    since: datetime | None,
    until: datetime | None,
    model: str | None,
    tags: Mapping[str, str],
    tz: str,
) -> str:
    """The filters of a report in words: ``2026-11-01T00:00+08:00 .. now, model kimi-k2.6``."""
    parts = []
    if since or until:
        zone = ZoneInfo(tz)
        start = since.astimezone(zone).isoformat(timespec="minutes") if since else ""
        end = until.astimezone(zone).isoformat(timespec="minutes") if until else ""
        parts.append(f"{start or 'start'} .. {end or 'now'}")
    if model:
        parts.append(f"model {model}")
    if tags:
        parts.append(" ".join(f"{k}={v}" for k, v in tags.items()))
    return ", ".join(parts)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
