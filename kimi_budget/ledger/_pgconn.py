"""One process's connection to a PostgreSQL ledger: connect, retry, reconnect, fork.

``PgConnection`` owns the psycopg connection of one ``PostgresLedger`` in one process and runs
the ledger's transactions on it (``run``) and its reads (``read``):

- one connection, used by one thread at a time (``lock``); autocommit mode, so that a
  transaction is exactly what ``run`` opens;
- fit for PgBouncer's transaction pooling: no session state outlives a transaction (no
  session-level prepared statements, ``prepare_threshold=None``; no ``SET``; only
  transaction-level advisory locks);
- a lost connection (server down, restarting, failing over; network) is retried on a new
  connection with backoff for ``reconnect_timeout`` seconds, then is one ``LedgerError``;
  a deadlock or serialization failure that PostgreSQL reports is retried at once;
- after ``fork()`` the child never touches its parent's socket: the inherited descriptor is
  pointed at ``/dev/null`` before the connection object is closed (its goodbye message goes
  there), and the child connects anew on first use;
- every message names the ledger by its URL without the password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._exceptions import LedgerError
from .._redact import redact

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgConnection", "Retry", "import_psycopg", "url_secrets"]

log = logging.getLogger("kimi_budget")
T = TypeVar("T")


def import_psycopg() -> Any:
    """psycopg, or the one error a user without the ``postgres`` extra needs to read."""
    try:
        import psycopg
    except ImportError:
        raise LedgerError(
            'A postgresql:// ledger needs psycopg 3: pip install "kimi-budget[postgres]".'
        ) from None
    return psycopg


class Retry(Exception):
    """Raised inside ``run``'s body to run it again (the database changed under it)."""


class PgConnection:
    """The connection of one ledger in this process (see the module doc)."""

    def __init__(
        self,
        url: str,
        location: str,
        *,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 10.0,
    ) -> None:
        self._psycopg = import_psycopg()
        self._url = url
        self.location = location
        self.secrets = url_secrets(url)
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.lock = threading.RLock()
        self.closed = False
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        _OPEN.add(self)

    @property
    def backend_pid(self) -> int | None:
        """The server process of the current session (None when not connected)."""
        conn = self._conn
        return None if conn is None or conn.closed else int(conn.info.backend_pid)

    # -- connecting ------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        pg = self._psycopg
        params = pg.conninfo.conninfo_to_dict(self._url)
        defaults: dict[str, Any] = {
            "connect_timeout": max(1, round(self.connect_timeout)),
            "application_name": "kimi-budget",
            # A dead server or host is noticed within seconds, not at the OS's TCP timeout.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        for key, value in defaults.items():
            params.setdefault(key, value)
        conn: psycopg.Connection[Any] = pg.connect(
            autocommit=True,
            # Session-level prepared statements would not survive PgBouncer's transaction
            # pooling (the next transaction may run on another server connection).
            prepare_threshold=None,
            **params,
        )
        return conn

    def get(self) -> psycopg.Connection[Any]:
        """The connection, (re)connected when needed. Call with ``lock`` held."""
        if self.closed:
            raise LedgerError(f"The ledger {self.location} is closed.", path=self.location)
        if os.getpid() != self._pid:
            self.forget_inherited()  # a fork the at-fork hook did not see
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conn = None
            try:
                conn = self._connect()
            except self._psycopg.Error as exc:
                raise LedgerError(self.explain(exc, "connect to"), path=self.location) from None
            self._conn = conn
        return conn

    def forget_inherited(self) -> None:
        """In a forked child: drop the parent's connection without a byte on its socket."""
        self._pid = os.getpid()
        self.lock = threading.RLock()  # one held by another thread at fork() stays held
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            fd = conn.pgconn.socket
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)  # the parent's socket stays open in the parent only
            finally:
                os.close(devnull)
        with contextlib.suppress(Exception):
            conn.close()  # its goodbye message goes to /dev/null

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conn, self._conn = self._conn, None
            if conn is not None and os.getpid() == self._pid:
                with contextlib.suppress(Exception):
                    conn.close()

    def explain(self, exc: BaseException, doing: str) -> str:
        """One sentence about ``exc``, without the URL's password."""
        text = redact(str(exc).strip() or type(exc).__name__, self.secrets)
        text = " ".join(text.split()).rstrip(".")
        return f"Cannot {doing} the ledger {self.location}: {text}."

    # -- running -----------------------------------------------------------------------------------

    def run(
        self,
        doing: str,
        body: Callable[[Any, bool], T],
        *,
        shared_lock: int | None = None,
        transaction: bool = True,
    ) -> tuple[T, bool]:
        """``body(conn, retried)`` in one transaction; ``(its result, reconnected)``.

        ``shared_lock``: an advisory lock key taken shared first. ``transaction=False``:
        ``body`` runs one autocommit statement (a function that takes its own locks), one
        round trip. ``body`` must be safe to run again: after a lost connection it may have
        committed already.
        """
        psycopg = self._psycopg
        if self.closed:
            raise LedgerError(f"The ledger {self.location} is closed.", path=self.location)
        deadline: float | None = None
        delay = 0.05
        retried = False
        conflicts = 0
        while True:
            with self.lock:
                try:
                    conn = self.get()
                    if not transaction:
                        return body(conn, retried), deadline is not None
                    # Pipeline mode: statements are sent without waiting for their answers
                    # until a result is needed, so a transaction costs 2-3 round trips.
                    with conn.pipeline(), conn.transaction():
                        if shared_lock is not None:
                            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (shared_lock,))
                        result = body(conn, retried)
                    return result, deadline is not None
                except (
                    Retry,
                    psycopg.errors.DeadlockDetected,
                    psycopg.errors.SerializationFailure,
                ):
                    conflicts += 1
                    retried = True
                    if conflicts < 20:
                        continue
                    raise LedgerError(
                        f"Cannot {doing} the ledger {self.location}: it stayed contended.",
                        path=self.location,
                    ) from None
                except (psycopg.OperationalError, LedgerError) as exc:
                    if self.closed:
                        raise
                    conn_now = self._conn
                    if isinstance(exc, psycopg.OperationalError) and conn_now is not None:
                        if not (conn_now.closed or conn_now.broken):
                            # A query error that is not about the connection (disk full...).
                            raise LedgerError(
                                self.explain(exc, doing), path=self.location
                            ) from None
                        with contextlib.suppress(Exception):
                            conn_now.close()
                    # The server is unreachable, restarting, or dropped us: a new connection.
                    self._conn = None
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.reconnect_timeout
                        log.warning(
                            "kimi-budget lost its connection to the ledger %s (%s); retrying "
                            "for %g s.",
                            self.location,
                            redact(" ".join(str(exc).split()), self.secrets),
                            self.reconnect_timeout,
                        )
                    if now >= deadline:
                        message = (
                            exc.args[0]
                            if isinstance(exc, LedgerError)
                            else self.explain(exc, doing)
                        )
                        raise LedgerError(message, path=self.location) from None
                    retried = True
                except psycopg.Error as exc:
                    raise LedgerError(self.explain(exc, doing), path=self.location) from None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    def read(self, doing: str, body: Callable[[Any], T]) -> T:
        """``body(conn)`` outside any transaction (one reconnect if the connection was lost)."""
        psycopg = self._psycopg
        for attempt in (1, 2):
            with self.lock:
                try:
                    return body(self.get())
                except psycopg.OperationalError as exc:
                    conn = self._conn
                    if attempt == 2 or conn is None or not (conn.closed or conn.broken):
                        raise LedgerError(self.explain(exc, doing), path=self.location) from None
                    self._conn = None
                except psycopg.Error as exc:
                    raise LedgerError(self.explain(exc, doing), path=self.location) from None
        raise AssertionError("unreachable")  # pragma: no cover


_OPEN: weakref.WeakSet[PgConnection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connection in list(_OPEN):
        connection.forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def url_secrets(url: str) -> tuple[str, ...]:
    """The password(s) a URL carries, to scrub from any message that might echo them."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    secrets: list[str] = []
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            secrets.append(unquote(userinfo.split(":", 1)[1]))
        for key, value in parse_qsl(parts.query):
            if key in ("password", "sslpassword"):
                secrets.append(value)
    return tuple(s for s in secrets if s)
