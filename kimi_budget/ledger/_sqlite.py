"""The SQLite backend: a ledger in one local file, shared by the processes of one machine.

A call moves through the ledger in two steps:

1. ``reserve``: ``BEGIN IMMEDIATE``; expire stale reservations; read the budget's window
   totals; refuse if the projected cost does not fit; insert a ``pending`` row and add its
   projected cost to the totals as reserved. Checking and reserving in one transaction is what
   keeps N processes from overshooting a cap together. On the call path (``reserve_call``),
   calls back to back take shares of an allotment instead (see ``_allotments``).
2. ``settle``: on the background writer (``_writer``), many per transaction: write the call's
   row in its final state (ok, error, abandoned, interrupted, cancelled) with the billed cost,
   move the amount from reserved to spent. Settling is idempotent by ``call_id``. Triggers
   keep the ``usage_rollup`` table that reports read.

File safety: the file is created 0600 in a 0700 directory, and a file that is not one of our
ledgers (another SQLite database, a symlink to one, a directory) is refused without a byte
written. Fork safety: a child never uses (or closes) its parent's connection; it opens its own.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite_utils

    from .._exceptions import BudgetExceededError

from .._budget import (
    WINDOWS,
    Budget,
    canonical_tags,
    format_utc,
    parse_utc,
    tags_json,
)
from .._money import to_usd
from . import _windows
from ._allotments import IDLE as IDLE_ALLOTMENT
from ._allotments import (
    Allotment,
    Allotments,
    is_allotment,
    journal_path,
    lost_journal_settlement,
    read_journal,
)
from ._allotments import size as allotment_size
from ._backend import (
    Clock,
    Ledger,
    budget_currency,
    default_ledger_path,
    expired_settlement,
    ledger_error,
    utcnow,
)
from ._fallback import FallbackFile
from ._records import LateSettlement, Reservation, Settlement, WindowStatus
from ._windows import Scope, as_utc_text
from ._writer import SettleWriter
from .migrations._sqlite import APPLICATION_ID, apply_migrations

__all__ = ["SQLiteLedger"]

logger = logging.getLogger("kimi_budget")

_SQLITE_MAGIC = b"SQLite format 3\x00"
_EXPIRY_PROBE_EVERY = timedelta(seconds=1)
# UPDATE ... RETURNING (SQLite 3.35+) settles a pending call without reading its row first.
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
# Window totals a batch of settlements moves: (scope_id, window, start) -> (spent, reserved).
_TotalSums = dict[tuple[int, str, str], tuple[int, int]]


@dataclass
class _Moves:
    """What the settlements of one transaction move, written once at its end.

    The scopes cannot change while the transaction holds the write lock; ``sums`` are the
    window totals' deltas (None: each settlement writes its own at once); ``taken`` is what
    shares take out of each allotment, whose row (windows, tags, currency) is read once.
    """

    scopes: list[Scope]
    sums: _TotalSums | None = None
    taken: dict[str, int] = field(default_factory=dict)
    allotments: dict[str, tuple[datetime, dict[str, str], str] | None] = field(default_factory=dict)


_UPDATE_CALL = (
    "UPDATE calls SET status = ?, finished_at = ?, prompt_tokens = ?, cached_tokens = ?, "
    "completion_tokens = ?, cost_nanos = ?, estimated = ?, attempts = ?, "
    "request_id = ?, latency_ms = ?, error = ?, note = ?, fee_nanos = ?, "
    "cache_write_tokens = ?, usage_json = ? "
    "WHERE call_id = ?"
)


# A reservation's columns, as ``reservations`` holds them and ``calls`` keeps them.
_HELD = (
    "call_id, created_at, model, tags, stream, currency, projected_nanos, prompt_estimate, "
    "price_cache_hit, price_cache_miss, price_output"
)


def _held(res: Reservation) -> tuple[Any, ...]:
    """A reservation as ``_HELD``'s columns."""
    return (
        res.call_id,
        format_utc(res.created_at),
        res.model,
        tags_json(res.tags),
        int(res.stream),
        res.currency,
        res.projected_nanos,
        res.prompt_estimate,
        res.price_cache_hit,
        res.price_cache_miss,
        res.price_output,
    )


def _outcome(s: Settlement) -> tuple[Any, ...]:
    """A settlement's columns, in ``_UPDATE_CALL``'s order."""
    return (
        s.status,
        format_utc(s.finished_at),
        s.prompt_tokens,
        s.cached_tokens,
        s.completion_tokens,
        s.cost_nanos,
        int(s.estimated),
        s.attempts,
        s.request_id,
        s.latency_ms,
        s.error,
        s.note,
        s.fee_nanos,
        s.cache_write_tokens,
        s.usage_json,
    )


