"""What the ``kimi-budget`` command reads from a ledger: reports, calls, budget status, estimates.

Every SQL statement of the command line lives here, with bound parameters only. Money is summed
as integer nano-dollars in SQL and turned into exact ``Decimal`` USD at the end, so a report's
total equals ``Ledger.spend()`` for the same filters to the nano-dollar. How the results are
printed is ``_tables``' business.

Reports read the ``usage_rollup`` table (settled calls summed per 15-minute UTC slot, model and
tags; triggers keep it exact, see ``ledger.migrations._sqlite``) whenever it answers exactly:
filters on model and tags, and ``since``/``until`` on slot boundaries (the command line's dates
are local midnights, which are). A million-row ledger is then ~50,000 rollup rows. Anything
else (``--since 08:07``) is answered from the ``calls`` rows, as ``build_report(source="rows")``.

Time buckets (day, week, month) are computed in the report's time zone with the same calendar
rules as budget windows (``window_bounds``), and each bucket is summed by SQLite over a range of
the time column's index: one statement, a correlated sub-select per bucket. That is exact in
every time zone, DST days included, and faster than ``GROUP BY substr(created_at, ...)``.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from .._budget import format_utc, window_bounds
from ..ledger._allotments import MODEL as ALLOTMENT_MODEL
from ..ledger._backend import OTHER_CURRENCIES_SQL
from ..ledger._windows import as_utc_text as _as_utc_text
from ._tables import parse_stored, per_million, usd

if TYPE_CHECKING:
    from .._budget import Budget
    from .._tokens import TokenEstimate
    from ..ledger import Ledger, WindowStatus
    from ..ledger._sqlite import SQLiteLedger
    from ..pricing import ModelPrice, PriceTable

__all__ = [
    "BUCKETS",
    "Report",
    "ReportRow",
    "build_report",
    "costliest_calls",
    "currencies",
    "list_calls",
    "parse_when",
    "tag_keys",
]

BUCKETS = {"day": "daily", "week": "weekly", "month": "monthly"}

# One aggregate row: calls, cost, cache-hit input, all input, output, cache savings, estimated.
# Cached tokens are clamped to [0, prompt] exactly as costs are (``call_cost_nanos``), and
# savings use the prices stored on each row, so a price change never rewrites history.
_CACHED = "max(min(coalesce(cached_tokens, 0), coalesce(prompt_tokens, 0)), 0)"
_AGGREGATE = (
    "count(*), "
    "coalesce(sum(cost_nanos), 0), "
    f"coalesce(sum({_CACHED}), 0), "
    "coalesce(sum(coalesce(prompt_tokens, 0)), 0), "
    "coalesce(sum(coalesce(completion_tokens, 0)), 0), "
    f"coalesce(sum({_CACHED} * (price_cache_miss - price_cache_hit)), 0), "
    "coalesce(sum(estimated), 0)"
)
# The same figures, in the same order, from the rollup (its cached tokens are clamped already).
_ROLLUP_AGGREGATE = (
    "coalesce(sum(calls), 0), "
    "coalesce(sum(cost_nanos), 0), "
    "coalesce(sum(cached_tokens), 0), "
    "coalesce(sum(prompt_tokens), 0), "
    "coalesce(sum(completion_tokens), 0), "
    "coalesce(sum(savings_nanos), 0), "
    "coalesce(sum(estimated), 0)"
)
# Reservations in flight are not spend: reports count settled rows only, as Ledger.spend does.
_SETTLED = "status != 'pending'"
_EXTRA_CHARGES = '(fee_nanos != 0 OR tags LIKE \'%"api":"batch"%\')'
_SLOT_MINUTES = ("00", "15", "30", "45")
_SLOT_STARTS = tuple(f"{minute}:00.000000Z" for minute in _SLOT_MINUTES)
# format_utc's shape: the GLOB pattern of the rollup's triggers.
_UTC_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


# -- dates ---------------------------------------------------------------------------------------


def parse_when(text: str, tz: ZoneInfo, *, option: str) -> datetime:
    """``--since``/``--until``: ISO date or date-time; without an offset it is in ``tz``.

    ``today`` and ``yesterday`` are accepted too (midnight in ``tz``).
    """
    value = text.strip()
    if value.lower() in ("today", "yesterday"):
        day = datetime.now(tz).date() - timedelta(days=value.lower() == "yesterday")
        return _midnight(day, tz)
    try:
        if len(value) == 10:
            return _midnight(date.fromisoformat(value), tz)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        raise ValueError(
            f"{option}: {text!r} is not a date; use ISO 8601 such as 2026-11-01 or "
            f"2026-11-01T08:00 (or today, yesterday)."
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    # window_bounds knows about zones whose DST starts at midnight; ask it for the day's start.
    noon = datetime.combine(day, time(12), tzinfo=tz)
    return window_bounds("daily", noon, tz)[0]


# -- the report ----------------------------------------------------------------------------------


@dataclass
class ReportRow:
    """Spend and tokens of one group of settled calls (nano-dollars and tokens, exact)."""

    key: str
    calls: int = 0
    cost_nanos: int = 0
    input_hit: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    savings_nanos: int = 0
    estimated: int = 0

    @classmethod
    def from_sql(cls, key: str, values: Sequence[Any]) -> ReportRow:
        calls, cost, hit, prompt, output, savings, estimated = (int(v or 0) for v in values)
        return cls(key, calls, cost, hit, prompt, output, savings, estimated)

    @property
    def input_miss(self) -> int:
        return self.input_tokens - self.input_hit

    def add(self, other: ReportRow) -> None:
        self.calls += other.calls
        self.cost_nanos += other.cost_nanos
        self.input_hit += other.input_hit
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.savings_nanos += other.savings_nanos
        self.estimated += other.estimated

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "calls": self.calls,
            "input_cache_hit_tokens": self.input_hit,
            "input_cache_miss_tokens": self.input_miss,
            "output_tokens": self.output_tokens,
            "spend_usd": usd(self.cost_nanos),
            "cache_savings_usd": usd(self.savings_nanos),
            "estimated_calls": self.estimated,
        }


@dataclass
class Report:
    by: str
    tz: str
    since: datetime | None
    until: datetime | None
    model: str | None
    tags: dict[str, str]
    rows: list[ReportRow]
    total: ReportRow
    pending_calls: int = 0
    pending_nanos: int = 0  # reserved by calls in flight and allotments
    pending_allotments: int = 0  # room running processes reserved for their next calls
    ledger: str = ""
    source: str = "rows"  # what was read: "rollup" or "rows" (not part of the JSON)
    currency: str = "USD"  # the amounts' currency (the *_usd keys of the JSON hold it too)
    fee_nanos: int = 0  # non-token fees ($web_search), already inside the totals
    batch_calls: int = 0  # Batch API rows (one per batch), already inside the totals
    batch_nanos: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger,
            "currency": self.currency,
            "by": self.by,
            "tz": self.tz,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "model": self.model,
            "tags": self.tags,
            "total_usd": usd(self.total.cost_nanos),
            "total_cache_savings_usd": usd(self.total.savings_nanos),
            "total_calls": self.total.calls,
            "total": self.total.to_json(),
            "rows": [row.to_json() for row in self.rows],
            "pending_calls": self.pending_calls,
            "pending_allotments": self.pending_allotments,
            "pending_reserved_usd": usd(self.pending_nanos),
            "fees_usd": usd(self.fee_nanos),
            "batches": self.batch_calls,
            "batch_usd": usd(self.batch_nanos),
        }


@dataclass(frozen=True)
class _Source:
    """Where a report's figures come from: the table, its time column, and the filters."""

    name: str  # "rollup" or "rows"
    table: str
    time: str
    aggregate: str
    where: str  # " AND ..." selecting the settled calls that match the filters
    params: list[Any]


