"""The SQLite ledger's schema, as numbered migrations applied when a ledger is opened.

Applied migrations are recorded by name in ``_kimi_budget_migrations`` (as ``llm`` does), so
a newer kimi-budget upgrades an older ledger in place and never re-runs a step.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["APPLICATION_ID", "MIGRATIONS", "apply_migrations"]

# "KIMB": stored in the SQLite header (offset 68) so that a kimi-budget ledger can be told from
# any other SQLite file before it is opened.
APPLICATION_ID = 0x4B494D42

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_calls(conn: sqlite3.Connection) -> None:
    _execute_script(
        conn,
        """
        CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,          -- UTC ISO 8601, when the budget was reserved
            finished_at TEXT,
            model TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '{}',   -- JSON object of strings
            status TEXT NOT NULL,  -- pending ok error abandoned interrupted cancelled expired
            stream INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            completion_tokens INTEGER,
            cost_nanos INTEGER NOT NULL DEFAULT 0,       -- 1e-9 USD
            projected_nanos INTEGER NOT NULL DEFAULT 0,  -- worst case reserved before sending
            prompt_estimate INTEGER NOT NULL DEFAULT 0,  -- local token count before sending
            price_cache_hit INTEGER NOT NULL,            -- 1e-9 USD per token, as charged
            price_cache_miss INTEGER NOT NULL,
            price_output INTEGER NOT NULL,
            estimated INTEGER NOT NULL DEFAULT 0,        -- 1: cost is an estimate, not billed usage
            attempts INTEGER NOT NULL DEFAULT 0,         -- HTTP attempts (retries included)
            request_id TEXT,
            latency_ms INTEGER,
            error TEXT,
            note TEXT,
            expires_at TEXT
        );
        CREATE INDEX calls_created_at ON calls (created_at);
        CREATE INDEX calls_model_created_at ON calls (model, created_at);
        CREATE INDEX calls_pending_expiry ON calls (expires_at) WHERE status = 'pending';

        -- Every (scope, time zone) a budget has used. Writes keep its window totals current,
        -- so a budget check reads one row per window, however large the ledger grows.
        CREATE TABLE budget_scopes (
            id INTEGER PRIMARY KEY,
            scope TEXT NOT NULL,
            tz TEXT NOT NULL,
            windows TEXT NOT NULL,
            UNIQUE (scope, tz)
        );
        CREATE TABLE window_totals (
            scope_id INTEGER NOT NULL REFERENCES budget_scopes (id),
            window TEXT NOT NULL,
            start TEXT NOT NULL,
            spent_nanos INTEGER NOT NULL DEFAULT 0,
            reserved_nanos INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (scope_id, window, start)
        ) WITHOUT ROWID;

        CREATE VIEW calls_usd AS
        SELECT
            id, created_at, finished_at, model, tags, status, stream,
            prompt_tokens, cached_tokens, completion_tokens,
            cost_nanos / 1e9 AS cost_usd,
            projected_nanos / 1e9 AS projected_usd,
            estimated, attempts, request_id, latency_ms, error, note
        FROM calls;
        """,
    )


# The 15-minute slot of a ``created_at`` text (``format_utc``'s fixed width), as text of the
# same form: "2026-11-28T06:44:59.123456Z" -> "2026-11-28T06:30:00.000000Z". Every UTC offset in
# use is a multiple of 15 minutes, so every local hour, day, week and month starts on a slot.
# For any slot boundary S, ``slot(t) >= S`` exactly when ``t >= S``, so a range of slots selects
# the same calls as the same range of ``created_at``. A ``created_at`` of any other shape (a row
# written by hand) is kept as it is, which keeps that equivalence for it too.
_CANONICAL = (
    "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]."
    "[0-9][0-9][0-9][0-9][0-9][0-9]Z'"
)


def _slot(created_at: str) -> str:
    minute = f"substr({created_at}, 15, 2)"
    return (
        f"CASE WHEN {created_at} GLOB {_CANONICAL} THEN substr({created_at}, 1, 14) || "
        f"CASE WHEN {minute} < '15' THEN '00' WHEN {minute} < '30' THEN '15' "
        f"WHEN {minute} < '45' THEN '30' ELSE '45' END || ':00.000000Z' "
        f"ELSE {created_at} END"
    )


def _cached(row: str) -> str:
    # Clamped to [0, prompt] as call_cost_nanos clamps it, so savings never exceed the input.
    return f"max(min(coalesce({row}cached_tokens, 0), coalesce({row}prompt_tokens, 0)), 0)"


_ROLLUP_COLUMNS = (
    "calls",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost_nanos",
    "savings_nanos",
    "estimated",
)
_ROLLUP_UPSERT = (
    "INSERT INTO usage_rollup (bucket, model, tags, "
    + ", ".join(_ROLLUP_COLUMNS)
    + ") VALUES ({values}) ON CONFLICT (bucket, model, tags) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _ROLLUP_COLUMNS)
)
# Columns whose change moves a settled call in the rollup; an UPDATE of any other column (the
# expiry of a reservation, a note) does not fire the triggers.
_ROLLUP_SOURCES = (
    "status, created_at, model, tags, prompt_tokens, cached_tokens, completion_tokens, "
    "cost_nanos, estimated, price_cache_hit, price_cache_miss"
)


def _rollup_values(row: str, sign: str) -> str:
    """The upsert's VALUES for one call (``row`` is ``new`` or ``old``; ``sign`` "" or "-")."""
    r = row + "."
    return ", ".join(
        [
            _slot(f"{r}created_at"),
            f"{r}model",
            f"{r}tags",
            f"{sign}1",
            f"{sign}coalesce({r}prompt_tokens, 0)",
            f"{sign}{_cached(r)}",
            f"{sign}coalesce({r}completion_tokens, 0)",
            f"{sign}{r}cost_nanos",
            f"{sign}{_cached(r)} * ({r}price_cache_miss - {r}price_cache_hit)",
            f"{sign}{r}estimated",
        ]
    )


