"""The PostgreSQL ledger's schema, as numbered migrations applied when a ledger is opened.

Applied migrations are recorded by name in ``kimi_budget_migrations``, as for SQLite. Two
processes opening a new ledger at once are safe: the migrating transaction first takes a
transaction-level advisory lock (``pg_advisory_xact_lock``), so the second waits for the first
to commit, then sees its migrations recorded and applies nothing. A transaction-level lock is
released by COMMIT, so this works through PgBouncer in transaction pooling mode too.

The schema mirrors the SQLite ledger's columns (same names, same meaning), with PostgreSQL's
types: ``timestamptz`` for instants, ``jsonb`` for tags, ``bigint`` nano-units, ``boolean``
flags. Window totals are keyed exactly as in SQLite (``_windows``' text keys).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOCK_KEY", "MIGRATIONS", "apply_migrations", "pending_migrations"]

# pg_advisory_xact_lock key of schema changes: "KIMB" << 32 | "MIGR" (one 64-bit int).
LOCK_KEY = 0x4B494D42_4D494752


def _statements(script: str) -> list[str]:
    """A script of plain statements (no function bodies), one per ``;`` at a line's end."""
    return [part.strip() for part in script.split(";\n") if part.strip()]


# (name, statements): applied in order, each migration in the one transaction.
MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "m001_calls",
        _statements("""
        CREATE TABLE calls (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            call_id text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL,     -- when the budget was reserved
            finished_at timestamptz,
            model text NOT NULL,
            tags jsonb NOT NULL DEFAULT '{}',    -- object of strings
            status text NOT NULL,  -- pending ok error abandoned interrupted cancelled expired
            stream boolean NOT NULL DEFAULT false,
            prompt_tokens bigint,
            cached_tokens bigint,
            completion_tokens bigint,
            cost_nanos bigint NOT NULL DEFAULT 0,       -- 1e-9 of currency, fees included
            projected_nanos bigint NOT NULL DEFAULT 0,  -- worst case reserved before sending
            prompt_estimate bigint NOT NULL DEFAULT 0,  -- local token count before sending
            price_cache_hit bigint NOT NULL,            -- 1e-9 of currency per token
            price_cache_miss bigint NOT NULL,
            price_output bigint NOT NULL,
            estimated boolean NOT NULL DEFAULT false,   -- cost is an estimate, not billed usage
            attempts integer NOT NULL DEFAULT 0,        -- HTTP attempts (retries included)
            request_id text,
            latency_ms bigint,
            error text,
            note text,
            expires_at timestamptz,
            currency text NOT NULL DEFAULT 'USD',
            fee_nanos bigint NOT NULL DEFAULT 0,        -- non-token fees, part of cost_nanos
            cache_write_tokens bigint,
            usage_json text                             -- the usage object as received
        );
        CREATE INDEX calls_created_at ON calls (created_at);
        CREATE INDEX calls_pending_expiry ON calls (expires_at) WHERE status = 'pending';

        -- Every (scope, time zone, currency) a budget has used. Writes keep its window
        -- totals current, so a budget check reads one row per window at any ledger size.
        CREATE TABLE budget_scopes (
            id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            scope text NOT NULL,
            tz text NOT NULL,
            windows text NOT NULL,
            currency text NOT NULL DEFAULT 'USD',  -- its totals count calls in it only
            UNIQUE (scope, tz, currency)
        );
        CREATE TABLE window_totals (
            scope_id integer NOT NULL REFERENCES budget_scopes (id),
            "window" text NOT NULL,
            start text NOT NULL,
            spent_nanos bigint NOT NULL DEFAULT 0,
            reserved_nanos bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (scope_id, "window", start)
        );

        CREATE VIEW calls_usd AS SELECT
            id, created_at, finished_at, model, tags, status, stream,
            prompt_tokens, cached_tokens, completion_tokens, cache_write_tokens, currency,
            cost_nanos / 1e9 AS cost_usd, fee_nanos / 1e9 AS fee_usd,
            projected_nanos / 1e9 AS projected_usd,
            estimated, attempts, request_id, latency_ms, error, note, usage_json
        FROM calls;
        """),
    ),
]