def _is_sqlite(ledger: Ledger) -> bool:
    from ..ledger._sqlite import SQLiteLedger

    return isinstance(ledger, SQLiteLedger)


def _sql_ledger(ledger: Ledger) -> SQLiteLedger:
    """Reports query the SQLite schema directly."""
    from ..ledger._sqlite import SQLiteLedger

    if not isinstance(ledger, SQLiteLedger):
        from .._exceptions import LedgerError

        raise LedgerError(f"Reports cannot read {ledger.location} yet: only SQLite ledgers.")
    ledger.flush()  # this process's own calls count
    return ledger


def _rows_source(
    ledger: SQLiteLedger,
    since: datetime | None,
    until: datetime | None,
    model: str | None,
    tags: Mapping[str, str] | None,
    currency: str | None = None,
) -> _Source:
    where, params = ledger.filters(since=since, until=until, model=model, tags=tags)
    if currency is not None:
        where += " AND currency = ?"
        params.append(currency)
    return _Source("rows", "calls", "created_at", _AGGREGATE, f" AND {_SETTLED}{where}", params)


def _rollup_source(
    ledger: SQLiteLedger,
    since: datetime | None,
    until: datetime | None,
    model: str | None,
    tags: Mapping[str, str] | None,
) -> _Source | None:
    """The rollup with the same filters, or None if it cannot answer them exactly."""
    where, params = ledger.filters(tags=tags)
    for value, op in ((since, ">="), (until, "<")):
        if value is None:
            continue
        text = _as_utc_text(value)
        if not is_slot(text):
            return None
        where += f" AND bucket {op} ?"
        params.append(text)
    if model is not None:
        where += " AND model = ?"
        params.append(model)
    return _Source("rollup", "usage_rollup", "bucket", _ROLLUP_AGGREGATE, where, params)


