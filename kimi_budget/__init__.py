"""kimi-budget: a hard cap on what Moonshot's Kimi API can cost you.

Change one import line and every chat completion is checked before it is sent (context window,
worst-case cost against every budget cap), reserved while in flight, and recorded exactly in a
local SQLite ledger::

    from kimi_budget import OpenAI, Budget

    client = OpenAI(budget=Budget(daily="5"), tags={"project": "crawler"})
"""

from __future__ import annotations

from importlib import metadata as _metadata

from ._balance import Balance
from ._budget import Budget
from ._client import AsyncOpenAI, OpenAI
from ._exceptions import (
    BudgetExceededError,
    ContextLengthExceededError,
    KimiBudgetError,
    LedgerError,
    PriceTableError,
    UnknownModelError,
)
from ._ledger import Ledger

try:
    __version__ = _metadata.version("kimi-budget")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AsyncOpenAI",
    "Balance",
    "Budget",
    "BudgetExceededError",
    "ContextLengthExceededError",
    "KimiBudgetError",
    "Ledger",
    "LedgerError",
    "OpenAI",
    "PriceTableError",
    "UnknownModelError",
]
