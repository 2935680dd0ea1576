"""Caps set outside the code (environment, configuration file) stay in force when code passes
``budget=``: every cap applies, and the strictest wins.

An operator who sets ``KIMI_BUDGET_DAILY_USD`` for a job must not have it lifted by a library
that passes its own ``budget=``. Each test runs calls against the stand-in until refused and
checks what the stand-in billed against the configured cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

import kimi_budget as kb
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LONG_REPLY = "The quick brown fox jumps over the lazy dog. " * 60
CAP = Decimal("0.003")


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, reply=LONG_REPLY) as standin:
        yield standin


def billed_nanos(server: MoonshotStandIn) -> int:
    prices = PriceTable.load()
    return sum(
        prices.get(r.model).cost_nanos(
            r.usage["prompt_tokens"], r.usage["cached_tokens"], r.usage["completion_tokens"]
        )
        for r in server.chat_requests
        if r.usage is not None and r.model is not None
    )


def calls_until_refused(client: kb.OpenAI, limit: int = 30) -> int:
    for number in range(limit):
        try:
            client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=200)
        except kb.BudgetExceededError:
            return number
    return limit


def test_environment_cap_holds_when_code_passes_a_budget(
    monkeypatch: pytest.MonkeyPatch, server: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", str(CAP))
    client = kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        budget=kb.Budget(daily="100", per_call="1"),  # generous: the environment's cap is not
    )
    assert calls_until_refused(client) < 30
    assert 0 < billed_nanos(server) <= CAP * 10**9
    assert {cap for budget in client.budgets for cap in budget.caps.values()} >= {CAP}


def test_file_cap_holds_in_a_copy_with_its_own_budget(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    Path("kimi-budget.toml").write_text(f'[budget]\ndaily = "{CAP}"\n')
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path)
    copy = client.with_options(budget=kb.Budget(monthly="100"))
    assert calls_until_refused(copy) < 30
    assert 0 < billed_nanos(server) <= CAP * 10**9
    assert kb.Budget(monthly="100") in copy.budgets and len(copy.budgets) == 2


def test_the_strictest_cap_wins(
    monkeypatch: pytest.MonkeyPatch, server: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", "100")
    client = kb.OpenAI(
        api_key=KEY, base_url=server.base_url, ledger=ledger_path, budget=kb.Budget(total=CAP)
    )
    with pytest.raises(kb.BudgetExceededError, match="total cap"):
        for _ in range(30):
            client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=200)
    assert 0 < billed_nanos(server) <= CAP * 10**9


def test_an_empty_budget_list_does_not_lift_configured_caps(
    monkeypatch: pytest.MonkeyPatch, server: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_TOTAL_USD", str(CAP))
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path, budget=[])
    assert calls_until_refused(client) < 30
    assert 0 < billed_nanos(server) <= CAP * 10**9
