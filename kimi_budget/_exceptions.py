"""The exceptions kimi-budget raises.

Every one of them is raised *before* a request is sent, and none is ever retried. They all
subclass ``openai.OpenAIError``, so code that already catches the SDK's errors keeps working::

    openai.OpenAIError
    └── KimiBudgetError
        ├── BudgetExceededError        the projected cost does not fit a budget cap
        ├── ContextLengthExceededError prompt + max output does not fit the model's window
        ├── InvalidRequestError        the request cannot be capped as written (absurd n)
        ├── UnknownModelError          the model has no price, so its cost cannot be capped
        ├── PriceTableError            a price file or override is malformed (also a ValueError)
        └── LedgerError                the ledger cannot be opened or written

Errors from Moonshot itself stay the SDK's own (``openai.RateLimitError`` and friends).

Why importing this module imports ``openai``, and who may import it: the tree above is a
promise to library users (``except openai.OpenAIError`` catches ours too), and an ``except``
clause matches by real subclassing only, so the base must be the SDK's own class, fixed when
this module is first imported, whatever the order of imports. That costs ``import openai``
(most of a fresh process's start-up). The command line's read-only commands (``report``,
``status``, ``calls``) never need it, so the modules on their path (``ledger/``, ``_budget``,
``_config``, ``cli/``) import this module only where they raise or catch one of these errors,
inside the function, never at the top. ``kimi_budget/__init__`` resolves its names lazily,
and the command line's error handler looks for these classes only once ``openai`` is loaded:
none of them can have been raised before. ``tests/test_startup_imports.py`` keeps it so.
"""

from __future__ import annotations

from decimal import Decimal

import openai

__all__ = [
    "BudgetExceededError",
    "ContextLengthExceededError",
    "InvalidRequestError",
    "KimiBudgetError",
    "LedgerError",
    "PriceTableError",
    "UnknownModelError",
]


class KimiBudgetError(openai.OpenAIError):
    """Base class of every error kimi-budget raises itself."""


class BudgetExceededError(KimiBudgetError):
    """The call's worst-case cost does not fit one of the budget's caps."""

    def __init__(
        self,
        *,
        window: str,
        limit_usd: Decimal,
        spent_usd: Decimal,
        reserved_usd: Decimal,
        projected_usd: Decimal,
        model: str,
        scope: dict[str, str] | None = None,
        resets_at: str | None = None,
        currency: str = "USD",
    ) -> None:
        self.currency = currency
        self.default_output: int | None = None
        self.window = window
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.projected_usd = projected_usd
        self.model = model
        self.scope = dict(scope or {})
        self.resets_at = resets_at
        sign = "¥" if currency == "CNY" else "$"
        where = f" for {_format_scope(self.scope)}" if self.scope else ""
        cap_name = "per-call" if window == "per_call" else window
        if limit_usd == 0:
            # Nothing to wait for and no max_tokens small enough: only the cap can change.
            message = (
                f"Refused before sending: the {cap_name} cap{where} is {sign}0, which blocks every "
                f"call (this {model} call could cost up to {sign}{projected_usd:f}). Raise the cap "
                f"to allow calls."
            )
        elif window == "per_call":
            message = (
                f"Refused before sending: this {model} call could cost up to "
                f"{sign}{projected_usd:f}, over the per-call cap of {sign}{limit_usd:f}{where}. "
                f"Lower max_tokens or shorten the "
                f"prompt, or raise the per_call cap."
            )
        else:
            left = max(limit_usd - spent_usd - reserved_usd, Decimal(0))
            if window == "total":
                # An all-time cap has no window to wait for.
                advice = "The total cap never resets: lower max_tokens, or raise the cap."
            else:
                reset = f"It resets at {resets_at}. " if resets_at else ""
                advice = f"{reset}Lower max_tokens, wait for the window to reset, or raise the cap."
            message = (
                f"Refused before sending: this {model} call could cost up to "
                f"{sign}{projected_usd:f}, but the {window} cap of {sign}{limit_usd:f}{where} has "
                f"{sign}{left:f} left ({sign}{spent_usd:f} spent, {sign}{reserved_usd:f} reserved "
                f"by calls in flight). {advice}"
            )
        super().__init__(message)

    def with_default_output(self, tokens: int) -> BudgetExceededError:
        """The same refusal, saying that the projection assumed the model's default output
        because the request set no ``max_tokens``."""
        self.default_output = tokens
        text = str(self.args[0]).replace("Lower max_tokens", "Set max_tokens")
        self.args = (
            f"{text} The request sets no max_tokens, so each choice was projected at "
            f"{self.model}'s default output of {tokens:,} tokens: set max_tokens to the output "
            f"you need.",
        )
        return self


class ContextLengthExceededError(KimiBudgetError):
    """The prompt plus the requested output does not fit the model's context window."""

    def __init__(
        self, *, model: str, prompt_tokens: int, max_tokens: int, context_window: int, exact: bool
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window
        self.exact = exact
        counted = "counted" if exact else "estimated"
        super().__init__(
            f"Refused before sending: {prompt_tokens} prompt tokens ({counted}) + max_tokens "
            f"{max_tokens} = {prompt_tokens + max_tokens} exceeds {model}'s context window of "
            f"{context_window} tokens. Shorten the messages or lower max_tokens."
        )


class InvalidRequestError(KimiBudgetError, ValueError):
    """The request cannot be capped as written (its worst case is beyond any ledger figure)."""


class UnknownModelError(KimiBudgetError):
    """The model has no price, so a call to it could not be capped or recorded exactly."""

    def __init__(self, model: str, known: list[str]) -> None:
        self.model = model
        self.known = known
        super().__init__(
            f"Refused before sending: kimi-budget has no price for model {model!r}. Add one with "
            f"OpenAI(prices={{{model!r}: {{'cache_hit': ..., 'cache_miss': ..., 'output': ..., "
            f"'context_window': ...}}}}) or in a price file named by KIMI_BUDGET_PRICES "
            f"(USD per million tokens). Known models: {', '.join(known)}."
        )


class PriceTableError(KimiBudgetError, ValueError):
    """A price file or price override is malformed."""


class LedgerError(KimiBudgetError):
    """The ledger cannot be opened or written, or the file is not a kimi-budget ledger."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


def _format_scope(scope: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(scope.items()))
