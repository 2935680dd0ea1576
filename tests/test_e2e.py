"""End to end, against a real HTTP server on 127.0.0.1 that speaks Moonshot's protocol."""

from __future__ import annotations

import json
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

import kimi_budget as kb
from kimi_budget._money import call_cost_nanos, to_usd
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY
from tests.python_processes import PythonProcess

LONG_PREFIX = "You are a careful assistant. " + "Context line about budgets and ledgers. " * 80


def billed_nanos(server: MoonshotStandIn, client: kb.OpenAI) -> int:
    """What the server billed, priced at the prices the ledger recorded for each call."""
    total = 0
    for usage in server.billed:
        price = client._kb.prices.get("kimi-k2.5")
        total += call_cost_nanos(
            prompt_tokens=usage["prompt_tokens"],
            cached_tokens=usage.get("cached_tokens", 0),
            completion_tokens=usage["completion_tokens"],
            cache_hit=price.cache_hit,
            cache_miss=price.cache_miss,
            output=price.output,
        )
    return total


def test_cache_hits_are_priced_at_the_hit_price(
    client: kb.OpenAI, standin: MoonshotStandIn
) -> None:
    messages = [{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": "First?"}]
    client.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=60)
    messages[-1] = {"role": "user", "content": "Second?"}
    second = client.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=60)
    assert second.usage is not None
    cached = second.usage.model_extra["cached_tokens"]  # Moonshot's top-level field
    assert cached > 256
    rows = list(reversed(client.ledger.calls(10)))
    assert [r["cached_tokens"] for r in rows] == [0, cached]
    assert rows[1]["cost_nanos"] == (
        (second.usage.prompt_tokens - cached) * 600
        + cached * 100
        + second.usage.completion_tokens * 3000
    )
    assert client.ledger.spend() == to_usd(billed_nanos(standin, client))
    # The local K2 count is exact: what we reserved for the prompt is what was billed.
    assert [r["prompt_estimate"] for r in rows] == [r["prompt_tokens"] for r in rows]


def test_stream_usage_in_the_final_choice(client: kb.OpenAI, standin: MoonshotStandIn) -> None:
    stream = client.chat.completions.create(
        model="kimi-k2.5",
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=40,
        stream=True,
    )
    chunks = list(stream)
    final = chunks[-1]
    assert final.usage is None and final.choices[0].model_extra["usage"]["completion_tokens"] > 0
    [row] = client.ledger.calls(1)
    assert row["estimated"] == 0 and row["stream"] == 1
    assert row["completion_tokens"] == standin.billed[-1]["completion_tokens"]
    assert "stream_options" not in standin.chat_requests[-1].body


def test_server_400_for_too_long_a_request_is_recorded_at_zero(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    # A user-supplied counter that undercounts lets the request through; Moonshot refuses it.
    client = kb.OpenAI(
        api_key=KEY, base_url=standin.base_url, ledger=ledger_path, token_counter=lambda body: 1
    )
    with pytest.raises(openai.BadRequestError, match="exceeded model token limit: 8192"):
        client.chat.completions.create(
            model="moonshot-v1-8k",
            messages=[{"role": "user", "content": "hi " * 50}],
            max_tokens=8190,
        )
    [row] = client.ledger.calls(1)
    assert row["status"] == "error" and row["cost_nanos"] == 0 and row["attempts"] == 1
    assert client.ledger.spend() == 0


@pytest.fixture
def v1_server() -> Any:
    """A server whose moonshot-v1 counts are lower than our conservative approximation."""
    from kimi_budget._tokens import count_request_tokens

    with MoonshotStandIn(
        api_key=KEY, count_tokens=lambda body: count_request_tokens(body, "kimi_k2").tokens
    ) as server:
        yield server


def test_estimate_endpoint_confirms_an_approximate_refusal(
    v1_server: MoonshotStandIn, ledger_path: Path
) -> None:
    from kimi_budget._tokens import count_request_tokens

    standin = v1_server
    client = kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger_path)
    messages = [{"role": "user", "content": "Please summarise the quarterly report. " * 20}]
    exact = client._kb_exact_count({"model": "moonshot-v1-8k", "messages": messages})
    approximate = count_request_tokens(
        {"model": "moonshot-v1-8k", "messages": messages}, "approximate"
    )
    assert not approximate.exact and approximate.tokens > exact
    before = len(standin.requests)
    client.chat.completions.create(
        model="moonshot-v1-8k", messages=messages, max_tokens=8192 - exact
    )
    paths = [r.path for r in standin.requests[before:]]
    assert paths == ["/v1/tokenizers/estimate-token-count", "/v1/chat/completions"]
    with pytest.raises(kb.ContextLengthExceededError) as info:
        client.chat.completions.create(
            model="moonshot-v1-8k", messages=messages, max_tokens=8192 - exact + 1
        )
    assert info.value.exact and info.value.prompt_tokens == exact
    assert [r.path for r in standin.requests[before:]][-1] == "/v1/tokenizers/estimate-token-count"


