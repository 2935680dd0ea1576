"""kimi-budget: a hard cap on what Moonshot's Kimi API can cost you.

Change one import line and every chat completion is checked before it is sent (context window,
worst-case cost against every budget cap), reserved while in flight, and recorded exactly in a
local SQLite ledger::

    from kimi_budget import OpenAI, Budget

    client = OpenAI(budget=Budget(daily="5"), tags={"project": "crawler"})

The public names are imported on first use (PEP 562): ``import kimi_budget`` alone costs next
to nothing, so the ``kimi-budget`` command's read-only commands (``report``, ``status``,
``calls``) start without importing ``openai`` and ``pydantic``. ``from kimi_budget import X``
and ``kimi_budget.X`` behave exactly as eager imports would; the exceptions are
``openai.OpenAIError`` subclasses whichever way they are reached (see ``_exceptions``).
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from ._balance import Balance
    from ._budget import Budget
    from ._client import AsyncOpenAI, OpenAI
    from ._exceptions import (
        BudgetExceededError,
        ContextLengthExceededError,
        InvalidRequestError,
        KimiBudgetError,
        LedgerError,
        PriceTableError,
        UnknownModelError,
    )
    from .ledger import Ledger

    __version__: str

__all__ = [
    "AsyncOpenAI",
    "Balance",
    "Budget",
    "BudgetExceededError",
    "ContextLengthExceededError",
    "InvalidRequestError",
    "KimiBudgetError",
    "Ledger",
    "LedgerError",
    "OpenAI",
    "PriceTableError",
    "UnknownModelError",
]

# Where each public name lives. Keep in step with __all__ and the TYPE_CHECKING imports above
# (tests/test_startup.py checks all three agree).
_HOMES = {
    "AsyncOpenAI": "._client",
    "Balance": "._balance",
    "Budget": "._budget",
    "BudgetExceededError": "._exceptions",
    "ContextLengthExceededError": "._exceptions",
    "InvalidRequestError": "._exceptions",
    "KimiBudgetError": "._exceptions",
    "Ledger": ".ledger",
    "LedgerError": "._exceptions",
    "OpenAI": "._client",
    "PriceTableError": "._exceptions",
    "UnknownModelError": "._exceptions",
}


if not typing.TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute

    def __getattr__(name: str) -> typing.Any:
        home = _HOMES.get(name)
        if home is not None:
            value = getattr(importlib.import_module(home, __name__), name)
        elif name == "__version__":
            value = _version()
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value  # later lookups are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kimi-budget")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"