def is_slot(text: str) -> bool:
    """Whether ``format_utc`` text is the start of a 15-minute slot of the rollup."""
    return _UTC_TEXT.fullmatch(text) is not None and text[14:] in _SLOT_STARTS


def slot_of(text: str) -> str:
    """The rollup slot of a ``format_utc`` text (its 15-minute floor); other text as it is.

    The same rule as the rollup's triggers (``ledger.migrations._sqlite._slot``).
    """
    if _UTC_TEXT.fullmatch(text) is None:
        return text
    minute = max(m for m in _SLOT_MINUTES if m <= text[14:16])
    return f"{text[:14]}{minute}:00.000000Z"


def build_report(
    ledger: Ledger,
    *,
    by: str = "model",
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
    tz: str = "UTC",
    source: str = "auto",
    currency: str | None = None,
) -> Report:
    """Settled spend grouped ``by`` day/week/month (in ``tz``), model, ``tag:KEY`` or ``total``.

    ``source``: ``"auto"`` reads the rollup when it answers exactly and the rows otherwise;
    ``"rows"`` always reads the rows; ``"rollup"`` raises ``ValueError`` if it cannot answer.
    ``currency`` keeps the calls billed in it (the rows' ``currency``; the rollup has none).
    """
    if source not in ("auto", "rollup", "rows"):
        raise ValueError(f"source must be auto, rollup or rows, not {source!r}.")
    if not _is_sqlite(ledger):  # a server ledger answers in its own SQL
        report: Report = ledger.report(  # type: ignore[attr-defined,unused-ignore]
            by=by, since=since, until=until, model=model, tags=tags, tz=tz, currency=currency
        )
        return report
    ledger = _sql_ledger(ledger)
    conn = ledger.conn
    zone = ZoneInfo(tz)
    rows_source = _rows_source(ledger, since, until, model, tags, currency)
    src: _Source | None = rows_source
    if source != "rows" and currency is None:
        src = _rollup_source(ledger, since, until, model, tags)
    if src is None:
        if source == "rollup":
            raise ValueError("the rollup cannot answer: since/until are not on 15-minute slots.")
        src = rows_source
    if by in BUCKETS:
        found = _by_time(conn, src, BUCKETS[by], by, zone)
        if found is None:
            # A calendar boundary off the 15-minute grid (a zone's old local mean time).
            if source == "rollup":
                raise ValueError(f"the rollup cannot answer: a {by} in {tz} is not on slots.")
            src = rows_source
            found = _by_time(conn, src, BUCKETS[by], by, zone)
        assert found is not None
        rows = found
    elif by == "model":
        rows = [
            ReportRow.from_sql(r[0], r[1:])
            for r in conn.execute(
                f"SELECT model, {src.aggregate} FROM {src.table} WHERE 1 = 1{src.where} "
                "GROUP BY model",
                src.params,
            )
        ]
    elif by.startswith("tag:") and len(by) > 4:
        path = '$."' + by[4:].replace('"', '""') + '"'
        rows = [
            ReportRow.from_sql("(none)" if r[0] is None else str(r[0]), r[1:])
            for r in conn.execute(
                f"SELECT json_extract(tags, ?) AS tag, {src.aggregate} FROM {src.table} "
                f"WHERE 1 = 1{src.where} GROUP BY tag",
                [path, *src.params],
            )
        ]
    elif by == "total":
        values = conn.execute(
            f"SELECT {src.aggregate} FROM {src.table} WHERE 1 = 1{src.where}", src.params
        ).fetchone()
        rows = [ReportRow.from_sql("total", values)]
    else:
        raise ValueError(f"--by must be day, week, month, model, tag:KEY or total, not {by!r}.")
    rows = [row for row in rows if row.calls]
    if by not in BUCKETS:
        rows.sort(key=lambda row: (-row.cost_nanos, row.key))
    total = ReportRow("total")
    for row in rows:
        total.add(row)
    where, params = ledger.filters(
        since=since, until=until, model=model, tags=tags, use_indexes=False
    )
    if currency is not None:
        where += " AND currency = ?"
        params.append(currency)
    pending_rows, pending_nanos, pending_allotments = conn.execute(
        f"SELECT count(*), coalesce(sum(projected_nanos), 0), "
        f"coalesce(sum(CASE WHEN model = '{ALLOTMENT_MODEL}' THEN 1 ELSE 0 END), 0) "
        f"FROM {ledger.pending_table} WHERE 1 = 1{where}",
        params,
    ).fetchone()
    pending_calls = int(pending_rows) - int(pending_allotments)
    # Fees and Batch API spend, from the few rows that have them (the rollup has neither);
    # the condition is the partial index calls_extra_charges' own (migration m005).
    extra = (
        "SELECT coalesce(sum(fee_nanos), 0), "
        "coalesce(sum(json_extract(tags, '$.api') = 'batch'), 0), "
        "coalesce(sum(CASE WHEN json_extract(tags, '$.api') = 'batch' THEN cost_nanos END), 0) "
        "FROM calls {index}"
        f"WHERE {_EXTRA_CHARGES} AND {_SETTLED}{where}"
    )
    try:
        charges = conn.execute(extra.format(index="INDEXED BY calls_extra_charges "), params)
    except sqlite3.OperationalError:  # a read-only ledger from before migration m005
        charges = conn.execute(extra.format(index=""), params)
    fee_nanos, batch_calls, batch_nanos = charges.fetchone()
    return Report(
        fee_nanos=int(fee_nanos),
        batch_calls=int(batch_calls),
        batch_nanos=int(batch_nanos),
        by=by,
        tz=tz,
        since=since,
        until=until,
        model=model,
        tags=dict(tags or {}),
        rows=rows,
        total=total,
        pending_calls=pending_calls,
        pending_nanos=int(pending_nanos),
        pending_allotments=int(pending_allotments),
        ledger=str(ledger.path),
        source=src.name,
    )