def _rollup_trigger(name: str, event: str, row: str) -> str:
    adding = row == "new"
    body = _ROLLUP_UPSERT.format(values=_rollup_values(row, "" if adding else "-")) + ";"
    if not adding:
        # A key whose last call left (an estimate replaced, a row deleted) leaves no zero row.
        body += (
            f" DELETE FROM usage_rollup WHERE bucket = {_slot(row + '.created_at')} "
            f"AND model = {row}.model AND tags = {row}.tags AND calls = 0;"
        )
    return (
        f"CREATE TRIGGER {name} AFTER {event} ON calls WHEN {row}.status != 'pending' "
        f"BEGIN {body} END"
    )


@migration
def m002_usage_rollup(conn: sqlite3.Connection) -> None:
    """Settled calls summed per 15-minute slot, model and tags, for reports on big ledgers.

    Triggers keep it exact for every writer: a settlement, an expiry, an expired call's real
    outcome replacing its estimate, a fallback merge, an older kimi-budget sharing the file,
    or a row fixed or deleted by hand. Reservations in flight ("pending") are not in it.

    The (model, created_at) index goes: reports by model read the rollup now, and one index
    fewer makes every reservation's insert ~3 µs cheaper, which pays for the rollup's upsert.
    """
    conn.execute("DROP INDEX IF EXISTS calls_model_created_at")
    conn.execute(
        "CREATE TABLE usage_rollup ("
        "bucket TEXT NOT NULL, "  # UTC start of the 15-minute slot, format_utc text
        "model TEXT NOT NULL, "
        "tags TEXT NOT NULL, "  # the calls' tags JSON, as stored in calls.tags
        "calls INTEGER NOT NULL, "
        "prompt_tokens INTEGER NOT NULL, "
        "cached_tokens INTEGER NOT NULL, "  # clamped to [0, prompt_tokens] per call
        "completion_tokens INTEGER NOT NULL, "
        "cost_nanos INTEGER NOT NULL, "
        "savings_nanos INTEGER NOT NULL, "  # cached x (cache miss - cache hit), each call's prices
        "estimated INTEGER NOT NULL, "  # calls whose cost is an estimate
        "PRIMARY KEY (bucket, model, tags)"
        ") WITHOUT ROWID"
    )
    conn.execute(
        "INSERT INTO usage_rollup (bucket, model, tags, "
        + ", ".join(_ROLLUP_COLUMNS)
        + f") SELECT {_slot('created_at')} AS slot, model, tags, count(*), "
        "sum(coalesce(prompt_tokens, 0)), "
        f"sum({_cached('')}), "
        "sum(coalesce(completion_tokens, 0)), "
        "sum(cost_nanos), "
        f"sum({_cached('')} * (price_cache_miss - price_cache_hit)), "
        "sum(estimated) "
        "FROM calls WHERE status != 'pending' GROUP BY slot, model, tags"
    )
    conn.execute(_rollup_trigger("usage_rollup_insert", "INSERT", "new"))
    conn.execute(_rollup_trigger("usage_rollup_update_old", f"UPDATE OF {_ROLLUP_SOURCES}", "old"))
    conn.execute(_rollup_trigger("usage_rollup_update_new", f"UPDATE OF {_ROLLUP_SOURCES}", "new"))
    conn.execute(_rollup_trigger("usage_rollup_delete", "DELETE", "old"))


