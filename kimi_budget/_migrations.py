"""The ledger's schema, as numbered migrations applied when a ledger is opened.

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