def test_exact_tokens_always_asks_the_endpoint(standin: MoonshotStandIn, ledger_path: Path) -> None:
    client = kb.OpenAI(
        api_key=KEY, base_url=standin.base_url, ledger=ledger_path, exact_tokens="always"
    )
    client.chat.completions.create(
        model="moonshot-v1-32k", messages=[{"role": "user", "content": "你好世界"}], max_tokens=5
    )
    [row] = client.ledger.calls(1)
    assert row["prompt_estimate"] == row["prompt_tokens"]
    assert [r.path for r in standin.requests][:2] == [
        "/v1/tokenizers/estimate-token-count",
        "/v1/chat/completions",
    ]


def test_async_client_under_one_cap(standin: MoonshotStandIn, ledger_path: Path) -> None:
    import asyncio

    cap = Decimal("0.003")

    async def main() -> tuple[int, int]:
        client = kb.AsyncOpenAI(
            api_key=KEY, base_url=standin.base_url, ledger=ledger_path, budget=kb.Budget(total=cap)
        )

        async def one(i: int) -> bool:
            try:
                await client.chat.completions.create(
                    model="kimi-k2.5",
                    messages=[{"role": "user", "content": f"call {i}"}],
                    max_tokens=200,
                )
                return True
            except kb.BudgetExceededError:
                return False

        results = await asyncio.gather(*(one(i) for i in range(30)))
        return sum(results), len(results) - sum(results)

    ok, refused = asyncio.run(main())
    ledger = kb.Ledger(ledger_path)
    assert ok == len(standin.chat_requests) == len(ledger.calls(100))
    assert refused > 0 and ledger.spend() <= cap
    assert ledger.pending() == []


WORKER = textwrap.dedent(
    """
    import json, sys
    import kimi_budget as kb
    base_url, ledger, key, worker = sys.argv[1:5]
    client = kb.OpenAI(api_key=key, base_url=base_url, ledger=ledger,
                       budget=kb.Budget(daily="0.004"), tags={"worker": worker})
    results = []
    for i in range(10):
        try:
            client.chat.completions.create(
                model="kimi-k2.5", max_tokens=200,
                messages=[{"role": "user", "content": f"worker {worker} call {i}"}])
            results.append({"ok": True})
        except kb.BudgetExceededError as e:
            results.append({"ok": False, "spent": str(e.spent_usd), "reserved": str(e.reserved_usd),
                            "projected": str(e.projected_usd), "limit": str(e.limit_usd)})
    print(json.dumps(results))
    """
)


def test_four_processes_share_one_daily_cap(standin: MoonshotStandIn, ledger_path: Path) -> None:
    kb.Ledger(ledger_path).close()
    workers = [
        PythonProcess(WORKER, standin.base_url, str(ledger_path), KEY, str(n)) for n in range(4)
    ]
    results: list[dict[str, Any]] = []
    for worker in workers:
        run = worker.communicate(timeout=120)
        assert run.returncode == 0, run.stderr
        results += json.loads(run.stdout)
    assert len(results) == 40
    ledger = kb.Ledger(ledger_path)
    cap = Decimal("0.004")
    sent = [r for r in results if r["ok"]]
    refused = [r for r in results if not r["ok"]]
    # 0 overshoot: settled spend never passes the cap.
    assert ledger.spend() <= cap
    # Every sent call is one ledger row, and the ledger matches what the server billed.
    assert len(sent) == len(standin.chat_requests) == len(ledger.calls(100))
    assert ledger.spend() == to_usd(
        billed_nanos(standin, kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger))
    )
    assert ledger.pending() == []
    # No needless refusals: each one really lacked headroom when it was made.
    assert refused, "the cap was meant to be reached"
    for r in refused:
        assert Decimal(r["spent"]) + Decimal(r["reserved"]) + Decimal(r["projected"]) > Decimal(
            r["limit"]
        )
    # Refusals come once the cap is mostly used (in-flight reservations hold the rest).
    assert min(Decimal(r["spent"]) + Decimal(r["reserved"]) for r in refused) > cap / 2