@migration
def m003_currency_fees_usage(conn: sqlite3.Connection) -> None:
    """The currency of each call, its non-token fees, cache writes and raw usage.

    ``cost_nanos`` stays the total charged (fees included) in the row's ``currency``; rows
    written before this migration were all in USD. ``calls_usd`` now shows the new columns
    (and ``currency``: despite its historical name, its amounts are in the row's currency).
    """
    conn.execute("ALTER TABLE calls ADD COLUMN currency TEXT NOT NULL DEFAULT 'USD'")
    conn.execute("ALTER TABLE calls ADD COLUMN fee_nanos INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE calls ADD COLUMN cache_write_tokens INTEGER")
    conn.execute("ALTER TABLE calls ADD COLUMN usage_json TEXT")
    conn.execute("DROP VIEW IF EXISTS calls_usd")
    conn.execute(
        "CREATE VIEW calls_usd AS SELECT "
        "id, created_at, finished_at, model, tags, status, stream, "
        "prompt_tokens, cached_tokens, completion_tokens, cache_write_tokens, currency, "
        "cost_nanos / 1e9 AS cost_usd, fee_nanos / 1e9 AS fee_usd, "
        "projected_nanos / 1e9 AS projected_usd, "
        "estimated, attempts, request_id, latency_ms, error, note, usage_json "
        "FROM calls"
    )


@migration
def m004_budget_scope_currency(conn: sqlite3.Connection) -> None:
    """Window totals per currency: a budget in CNY counts CNY calls only, one in USD USD only.

    Scopes already kept were USD budgets. ``UNIQUE (scope, tz)`` becomes
    ``UNIQUE (scope, tz, currency)``, which SQLite can only do by rebuilding the table; the
    ids (which ``window_totals`` refers to) are kept.
    """
    _execute_script(
        conn,
        """
        CREATE TABLE budget_scopes_new (
            id INTEGER PRIMARY KEY,
            scope TEXT NOT NULL,
            tz TEXT NOT NULL,
            windows TEXT NOT NULL,
            currency TEXT NOT NULL DEFAULT 'USD',
            UNIQUE (scope, tz, currency)
        );
        INSERT INTO budget_scopes_new (id, scope, tz, windows)
            SELECT id, scope, tz, windows FROM budget_scopes;
        DROP TABLE budget_scopes;
        ALTER TABLE budget_scopes_new RENAME TO budget_scopes
        """,
    )


@migration
def m005_extra_charges_index(conn: sqlite3.Connection) -> None:
    """The few rows with a charge beyond tokens ($web_search fees, Batch API batches), so that
    ``report`` sums them without reading every row of a large ledger."""
    conn.execute(
        "CREATE INDEX calls_extra_charges ON calls (created_at) "
        'WHERE fee_nanos != 0 OR tags LIKE \'%"api":"batch"%\''
    )


