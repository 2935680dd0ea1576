"""The public surface: exports, the exception tree, and Budget validation."""

from __future__ import annotations

import types
from decimal import Decimal

import openai
import pytest

import kimi_budget as kb


def test_exports_are_sorted_and_complete() -> None:
    assert kb.__all__ == sorted(kb.__all__)
    assert sorted(dir(kb)) == dir(kb) and set(kb.__all__) <= set(dir(kb))
    for name in kb.__all__:  # the names are imported on first use
        getattr(kb, name)
    public = {
        name
        for name, value in vars(kb).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - {"annotations"} == set(kb.__all__)
    for name in kb.__all__:
        assert getattr(kb, name).__module__.startswith("kimi_budget.")


def test_exception_tree() -> None:
    assert issubclass(kb.KimiBudgetError, openai.OpenAIError)
    for error in (
        kb.BudgetExceededError,
        kb.ContextLengthExceededError,
        kb.UnknownModelError,
        kb.LedgerError,
        kb.PriceTableError,
    ):
        assert issubclass(error, kb.KimiBudgetError)
        assert not issubclass(error, openai.APIError)  # never retried, never mistaken for the API's
    assert issubclass(kb.PriceTableError, ValueError)


def test_clients_subclass_the_sdk() -> None:
    assert issubclass(kb.OpenAI, openai.OpenAI)
    assert issubclass(kb.AsyncOpenAI, openai.AsyncOpenAI)


def test_budget_accepts_every_amount_type_exactly() -> None:
    budget = kb.Budget(
        per_call="0.05", hourly=1, daily=0.1, weekly=Decimal("7.5"), monthly="100", total="1e3"
    )
    assert budget.caps == {
        "per_call": Decimal("0.05"),
        "hourly": Decimal(1),
        "daily": Decimal("0.1"),
        "weekly": Decimal("7.5"),
        "monthly": Decimal(100),
        "total": Decimal(1000),
    }
    assert budget.caps_nanos["daily"] == 100_000_000  # 0.1 as written, not its binary neighbour
    assert budget.windows == ("hourly", "daily", "weekly", "monthly", "total")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"daily": "-1"}, "must not be negative"),
        ({"daily": "five"}, "USD amount"),
        ({"monthly": float("nan")}, "finite"),
        ({"per_call": True}, "USD amount"),
        ({"tz": "Mars/Olympus"}, "not a known IANA time zone"),
        ({"tz": ""}, "IANA"),
        ({"scope": {"project": ["a"]}}, "must be a string"),
    ],
)
def test_budget_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kb.Budget(**kwargs)  # type: ignore[arg-type]


def test_budget_scope_and_repr() -> None:
    budget = kb.Budget(daily="5", tz="Asia/Shanghai", scope={"project": "crawler"})
    assert budget.applies_to({"project": "crawler", "job": "x"})
    assert not budget.applies_to({"project": "other"})
    assert repr(budget) == "Budget(daily='5', tz='Asia/Shanghai', scope={'project': 'crawler'})"
    assert budget == kb.Budget(daily=5, tz="Asia/Shanghai", scope={"project": "crawler"})


def test_budget_error_carries_context() -> None:
    error = kb.BudgetExceededError(
        window="daily",
        limit_usd=Decimal(5),
        spent_usd=Decimal("4.9"),
        reserved_usd=Decimal("0.05"),
        projected_usd=Decimal("0.2"),
        model="kimi-k2.5",
        resets_at="2026-11-29T00:00:00+08:00",
    )
    text = str(error)
    assert "$0.05 left" in text and "2026-11-29T00:00:00+08:00" in text and "kimi-k2.5" in text
    assert (error.window, error.limit_usd, error.spent_usd) == ("daily", Decimal(5), Decimal("4.9"))
