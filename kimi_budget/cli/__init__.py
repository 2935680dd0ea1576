"""The ``kimi-budget`` command line.

``_app`` holds the click group, its error handling and the shared options; each command module
registers its commands on that group when imported here:

- ``_spend``: ``report``, ``status``, ``calls``, ``path`` (reading the ledger)
- ``_prices``: ``estimate``, ``prices`` (the price table, no ledger)
- ``_account``: ``balance`` (Moonshot's API)
- ``_demo``: ``demo`` (real calls to the loopback stand-in)
- ``_copy``: ``ledger copy`` (a ledger's calls into another, SQLite <-> PostgreSQL)

``_report`` reads what the commands show (all SQL of the command line), ``_tables`` prints it.
"""

from __future__ import annotations

from . import _account, _copy, _demo, _prices, _spend
from ._app import cli, main

__all__ = ["cli", "main"]

# Imported for their side effect: each registers its commands on ``cli``.
del _account, _copy, _demo, _prices, _spend
