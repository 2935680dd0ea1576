"""Exact money arithmetic.

Storage uses integer nano-dollars (1e-9 USD): every price in Moonshot's pricing document is a
whole number of nano-dollars per token, so a call's cost is an exact integer. The public API
speaks ``Decimal`` USD. No float ever touches an amount.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per million tokens


def to_usd(nanos: int) -> Decimal:
    """Nano-dollars as exact Decimal USD (``1_500`` becomes ``Decimal('0.0000015')``)."""
    amount = (Decimal(nanos) / NANOS_PER_USD).normalize()
    # normalize() writes whole dollars as 1E+1; keep them plain (10) for anyone printing them.
    return amount.quantize(Decimal(1)) if amount.as_tuple().exponent > 0 else amount  # type: ignore[operator]


def parse_usd(value: object, *, what: str) -> Decimal:
    """A user-supplied USD amount (str, int, float or Decimal) as a non-negative Decimal.

    Floats go through ``str()`` so that ``0.1`` means ten cents, not its binary neighbour.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a USD amount such as '5' or '0.25', not {value!r}.")
    try:
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(
            f"{what} must be a USD amount such as '5' or '0.25', not {value!r}."
        ) from None
    if not amount.is_finite():
        raise ValueError(f"{what} must be a finite USD amount, not {value!r}.")
    if amount < 0:
        raise ValueError(f"{what} must not be negative (got {value!r}); use 0 to block all calls.")
    return amount


# The ledger stores amounts as SQLite INTEGERs: signed 64-bit nano-units.
MAX_NANOS = 2**63 - 1


def check_cap(amount: Decimal, *, what: str) -> Decimal:
    """A cap kimi-budget can count: 0, or between one nano-dollar and the ledger's largest sum."""
    if amount * NANOS_PER_USD > MAX_NANOS:
        raise ValueError(
            f"{what} of {amount} is more than kimi-budget can count: amounts are stored as "
            f"integer nano-dollars, so a cap is at most {to_usd(MAX_NANOS):f}. Leave the cap "
            f"out for no limit."
        )
    if 0 < amount < Decimal(1) / NANOS_PER_USD:
        raise ValueError(
            f"{what} of {amount} is less than one nano-dollar (0.000000001), the smallest "
            f"amount kimi-budget counts; use 0 to block every call."
        )
    return amount


def usd_to_nanos_floor(amount: Decimal) -> int:
    """USD as nano-dollars, rounded down: a cap never grows by rounding."""
    return int(amount * NANOS_PER_USD)


def price_to_nanos_per_token(price_per_million: Decimal) -> int:
    """A per-million-token USD price as exact nano-dollars per token.

    Raises ``ValueError`` if the price is not a whole number of nano-dollars per token.
    """
    nanos = price_per_million * NANOS_PER_USD / TOKENS_PER_PRICE_UNIT
    if nanos != nanos.to_integral_value():
        raise ValueError(
            f"${price_per_million} per million tokens is not a whole number of nano-dollars per "
            f"token; use at most three decimals."
        )
    return int(nanos)


def call_cost_nanos(
    *,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    cache_hit: int,
    cache_miss: int,
    output: int,
) -> int:
    """Cost = (prompt - cached) x miss + cached x hit + completion x output, in nano-dollars.

    ``cached_tokens`` is clamped to ``[0, prompt_tokens]`` so that malformed usage can never make
    a cost negative or larger than the all-miss price.
    """
    prompt = max(prompt_tokens, 0)
    cached = min(max(cached_tokens, 0), prompt)
    completion = max(completion_tokens, 0)
    return (prompt - cached) * cache_miss + cached * cache_hit + completion * output