def _by_time(
    conn: Any, src: _Source, window: str, by: str, zone: ZoneInfo
) -> list[ReportRow] | None:
    """Rows per calendar window; None if the rollup cannot answer (a window off the slots)."""
    first = conn.execute(
        f"SELECT {src.time} FROM {src.table} WHERE 1 = 1{src.where} ORDER BY {src.time} LIMIT 1",
        src.params,
    ).fetchone()
    if first is None:
        return []
    last = conn.execute(
        f"SELECT {src.time} FROM {src.table} WHERE 1 = 1{src.where} "
        f"ORDER BY {src.time} DESC LIMIT 1",
        src.params,
    ).fetchone()
    buckets = _buckets(window, by, parse_stored(first[0]), parse_stored(last[0]), zone)
    if src.name == "rollup" and not all(is_slot(b[1]) and is_slot(b[2]) for b in buckets):
        return None
    # The sub-select's `?` come first in the text, the bucket list (json_each) last.
    sql = (
        "SELECT json_extract(b.value, '$[0]'), "
        f"(SELECT json_array({src.aggregate}) FROM {src.table} "
        f"WHERE {src.time} >= json_extract(b.value, '$[1]') "
        f"AND {src.time} < json_extract(b.value, '$[2]'){src.where}) "
        "FROM json_each(?) AS b ORDER BY b.key"
    )
    rows = []
    for key, values in conn.execute(sql, [*src.params, json.dumps(buckets)]):
        rows.append(ReportRow.from_sql(key, json.loads(values)))
    return rows


