"""The PostgreSQL backend: one ledger on a server, shared by processes on many machines.

``Ledger("postgresql://user@host:5432/db")`` opens it (psycopg 3, the ``postgres`` extra). It
gives the guarantees of the SQLite backend across hosts; how:

Locks, and why there are no deadlocks
    Every write takes its locks in one global order, in READ COMMITTED:

    1. ``pg_advisory_xact_lock_shared(WRITERS_LOCK)``: every writer holds it shared; registering
       a new budget scope (which totals a new window from the rows) holds it exclusively, so no
       writer can add a row that the new total misses, nor miss the new total;
    2. rows of ``calls``: the call being settled (``UPDATE``), or the stale reservations being
       expired (``FOR UPDATE SKIP LOCKED``: never waits for a row another writer holds);
    3. rows of ``window_totals``, in ascending ``(scope_id, window, start)`` order: the client
       sorts the keys, and one ``INSERT ... ON CONFLICT DO UPDATE`` (or ``kb_reserve``'s loop)
       takes the row locks in that order, creating missing totals on the way.

    No writer takes a lock of an earlier kind after one of a later kind, and totals are locked
    in ascending order, so two writers never wait for each other in a cycle, however many
    budgets share windows (``tests/test_postgres_ledger.py`` reads PostgreSQL's own deadlock
    count). ``reserve`` locks the totals of every cap it checks *before* reading them, so
    writers on any number of hosts check-and-reserve one at a time per window: no overshoot.
    Should PostgreSQL still report a deadlock or a serialization failure, the write is retried.

One round trip
    The hot writes, ``reserve`` and the settlement of a pending call, are one call each of a
    function the migrations install (``kb_reserve``, ``kb_settle``): window rows are never
    locked across a network round trip. The policy stays here and in ``_windows``: the client
    computes which totals a call moves and the cap of each; the function locks, compares
    ``spent + reserved + projected <= cap`` on every locked row, and writes all or nothing.
    The client's copy of the budget scopes carries a version; a function that sees another
    version does nothing and says so, and the client reads the scopes again.

Failures fail closed
    ``_pgconn.PgConnection`` retries a lost connection for ``reconnect_timeout`` seconds; then
    ``reserve`` raises ``LedgerError`` (the call is not sent) and a settlement goes to the local
    fallback file, merged by the next write that reaches the server. A retried write whose
    first ``COMMIT`` went through unseen changes nothing: ``kb_reserve`` finds its row, settling
    is idempotent by ``call_id``.

Async
    ``reserve`` is awaited in a worker thread by ``AsyncOpenAI`` (``blocking_io``); a settlement
    or an expiry extension made on an event loop's thread is handed to this ledger's writer
    thread, so the loop never waits for a network round trip.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._budget import WINDOWS, Budget, canonical_tags, format_utc, parse_utc, tags_json
from .._exceptions import BudgetExceededError, LedgerError
from .._money import to_usd
from .._redact import redact_url
from . import _windows
from ._backend import (
    OTHER_CURRENCIES_SQL,
    Clock,
    Ledger,
    budget_currency,
    expired_settlement,
    on_event_loop,
    utcnow,
)
from ._fallback import FallbackFile
from ._pgconn import PgConnection, Retry
from ._records import Reservation, Settlement, WindowStatus
from ._windows import Scope, as_utc_text
from .migrations._postgres import apply_migrations

if TYPE_CHECKING:
    pass

__all__ = ["PostgresLedger"]

log = logging.getLogger("kimi_budget")
UTC = timezone.utc
T = TypeVar("T")

# pg_advisory_xact_lock key held shared by every writer, exclusively by a scope registration.
WRITERS_LOCK = 0x4B494D42_57524954  # "KIMB" "WRIT"
# Row shapes shared by the statements below.
_RESERVATION_COLUMNS = (
    "call_id, created_at, model, tags, stream, projected_nanos, prompt_estimate, "
    "price_cache_hit, price_cache_miss, price_output, expires_at, attempts, currency"
)
_SETTLE_SET = (
    "status = %s, finished_at = %s, prompt_tokens = %s, cached_tokens = %s, "
    "completion_tokens = %s, cost_nanos = %s, estimated = %s, attempts = %s, request_id = %s, "
    "latency_ms = %s, error = %s, note = %s, fee_nanos = %s, cache_write_tokens = %s, "
    "usage_json = %s, expires_at = NULL"
)
_INSERT_SETTLED = (
    "INSERT INTO calls (call_id, created_at, model, tags, stream, projected_nanos, "
    "prompt_estimate, price_cache_hit, price_cache_miss, price_output, currency, status, "
    "finished_at, prompt_tokens, cached_tokens, completion_tokens, cost_nanos, estimated, "
    "attempts, request_id, latency_ms, error, note, fee_nanos, cache_write_tokens, usage_json) "
    "VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (call_id) DO NOTHING RETURNING id"
)
# The columns of ``calls`` in SQLite's order, shaped as SQLite returns them (text instants,
# tags as JSON text, 0/1 flags), so that readers see one shape whatever the backend.
_CALL_COLUMNS = (
    "id",
    "call_id",
    "created_at",
    "finished_at",
    "model",
    "tags",
    "status",
    "stream",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost_nanos",
    "projected_nanos",
    "prompt_estimate",
    "price_cache_hit",
    "price_cache_miss",
    "price_output",
    "estimated",
    "attempts",
    "request_id",
    "latency_ms",
    "error",
    "note",
    "expires_at",
    "currency",
    "fee_nanos",
    "cache_write_tokens",
    "usage_json",
)
_INSTANTS = {"created_at", "finished_at", "expires_at"}
_FLAGS = {"stream", "estimated"}

TotalKey = tuple[int, str, str]  # (scope_id, window, start key)
_CALL_RESERVE = (
    "SELECT * FROM kb_reserve(%s, %s, %s::integer[], %s::text[], %s::text[], %s::bigint[], "
    "%s::bigint[], %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_CALL_SETTLE = (
    "SELECT kb_settle(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s::integer[], %s::text[], %s::text[], %s::bigint[], %s::bigint[])"
)


class PostgresLedger(Ledger):
    """A ledger in a PostgreSQL database (migrated on open), shared by many machines."""

    #: Ledger calls wait on the network: async clients run them off the event loop.
    blocking_io = True

    def __init__(
        self,
        url: str | None = None,
        *,
        busy_timeout: float = 30.0,
        clock: Clock | None = None,
        read_only: bool = False,
        reconnect_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        url = url or os.environ.get("KIMI_BUDGET_LEDGER") or ""
        self.location = redact_url(url)
        self._conn = PgConnection(
            url,
            self.location,
            connect_timeout=connect_timeout,
            reconnect_timeout=reconnect_timeout,
        )
        self.busy_timeout = busy_timeout
        self.clock: Clock = clock or utcnow
        self.read_only = read_only
        self.fallback_path = _fallback_path(self.location)
        self._fallback = FallbackFile(self.fallback_path, self.location)
        self._registered: set[tuple[str, str, tuple[str, ...], str]] = set()
        self._scope_cache: tuple[int, list[Scope]] | None = None
        self._writer: _BackgroundWriter | None = None
        self._merging = threading.local()
        with self._conn.lock:
            connection = self._conn.get()  # fail now, clearly, if the server cannot be reached
            if not read_only:
                try:
                    apply_migrations(connection)
                except Exception as exc:
                    raise LedgerError(
                        self._conn.explain(exc, "migrate"), path=self.location
                    ) from None
        if not read_only:
            self._merge_fallback()
            self.expire_stale()

    def _run(
        self,
        doing: str,
        body: Callable[[Any, bool], T],
        *,
        shared_lock: bool = True,
        transaction: bool = True,
    ) -> T:
        """``body(conn, retried)`` in one transaction (``PgConnection.run``), then the
        fallback file's settlements if there are any (the server takes writes again)."""
        if self.read_only:
            raise LedgerError(
                f"Cannot {doing} the ledger {self.location}: it was opened read-only.",
                path=self.location,
            )
        result, reconnected = self._conn.run(
            doing,
            body,
            shared_lock=WRITERS_LOCK if shared_lock else None,
            transaction=transaction,
        )
        if reconnected:
            log.warning("kimi-budget reached the ledger %s again.", self.location)
        self._merge_fallback_if_any()
        return result

    # -- the call lifecycle ----------------------------------------------------------------------

    def reserve(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> None:
        """Check every applicable cap and reserve the projected cost, atomically.

        Raises ``BudgetExceededError`` (and reserves nothing) if a cap would be exceeded,
        ``LedgerError`` if the server cannot be reached (then nothing may be sent).
        """
        tags = dict(reservation.tags)
        applicable = _windows.applicable(budgets, reservation)
        _windows.check_per_call(reservation, applicable)
        for budget in applicable:
            if budget.windows:
                self._register(budget)

        def body(conn: Any, retried: bool) -> tuple[str, BudgetExceededError | None, bool]:
            for _ in range(5):
                version, scopes = self._scopes_cached(conn)
                checks: list[tuple[Budget, Scope]] = []
                caps: dict[TotalKey, int] = {}
                for budget in applicable:
                    if not budget.windows:
                        continue
                    scope = _windows.scope_for(scopes, budget)
                    if scope is None:  # registered since this process read the scopes
                        break
                    checks.append((budget, scope))
                    for w, k in scope.keys(budget.windows, reservation.created_at):
                        cap = budget.caps_nanos[w]
                        caps[(scope.id, w, k)] = min(cap, caps.get((scope.id, w, k), cap))
                else:
                    adding = _windows.total_rows(
                        scopes,
                        tags,
                        reservation.created_at,
                        spent=0,
                        reserved=reservation.projected_nanos,
                        currency=reservation.currency,
                    )
                    adds = {row[:3]: row[4] for row in adding}
                    keys = sorted(set(caps) | set(adds))  # the lock order
                    outcome, spents, reserveds, stale = conn.execute(
                        _CALL_RESERVE,
                        (
                            WRITERS_LOCK,
                            version,
                            [k[0] for k in keys],
                            [k[1] for k in keys],
                            [k[2] for k in keys],
                            [caps.get(k) for k in keys],
                            [adds.get(k, 0) for k in keys],
                            reservation.projected_nanos,
                            reservation.call_id,
                            reservation.created_at,
                            reservation.model,
                            tags_json(tags),
                            bool(reservation.stream),
                            reservation.prompt_estimate,
                            reservation.price_cache_hit,
                            reservation.price_cache_miss,
                            reservation.price_output,
                            reservation.expires_at,
                            reservation.currency,
                            self.clock(),
                        ),
                    ).fetchone()
                    if outcome != "scopes":
                        break
                self._scope_cache = None  # out of date: read them again
            else:
                raise Retry
            if outcome == "exists" and not retried:
                raise LedgerError(
                    f"The ledger {self.location} already has a call {reservation.call_id}; "
                    f"a call id is used once.",
                    path=self.location,
                )
            if outcome != "refused":
                return outcome, None, bool(stale)
            totals = {k: (int(a), int(b)) for k, a, b in zip(keys, spents, reserveds, strict=True)}
            for budget, scope in checks:
                mine = {
                    w: totals[(scope.id, w, k)]
                    for w, k in scope.keys(budget.windows, reservation.created_at)
                }
                refused = _windows.refusal(budget, reservation, mine)
                if refused is not None:
                    return outcome, refused, bool(stale)
            raise LedgerError(  # the server and _windows disagree: a bug, say so
                f"The ledger {self.location} refused call {reservation.call_id} but no cap "
                f"is exceeded by its totals {totals}.",
                path=self.location,
            )

        _, refusal, stale = self._run("reserve budget in", body, transaction=False)
        if refusal is not None and self._writer is not None:
            # Settlements an event loop handed to the writer thread hold their full
            # reservations until written (some may be written just after the check): write
            # them, then look again. Only a refusal pays for this.
            self.flush()
            _, refusal, stale = self._run("reserve budget in", body, transaction=False)
        if stale:
            # Reservations of dead processes: charged in full now (room is not freed by it,
            # so this never changes what a check decides; it only settles their rows).
            with contextlib.suppress(LedgerError):
                self._expire(sparing=reservation.call_id)
        if refusal is not None:
            raise refusal

    def extend(self, call_id: str, expires_at: datetime) -> None:
        """Push a live reservation's expiry out (a call still retrying or streaming)."""
        if on_event_loop():
            self._background().put(("extend", call_id, expires_at))
            return
        self._extend_now(call_id, expires_at)

    def _extend_now(self, call_id: str, expires_at: datetime) -> None:
        def body(conn: Any, retried: bool) -> None:
            conn.execute(
                "UPDATE calls SET expires_at = %s WHERE call_id = %s AND status = 'pending'",
                (expires_at, call_id),
            )

        self._run("extend a reservation in", body, shared_lock=False)

    def settle(self, settlement: Settlement) -> bool:
        """Record how a call ended. Returns False if it was already settled (idempotent).

        On an event loop's thread the write is handed to the writer thread (returns True).
        """
        if on_event_loop():
            self._background().put(("settle", settlement, None))
            return True
        return self._run(
            "record a call in",
            lambda conn, _: self._settle_fast(conn, settlement),
            transaction=False,
        )

    def _settle_fast(self, conn: Any, s: Settlement) -> bool:
        """The usual settlement, of a pending reservation, in one round trip (``kb_settle``);
        anything else (settled already, expired, never reserved) in a transaction."""
        res = s.reservation
        for _ in range(5):
            version, scopes = self._scopes_cached(conn)
            deltas = [
                row
                for row in _summed(
                    _windows.total_rows(
                        scopes,
                        res.tags,
                        res.created_at,
                        spent=s.cost_nanos,
                        reserved=-res.projected_nanos,
                        currency=res.currency,
                    )
                )
                if row[3] or row[4]
            ]
            (outcome,) = conn.execute(
                _CALL_SETTLE,
                (
                    WRITERS_LOCK,
                    version,
                    res.call_id,
                    *_settlement_values(s),
                    [d[0] for d in deltas],
                    [d[1] for d in deltas],
                    [d[2] for d in deltas],
                    [d[3] for d in deltas],
                    [d[4] for d in deltas],
                ),
            ).fetchone()
            if outcome == "settled":
                return True
            if outcome != "scopes":
                break
            self._scope_cache = None
        with conn.pipeline(), conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WRITERS_LOCK,))
            return self._settle(conn, s)

    def _settle_or_fallback(self, settlement: Settlement) -> None:
        """The writer thread's settle: what the server cannot take goes to the fallback file."""
        try:
            self._run(
                "record a call in",
                lambda conn, _: self._settle_fast(conn, settlement),
                transaction=False,
            )
        except LedgerError as exc:
            self.write_fallback(settlement, exc)

    def _settle(self, conn: Any, s: Settlement) -> bool:
        res = s.reservation
        values = _settled_values(s)
        tags = dict(res.tags)
        updated = conn.execute(
            f"UPDATE calls SET {_SETTLE_SET} WHERE call_id = %s AND status = 'pending' "
            "RETURNING projected_nanos",
            (*values, res.call_id),
        )
        scopes = self._scopes(conn)  # one round trip answers both
        row = updated.fetchone()
        if row is not None:
            spent, reserved = s.cost_nanos, -row[0]
        else:
            found = conn.execute(
                "SELECT status, cost_nanos FROM calls WHERE call_id = %s FOR UPDATE",
                (res.call_id,),
            ).fetchone()
            if found is None:
                # A fallback line whose reservation never reached the server.
                inserted = conn.execute(
                    _INSERT_SETTLED,
                    (
                        res.call_id,
                        res.created_at,
                        res.model,
                        tags_json(tags),
                        bool(res.stream),
                        res.projected_nanos,
                        res.prompt_estimate,
                        res.price_cache_hit,
                        res.price_cache_miss,
                        res.price_output,
                        res.currency,
                        *values,
                    ),
                ).fetchone()
                if inserted is None:
                    raise Retry  # inserted by another writer since our SELECT
                spent, reserved = s.cost_nanos, 0
            elif found[0] == "expired" and s.status != "expired":
                # The call outlived its reservation; its real outcome replaces the estimate.
                conn.execute(
                    f"UPDATE calls SET {_SETTLE_SET} WHERE call_id = %s", (*values, res.call_id)
                )
                spent, reserved = s.cost_nanos - found[1], 0
            else:
                return False
        deltas = _windows.total_rows(
            scopes, tags, res.created_at, spent=spent, reserved=reserved, currency=res.currency
        )
        _upsert_totals(conn, deltas)
        return True

    def expire_stale(self) -> int:
        """Settle reservations past their expiry (``expired_settlement``); returns how many."""
        return self._expire()

    def _expire(self, sparing: str | None = None) -> int:
        def body(conn: Any, retried: bool) -> int:
            stale_rows = self._select_stale(conn, self.clock(), sparing)
            scopes = self._scopes(conn)
            stale = _stale(stale_rows)
            deltas = self._expiry_deltas(conn, scopes, stale)
            _upsert_totals(conn, deltas)
            return len(stale)

        return self._run("expire reservations in", body)

    def _select_stale(self, conn: Any, now: datetime, sparing: str | None = None) -> Any:
        """Lock reservations past their expiry (skipping rows another writer holds), but the
        one ``sparing`` names (a reservation just taken, as SQLite expires before inserting).

        Returns the cursor, not its rows: the answer comes with the next statement's.
        """
        return conn.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM calls WHERE status = 'pending' "
            "AND expires_at < %s AND call_id IS DISTINCT FROM %s "
            "ORDER BY call_id LIMIT 500 FOR UPDATE SKIP LOCKED",
            (now, sparing),
        )

    def _expiry_deltas(
        self, conn: Any, scopes: Sequence[Scope], stale: Sequence[tuple[Reservation, int]]
    ) -> list[_windows.TotalRow]:
        """Settle the locked stale rows as expired; the totals they move (not yet applied)."""
        now = self.clock()
        deltas: list[_windows.TotalRow] = []
        for res, attempts in stale:
            s = expired_settlement(res, attempts, now)
            conn.execute(
                f"UPDATE calls SET {_SETTLE_SET} WHERE call_id = %s",
                (*_settled_values(s), res.call_id),
            )
            deltas += _windows.total_rows(
                scopes,
                res.tags,
                res.created_at,
                spent=s.cost_nanos,
                reserved=-res.projected_nanos,
                currency=res.currency,
            )
        return deltas

    # -- window totals ---------------------------------------------------------------------------

    def _scopes(self, conn: Any) -> list[Scope]:
        """The budget scopes now (read again), with their version, kept as this process's copy."""
        rows = conn.execute(
            "SELECT v.version, s.id, s.scope, s.tz, s.windows, s.currency "
            "FROM budget_scopes_version v LEFT JOIN budget_scopes s ON true ORDER BY s.id"
        ).fetchall()
        version = int(rows[0][0])
        cached = self._scope_cache
        if cached is None or cached[0] != version:
            scopes = [Scope.from_row(*r[1:]) for r in rows if r[1] is not None]
            self._scope_cache = cached = (version, scopes)
        return cached[1]

    def _scopes_cached(self, conn: Any) -> tuple[int, list[Scope]]:
        """This process's copy of the scopes and its version (read once, then on a mismatch
        that ``kb_reserve``/``kb_settle`` report)."""
        if self._scope_cache is None:
            self._scopes(conn)
        assert self._scope_cache is not None
        return self._scope_cache

    def _register(self, budget: Budget) -> None:
        """Make sure writes keep totals for this budget's scope, time zone and windows."""
        currency = budget_currency(budget)
        key = (budget.scope_key, budget.tz_name, budget.windows, currency)
        if key in self._registered:
            return

        def body(conn: Any, retried: bool) -> None:
            query = (
                "SELECT id, windows FROM budget_scopes "
                "WHERE scope = %s AND tz = %s AND currency = %s"
            )
            args = (budget.scope_key, budget.tz_name, currency)
            row = conn.execute(query, args).fetchone()
            if row is not None and set(budget.windows) <= set(json.loads(row[1])):
                return  # registered by someone else already
            # Exclusive: waits for every writer in flight, and holds off new ones, so that the
            # totals summed below miss no row and no later write misses them.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITERS_LOCK,))
            row = conn.execute(query, args).fetchone()
            if row is None:
                row = conn.execute(
                    "INSERT INTO budget_scopes (scope, tz, currency, windows) "
                    "VALUES (%s, %s, %s, '[]') RETURNING id, windows",
                    args,
                ).fetchone()
            scope_id, have = row[0], set(json.loads(row[1]))
            missing = [w for w in budget.windows if w not in have]
            if not missing:
                return
            now = self.clock()
            for window in missing:
                self._backfill(conn, scope_id, budget, window, now)
            windows = [w for w in WINDOWS if w in have or w in missing]
            conn.execute(
                "UPDATE budget_scopes SET windows = %s WHERE id = %s",
                (json.dumps(windows), scope_id),
            )
            # Every other process's copy of the scopes is out of date from this commit on.
            conn.execute("UPDATE budget_scopes_version SET version = version + 1")

        self._run("register a budget in", body, shared_lock=False)
        self._registered.add(key)
        self._scope_cache = None

    def _backfill(
        self, conn: Any, scope_id: int, budget: Budget, window: str, now: datetime
    ) -> None:
        """Total the current window from the rows once; writes keep it current from then on."""
        where = "tags @> %s::jsonb AND currency = %s"
        params: list[Any] = [tags_json(budget.scope), budget_currency(budget)]
        bounds = _windows.backfill_range(window, now, budget)
        if bounds is not None:
            where += " AND created_at >= %s AND created_at < %s"
            params += [parse_utc(bounds[0]), parse_utc(bounds[1])]
        spent, reserved = conn.execute(
            "SELECT coalesce(sum(cost_nanos) FILTER (WHERE status <> 'pending'), 0), "
            "coalesce(sum(projected_nanos) FILTER (WHERE status = 'pending'), 0) "
            f"FROM calls WHERE {where}",
            params,
        ).fetchone()
        conn.execute(
            'INSERT INTO window_totals (scope_id, "window", start, spent_nanos, reserved_nanos) '
            'VALUES (%s, %s, %s, %s, %s) ON CONFLICT (scope_id, "window", start) DO UPDATE '
            "SET spent_nanos = excluded.spent_nanos, reserved_nanos = excluded.reserved_nanos",
            (scope_id, window, "" if bounds is None else bounds[0], spent, reserved),
        )

    def _read_totals(
        self, conn: Any, scope: Scope, windows: Sequence[str], instant: datetime
    ) -> dict[str, tuple[int, int]]:
        keys = scope.keys(windows, instant)
        rows = conn.execute(
            'SELECT "window", start, spent_nanos, reserved_nanos FROM window_totals '
            'WHERE scope_id = %s AND ("window", start) IN ('
            + ", ".join(["(%s, %s)"] * len(keys))
            + ")",
            [scope.id, *(part for key in keys for part in key)],
        ).fetchall()
        found = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in rows}
        return {window: found.get((window, key), (0, 0)) for window, key in keys}

    # -- fallback ------------------------------------------------------------------------------

    def write_fallback(self, settlement: Settlement, reason: BaseException) -> None:
        with contextlib.suppress(OSError):
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fallback.append(settlement, reason)

    def _merge_fallback(self) -> int:
        return self._fallback.merge(self._settle_all)

    def _merge_fallback_if_any(self) -> None:
        if self.fallback_path.exists() and not getattr(self._merging, "active", False):
            self._merging.active = True
            try:
                merged = self._merge_fallback()
            except LedgerError:
                return  # still down for this one; the next write tries again
            finally:
                self._merging.active = False
            if merged:
                log.warning(
                    "kimi-budget merged %d settlement(s) from %s into %s.",
                    merged,
                    self.fallback_path,
                    self.location,
                )

    def _settle_all(self, settlements: Sequence[Settlement]) -> int:
        def body(conn: Any, retried: bool) -> int:
            return sum(int(self._settle(conn, s)) for s in settlements)

        return self._run("merge the fallback file into", body)

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, doing: str, body: Callable[[Any], T]) -> T:
        return self._conn.read(doing, body)

    def spend(
        self,
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        currency: str = "USD",
    ) -> Decimal:
        """Settled spend in ``currency`` (``[since, until)``, by model and tags), exact."""
        where, params = _filters(since=since, until=until, model=model, tags=tags)
        where += " AND currency = %s"
        params.append(currency)
        self.flush()

        def body(conn: Any) -> int:
            row = conn.execute(
                f"SELECT coalesce(sum(cost_nanos), 0) FROM calls WHERE status <> 'pending'{where}",
                params,
            ).fetchone()
            return int(row[0])

        return to_usd(self._read("read", body))

    def status(self, budget: Budget) -> list[WindowStatus]:
        """Each cap of ``budget`` now: spent, reserved, and when its window resets."""
        now = self.clock()
        totals: dict[str, tuple[int, int]] = {}
        if not self.read_only:
            self.expire_stale()
            if budget.windows:
                self._register(budget)
        if budget.windows:

            def body(conn: Any) -> dict[str, tuple[int, int]]:
                scope = _windows.scope_for(self._scopes(conn), budget)
                if scope is None:
                    return {}
                return self._read_totals(conn, scope, budget.windows, now)

            totals = self._read("read budget totals from", body)
        return _windows.window_status(budget, now, totals)

    def pending(self) -> list[dict[str, Any]]:
        """Reservations in flight, oldest first."""
        columns = (
            "call_id",
            "created_at",
            "model",
            "tags",
            "projected_nanos",
            "expires_at",
            "attempts",
        )
        return self._rows(
            f"SELECT {', '.join(columns)} FROM calls WHERE status = 'pending' ORDER BY created_at",
            (),
            columns,
        )

    def calls(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest calls, newest first, as dicts of the ``calls`` columns."""
        return self._rows(
            f"SELECT {', '.join(_CALL_COLUMNS)} FROM calls ORDER BY created_at DESC, id DESC "
            "LIMIT %s",
            (limit,),
            _CALL_COLUMNS,
        )

    def all_calls(self, batch: int = 5000) -> Iterable[dict[str, Any]]:
        """Every row of ``calls`` in ``id`` order, as SQLite shapes it (for ``ledger copy``)."""
        last = 0
        while True:
            rows = self._rows(
                f"SELECT {', '.join(_CALL_COLUMNS)} FROM calls WHERE id > %s ORDER BY id LIMIT %s",
                (last, batch),
                _CALL_COLUMNS,
            )
            if not rows:
                return
            yield from rows
            last = rows[-1]["id"]

    def recent_calls(self, **filters: Any) -> list[dict[str, Any]]:
        """The latest calls matching the filters (pending too), newest first, as ``calls()``
        shapes them (``kimi-budget calls`` reads them through here)."""
        limit = int(filters.pop("limit", 20))
        where, params = _filters(**filters)
        return self._rows(
            f"SELECT {', '.join(_CALL_COLUMNS)} FROM calls WHERE true{where} "
            "ORDER BY created_at DESC, id DESC LIMIT %s",
            (*params, limit),
            _CALL_COLUMNS,
        )

    def has_call(self, call_id: str) -> bool:
        """Whether a row of ``call_id`` exists (a reservation or a settled call)."""
        return self._read("read", lambda conn: _exists(conn, call_id))

    def _rows(
        self, sql: str, params: Sequence[Any], columns: Sequence[str]
    ) -> list[dict[str, Any]]:
        self.flush()
        rows = self._read("read", lambda conn: conn.execute(sql, params).fetchall())
        return [_sqlite_shaped(dict(zip(columns, row, strict=True))) for row in rows]

    # -- the report command ------------------------------------------------------------------

    def currencies(self) -> list[str]:
        """The currencies settled calls were billed in, USD first (``kimi-budget report``)."""
        def read(conn: Any) -> list[str]:
            others = [r[0] for r in conn.execute(OTHER_CURRENCIES_SQL).fetchall()]
            if not others:
                return ["USD"]  # no scan at all: the usual ledger
            # Stops at the first USD row: a full scan only in a ledger without one.
            has_usd = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM calls WHERE currency = 'USD' "
                "AND status <> 'pending')"
            ).fetchone()[0]
            return (["USD"] if has_usd else []) + sorted(others)

        found: list[str] = self._read("read", read)
        return found

    def tag_keys(self) -> list[str]:
        """Every tag key settled calls carry (``kimi-budget report --html``)."""
        rows = self._read(
            "read",
            lambda conn: conn.execute(
                "SELECT DISTINCT jsonb_object_keys(tags) FROM calls WHERE status <> 'pending'"
            ).fetchall(),
        )
        return sorted(r[0] for r in rows)

    def costliest_calls(self, **filters: Any) -> list[dict[str, Any]]:
        """The settled calls that cost the most, as ``calls()`` shapes them (``--html``)."""
        limit = int(filters.pop("limit", 10))
        currency = filters.pop("currency", None)
        where, params = _filters(**filters)
        if currency is not None:
            where += " AND currency = %s"
            params.append(currency)
        return self._rows(
            f"SELECT {', '.join(_CALL_COLUMNS)} FROM calls WHERE status <> 'pending'{where} "
            "ORDER BY cost_nanos DESC, created_at DESC LIMIT %s",
            (*params, limit),
            _CALL_COLUMNS,
        )

    def report(self, **filters: Any) -> Any:
        """``kimi-budget report``'s table (``cli._report.Report``), from the rows: PostgreSQL
        has no rollup table; a calendar window is one index range scan on ``created_at``."""
        from zoneinfo import ZoneInfo

        from ..cli import _report as rp

        by: str = filters.get("by", "model")
        tz: str = filters.get("tz", "UTC")
        currency: str | None = filters.get("currency")
        where, params = _filters(
            since=filters.get("since"),
            until=filters.get("until"),
            model=filters.get("model"),
            tags=filters.get("tags"),
            column="c.",
        )
        if currency is not None:
            where += " AND c.currency = %s"
            params.append(currency)
        settled = f"c.status <> 'pending'{where}"
        cached = "greatest(least(coalesce(c.cached_tokens, 0), coalesce(c.prompt_tokens, 0)), 0)"
        aggregate = (
            "count(c.id), coalesce(sum(c.cost_nanos), 0)::bigint, "
            f"coalesce(sum({cached}), 0)::bigint, "
            "coalesce(sum(coalesce(c.prompt_tokens, 0)), 0)::bigint, "
            "coalesce(sum(coalesce(c.completion_tokens, 0)), 0)::bigint, "
            f"coalesce(sum({cached} * (c.price_cache_miss - c.price_cache_hit)), 0)::bigint, "
            "count(c.id) FILTER (WHERE c.estimated)"
        )

        def query(conn: Any) -> tuple[list[Any], tuple[int, int]]:
            if by in rp.BUCKETS:
                first, last = conn.execute(
                    f"SELECT min(c.created_at), max(c.created_at) FROM calls c WHERE {settled}",
                    params,
                ).fetchone()
                buckets = (
                    []
                    if first is None
                    else rp._buckets(rp.BUCKETS[by], by, first, last, ZoneInfo(tz))
                )
                found = conn.execute(
                    f"SELECT b.label, {aggregate} FROM unnest(%s::text[], %s::timestamptz[], "
                    "%s::timestamptz[]) WITH ORDINALITY AS b (label, s, e, n) "
                    f"LEFT JOIN calls c ON c.created_at >= b.s AND c.created_at < b.e "
                    f"AND {settled} GROUP BY b.label, b.n ORDER BY b.n",
                    [
                        [b[0] for b in buckets],
                        [parse_utc(b[1]) for b in buckets],
                        [parse_utc(b[2]) for b in buckets],
                        *params,
                    ],
                ).fetchall()
            elif by == "model":
                found = conn.execute(
                    f"SELECT c.model, {aggregate} FROM calls c WHERE {settled} GROUP BY c.model",
                    params,
                ).fetchall()
            elif by.startswith("tag:") and len(by) > 4:
                found = conn.execute(
                    f"SELECT coalesce(c.tags ->> %s, '(none)'), {aggregate} FROM calls c "
                    f"WHERE {settled} GROUP BY 1",
                    [by[4:], *params],
                ).fetchall()
            elif by == "total":
                found = [
                    (
                        "total",
                        *conn.execute(
                            f"SELECT {aggregate} FROM calls c WHERE {settled}", params
                        ).fetchone(),
                    )
                ]
            else:
                raise ValueError(
                    f"--by must be day, week, month, model, tag:KEY or total, not {by!r}."
                )
            pending = conn.execute(
                "SELECT count(*), coalesce(sum(c.projected_nanos), 0)::bigint FROM calls c "
                f"WHERE c.status = 'pending'{where}",
                params,
            ).fetchone()
            # Fees ($web_search) and Batch API rows, shown on lines of their own.
            batch = "c.tags ->> 'api' = 'batch'"
            extra.extend(
                int(v)
                for v in conn.execute(
                    "SELECT coalesce(sum(c.fee_nanos), 0)::bigint, "
                    f"count(c.id) FILTER (WHERE {batch}), "
                    f"coalesce(sum(c.cost_nanos) FILTER (WHERE {batch}), 0)::bigint "
                    f"FROM calls c WHERE (c.fee_nanos <> 0 OR {batch}) AND {settled}",
                    params,
                ).fetchone()
            )
            return found, (int(pending[0]), int(pending[1]))

        extra: list[int] = []
        found, (pending_calls, pending_nanos) = self._read("read a report from", query)
        fee_nanos, batch_calls, batch_nanos = extra[-3:] if len(extra) >= 3 else (0, 0, 0)
        rows = [rp.ReportRow.from_sql(str(r[0]), r[1:]) for r in found]
        rows = [row for row in rows if row.calls]
        if by not in rp.BUCKETS:
            rows.sort(key=lambda row: (-row.cost_nanos, row.key))
        total = rp.ReportRow("total")
        for row in rows:
            total.add(row)
        return rp.Report(
            by=by,
            tz=tz,
            since=filters.get("since"),
            until=filters.get("until"),
            model=filters.get("model"),
            tags=dict(filters.get("tags") or {}),
            rows=rows,
            total=total,
            pending_calls=pending_calls,
            pending_nanos=pending_nanos,
            ledger=self.location,
            source="rows",
            fee_nanos=fee_nanos,
            batch_calls=batch_calls,
            batch_nanos=batch_nanos,
        )

    # -- life ------------------------------------------------------------------------------------

    def _background(self) -> _BackgroundWriter:
        with self._conn.lock:
            if self._writer is None or not self._writer.alive():
                self._writer = _BackgroundWriter(self)
            return self._writer

    def flush(self) -> None:
        """Wait until every settlement handed to the writer thread is written."""
        writer = self._writer
        if writer is not None:
            writer.flush()

    def close(self) -> None:
        """Write what is queued, then close the connection. Safe to call twice."""
        self.flush()
        self._conn.close()

    def __repr__(self) -> str:
        return f"Ledger({self.location!r})"


class _BackgroundWriter:
    """One daemon thread writing what an event loop's thread handed over, in order."""

    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = weakref.ref(ledger)
        self._queue: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="kimi-budget-ledger", daemon=True)
        self._pid = os.getpid()
        self._thread.start()
        _WRITERS.add(self)

    def alive(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def put(self, item: tuple[str, Any, Any]) -> None:
        self._queue.put(item)

    def flush(self) -> None:
        if self.alive():
            self._queue.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                ledger = self._ledger()
                if ledger is None:
                    continue
                kind, first, second = item
                if kind == "extend":
                    with contextlib.suppress(LedgerError):
                        ledger._extend_now(first, second)
                else:
                    ledger._settle_or_fallback(first)
            except Exception:  # pragma: no cover - never let the writer die silently
                log.exception("kimi-budget's ledger writer failed")
            finally:
                self._queue.task_done()


_WRITERS: weakref.WeakSet[_BackgroundWriter] = weakref.WeakSet()


def _flush_at_exit() -> None:
    for writer in list(_WRITERS):
        with contextlib.suppress(Exception):
            writer.flush()


atexit.register(_flush_at_exit)


# -- SQL helpers ---------------------------------------------------------------------------------


def _settlement_values(s: Settlement) -> tuple[Any, ...]:
    """A settlement's values in ``_SETTLE_SET``'s (and ``kb_settle``'s) order."""
    return (
        s.status,
        s.finished_at,
        s.prompt_tokens,
        s.cached_tokens,
        s.completion_tokens,
        s.cost_nanos,
        bool(s.estimated),
        s.attempts,
        s.request_id,
        s.latency_ms,
        s.error,
        s.note,
        s.fee_nanos,
        s.cache_write_tokens,
        s.usage_json,
    )


def _stale(cursor: Any) -> list[tuple[Reservation, int]]:
    return [(_reservation_from_row(row), row[11]) for row in cursor.fetchall()]


def _exists(conn: Any, call_id: str) -> bool:
    return conn.execute("SELECT 1 FROM calls WHERE call_id = %s", (call_id,)).fetchone() is not None


def _summed(rows: Iterable[_windows.TotalRow]) -> list[_windows.TotalRow]:
    """One row per total key, in the global lock order (ascending key)."""
    sums: dict[TotalKey, list[int]] = {}
    for scope_id, window, start, spent, reserved in rows:
        entry = sums.setdefault((scope_id, window, start), [0, 0])
        entry[0] += spent
        entry[1] += reserved
    return [(*key, v[0], v[1]) for key, v in sorted(sums.items())]


def _upsert_totals(conn: Any, rows: Iterable[_windows.TotalRow]) -> None:
    """Add to totals, locking (and creating) them in ascending key order in one statement."""
    summed = [r for r in _summed(rows) if r[3] or r[4]]
    if not summed:
        return
    conn.execute(
        'INSERT INTO window_totals (scope_id, "window", start, spent_nanos, reserved_nanos) '
        "VALUES "
        + ", ".join(["(%s, %s, %s, %s, %s)"] * len(summed))
        + ' ON CONFLICT (scope_id, "window", start) DO UPDATE SET '
        "spent_nanos = window_totals.spent_nanos + excluded.spent_nanos, "
        "reserved_nanos = window_totals.reserved_nanos + excluded.reserved_nanos",
        [part for row in summed for part in row],
    )


def _filters(
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
    column: str = "",
) -> tuple[str, list[Any]]:
    """A SQL ``AND ...`` clause (bound parameters only) for the common filters; ``column``
    prefixes the column names (a table alias such as ``"c."``)."""
    where = ""
    params: list[Any] = []
    clean = canonical_tags(tags or {})
    if clean:
        where += f" AND {column}tags @> %s::jsonb"
        params.append(tags_json(clean))
    if since is not None:
        where += f" AND {column}created_at >= %s"
        params.append(parse_utc(as_utc_text(since)))
    if until is not None:
        where += f" AND {column}created_at < %s"
        params.append(parse_utc(as_utc_text(until)))
    if model is not None:
        where += f" AND {column}model = %s"
        params.append(model)
    return where, params


def _reservation_from_row(row: Sequence[Any]) -> Reservation:
    return Reservation(
        call_id=row[0],
        created_at=row[1].astimezone(UTC),
        model=row[2],
        tags=dict(row[3]),
        stream=bool(row[4]),
        projected_nanos=int(row[5]),
        prompt_estimate=int(row[6]),
        price_cache_hit=int(row[7]),
        price_cache_miss=int(row[8]),
        price_output=int(row[9]),
        expires_at=row[10].astimezone(UTC),
        currency=row[12],
    )


def _sqlite_shaped(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if value is None:
            continue
        if key in _INSTANTS:
            row[key] = format_utc(value)
        elif key in _FLAGS:
            row[key] = int(value)
        elif key == "tags":
            row[key] = tags_json(value)
    return row


def _fallback_path(location: str) -> Path:
    """Where this machine keeps settlements the server could not take (one file per server)."""
    import platformdirs

    digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:16]
    directory = Path(platformdirs.user_data_dir("kimi-budget", appauthor=False))
    return directory / f"postgres-{digest}.fallback.jsonl"


def _settled_values(s: Settlement) -> tuple[Any, ...]:
    """A settlement's values in the order of ``_SETTLE_SET``."""
    return (
        s.status,
        s.finished_at,
        s.prompt_tokens,
        s.cached_tokens,
        s.completion_tokens,
        s.cost_nanos,
        bool(s.estimated),
        s.attempts,
        s.request_id,
        s.latency_ms,
        s.error,
        s.note,
        s.fee_nanos,
        s.cache_write_tokens,
        s.usage_json,
    )