class SQLiteLedger(Ledger):
    """A ledger in a SQLite file (WAL mode, created 0600, migrated on open)."""

    # When reserve() last looked for expired reservations (by the ledger's clock); see there.
    _expiry_probed_at: datetime | None = None

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        busy_timeout: float = 30.0,
        clock: Clock | None = None,
        read_only: bool = False,
        allotments: bool = True,
    ) -> None:
        """``allotments=False``: every call reserves in a transaction of its own (see
        ``_allotments``; slower, and a process never holds budget it is not using)."""
        self.path = Path(path).expanduser() if path is not None else default_ledger_path()
        self.read_only, self._read_only_why = read_only, "opened with read_only=True"
        if not read_only and self.path.exists() and not _writable(self.path):
            self.read_only = True
            self._read_only_why = "you may read this file but not write it"
            logger.info("kimi-budget opened %s read-only: %s", self.path, self._read_only_why)
        self.busy_timeout = busy_timeout
        self.location = str(self.path)
        self._file = os.path.realpath(self.path)  # the same file, however it was named
        self.clock: Clock = clock or utcnow
        self.fallback_path = self.path.with_name(self.path.name + ".fallback.jsonl")
        self._fallback = FallbackFile(self.fallback_path, self.location)
        self._lock = threading.RLock()
        self._registered: set[tuple[str, str, str, tuple[str, ...]]] = set()
        self._scope_cache: tuple[tuple[Any, ...], list[Scope]] = ((), [])
        self._pid = os.getpid()
        self._writer: int | None = None  # the thread inside a write transaction, if any
        self._deferred: list[Settlement] = []
        self._inherited: list[sqlite3.Connection] = []
        self._merging = False
        self._commits = self._checkpointed_at = 0
        self._checkpoints_apart = False
        self._ckpt_conn: sqlite3.Connection | None = None
        self._settler = SettleWriter(self._apply_batch, self._rescue, self._upkeep, idle_every=0.5)
        # Journals are named after the file itself: another process may name it otherwise.
        self._allotments = Allotments(Path(self._file), _journal_line) if allotments else None
        self._after_commit: list[Path] = []  # journals of allotments expired in this transaction
        self._allotment_idle = IDLE_ALLOTMENT  # seconds unused before the writer gives one back
        self._conn = self._open()
        self._db: sqlite_utils.Database | None = None
        self._columns = {row[1] for row in self._conn.execute("PRAGMA table_info(calls)")}
        self._split = bool(
            self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reservations'"
            ).fetchone()
        )
        _OPEN_LEDGERS.add(self)
        if not self.read_only:
            # Reservations of processes that died are settled as soon as anyone opens the
            # ledger (and the fallback file merged, by the write).
            self.expire_stale()

    # -- opening -----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        path = self.path
        self._refuse_foreign_file(path)
        if self.read_only:
            return self._open_read_only()
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.close(fd)
            except FileExistsError:
                pass  # another process created it first; it is checked below like any file
            except OSError as exc:
                raise ledger_error(
                    f"Cannot create the ledger {path}: {exc.strerror or exc}. Choose a writable "
                    f"path with ledger= or KIMI_BUDGET_LEDGER.",
                    path=str(path),
                ) from None
        try:
            self._check_ours(path)
            conn = sqlite3.connect(
                path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            apply_migrations(conn)
        except sqlite3.DatabaseError as exc:
            raise ledger_error(self._explain(exc, "open"), path=str(path)) from None
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """Open without creating, migrating or writing anything (not even the WAL index)."""
        path = self.path
        if not path.exists():
            raise ledger_error(
                f"There is no ledger at {path} to read; nothing has been recorded there yet.",
                path=str(path),
            )
        uri = path.resolve().as_uri()
        try:
            self._check_ours(path)
            try:
                conn = sqlite3.connect(
                    f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                # A WAL ledger in a folder we may not write has no -shm we could create: read
                # the file as it stands (its writers are not running: we could not see them).
                conn = sqlite3.connect(
                    f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False
                )
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            raise ledger_error(self._explain(exc, "read"), path=str(path)) from None
        if "calls" not in tables:
            conn.close()
            raise ledger_error(
                f"{path} has no calls yet (an empty ledger); nothing to read.", path=str(path)
            )
        return conn

    def _refuse_foreign_file(self, path: Path) -> None:
        if path.is_symlink():
            target = path.resolve()
            if not (target.is_file() and _is_ledger(target)):
                raise ledger_error(
                    f"The ledger path {path} is a symbolic link to {target}, which is not a "
                    f"kimi-budget ledger; refusing to write through it. Point ledger= at a "
                    f"regular file.",
                    path=str(path),
                )
        if path.exists():
            if path.is_dir():
                raise ledger_error(
                    f"The ledger path {path} is a directory; give a file path such as "
                    f"{path / 'ledger.db'}.",
                    path=str(path),
                )
            if not stat.S_ISREG(path.stat().st_mode):
                raise ledger_error(f"The ledger path {path} is not a regular file.", path=str(path))

    def _check_ours(self, path: Path) -> None:
        """Refuse, without writing a byte, any non-empty file that is not one of our ledgers."""
        if path.stat().st_size == 0 or _header_is_ours(path):
            return
        with open(path, "rb") as f:
            magic = f.read(len(_SQLITE_MAGIC))
        if magic != _SQLITE_MAGIC:
            raise sqlite3.DatabaseError("file is not a database")
        app_id, tables = _probe(path)
        # An empty SQLite database (no tables yet) may be adopted; anything else is not ours.
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise ledger_error(
                f"{self.path} is a SQLite database but not a kimi-budget ledger; kimi-budget "
                f"will not write to it. Choose another path with ledger= or KIMI_BUDGET_LEDGER.",
                path=str(self.path),
            )

    def _explain(self, exc: BaseException, doing: str) -> str:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return (
                f"{self.path} is not a readable kimi-budget ledger ({text}). Move it aside and "
                f"let kimi-budget create a new one, or point ledger= at another file."
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return (
                f"Cannot {doing} the ledger {self.path}: the file or its directory is not "
                f"writable ({text}). Fix the permissions or choose another path."
            )
        if "locked" in text or "busy" in text:
            return (
                f"Cannot {doing} the ledger {self.path}: it stayed locked by another process "
                f"for more than {self.busy_timeout:g} s. Retry, or raise busy_timeout."
            )
        if "disk" in text or "full" in text:
            return f"Cannot {doing} the ledger {self.path}: the disk is full ({text})."
        return f"Cannot {doing} the ledger {self.path}: {text}."

    @property
    def conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # A forked child must not use its parent's SQLite connection, nor close it (that
            # would touch the parent's locks): keep it, unused, and open our own.
            self._pid = os.getpid()
            self._inherited.append(self._conn)
            self._conn = self._open()
            self._db = None
        return self._conn

    def _after_fork(self) -> None:
        # A lock held by another thread at fork() would never be released in the child; the
        # parent's writer thread and its queue stay the parent's.
        self._lock = threading.RLock()
        self._writer = None
        self._deferred = []
        self._settler.after_fork()
        if self._allotments is not None:
            self._allotments.after_fork()
        self._after_commit = []
        self._ckpt_conn = None
        self._checkpoints_apart = False

    @property
    def db(self) -> sqlite_utils.Database:
        """The ledger as a ``sqlite_utils.Database`` on the same connection.

        Made on first use: importing sqlite-utils costs ~30 ms that guarded calls never need.
        """
        conn = self.conn
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(conn)
        return self._db

    def close(self) -> None:
        """Write what is queued, then close (safe to call twice)."""
        if self._pid == os.getpid():
            self._settler.close()
            with contextlib.suppress(Exception):
                self._give_back(idle=None)
        with self._lock:
            if self._ckpt_conn is not None:
                self._ckpt_conn.close()
                self._ckpt_conn = None
            self._conn.close()

    def _refuse_if_read_only(self, doing: str) -> None:
        if self.read_only:
            raise ledger_error(
                f"Cannot {doing} the ledger {self.path}: it is open read-only "
                f"({self._read_only_why}); record calls in a ledger you may write.",
                path=str(self.path),
            )

    @contextlib.contextmanager
    def _write(self, doing: str, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, after merging a waiting fallback file (any writer does).

        ``wait=False``: raise ``_WouldWait`` (having done nothing) instead of waiting for a
        lock, this process's or another's, or doing the slow work of a merge.
        """
        self._refuse_if_read_only(doing)
        if not self._merging and self._fallback.pending():
            if not wait:
                raise _WouldWait
            self._merge_fallback()
        with self._transaction(doing, wait=wait) as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, doing: str, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; SQLite errors become ``LedgerError``."""
        if not self._lock.acquire(blocking=wait):
            raise _WouldWait
        try:
            conn = self.conn
            try:
                if wait:
                    conn.execute("BEGIN IMMEDIATE")
                else:
                    self._begin_now(conn)
            except sqlite3.Error as exc:
                raise ledger_error(self._explain(exc, doing), path=str(self.path)) from None
            self._writer = threading.get_ident()
            try:
                yield conn
                conn.execute("COMMIT")
                self._commits += 1
                for journal in self._after_commit:
                    with contextlib.suppress(OSError):
                        journal.unlink()
            except sqlite3.Error as exc:
                _rollback(conn)
                raise ledger_error(self._explain(exc, doing), path=str(self.path)) from None
            except BaseException:
                _rollback(conn)
                raise
            finally:
                self._writer = None
                self._after_commit = []
        finally:
            self._lock.release()
        self._settle_deferred()

    def _begin_now(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE`` if the write lock is free this instant, else ``_WouldWait``."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _WouldWait from None
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    # -- the call lifecycle ----------------------------------------------------------------

    def reserve(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> None:
        """Check every applicable cap and reserve the projected cost, atomically.

        One short transaction on a few hot pages: the window totals it reads and moves, and
        a narrow row in the table of reservations in flight. Raises ``BudgetExceededError``
        (and reserves nothing) if any cap would be exceeded.
        """
        applicable = _windows.applicable(budgets, reservation)
        _windows.check_per_call(reservation, applicable)
        self._reserve_or_refuse(reservation, applicable)

    def reserve_call(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> Reservation:
        """``reserve()`` for a call about to be sent: a share of an allotment this process
        holds if one fits (no transaction), else a transaction that may reserve a new
        allotment beside the call (see ``_allotments``)."""
        applicable = _windows.applicable(budgets, reservation)
        _windows.check_per_call(reservation, applicable)
        share, allot = self._take_share(reservation, applicable)
        if share is not None:
            return share
        self._reserve_or_refuse(reservation, applicable, allot=allot)
        return reservation

    def _take_share(
        self, reservation: Reservation, applicable: Sequence[Budget]
    ) -> tuple[Reservation | None, bool]:
        """A share of an allotment this process holds, if one fits; else None, and whether
        the call's own transaction should reserve an allotment beside it."""
        if self._allotments is None:
            return None, False
        share = self._allotments.take(reservation, applicable, self._scope_cache[1])
        if share is not None:
            return share, False
        return None, self._allotments.wanted(reservation, applicable)

    def _reserve_or_refuse(
        self, reservation: Reservation, applicable: Sequence[Budget], *, allot: bool = False
    ) -> None:
        refusal = self._reserve(reservation, applicable, allot=allot)
        if refusal is not None and self._settles_here():
            # Settlements this process queued (through any Ledger object on this file) hold
            # their full reservations until written, and its allotments hold room it may not
            # use: write them all, give back what is unused, then look again (both may only
            # ever make a check stricter). Only a refusal pays for this, never the call path.
            self.flush()
            refusal = self._reserve(reservation, applicable, allot=allot)
        if refusal is not None:
            raise refusal

    def try_reserve(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> bool:
        """``reserve()`` if it can be done this instant, without waiting for any lock.

        False (nothing reserved) when it would have to wait: another process writing, this
        process's settle writer mid-batch, a fallback file to merge, a refusal that a flush
        might lift. The async client calls this on its event loop and, on False, ``reserve``
        in a worker thread, so the loop never waits on the ledger.
        """
        return self._try_reserve(reservation, budgets) is not None

    def try_reserve_call(
        self, reservation: Reservation, budgets: Sequence[Budget] = ()
    ) -> Reservation | None:
        """``reserve_call()`` if it can be done this instant (see ``try_reserve``): the
        reservation as recorded, or None (nothing reserved)."""
        return self._try_reserve(reservation, budgets, allot=True)

    def _try_reserve(
        self, reservation: Reservation, budgets: Sequence[Budget], *, allot: bool = False
    ) -> Reservation | None:
        applicable = _windows.applicable(budgets, reservation)
        _windows.check_per_call(reservation, applicable)
        if allot:
            share, allot = self._take_share(reservation, applicable)
            if share is not None:
                return share
        try:
            refusal = self._reserve(reservation, applicable, wait=False, allot=allot)
        except _WouldWait:
            return None
        if refusal is not None:
            if self._settles_here():
                return None  # reserve() flushes and looks again, off the loop
            raise refusal
        return reservation

    def _reserve(
        self,
        reservation: Reservation,
        applicable: Sequence[Budget],
        *,
        wait: bool = True,
        allot: bool = False,
    ) -> BudgetExceededError | None:
        """Reserve ``reservation`` in one transaction, and beside it (``allot``) an allotment
        for the calls that follow, if there is room for one."""
        tags = reservation.tags
        allotment: Allotment | None = None
        try:
            with self._write("reserve budget in", wait=wait) as conn:
                now = self.clock()
                # Expired reservations (of dead processes) are looked for at most about once a
                # second: one left a moment longer only keeps its budget reserved a moment
                # longer.
                last = self._expiry_probed_at
                if last is None or not timedelta(0) <= now - last < _EXPIRY_PROBE_EVERY:
                    self._expire_stale(conn, now)
                    self._expiry_probed_at = now
                for budget in applicable:
                    if budget.windows:
                        self._register(conn, budget, now)
                scopes = self._scopes(conn)
                refusal, room = self._refusal(conn, scopes, applicable, reservation)
                if refusal is None:
                    reserved = reservation.projected_nanos
                    self._insert_pending(conn, reservation, tags)
                    if allot and self._allotments is not None:
                        allotment = self._start_allotment(
                            conn, scopes, reservation, applicable, room
                        )
                        if allotment is not None:
                            reserved += allotment.rest
                    self._add_totals(
                        conn,
                        scopes,
                        tags,
                        reservation.created_at,
                        spent=0,
                        reserved=reserved,
                        currency=reservation.currency,
                    )
        except BaseException:
            if allotment is not None and self._allotments is not None:
                self._allotments.discard(allotment)
            raise
        if allotment is not None and self._allotments is not None:
            self._allotments.add(allotment, applicable)
        # Returned (and raised) after the commit, so that the expiries done on the way stay.
        return refusal

    def _start_allotment(
        self,
        conn: sqlite3.Connection,
        scopes: Sequence[Scope],
        reservation: Reservation,
        applicable: Sequence[Budget],
        room: int | None,
    ) -> Allotment | None:
        """An allotment beside ``reservation``, its row inserted (its totals are the
        caller's to add), if there is room for at least one more such call."""
        assert self._allotments is not None
        amount = allotment_size(reservation.projected_nanos, room)
        if not amount:
            return None
        valid_until = _windows.first_window_end(
            scopes, reservation.tags, reservation.currency, reservation.created_at
        )
        allotment = self._allotments.start(reservation, applicable, scopes, amount, valid_until)
        if allotment is not None:
            self._insert_pending(conn, allotment.reservation, reservation.tags)
        return allotment

    def _refusal(
        self,
        conn: sqlite3.Connection,
        scopes: Sequence[Scope],
        budgets: Sequence[Budget],
        reservation: Reservation,
    ) -> tuple[BudgetExceededError | None, int | None]:
        """The first window cap the reservation would exceed, narrowest window first; else
        None and the room the tightest cap has left after it (None: no window cap)."""
        room: int | None = None
        for budget in budgets:
            if not budget.windows:
                continue  # a per_call-only budget keeps no totals (and has no scope row)
            scope = _windows.scope_for(scopes, budget)
            assert scope is not None  # registered in this transaction
            totals = self._read_totals(conn, scope, budget.windows, reservation.created_at)
            refused = _windows.refusal(budget, reservation, totals)
            if refused is not None:
                return refused, None
            left = _windows.room(budget, reservation, totals)
            room = left if room is None else min(room, left)
        return None, room

    def _insert_pending(
        self, conn: sqlite3.Connection, reservation: Reservation, tags: Mapping[str, str]
    ) -> None:
        conn.execute(
            "INSERT INTO reservations (call_id, created_at, expires_at, model, tags, stream, "
            "currency, projected_nanos, prompt_estimate, price_cache_hit, price_cache_miss, "
            "price_output) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                reservation.call_id,
                format_utc(reservation.created_at),
                format_utc(reservation.expires_at),
                reservation.model,
                tags_json(tags),
                int(reservation.stream),
                reservation.currency,
                reservation.projected_nanos,
                reservation.prompt_estimate,
                reservation.price_cache_hit,
                reservation.price_cache_miss,
                reservation.price_output,
            ),
        )

    def extend(self, call_id: str, expires_at: datetime) -> None:
        """Push a live reservation's expiry out (a call that is retrying is not dead)."""
        with self._write("extend a reservation in") as conn:
            conn.execute(
                # An allotment holds shares of several calls: one may only push it out.
                "UPDATE reservations SET expires_at = ? WHERE call_id = ?"
                + (" AND expires_at < ?" if is_allotment(call_id) else ""),
                (format_utc(expires_at), call_id)
                + ((format_utc(expires_at),) if is_allotment(call_id) else ()),
            )

    def settle(self, settlement: Settlement) -> bool:
        """Record how a call ended, now. False if it was already settled (idempotent)."""
        if self._writer == threading.get_ident():
            # Called from inside one of our own transactions on this thread: a stream's
            # finalizer run by the garbage collector. It is written right after the commit.
            self._deferred.append(settlement)
            return True
        self.flush()  # in order with what this process queued before
        with self._write("record a call in") as conn:
            done = self._settle(conn, settlement)
        if self._allotments is not None:
            self._allotments.settled([settlement.reservation.allotment_id])
        return done

    def settle_later(self, settlement: Settlement | LateSettlement) -> None:
        """Queue how a call ended for the background writer; returns at once.

        The reservation keeps holding the call's full projected cost until the writer
        applies this; if it cannot, the settlement goes to the fallback file.
        """
        self._refuse_if_read_only("record a call in")
        if not self._checkpoints_apart:
            # From now on the writer checkpoints between batches; no caller's commit does.
            self._checkpoints_apart = True
            with self._lock:
                self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._settler.submit(settlement)

    def _settles_here(self) -> bool:
        """Whether this process ever queued a settlement for this file, or holds an allotment
        of it (through any ``Ledger`` object on it)."""
        return any(
            ledger._settler.submitted or (ledger._allotments and ledger._allotments.held)
            for ledger in list(_OPEN_LEDGERS)
            if ledger._file == self._file
        )

    def flush(self) -> None:
        """Write the settlements this process queued for this file, through any of its
        ``Ledger`` objects, and give back its allotments' unused room (reads and close() do
        it first)."""
        for ledger in list(_OPEN_LEDGERS):
            if ledger._file != self._file:
                continue
            # The file first: ``queued`` takes the writer's lock, of every ledger open.
            if ledger._settler.queued:
                ledger._settler.flush()
            if ledger._allotments is not None and ledger._allotments.held:
                ledger._give_back(idle=None)

    def _give_back(self, *, idle: float | None) -> None:
        """Release the unused room of this object's allotments that are closed or unused for
        ``idle`` seconds (None: all), and remove those with no share in flight."""
        if self._allotments is None or self._pid != os.getpid() or self._fallback.pending():
            # (Settlements of shares may wait in the fallback file: the shares stay held by
            # their allotment until a write merges them.)
            return
        allotments = self._allotments.to_give_back(idle=idle)
        if not allotments:
            return
        from .._exceptions import LedgerError  # an allotment exists: a call was made

        gone: list[Allotment] = []
        try:
            with self._write("give back allotments in") as conn:
                scopes = self._scopes(conn)
                for allotment in allotments:
                    if self._release_allotment(conn, scopes, allotment):
                        gone.append(allotment)
        except LedgerError as exc:
            # They stay held, closed, and are given back later (or expire: their journals
            # then say which calls were in flight).
            logger.info("kimi-budget could not give back allotments yet: %s", exc)
            return
        for allotment in gone:
            self._allotments.given_back(allotment)

    def _release_allotment(
        self, conn: sqlite3.Connection, scopes: Sequence[Scope], allotment: Allotment
    ) -> bool:
        """Release what ``allotment`` has not handed out; remove its row if no share of it is
        in flight. True when the row is gone."""
        res = allotment.reservation
        release, allotment.rest = allotment.rest, 0
        if allotment.in_flight <= 0:
            self._release_from_allotment_row(conn, scopes, res, None)
            return True
        if release:
            self._release_from_allotment_row(conn, scopes, res, release)
        return False

    def _release_from_allotment_row(
        self,
        conn: sqlite3.Connection,
        scopes: Sequence[Scope],
        res: Reservation,
        amount: int | None,
    ) -> None:
        """Release ``amount`` of what an allotment's row holds; None: all of it, and the row
        goes. (An allotment that outlived its expiry was settled by whoever expired it.)"""
        if amount is None:
            row = conn.execute(
                "SELECT projected_nanos FROM reservations WHERE call_id = ?", (res.call_id,)
            ).fetchone()
            if row is None:
                return
            conn.execute("DELETE FROM reservations WHERE call_id = ?", (res.call_id,))
            amount = int(row[0])
        elif not conn.execute(
            "UPDATE reservations SET projected_nanos = projected_nanos - ? WHERE call_id = ?",
            (amount, res.call_id),
        ).rowcount:
            return
        if amount:
            self._add_totals(
                conn,
                scopes,
                res.tags,
                res.created_at,
                spent=0,
                reserved=-amount,
                currency=res.currency,
            )

    def _apply_batch(self, batch: Sequence[Settlement]) -> None:
        # The window totals the batch moves are summed, and each is written once.
        with self._write("record calls in") as conn:
            moves = _Moves(self._scopes(conn), sums={})
            for settlement in batch:
                self._settle(conn, settlement, moves)
            self._apply_moves(conn, moves)
        if self._allotments is not None:
            self._allotments.settled([s.reservation.allotment_id for s in batch])

    def _rescue(self, batch: Sequence[Settlement], exc: BaseException) -> None:
        for settlement in batch:
            self.write_fallback(settlement, exc)
        if self._allotments is not None:
            self._allotments.settled([s.reservation.allotment_id for s in batch])

    def _upkeep(self) -> None:
        """On the writer's thread, between batches: checkpoint the WAL, off every caller's
        commit (a PASSIVE checkpoint on its own connection: it takes no write lock)."""
        if self._pid != os.getpid():
            return
        with contextlib.suppress(Exception):
            self._give_back(idle=self._allotment_idle)  # closed, or unused for a while
        if self._commits == self._checkpointed_at:
            return
        self._checkpointed_at = self._commits
        if self._ckpt_conn is None:
            self._ckpt_conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
        with contextlib.suppress(sqlite3.Error):
            self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _settle_deferred(self) -> None:
        if not self._deferred:
            return
        from .._exceptions import LedgerError  # a call is under way: openai is loaded

        while self._deferred:
            settlement = self._deferred.pop(0)
            try:
                self.settle(settlement)
            except LedgerError as exc:
                self.write_fallback(settlement, exc)
                if self._allotments is not None:  # kept in the fallback file: ended here
                    self._allotments.settled([settlement.reservation.allotment_id])

    def _settle(self, conn: sqlite3.Connection, s: Settlement, moves: _Moves | None = None) -> bool:
        """Record ``s`` in this transaction. A batch passes its ``moves`` (what its
        settlements move is summed there and written once); alone, they are written now."""
        if moves is None:
            alone = _Moves(self._scopes(conn))
            done = self._settle(conn, s, alone)
            self._apply_moves(conn, alone)
            return done
        res = s.reservation
        scopes = moves.scopes
        if res.allotment_id is not None:
            held = []  # a share of an allotment has no row of its own
        elif _HAS_RETURNING:
            held = conn.execute(
                f"DELETE FROM reservations WHERE call_id = ? RETURNING {_HELD}", (res.call_id,)
            ).fetchall()
        else:  # pragma: no cover - SQLite before 3.35
            held = conn.execute(
                f"SELECT {_HELD} FROM reservations WHERE call_id = ?", (res.call_id,)
            ).fetchall()
            conn.execute("DELETE FROM reservations WHERE call_id = ?", (res.call_id,))
        if held:
            # The reservation as it was recorded (its prices, projection, time and tags) is
            # what the row keeps and what the totals move back.
            stored = held[0]
            self._insert_call(conn, s, stored)
            created_at, tags, currency = parse_utc(stored[1]), json.loads(stored[3]), stored[5]
            spent_delta, reserved_delta = s.cost_nanos, -stored[6]
        else:
            created_at, tags, currency = res.created_at, res.tags, res.currency
            row = conn.execute(
                "SELECT status, cost_nanos FROM calls WHERE call_id = ?", (res.call_id,)
            ).fetchone()
            if row is None:
                # A share of an allotment, or a fallback line whose reservation never reached
                # this file.
                spent_delta, reserved_delta = s.cost_nanos, 0
                self._insert_call(conn, s, _held(res))
                if res.allotment_id is not None:
                    self._take_from_allotment(conn, res, moves)
            elif row[0] == "expired" and s.status != "expired":
                # The call outlived its reservation; its real outcome replaces the estimate.
                spent_delta, reserved_delta = s.cost_nanos - row[1], 0
                conn.execute(_UPDATE_CALL, (*_outcome(s), res.call_id))
            else:
                return False
        self._add_totals(
            conn,
            scopes,
            tags,
            created_at,
            spent=spent_delta,
            reserved=reserved_delta,
            currency=currency,
            sums=moves.sums,
        )
        return True

    def _take_from_allotment(
        self, conn: sqlite3.Connection, share: Reservation, moves: _Moves
    ) -> None:
        """Move a settled share out of its allotment (if it is still there: an allotment
        given back or expired released its shares already), in the allotment's windows."""
        allotment_id = share.allotment_id
        assert allotment_id is not None
        if allotment_id not in moves.allotments:
            found = conn.execute(
                "SELECT created_at, tags, currency FROM reservations WHERE call_id = ?",
                (allotment_id,),
            ).fetchone()
            moves.allotments[allotment_id] = (
                None if found is None else (parse_utc(found[0]), json.loads(found[1]), found[2])
            )
        if moves.allotments[allotment_id] is not None:
            moves.taken[allotment_id] = moves.taken.get(allotment_id, 0) + share.projected_nanos

    def _apply_moves(self, conn: sqlite3.Connection, moves: _Moves) -> None:
        """Write what a transaction's settlements took out of allotments, and their totals
        (what shares take out of an allotment leaves its own windows' reserved totals)."""
        for allotment_id, taken in moves.taken.items():
            conn.execute(
                "UPDATE reservations SET projected_nanos = projected_nanos - ? WHERE call_id = ?",
                (taken, allotment_id),
            )
            found = moves.allotments[allotment_id]
            assert found is not None
            created_at, tags, currency = found
            self._add_totals(
                conn,
                moves.scopes,
                tags,
                created_at,
                spent=0,
                reserved=-taken,
                currency=currency,
                sums=moves.sums,
            )
        if moves.sums:
            _upsert_totals(
                conn, [(*key, spent, reserved) for key, (spent, reserved) in moves.sums.items()]
            )

    def _insert_call(self, conn: sqlite3.Connection, s: Settlement, held: Sequence[Any]) -> None:
        """The settled row: the reservation's columns (``_HELD``'s order), then the outcome."""
        conn.execute(
            f"INSERT INTO calls ({_HELD}, status, finished_at, prompt_tokens, cached_tokens, "
            "completion_tokens, cost_nanos, estimated, attempts, request_id, latency_ms, error, "
            "note, fee_nanos, cache_write_tokens, usage_json) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*held, *_outcome(s)),
        )

    def expire_stale(self) -> int:
        """Settle reservations past their expiry at their full cost; returns how many."""
        with self._write("expire reservations in") as conn:
            return self._expire_stale(conn, self.clock())

    def _expire_stale(self, conn: sqlite3.Connection, now: datetime) -> int:
        stale = conn.execute(
            "SELECT call_id, created_at, model, tags, stream, projected_nanos, prompt_estimate, "
            "price_cache_hit, price_cache_miss, price_output, expires_at, attempts, currency "
            "FROM reservations WHERE expires_at < ?",
            (format_utc(now),),
        ).fetchall()
        for row in stale:
            res = _reservation_from_row(row)
            if is_allotment(res.call_id):
                self._expire_allotment(conn, res, now)
            else:
                self._settle(conn, expired_settlement(res, row[11], now))
        return len(stale)

    def _expire_allotment(
        self, conn: sqlite3.Connection, allotment: Reservation, now: datetime
    ) -> None:
        """An allotment its process never gave back: each call its journal lists that never
        settled is charged its full reservation; the rest is released. Without a journal to
        trust, the whole rest is charged, as one estimated row."""
        journal = journal_path(Path(self._file), allotment.call_id)
        shares = read_journal(journal)
        if shares is None:
            self._settle(conn, lost_journal_settlement(allotment, now))
        else:
            for line in shares:
                self._settle(conn, expired_settlement(_share_from_journal(line, allotment), 1, now))
            self._release_from_allotment_row(conn, self._scopes(conn), allotment, None)
        self._after_commit.append(journal)

    # -- window totals -----------------------------------------------------------------

    def _scopes(self, conn: sqlite3.Connection) -> list[Scope]:
        try:
            rows = tuple(conn.execute("SELECT id, scope, tz, windows, currency FROM budget_scopes"))
        except sqlite3.OperationalError:  # a ledger read before m004: USD budgets only
            rows = tuple(conn.execute("SELECT id, scope, tz, windows, 'USD' FROM budget_scopes"))
        cached_rows, scopes = self._scope_cache
        if rows != cached_rows:
            scopes = [Scope.from_row(*r) for r in rows]
            self._scope_cache = (rows, scopes)
        return scopes

    def _register(self, conn: sqlite3.Connection, budget: Budget, now: datetime) -> None:
        """Make sure writes keep totals for this budget's scope, time zone and windows."""
        currency = budget_currency(budget)
        key = (budget.scope_key, budget.tz_name, currency, budget.windows)
        if key in self._registered:
            return
        row = conn.execute(
            "SELECT id, windows FROM budget_scopes WHERE scope = ? AND tz = ? AND currency = ?",
            (budget.scope_key, budget.tz_name, currency),
        ).fetchone()
        if row is None:
            scope_id = conn.execute(
                "INSERT INTO budget_scopes (scope, tz, windows, currency) VALUES (?, ?, ?, ?)",
                (budget.scope_key, budget.tz_name, json.dumps(list(budget.windows)), currency),
            ).lastrowid
            have: set[str] = set()
        else:
            scope_id, have = row[0], set(json.loads(row[1]))
        missing = [w for w in budget.windows if w not in have]
        if missing:
            for window in missing:
                self._backfill(conn, int(scope_id or 0), budget, window, now)
            windows = [w for w in WINDOWS if w in have or w in missing]
            conn.execute(
                "UPDATE budget_scopes SET windows = ? WHERE id = ?", (json.dumps(windows), scope_id)
            )
        self._registered.add(key)

    def _backfill(
        self, conn: sqlite3.Connection, scope_id: int, budget: Budget, window: str, now: datetime
    ) -> None:
        """Total the current window from the rows once; writes keep it current from then on."""
        spent, reserved = self._sum_window(conn, budget, window, now)
        bounds = _windows.backfill_range(window, now, budget)
        conn.execute(
            "INSERT OR REPLACE INTO window_totals (scope_id, window, start, spent_nanos, "
            "reserved_nanos) VALUES (?, ?, ?, ?, ?)",
            (scope_id, window, "" if bounds is None else bounds[0], spent, reserved),
        )

    def _sum_window(
        self, conn: sqlite3.Connection, budget: Budget, window: str, now: datetime
    ) -> tuple[int, int]:
        """``(spent, reserved)`` of ``budget``'s current ``window``, summed from the rows."""
        where, params = _tag_filter(budget.scope)
        currency = budget_currency(budget)
        if "currency" in self._columns:
            where += " AND currency = ?"
            params.append(currency)
        elif currency != "USD":
            return 0, 0  # a ledger written before currencies holds USD only
        bounds = _windows.backfill_range(window, now, budget)
        if bounds is not None:
            where += " AND created_at >= ? AND created_at < ?"
            params += bounds
        spent = conn.execute(
            f"SELECT coalesce(sum(cost_nanos), 0) FROM calls WHERE status != 'pending'{where}",
            params,
        ).fetchone()[0]
        reserved = conn.execute(
            f"SELECT coalesce(sum(projected_nanos), 0) FROM {self.pending_table} "
            f"WHERE 1 = 1{where}",
            params,
        ).fetchone()[0]
        return int(spent), int(reserved)

    def _read_totals(
        self, conn: sqlite3.Connection, scope: Scope, windows: Sequence[str], instant: datetime
    ) -> dict[str, tuple[int, int]]:
        """``(spent, reserved)`` of each window holding ``instant``, in one indexed query."""
        keys = scope.keys(windows, instant)
        params: list[Any] = [scope.id]
        for key in keys:
            params += key
        # OR of equalities, not a row-value IN: SQLite answers it with one primary-key search
        # per window instead of scanning every window start the scope ever had.
        rows = conn.execute(
            "SELECT window, start, spent_nanos, reserved_nanos FROM window_totals "
            "WHERE scope_id = ? AND ("
            + " OR ".join(["(window = ? AND start = ?)"] * len(keys))
            + ")",
            params,
        ).fetchall()
        found = {(row[0], row[1]): (row[2], row[3]) for row in rows}
        return {window: found.get((window, key), (0, 0)) for window, key in keys}

    def _add_totals(
        self,
        conn: sqlite3.Connection,
        scopes: Sequence[Scope],
        tags: Mapping[str, str],
        instant: datetime,
        *,
        spent: int,
        reserved: int,
        currency: str,
        sums: _TotalSums | None = None,
    ) -> None:
        rows = _windows.total_rows(
            scopes, tags, instant, spent=spent, reserved=reserved, currency=currency
        )
        if sums is None:
            _upsert_totals(conn, rows)
            return
        for scope_id, window, start, spent_delta, reserved_delta in rows:
            had = sums.get((scope_id, window, start), (0, 0))
            sums[scope_id, window, start] = (had[0] + spent_delta, had[1] + reserved_delta)

    # -- fallback --------------------------------------------------------------------------

    def write_fallback(self, settlement: Settlement, reason: BaseException) -> None:
        self._fallback.append(settlement, reason)

    def _merge_fallback(self) -> int:
        self._merging = True
        try:
            return self._fallback.merge(self._settle_all)
        finally:
            self._merging = False

    def _settle_all(self, settlements: Sequence[Settlement]) -> int:
        with self._transaction("merge the fallback file into") as conn:
            return sum(int(self._settle(conn, settlement)) for settlement in settlements)

    # -- reading -----------------------------------------------------------------------

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
        where, params = self.filters(since=since, until=until, model=model, tags=tags)
        if "currency" in self._columns:
            where += " AND currency = ?"
            params.append(currency)
        elif currency != "USD":
            return Decimal(0)  # a ledger written before currencies holds USD only
        self.flush()  # this process's own calls count
        with self._lock:
            total = self.conn.execute(
                f"SELECT coalesce(sum(cost_nanos), 0) FROM calls WHERE status != 'pending'{where}",
                params,
            ).fetchone()[0]
        return to_usd(int(total))

    @staticmethod
    def filters(
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        use_indexes: bool = True,
    ) -> tuple[str, list[Any]]:
        """A SQL ``AND ...`` clause (bound parameters only) for the common filters.

        ``use_indexes=False`` keeps SQLite off the ``created_at`` index (a unary ``+``), for
        queries that a smaller index serves better, such as the few pending rows.
        """
        column = "" if use_indexes else "+"
        where, params = _tag_filter(canonical_tags(tags or {}))
        if since is not None:
            where += f" AND {column}created_at >= ?"
            params.append(as_utc_text(since))
        if until is not None:
            where += f" AND {column}created_at < ?"
            params.append(as_utc_text(until))
        if model is not None:
            where += f" AND {column}model = ?"
            params.append(model)
        return where, params

    def status(self, budget: Budget) -> list[WindowStatus]:
        """Each cap of ``budget`` now: spent, reserved, and when its window resets."""
        self.flush()
        now = self.clock()
        totals: dict[str, tuple[int, int]] = {}
        if self.read_only:
            # Nothing may be registered or expired: the totals writers keep, else the rows (a
            # reservation past its expiry counts at its full projection either way, as its
            # expiry would charge it).
            with self._lock:
                conn = self.conn
                scope = _windows.scope_for(self._scopes(conn), budget) if budget.windows else None
                kept = self._read_totals(conn, scope, scope.windows, now) if scope else {}
                for window in budget.windows:
                    if window in kept:
                        totals[window] = kept[window]
                    else:
                        totals[window] = self._sum_window(conn, budget, window, now)
            return _windows.window_status(budget, now, totals)
        with self._write("read budget totals from") as conn:
            self._expire_stale(conn, now)
            if budget.windows:
                self._register(conn, budget, now)
                scope = _windows.scope_for(self._scopes(conn), budget)
                assert scope is not None  # registered just now
                totals = self._read_totals(conn, scope, budget.windows, now)
        return _windows.window_status(budget, now, totals)

    @property
    def pending_table(self) -> str:
        """SQL naming the reservations in flight as rows shaped like ``calls``."""
        if self._split:
            return "pending_calls"
        return "(SELECT * FROM calls WHERE status = 'pending')"  # a ledger read before m005

    def pending(self) -> list[dict[str, Any]]:
        """Reservations in flight (calls sent and not yet settled), oldest first."""
        self.flush()
        with self._lock:
            # "+created_at": sorting the few pending rows beats walking an index over all.
            cursor = self.conn.execute(
                "SELECT call_id, created_at, model, tags, projected_nanos, expires_at, attempts "
                f"FROM {self.pending_table} ORDER BY +created_at"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def all_calls(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every call, settled ones in insertion order, then those in flight (as rows shaped
        like ``calls``): what ``kimi-budget ledger copy`` reads."""
        self.flush()
        last = 0
        while True:
            with self._lock:
                cursor = self.conn.execute(
                    "SELECT * FROM calls WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                )
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
            if not rows:
                break
            yield from (dict(zip(names, row, strict=True)) for row in rows)
            last = rows[-1][names.index("id")]
        if self._split:
            with self._lock:
                cursor = self.conn.execute("SELECT * FROM pending_calls ORDER BY +created_at")
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
            yield from (dict(zip(names, row, strict=True)) for row in rows)

    def has_call(self, call_id: str) -> bool:
        """Whether the ledger has this call, settled or in flight."""
        self.flush()
        with self._lock:
            found = self.conn.execute("SELECT 1 FROM calls WHERE call_id = ?", (call_id,))
            if found.fetchone() is not None:
                return True
            if not self._split:
                return False
            found = self.conn.execute("SELECT 1 FROM reservations WHERE call_id = ?", (call_id,))
            return found.fetchone() is not None

    def calls(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest calls (settled and in flight), newest first, as dicts of the ``calls``
        columns."""
        self.flush()
        with self._lock:
            cursor = self.conn.execute(
                "SELECT * FROM calls ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
            )
            names = [d[0] for d in cursor.description]
            found = cursor.fetchall()
            if self._split:
                found += self.conn.execute(
                    "SELECT * FROM pending_calls ORDER BY +created_at DESC LIMIT ?", (limit,)
                ).fetchall()
        at, ident = names.index("created_at"), names.index("id")
        found.sort(key=lambda row: (row[at], row[ident]), reverse=True)
        return [dict(zip(names, row, strict=True)) for row in found[:limit]]


_OPEN_LEDGERS: weakref.WeakSet[SQLiteLedger] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for ledger in list(_OPEN_LEDGERS):
        ledger._after_fork()


def _flush_at_exit() -> None:
    for ledger in list(_OPEN_LEDGERS):
        if ledger._pid == os.getpid():
            with contextlib.suppress(Exception):
                ledger._settler.close()
            with contextlib.suppress(Exception):
                ledger._give_back(idle=None)


atexit.register(_flush_at_exit)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class _WouldWait(Exception):
    """A write that was asked not to wait would have had to."""


def _writable(path: Path) -> bool:
    """Whether this user may write the ledger (the file, and its folder for the WAL files)."""
    return os.access(path, os.W_OK) and os.access(path.resolve().parent, os.W_OK | os.X_OK)


# Rows per statement of _upsert_totals: 5 parameters each, within SQLite's oldest limit (999).
_UPSERT_ROWS = 150


@functools.cache
def _upsert_sql(rows: int) -> str:
    return (
        "INSERT INTO window_totals (scope_id, window, start, spent_nanos, reserved_nanos) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?)"] * rows)
        + " ON CONFLICT (scope_id, window, start) DO UPDATE SET "
        "spent_nanos = spent_nanos + excluded.spent_nanos, "
        "reserved_nanos = reserved_nanos + excluded.reserved_nanos"
    )


def _upsert_totals(conn: sqlite3.Connection, rows: Sequence[_windows.TotalRow]) -> None:
    """Add each row's amounts to its window total: one statement for all of a call's windows
    (a statement costs more than a row on the call path)."""
    rows = [row for row in rows if row[3] or row[4]]
    for at in range(0, len(rows), _UPSERT_ROWS):
        chunk = rows[at : at + _UPSERT_ROWS]
        conn.execute(_upsert_sql(len(chunk)), [value for row in chunk for value in row])


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _probe(path: Path) -> tuple[int, int]:
    """(application_id, table count) read through SQLite, read-only: the WAL may hold news."""
    probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        app_id = probe.execute("PRAGMA application_id").fetchone()[0]
        tables = probe.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    finally:
        probe.close()
    return int(app_id), int(tables)


def _is_ledger(path: Path) -> bool:
    if _header_is_ours(path):
        return True
    try:
        return _probe(path)[0] == APPLICATION_ID
    except sqlite3.Error:
        return False


def _header_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            header = f.read(72)
    except OSError:
        return False
    return (
        len(header) >= 72
        and header[:16] == _SQLITE_MAGIC
        and int.from_bytes(header[68:72], "big") == APPLICATION_ID
    )


def _tag_filter(tags: Mapping[str, str]) -> tuple[str, list[Any]]:
    where = ""
    params: list[Any] = []
    for key, value in tags.items():
        if json.dumps(key, ensure_ascii=False)[1:-1] != key:
            # A SQLite JSON path cannot name a key that JSON escapes (", \, control
            # characters): a quote is a path error, the rest match nothing. Compare the
            # object's own keys instead, still as bound parameters.
            where += (
                " AND EXISTS (SELECT 1 FROM json_each(tags) WHERE json_each.key = ? "
                "AND json_each.value = ?)"
            )
            params += [key, value]
            continue
        # json_extract paths are built from a bound parameter too, so no key can inject SQL.
        where += " AND json_extract(tags, ?) = ?"
        params += ['$."' + key + '"', value]
    return where, params


def _journal_line(res: Reservation) -> bytes:
    """A call's line in an allotment's journal: its reservation as ``_HELD``'s columns."""
    return (json.dumps(_held(res), separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _share_from_journal(line: Sequence[Any], allotment: Reservation) -> Reservation:
    """A journal line (see ``_journal_line``) as the reservation of a share of ``allotment``."""
    return Reservation(
        call_id=line[0],
        created_at=parse_utc(line[1]),
        model=line[2],
        tags=json.loads(line[3]),
        stream=bool(line[4]),
        currency=line[5],
        projected_nanos=int(line[6]),
        prompt_estimate=int(line[7]),
        price_cache_hit=int(line[8]),
        price_cache_miss=int(line[9]),
        price_output=int(line[10]),
        expires_at=allotment.expires_at,
        allotment_id=allotment.call_id,
    )


def _reservation_from_row(row: Sequence[Any]) -> Reservation:
    return Reservation(
        call_id=row[0],
        created_at=parse_utc(row[1]),
        model=row[2],
        tags=json.loads(row[3]),
        stream=bool(row[4]),
        projected_nanos=row[5],
        prompt_estimate=row[6],
        price_cache_hit=row[7],
        price_cache_miss=row[8],
        price_output=row[9],
        expires_at=parse_utc(row[10]),
        currency=row[12],
    )