# The call lifecycle's two hot writes as functions: one round trip each (a network round trip
# while window rows are locked would make every other writer wait for it). They take the same
# locks in the same order as the backend's multi-statement transactions (see ``_postgres``):
# the writers' shared advisory lock, then the call row, then the window totals in ascending key
# order (the client sorts the arrays). The cap policy stays in Python: the client computes the
# keys and the cap of each; the function only compares ``spent + reserved + projected <= cap``
# on the locked rows, all of them or none.
_RESERVE = """
CREATE FUNCTION kb_reserve(
    p_lock bigint, p_version bigint,
    p_scope_ids integer[], p_windows text[], p_starts text[], p_caps bigint[], p_adds bigint[],
    p_projected bigint, p_call_id text, p_created_at timestamptz, p_model text, p_tags jsonb,
    p_stream boolean, p_prompt_estimate bigint, p_price_cache_hit bigint,
    p_price_cache_miss bigint, p_price_output bigint, p_expires_at timestamptz,
    p_currency text, p_now timestamptz
) RETURNS TABLE (outcome text, spent bigint[], reserved bigint[], stale boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    s bigint;
    r bigint;
    refused boolean := false;
    spents bigint[] := '{}';
    reserveds bigint[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock_shared(p_lock);
    IF (SELECT v.version FROM budget_scopes_version v) IS DISTINCT FROM p_version THEN
        RETURN QUERY SELECT 'scopes'::text, NULL::bigint[], NULL::bigint[], false;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM calls c WHERE c.call_id = p_call_id) THEN
        -- A retry whose first attempt committed (its answer was lost with the connection).
        RETURN QUERY SELECT 'exists'::text, NULL::bigint[], NULL::bigint[], false;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_scope_ids, 1), 0) LOOP
        INSERT INTO window_totals AS w (scope_id, "window", start)
        VALUES (p_scope_ids[i], p_windows[i], p_starts[i])
        ON CONFLICT (scope_id, "window", start) DO UPDATE SET spent_nanos = w.spent_nanos
        RETURNING w.spent_nanos, w.reserved_nanos INTO s, r;
        spents := spents || s;
        reserveds := reserveds || r;
        IF p_caps[i] IS NOT NULL AND s + r + p_projected > p_caps[i] THEN
            refused := true;
        END IF;
    END LOOP;
    IF NOT refused THEN
        INSERT INTO calls (call_id, created_at, model, tags, status, stream, prompt_tokens,
            projected_nanos, prompt_estimate, price_cache_hit, price_cache_miss, price_output,
            estimated, expires_at, currency)
        VALUES (p_call_id, p_created_at, p_model, p_tags, 'pending', p_stream,
            p_prompt_estimate, p_projected, p_prompt_estimate, p_price_cache_hit,
            p_price_cache_miss, p_price_output, true, p_expires_at, p_currency);
        UPDATE window_totals AS w SET reserved_nanos = w.reserved_nanos + v.add
        FROM unnest(p_scope_ids, p_windows, p_starts, p_adds) AS v (scope_id, win, start, add)
        WHERE v.add <> 0 AND w.scope_id = v.scope_id AND w."window" = v.win
            AND w.start = v.start;
    END IF;
    RETURN QUERY SELECT CASE WHEN refused THEN 'refused' ELSE 'reserved' END, spents,
        reserveds, EXISTS (
            SELECT 1 FROM calls c
            WHERE c.status = 'pending' AND c.expires_at < p_now AND c.call_id <> p_call_id
        );
END
$fn$
"""
_SETTLE = """
CREATE FUNCTION kb_settle(
    p_lock bigint, p_version bigint, p_call_id text, p_status text, p_finished_at timestamptz,
    p_prompt_tokens bigint, p_cached_tokens bigint, p_completion_tokens bigint,
    p_cost_nanos bigint, p_estimated boolean, p_attempts integer, p_request_id text,
    p_latency_ms bigint, p_error text, p_note text, p_fee_nanos bigint,
    p_cache_write_tokens bigint, p_usage_json text,
    p_scope_ids integer[], p_windows text[], p_starts text[], p_spent bigint[],
    p_reserved bigint[]
) RETURNS text
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(p_lock);
    IF (SELECT v.version FROM budget_scopes_version v) IS DISTINCT FROM p_version THEN
        RETURN 'scopes';
    END IF;
    UPDATE calls SET status = p_status, finished_at = p_finished_at,
        prompt_tokens = p_prompt_tokens, cached_tokens = p_cached_tokens,
        completion_tokens = p_completion_tokens, cost_nanos = p_cost_nanos,
        estimated = p_estimated, attempts = p_attempts, request_id = p_request_id,
        latency_ms = p_latency_ms, error = p_error, note = p_note, fee_nanos = p_fee_nanos,
        cache_write_tokens = p_cache_write_tokens, usage_json = p_usage_json, expires_at = NULL
    WHERE call_id = p_call_id AND status = 'pending';
    IF NOT FOUND THEN
        RETURN 'not pending';  -- settled already, expired, or never reserved: the client's
    END IF;                    -- general path decides
    INSERT INTO window_totals AS w (scope_id, "window", start, spent_nanos, reserved_nanos)
    SELECT v.scope_id, v.win, v.start, v.spent, v.reserved
    FROM unnest(p_scope_ids, p_windows, p_starts, p_spent, p_reserved)
        WITH ORDINALITY AS v (scope_id, win, start, spent, reserved, n)
    ORDER BY v.n
    ON CONFLICT (scope_id, "window", start) DO UPDATE
    SET spent_nanos = w.spent_nanos + excluded.spent_nanos,
        reserved_nanos = w.reserved_nanos + excluded.reserved_nanos;
    RETURN 'settled';
END
$fn$
"""

