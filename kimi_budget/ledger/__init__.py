"""The ledger: one row per call, and the reservations that keep budgets exact.

``Ledger(target)`` opens the backend the target names; the package is laid out by concern:

- ``_records``: what is stored (``Reservation``, ``Settlement``, ``WindowStatus``), and the
  ``LateSettlement`` a writer works out off the caller's path;
- ``_backend``: the interface every backend implements, and the rule for expired reservations;
- ``_windows``: window totals, the cap policy both backends share;
- ``_sqlite``: one local file (file safety, fork handling); ``_postgres``: a shared server;
- ``_writer``: the background writer that applies settlements in batches;
- ``_allotments``: budget a SQLite ledger reserves for several calls in one transaction;
- ``_fallback``: the file that keeps settlements a ledger could not take;
- ``migrations``: each backend's schema.
"""

from __future__ import annotations

import os
from typing import Any

from ._backend import Ledger, default_ledger_path, expired_settlement
from ._records import LateSettlement, Reservation, Settlement, WindowStatus, new_call_id

__all__ = [
    "LateSettlement",
    "Ledger",
    "Reservation",
    "Settlement",
    "WindowStatus",
    "backend_class",
    "default_ledger_path",
    "expired_settlement",
    "is_server_url",
    "new_call_id",
]

_SERVER_SCHEMES = ("postgresql://", "postgres://")


def is_server_url(target: Any) -> bool:
    """Whether ``target`` names a PostgreSQL server rather than a SQLite file."""
    return isinstance(target, str) and target.lower().startswith(_SERVER_SCHEMES)


def backend_class(target: Any) -> type[Ledger]:
    """The backend ``Ledger(target)`` opens: PostgreSQL for a server URL, else SQLite."""
    if is_server_url(target):
        import importlib

        try:
            module = importlib.import_module("._postgres", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}._postgres":
                raise
            from .._exceptions import LedgerError

            raise LedgerError(
                "This version of kimi-budget has no PostgreSQL ledger; use a SQLite file path."
            ) from None
        backend: type[Ledger] = module.PostgresLedger
        return backend
    if target is not None and not isinstance(target, (str, os.PathLike)):
        raise TypeError(
            f"A ledger is a file path or a postgresql:// URL, not {type(target).__name__}."
        )
    from ._sqlite import SQLiteLedger

    return SQLiteLedger
