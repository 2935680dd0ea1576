"""The interface every ledger backend implements, and the policy they all follow.

``Ledger`` is both the public type and the abstract base of the backends:
``Ledger("spend.db")`` is a :class:`~kimi_budget.ledger._sqlite.SQLiteLedger` and
``Ledger("postgresql://...")`` a PostgreSQL one (``kimi_budget.ledger.backend_class`` picks).

What a backend must guarantee (the tests in ``tests/test_ledger.py`` run against each one):

- ``reserve`` checks every cap of every applicable budget and records the reservation in ONE
  transaction that no other writer (thread, process, host) can interleave with: N workers never
  overshoot a cap together. The check reads per-window totals (``_windows``), never the rows.
  A refused reservation records nothing, but expiries done on the way are kept.
- ``settle`` is idempotent by ``call_id``: a second settlement of a settled call changes nothing
  and returns False, except that a real outcome replaces an ``expired`` estimate exactly.
  A settlement whose reservation never reached this ledger (a fallback line) inserts the row.
- A pending reservation past ``expires_at`` is settled by the next writer as
  :func:`expired_settlement` says (the rule on unknown bills lives there, not in a backend).
- Amounts are integer nano-units of the row's currency; nothing adds one currency to another.
- Totals: every write moves the ``(spent, reserved)`` of the window totals
  ``_windows.total_rows`` names, in the same transaction as the row.
- A settlement that cannot be written goes to the fallback file (``_fallback``) and is merged
  by a later writer. Secrets (a URL's password) never appear in errors, logs or ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._records import LateSettlement, Reservation, Settlement, WindowStatus, settlement_of

if TYPE_CHECKING:
    from .._budget import Budget
    from .._exceptions import LedgerError

__all__ = [
    "EXPIRED_NOTE",
    "OTHER_CURRENCIES_SQL",
    "Clock",
    "Ledger",
    "budget_currency",
    "default_ledger_path",
    "expired_settlement",
    "ledger_error",
    "on_event_loop",
]

UTC = timezone.utc
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_ledger_path() -> Path:
    """``KIMI_BUDGET_LEDGER``, else ``ledger.db`` in the user's data directory."""
    configured = os.environ.get("KIMI_BUDGET_LEDGER")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("kimi-budget", appauthor=False)) / "ledger.db"


def ledger_error(message: str, *, path: str | None = None) -> LedgerError:
    """``LedgerError(message, path=path)``, its class imported only now, on the error path.

    ``kimi_budget._exceptions`` imports openai (its classes subclass ``openai.OpenAIError``),
    which the command line's read-only commands must not pay for: the ledger package never
    imports it at the top of a module (see that module's docstring).
    """
    from .._exceptions import LedgerError

    return LedgerError(message, path=path)


def on_event_loop() -> bool:
    """Whether this thread runs an async event loop (asyncio, or trio: sniffio tells), where
    ledger work that may wait (a lock, a round trip) must be moved off the thread."""
    import sniffio

    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


# The currencies other than USD that settled calls were billed in, as a loose index scan: each
# step reads the next code above the last from the partial index calls_other_currencies
# (migrations m007 for SQLite, m003 for PostgreSQL), so a ledger of millions of USD rows and a
# few CNY ones answers in a few index reads. The same SQL runs on both backends.
OTHER_CURRENCIES_SQL = """
WITH RECURSIVE found(code) AS (
    SELECT min(currency) FROM calls WHERE currency <> 'USD' AND status <> 'pending'
    UNION ALL
    SELECT (SELECT min(currency) FROM calls
            WHERE currency <> 'USD' AND status <> 'pending' AND currency > found.code)
    FROM found WHERE found.code IS NOT NULL
)
SELECT code FROM found WHERE code IS NOT NULL
"""


EXPIRED_NOTE = (
    "the process holding this reservation did not settle it before it expired (it may have "
    "died); charged the full reservation, the call's worst case, until its real bill arrives"
)


def expired_settlement(reservation: Reservation, attempts: int, now: datetime) -> Settlement:
    """How a reservation that outlived its expiry is settled, by every backend.

    The rule on unknown bills: the call may have been sent and billed in full, so it is
    charged its FULL projected cost, flagged as estimated. Expiry never frees room; only a
    later real settlement of the same ``call_id`` replaces the estimate (and frees the
    difference then).
    """
    return Settlement(
        reservation=reservation,
        status="expired",
        prompt_tokens=reservation.prompt_estimate,
        cached_tokens=None,
        completion_tokens=None,
        cost_nanos=reservation.projected_nanos,
        estimated=True,
        attempts=attempts,
        finished_at=now,
        note=EXPIRED_NOTE,
    )


def budget_currency(budget: Budget) -> str:
    """The currency of a budget's caps ("USD" for budgets made before currencies)."""
    currency: str = getattr(budget, "currency", "USD")
    return currency


class Ledger:
    """A kimi-budget ledger: one row per call, and the reservations that keep budgets exact.

    >>> ledger = Ledger("spend.db")                                  # doctest: +SKIP
    >>> ledger.spend(since="2026-11-01", tags={"project": "crawler"}) # doctest: +SKIP
    Decimal('1.234567')

    ``Ledger(target)`` opens the backend ``target`` names: a ``postgresql://`` or
    ``postgres://`` URL, else a SQLite file path (``None``: :func:`default_ledger_path`).
    Constructor keywords every backend takes: ``busy_timeout`` (seconds a write waits for a
    lock), ``clock`` (a callable returning an aware UTC datetime; tests use it), ``read_only``.

    Read-only (``read_only=True``, and automatically when the user may read but not write the
    ledger): nothing is created, migrated, expired or merged; the read methods work and every
    write raises ``LedgerError`` saying the ledger is read-only.

    Currencies: a reservation carries its currency; a budget (``budget.currency``, "USD" when
    absent) applies to, and totals, only calls of its currency. Nothing adds one to another.
    """

    #: Shown in messages and reports; never contains a password.
    location: str
    #: Where settlements the ledger could not take are kept until merged.
    fallback_path: Path
    clock: Clock
    busy_timeout: float
    read_only: bool = False

    def __new__(cls, target: Any = None, *args: Any, **kwargs: Any) -> Ledger:
        if cls is Ledger:
            from . import backend_class

            cls = backend_class(target)
        return object.__new__(cls)

    # -- the call lifecycle ------------------------------------------------------------------

    def reserve(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> None:
        """Check every applicable cap and reserve the projected cost, atomically.

        Raises ``BudgetExceededError`` (and reserves nothing) if any cap would be exceeded,
        ``LedgerError`` if the ledger cannot be written (nothing may be sent then).
        """
        raise NotImplementedError

    def reserve_call(self, reservation: Reservation, budgets: Sequence[Budget] = ()) -> Reservation:
        """``reserve()`` for a call the guard is about to send; returns the reservation as
        recorded, which the call's settlement must carry.

        A backend may record the call as a share of an allotment this process reserved
        earlier (SQLite does: see ``_allotments``) instead of a transaction of its own.
        """
        self.reserve(reservation, budgets)
        return reservation

    def settle(self, settlement: Settlement) -> bool:
        """Record how a call ended. Returns False if it was already settled (idempotent)."""
        raise NotImplementedError

    def settle_later(self, settlement: Settlement | LateSettlement) -> None:
        """Record how a call ended without keeping the caller waiting; never raises for the
        ledger's sake (a call's answer must reach its caller).

        The call path uses this. A backend may queue it for a background writer (the
        reservation holds the full projected cost until it is applied) as long as reads
        by this process flush first; what cannot be written goes to the fallback file. This
        default settles now and falls back on failure.
        """
        from .._exceptions import LedgerError

        settled = settlement_of(settlement)
        try:
            self.settle(settled)
        except LedgerError as exc:
            self.write_fallback(settled, exc)

    def extend(self, call_id: str, expires_at: datetime) -> None:
        """Push a live reservation's expiry out (a call still retrying or streaming)."""
        raise NotImplementedError

    def expire_stale(self) -> int:
        """Settle reservations past their expiry (:func:`expired_settlement`); how many."""
        raise NotImplementedError

    def write_fallback(self, settlement: Settlement, reason: BaseException) -> None:
        """Keep a settlement this ledger could not take, to be merged by a later writer."""
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------------

    def spend(
        self,
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        currency: str = "USD",
    ) -> Decimal:
        """Settled spend in ``currency`` (``[since, until)``, by model and tags), exact.

        Estimated rows (expired reservations, unknown bills) count at what they were charged.
        """
        raise NotImplementedError

    def status(self, budget: Budget) -> list[WindowStatus]:
        """Each cap of ``budget`` now: spent, reserved, and when its window resets."""
        raise NotImplementedError

    def pending(self) -> list[dict[str, Any]]:
        """Reservations in flight, oldest first: call_id, created_at, model, tags,
        projected_nanos, expires_at, attempts."""
        raise NotImplementedError

    def calls(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest calls, newest first, as dicts of the ``calls`` columns."""
        raise NotImplementedError

    def report(self, **filters: Any) -> Any:
        """The ``kimi-budget report`` table (``kimi_budget.cli._report.Report``).

        The CLI queries a SQLite ledger's schema itself; another backend returns the same
        ``Report`` from here, taking ``build_report``'s keywords (by, since, until, model,
        tags, tz, currency).
        """
        raise ledger_error(f"Reports cannot read {self.location} yet.")

    def recent_calls(self, **filters: Any) -> list[dict[str, Any]]:
        """The latest calls for ``kimi-budget calls`` (``kimi_budget.cli._report.list_calls``'s
        keywords: limit, since, until, model, tags), newest first, as ``calls()`` shapes them,
        for a backend the CLI does not query itself (``currencies``, ``tag_keys`` and
        ``costliest_calls`` likewise serve ``report`` and ``report --html``)."""
        raise ledger_error(f"Listing calls cannot read {self.location} yet.")

    # -- life ------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what this process queued for the ledger (settlements) before returning.

        Reads by this process flush first; ``close()`` and interpreter exit flush too.
        """

    def close(self) -> None:
        """Flush, then release connections. Safe to call twice."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.location!r})"