MIGRATIONS.append(
    (
        "m002_one_round_trip",
        [
            # Bumped by every change of budget_scopes: a client's cached copy of the scopes is
            # current exactly when its version is.
            "CREATE TABLE budget_scopes_version (one boolean PRIMARY KEY DEFAULT true "
            "CHECK (one), version bigint NOT NULL DEFAULT 0)",
            "INSERT INTO budget_scopes_version DEFAULT VALUES",
            _RESERVE,
            _SETTLE,
        ],
    )
)

# The calls billed in a currency other than USD: which currencies a ledger holds is then a
# few index reads (see ``PostgresLedger.currencies``), not a scan of every row.
MIGRATIONS.append(
    (
        "m003_other_currencies_index",
        ["CREATE INDEX calls_other_currencies ON calls (currency) WHERE currency <> 'USD'"],
    )
)

_CREATE_LOG = (
    "CREATE TABLE IF NOT EXISTS kimi_budget_migrations "
    "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


def pending_migrations(conn: Any) -> list[str]:
    """Names of the migrations this database lacks (read-only; no lock, no DDL)."""
    row = conn.execute("SELECT to_regclass('kimi_budget_migrations') IS NOT NULL").fetchone()
    done: set[str] = set()
    if row[0]:
        done = {r[0] for r in conn.execute("SELECT name FROM kimi_budget_migrations")}
    return [name for name, _ in MIGRATIONS if name not in done]


def apply_migrations(conn: Any) -> list[str]:
    """Apply the migrations this database lacks, in one transaction; returns their names.

    ``conn`` is a psycopg connection in autocommit mode (no transaction open).
    """
    if not pending_migrations(conn):
        return []  # the usual case: nothing to lock, nothing to write
    applied: list[str] = []
    with conn.transaction():
        # Whoever holds this lock migrates; the others wait here, then find nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_CREATE_LOG)
        done = {r[0] for r in conn.execute("SELECT name FROM kimi_budget_migrations")}
        for name, statements in MIGRATIONS:
            if name in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO kimi_budget_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied
