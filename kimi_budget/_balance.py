"""The account balance, from ``GET /v1/users/me/balance``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

import openai

__all__ = ["Balance", "parse_balance"]


@dataclass(frozen=True, slots=True)
class Balance:
    """Moonshot balances: ``available = cash + voucher``; calls fail once it is 0 or less.

    Amounts are exact Decimals in ``currency``: USD on api.moonshot.ai, CNY on api.moonshot.cn.
    """

    available: Decimal
    voucher: Decimal
    cash: Decimal
    currency: str


def currency_of(base_url: str) -> str:
    return "CNY" if "moonshot.cn" in base_url else "USD"


def parse_balance(content: bytes, base_url: str) -> Balance:
    try:
        data = json.loads(content, parse_float=Decimal)["data"]
        return Balance(
            available=Decimal(data["available_balance"]),
            voucher=Decimal(data["voucher_balance"]),
            cash=Decimal(data["cash_balance"]),
            currency=currency_of(base_url),
        )
    except (ValueError, KeyError, TypeError, ArithmeticError):
        raise openai.APIError(
            f"Moonshot's balance endpoint gave an unexpected answer: {content[:200]!r}",
            request=None,  # type: ignore[arg-type]
            body=None,
        ) from None