def _buckets(
    window: str, by: str, first: datetime, last: datetime, zone: ZoneInfo
) -> list[tuple[str, str, str]]:
    """``(label, start, end)`` of every calendar window from ``first`` to ``last``."""
    start, end = window_bounds(window, first, zone)
    buckets = []
    while start <= last:
        local = start.astimezone(zone)
        label = local.strftime("%Y-%m") if by == "month" else local.date().isoformat()
        buckets.append((label, format_utc(start), format_utc(end)))
        start, end = window_bounds(window, end, zone)
    return buckets


# -- calls ---------------------------------------------------------------------------------------

_CALL_COLUMNS = (
    "id, call_id, created_at, finished_at, model, tags, status, stream, prompt_tokens, "
    "cached_tokens, completion_tokens, cost_nanos, projected_nanos, estimated, attempts, "
    "request_id, latency_ms, error, note, expires_at"
)


def list_calls(
    ledger: Ledger,
    *,
    limit: int = 20,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The latest calls (pending ones too), newest first, money as exact USD strings."""
    if not _is_sqlite(ledger):  # a server ledger finds its rows itself
        found_rows = ledger.recent_calls(  # type: ignore[attr-defined,unused-ignore]
            limit=limit, since=since, until=until, model=model, tags=tags
        )
        return [_call_json(row) for row in found_rows]
    ledger = _sql_ledger(ledger)
    conn = ledger.conn
    where, params = ledger.filters(since=since, until=until, model=model, tags=tags)
    order = "ORDER BY created_at DESC, id DESC LIMIT ?"
    found = []
    if model is None:
        # Walking the created_at index backwards finds the newest rows of any common filter.
        found += conn.execute(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE {_SETTLED}{where} {order}",
            [*params, limit],
        ).fetchall()
    else:
        # No index leads with model (it would slow every call's insert): the rollup tells
        # from which slot on the newest `limit` settled calls of the model lie.
        floor = _newest_slot(conn, limit, until, model, tags, ledger)
        if floor is not None:
            found += conn.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE {_SETTLED} AND created_at >= ?"
                f"{where} {order}",
                [floor, *params, limit],
            ).fetchall()
    # The few reservations in flight are read apart, from their own small table.
    pending_where, pending_params = ledger.filters(
        since=since, until=until, model=model, tags=tags, use_indexes=False
    )
    cursor = conn.execute(
        f"SELECT {_CALL_COLUMNS} FROM {ledger.pending_table} WHERE 1 = 1{pending_where}",
        pending_params,
    )
    names = [d[0] for d in cursor.description]
    found += cursor.fetchall()
    created, ident = names.index("created_at"), names.index("id")
    found.sort(key=lambda r: (r[created], r[ident]), reverse=True)
    del found[limit:]
    return [_call_json(dict(zip(names, values, strict=True))) for values in found]


def _call_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ``calls`` row as ``list_calls`` shows it."""
    shown = {name: row[name] for name in _CALL_COLUMNS.split(", ")}
    shown["tags"] = json.loads(shown["tags"] or "{}")
    shown["stream"] = bool(shown["stream"])
    shown["estimated"] = bool(shown["estimated"])
    shown["cost_usd"] = usd(shown.pop("cost_nanos"))
    shown["projected_usd"] = usd(shown.pop("projected_nanos"))
    return shown


def _newest_slot(
    conn: Any,
    limit: int,
    until: datetime | None,
    model: str,
    tags: Mapping[str, str] | None,
    ledger: SQLiteLedger,
) -> str | None:
    """A ``created_at`` from which on the ``limit`` newest settled calls matching lie.

    Counts from the rollup, newest slot first, until ``limit`` calls; if fewer match, the oldest
    slot that has one. None when no settled call matches. ``until`` is rounded down to its slot,
    so only calls before it are counted (the floor may come out earlier, never too late), and
    the calls of that last part-slot are newer than any floor, or the floor itself.
    """
    where, params = ledger.filters(tags=tags)
    where += " AND model = ?"
    params.append(model)
    floor = None
    if until is not None:
        floor = slot_of(_as_utc_text(until))
        where += " AND bucket < ?"
        params.append(floor)
    seen = 0
    for bucket, calls in conn.execute(
        f"SELECT bucket, sum(calls) FROM usage_rollup WHERE 1 = 1{where} "
        "GROUP BY bucket ORDER BY bucket DESC",
        params,
    ):
        if calls > 0:
            floor = bucket
            seen += calls
            if seen >= limit:
                break
    return floor


def costliest_calls(
    ledger: Ledger,
    *,
    limit: int = 10,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
    currency: str | None = None,
) -> list[dict[str, Any]]:
    """The ``limit`` settled calls that cost the most, most expensive first (as ``list_calls``)."""
    found: list[dict[str, Any]]
    if not _is_sqlite(ledger):  # a server ledger finds its rows itself
        found = ledger.costliest_calls(  # type: ignore[attr-defined]
            limit=limit, since=since, until=until, model=model, tags=tags, currency=currency
        )
    else:
        sql = _sql_ledger(ledger)
        where, params = sql.filters(since=since, until=until, model=model, tags=tags)
        if currency is not None:
            where += " AND currency = ?"
            params.append(currency)
        cursor = sql.conn.execute(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE {_SETTLED}{where} "
            "ORDER BY cost_nanos DESC, created_at DESC LIMIT ?",
            [*params, limit],
        )
        names = [d[0] for d in cursor.description]
        found = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    result = []
    for row in found:
        row = {name: row[name] for name in _CALL_COLUMNS.split(", ")}
        row["tags"] = json.loads(row["tags"] or "{}")
        row["stream"] = bool(row["stream"])
        row["estimated"] = bool(row["estimated"])
        row["cost_nanos"] = int(row["cost_nanos"])
        result.append(row)
    return result


def currencies(ledger: Ledger) -> list[str]:
    """The currencies settled calls were billed in (``["USD"]`` for a ledger without the column).

    USD first, then the others alphabetically; never an amount summed across two of them.
    """
    if not _is_sqlite(ledger):
        codes: list[str] = ledger.currencies()  # type: ignore[attr-defined]
        return codes
    conn = _sql_ledger(ledger).conn
    columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    if "currency" not in columns:
        return ["USD"]
    others = [r[0] for r in conn.execute(OTHER_CURRENCIES_SQL)]
    if not others:
        return ["USD"]  # no scan at all: the usual ledger
    # Every row is either USD or in the partial index: two counts, neither reads the table.
    (has_usd,) = conn.execute(
        "SELECT (SELECT count(*) FROM calls) > (SELECT count(*) FROM calls WHERE currency <> 'USD')"
    ).fetchone()
    return (["USD"] if has_usd else []) + sorted(others)


def tag_keys(ledger: Ledger) -> list[str]:
    """Every tag key that settled calls carry (from the rollup: one row per tag set)."""
    if not _is_sqlite(ledger):
        found: list[str] = ledger.tag_keys()  # type: ignore[attr-defined]
        return found
    keys: set[str] = set()
    for (text,) in _sql_ledger(ledger).conn.execute("SELECT DISTINCT tags FROM usage_rollup"):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            keys.update(json.loads(text or "{}").keys())
    return sorted(keys)


def ledger_file_problem(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is not a kimi-budget ledger (None if it is one).

    Read through a read-only connection: looking never changes the file.
    """
    import sqlite3

    if path.is_dir():
        return "is a folder, not a ledger file"
    try:
        if path.stat().st_size == 0:
            return "is an empty file, not a kimi-budget ledger (nothing was ever recorded in it)"
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except (OSError, sqlite3.Error) as exc:
        return f"cannot be read ({exc})"
    try:
        found = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'calls'"
        ).fetchone()[0]
    except sqlite3.DatabaseError:
        return "is not a SQLite database, so not a kimi-budget ledger"
    finally:
        conn.close()
    if not found:
        return "is a SQLite database without a calls table: not a kimi-budget ledger"
    return None


# -- status --------------------------------------------------------------------------------------


@dataclass
class BudgetStatus:
    budget: Budget
    windows: list[WindowStatus] = field(default_factory=list)


def budget_status(ledger: Ledger, budgets: Iterable[Budget]) -> list[BudgetStatus]:
    return [BudgetStatus(budget, ledger.status(budget)) for budget in budgets]


# -- estimates -----------------------------------------------------------------------------------


@dataclass
class Estimate:
    """What ``prepare`` would conclude about a request, without refusing it."""

    price: ModelPrice
    estimate: TokenEstimate
    max_output: int
    explicit_max: bool
    choices: int
    fits: bool
    projected_nanos: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.price.model,
            "prompt_tokens": self.estimate.tokens,
            "exact": self.estimate.exact,
            "method": self.estimate.method,
            "max_output_tokens": self.max_output,
            "max_tokens_explicit": self.explicit_max,
            "choices": self.choices,
            "context_window": self.price.context_window,
            "fits": self.fits,
            "projected_usd": usd(self.projected_nanos),
            "prices_per_million_usd": {
                "cache_hit": per_million(self.price.cache_hit),
                "cache_miss": per_million(self.price.cache_miss),
                "output": per_million(self.price.output),
            },
        }


def estimate_request(body: dict[str, Any], prices: PriceTable) -> Estimate:
    """Run the client's own pre-flight (``_guard.prepare``) on ``body`` and report, not refuse."""
    from .._exceptions import ContextLengthExceededError
    from .._guard import GuardSettings, _positive_int, prepare
    from .._tokens import count_request_tokens

    # prepare() needs no ledger: it prices, counts and bounds the request, nothing else.
    settings = GuardSettings(
        ledger=None,  # type: ignore[arg-type]
        budgets=(),
        tags={},
        prices=prices,
        exact_tokens="never",
    )
    explicit = body.get("max_completion_tokens", body.get("max_tokens")) is not None
    try:
        prepared = prepare(settings, body, None)
    except ContextLengthExceededError as exc:
        price = prices.get(exc.model)
        estimate = count_request_tokens(body, price.tokenizer)
        choices = _positive_int(body.get("n")) or 1
        projected = estimate.tokens * price.cache_miss + exc.max_tokens * choices * price.output
        return Estimate(price, estimate, exc.max_tokens, True, choices, False, projected)
    fits = prepared.estimate.tokens + prepared.max_output <= prepared.price.context_window
    if not explicit:
        # Without max_tokens the server still needs room for at least one output token.
        fits = prepared.estimate.tokens < prepared.price.context_window
    return Estimate(
        prepared.price,
        prepared.estimate,
        prepared.max_output,
        explicit,
        prepared.choices,
        fits,
        prepared.projected_nanos,
    )