# The columns of ``calls`` (named: a view's ``*`` would break when a column is added), and
# the same columns as a reservation in flight shows them (``pending_calls``).
_CALL_COLUMNS = (
    "id, call_id, created_at, finished_at, model, tags, status, stream, prompt_tokens, "
    "cached_tokens, completion_tokens, cost_nanos, projected_nanos, prompt_estimate, "
    "price_cache_hit, price_cache_miss, price_output, estimated, attempts, request_id, "
    "latency_ms, error, note, expires_at, currency, fee_nanos, cache_write_tokens, usage_json"
)
_PENDING_AS_CALL = """
    0 AS id, call_id, created_at, NULL AS finished_at, model, tags, 'pending' AS status,
    stream, prompt_estimate AS prompt_tokens, NULL AS cached_tokens,
    NULL AS completion_tokens, 0 AS cost_nanos, projected_nanos, prompt_estimate,
    price_cache_hit, price_cache_miss, price_output, 1 AS estimated, attempts,
    NULL AS request_id, NULL AS latency_ms, NULL AS error, NULL AS note, expires_at,
    currency, 0 AS fee_nanos, NULL AS cache_write_tokens, NULL AS usage_json"""


@migration
def m006_reservations(conn: sqlite3.Connection) -> None:
    """Reservations in flight in their own small table, apart from the settled history.

    A call's one synchronous write (its reservation) then touches a few hot pages: a narrow
    row in a table that holds only the calls in flight, and the window totals. Its settlement
    inserts the full row into ``calls`` (indexes, rollup trigger) from the background writer.
    ``calls`` holds settled calls only; ``pending_calls`` shows the reservations in the shape
    of ``calls``, and ``calls_all`` is both (what ``calls`` was before).
    """
    _execute_script(
        conn,
        f"""
        CREATE TABLE reservations (
            call_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            model TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '{{}}',
            stream INTEGER NOT NULL DEFAULT 0,
            currency TEXT NOT NULL DEFAULT 'USD',
            projected_nanos INTEGER NOT NULL,
            prompt_estimate INTEGER NOT NULL,
            price_cache_hit INTEGER NOT NULL,
            price_cache_miss INTEGER NOT NULL,
            price_output INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;
        CREATE INDEX reservations_expires_at ON reservations (expires_at);
        INSERT INTO reservations (call_id, created_at, expires_at, model, tags, stream,
            currency, projected_nanos, prompt_estimate, price_cache_hit, price_cache_miss,
            price_output, attempts)
            SELECT call_id, created_at, coalesce(expires_at, created_at), model, tags, stream,
            currency, projected_nanos, prompt_estimate, price_cache_hit, price_cache_miss,
            price_output, attempts FROM calls WHERE status = 'pending';
        DELETE FROM calls WHERE status = 'pending';
        DROP INDEX IF EXISTS calls_pending_expiry;
        CREATE VIEW pending_calls AS SELECT {_PENDING_AS_CALL} FROM reservations;
        CREATE VIEW calls_all AS
            SELECT {_CALL_COLUMNS} FROM calls
            UNION ALL SELECT {_CALL_COLUMNS} FROM pending_calls;
        DROP VIEW IF EXISTS calls_usd;
        CREATE VIEW calls_usd AS SELECT
            id, created_at, finished_at, model, tags, status, stream,
            prompt_tokens, cached_tokens, completion_tokens, cache_write_tokens, currency,
            cost_nanos / 1e9 AS cost_usd, fee_nanos / 1e9 AS fee_usd,
            projected_nanos / 1e9 AS projected_usd,
            estimated, attempts, request_id, latency_ms, error, note, usage_json
        FROM calls_all
        """,
    )


@migration
def m007_other_currencies_index(conn: sqlite3.Connection) -> None:
    """The calls billed in a currency other than USD (the CNY platform's), so that a report
    finds which currencies a ledger holds in a few index reads instead of reading every row.
    USD rows, nearly all of most ledgers, are left out: they cost this index nothing."""
    conn.execute("CREATE INDEX calls_other_currencies ON calls (currency) WHERE currency <> 'USD'")


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the migration transaction half-way; run statement by statement.
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


def apply_migrations(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations this ledger lacks, in one transaction; returns their names."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _kimi_budget_migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM _kimi_budget_migrations")}
        applied = []
        for name, step in MIGRATIONS:
            if name in done:
                continue
            step(conn)
            conn.execute(
                "INSERT INTO _kimi_budget_migrations (name, applied_at) "
                "VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                (name,),
            )
            applied.append(name)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
