"""The projected output of a call is never less than the server can generate (and bill).

The projection is what a call reserves before it is sent: the prompt at the cache-miss price
plus every output token the server may generate at the output price. The tests give the
stand-in a reply longer than an optimistic projection, and check what it billed against a
per-call cap that the optimistic projection would have passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import kimi_budget as kb
from kimi_budget._guard import GuardSettings, prepare
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import MoonshotStandIn
from kimi_budget.testing._models import ModelInfo
from tests.conftest import KEY

LONG_REPLY = "The quick brown fox jumps over the lazy dog. " * 200  # about 2,000 tokens
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
# Prices of the day's models (moonshot-models-2026.md), given here so the tests do not depend
# on which models the built-in table lists: USD per million tokens.
K26 = {
    "cache_hit": "0.15",
    "cache_miss": "0.60",
    "output": "2.50",
    "context_window": 262_144,
    "default_max_tokens": 32_768,
}
# A model the user priced without saying its default output limit.
UNDOCUMENTED = {
    "cache_hit": "0.15",
    "cache_miss": "0.60",
    "output": "2.50",
    "context_window": 8_192,
}


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(
        api_key=KEY,
        reply=LONG_REPLY,
        extra_models={"my-model": ModelInfo(8_192, 4_000)},
    ) as standin:
        yield standin


def billed_nanos(server: MoonshotStandIn, prices: PriceTable) -> int:
    total = 0
    for request in server.chat_requests:
        if request.usage is not None and request.model is not None:
            total += prices.get(request.model).cost_nanos(
                request.usage["prompt_tokens"],
                request.usage["cached_tokens"],
                request.usage["completion_tokens"],
            )
    return total


def client_for(server: MoonshotStandIn, ledger: Path, **kwargs: Any) -> kb.OpenAI:
    return kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger,
        max_retries=0,
        prices={"kimi-k2.6": K26, "my-model": UNDOCUMENTED},
        **kwargs,
    )


def settings(**prices: dict[str, Any]) -> GuardSettings:
    return GuardSettings(
        ledger=None,  # type: ignore[arg-type]  # prepare() needs no ledger
        budgets=(),
        tags={},
        prices=PriceTable.load(overrides=prices),
        exact_tokens="never",
    )


def test_no_limit_projects_the_models_default_output(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    # A per-call cap that a 1,024-token projection fits, and the reply the server then
    # generates (about 2,000 tokens, within kimi-k2.6's default of 32,768) does not.
    cap = Decimal("0.004")
    client = client_for(server, ledger_path, budget=kb.Budget(per_call=cap))
    with pytest.raises(kb.BudgetExceededError, match="per-call cap"):
        client.chat.completions.create(model="kimi-k2.6", messages=MESSAGES)
    assert billed_nanos(server, client._kb.prices) <= cap * 10**9
    # Without the cap, the same call is billed more than a 1,024-token projection covers.
    free = client_for(server, ledger_path)
    free.chat.completions.create(model="kimi-k2.6", messages=MESSAGES)
    [row] = free.ledger.calls(1)
    assert row["completion_tokens"] > 1024
    assert row["projected_nanos"] >= row["cost_nanos"] > cap * 10**9
    assert row["projected_nanos"] == row["prompt_estimate"] * 600 + 32_768 * 2500


def test_both_limits_project_the_larger(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = client_for(server, ledger_path)
    client.chat.completions.create(
        model="kimi-k2.6", messages=MESSAGES, max_tokens=10, max_completion_tokens=3000
    )
    client.chat.completions.create(
        model="kimi-k2.6", messages=MESSAGES, max_tokens=3000, max_completion_tokens=10
    )
    rows = client.ledger.calls(2)
    for row in rows:
        # Whichever limit the server honours, the reservation covers it.
        assert row["projected_nanos"] == row["prompt_estimate"] * 600 + 3000 * 2500
        assert row["cost_nanos"] <= row["projected_nanos"]


def test_user_priced_model_without_a_default_projects_the_window(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    client = client_for(server, ledger_path, token_counter=lambda body: 100)
    client.chat.completions.create(model="my-model", messages=MESSAGES)
    [row] = client.ledger.calls(1)
    assert row["projected_nanos"] == 100 * 600 + (8_192 - 100) * 2500
    assert row["completion_tokens"] > 1024  # the server went past the old 1,024 guess
    assert row["cost_nanos"] <= row["projected_nanos"]


def test_an_over_estimated_prompt_does_not_shrink_the_output() -> None:
    body = {"model": "approx", "messages": [{"role": "user", "content": "word " * 6000}]}
    prepared = prepare(
        settings(approx={**UNDOCUMENTED, "tokenizer": "approximate", "default_max_tokens": 4096}),
        body,
        None,
    )
    assert not prepared.estimate.exact and prepared.estimate.tokens > 4096
    # 8,192 - the estimate would be less than 4,096; the prompt may really be far shorter.
    assert prepared.max_output == 4096
    undocumented = prepare(
        settings(approx={**UNDOCUMENTED, "tokenizer": "approximate"}), body, None
    )
    assert undocumented.max_output == 8_192  # the whole window: the estimate may be too high


def test_an_exact_prompt_narrows_the_output_to_the_window() -> None:
    body = {"model": "exact", "messages": [{"role": "user", "content": "hi"}]}
    table = settings(exact=UNDOCUMENTED)
    table.token_counter = lambda body: 8_000
    assert prepare(table, body, None).max_output == 192


def test_limits_in_other_number_shapes_are_read() -> None:
    body = {"model": "kimi-k2.6", "messages": MESSAGES, "max_tokens": 3000.0, "n": "2"}
    prepared = prepare(settings(**{"kimi-k2.6": K26}), body, None)
    assert prepared.max_output == 3000 and prepared.choices == 2
    unreadable = {"model": "kimi-k2.6", "messages": MESSAGES, "max_tokens": "lots"}
    # A limit we cannot read may still be one the server reads: the whole window, then.
    read = prepare(settings(**{"kimi-k2.6": K26}), unreadable, None)
    assert read.estimate.exact and read.max_output == 262_144 - read.estimate.tokens


@pytest.mark.parametrize("n", [10**13, 10**18, 2**70])
def test_absurd_n_is_a_clear_error(ledger_path: Path, n: int) -> None:
    client = kb.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1", ledger=ledger_path)
    with pytest.raises(kb.InvalidRequestError, match="Lower n"):
        client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, n=n)
    assert client.ledger.calls(1) == []


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_absurd_limit_is_a_clear_error(ledger_path: Path, field: str) -> None:
    client = kb.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1", ledger=ledger_path)
    with pytest.raises(kb.ContextLengthExceededError, match="context window"):
        client.chat.completions.create(
            model="kimi-k2.5",
            messages=MESSAGES,
            **{field: 10**30},  # type: ignore[arg-type]
        )


def test_an_absurd_second_limit_is_bounded_by_the_window(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    client = client_for(server, ledger_path)
    client.chat.completions.create(
        model="kimi-k2.6", messages=MESSAGES, max_tokens=50, max_completion_tokens=10**30
    )
    [row] = client.ledger.calls(1)
    assert row["projected_nanos"] <= row["prompt_estimate"] * 600 + 262_144 * 2500
    assert row["cost_nanos"] <= row["projected_nanos"]
