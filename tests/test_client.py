"""The guarded client, with Moonshot mocked by respx: pre-checks, recording, drop-in behaviour."""

from __future__ import annotations

import gc
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx

import kimi_budget as kb
from tests.conftest import KEY, MOCK_BASE_URL
from tests.helpers import LogCapture, completion, error, sent_body, sse_response, stream_chunks

MESSAGES = [{"role": "user", "content": "Say hello."}]


def rows(client: kb.OpenAI) -> list[dict[str, Any]]:
    return list(reversed(client.ledger.calls(1000)))


def test_records_cost_with_top_level_cached_tokens(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, json=completion(prompt=19, completion_tokens=21, cached=10)
        )
    )
    response = mocked_client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=100
    )
    assert response.usage is not None and response.usage.completion_tokens == 21
    [row] = rows(mocked_client)
    # (19 - 10) x $0.60/M + 10 x $0.10/M + 21 x $3.00/M
    assert row["cost_nanos"] == 9 * 600 + 10 * 100 + 21 * 3000
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (19, 10, 21)
    assert row["status"] == "ok" and row["estimated"] == 0 and row["attempts"] == 1
    assert row["request_id"] == "chatcmpl-6911668985355ab7ab43bc2b"
    assert (row["price_cache_hit"], row["price_cache_miss"], row["price_output"]) == (
        100,
        600,
        3000,
    )
    assert mocked_client.ledger.spend() == Decimal("0.0000694")


@pytest.mark.parametrize("style", ["openai", "both"])
def test_reads_openai_spelling_of_cached_tokens(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, style: str
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion(cached=10, style=style))
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=100)
    assert rows(mocked_client)[0]["cached_tokens"] == 10


def test_request_is_sent_unchanged(mocked_client: kb.OpenAI, moonshot_mock: respx.Router) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    raw = openai.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, max_retries=0)
    kwargs: dict[str, Any] = dict(
        model="kimi-k2.5", messages=MESSAGES, temperature=0.3, extra_body={"partial": False}
    )
    raw.chat.completions.create(**kwargs)
    mocked_client.chat.completions.create(**kwargs)
    assert sent_body(route, 0) == sent_body(route, 1)
    assert "max_tokens" not in sent_body(route, 1)  # never added to make a check pass
    assert "stream_options" not in sent_body(route, 1)
    assert route.calls[1].request.headers["authorization"] == f"Bearer {KEY}"


def test_stream_usage_inside_final_choice(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    usage = {"prompt_tokens": 4796, "completion_tokens": 174, "total_tokens": 4970}
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=sse_response(stream_chunks(["Hel", "lo"], usage=usage))
    )
    stream = mocked_client.chat.completions.create(
        model="kimi-k2-0905-preview", messages=MESSAGES, max_tokens=500, stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert pieces[:2] == ["Hel", "lo"]
    assert "stream_options" not in sent_body(route)
    [row] = rows(mocked_client)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (4796, 174, 0)
    assert row["cost_nanos"] == 4796 * 600 + 174 * 2500
    assert row["stream"] == 1


def test_stream_usage_in_top_level_chunk(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32, "cached_tokens": 20}
    moonshot_mock.post("/chat/completions").mock(
        return_value=sse_response(stream_chunks(["a", "b"], usage=usage, usage_in_choice=False))
    )
    stream = mocked_client.chat.completions.create(
        model="kimi-k2.5",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    for _ in stream:
        pass
    [row] = rows(mocked_client)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (30, 20, 2)
    assert row["cost_nanos"] == 10 * 600 + 20 * 100 + 2 * 3000


def test_abandoned_stream_is_recorded_once_as_estimate(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
    moonshot_mock.post("/chat/completions").mock(
        return_value=sse_response(stream_chunks(["w"] * 5, usage=usage), piecewise=True)
    )
    stream = mocked_client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=100, stream=True
    )
    for _ in stream:
        break
    stream.close()
    stream.close()  # closing twice settles once
    [row] = rows(mocked_client)
    assert row["status"] == "abandoned" and row["estimated"] == 1
    assert row["completion_tokens"] >= 1
    price_in = row["prompt_tokens"] * 600
    assert row["cost_nanos"] == price_in + row["completion_tokens"] * 3000
    assert mocked_client.ledger.pending() == []


def test_garbage_collected_stream_is_recorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=sse_response(stream_chunks(["w"] * 3, usage=None), piecewise=True)
    )
    stream = mocked_client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=100, stream=True
    )
    next(iter(stream))
    del stream
    gc.collect()
    [row] = rows(mocked_client)
    assert row["status"] in ("abandoned", "ok") and row["estimated"] == 1
    assert mocked_client.ledger.pending() == []


def test_stream_without_usage_is_flagged(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=sse_response(stream_chunks(["a", "b", "c"], usage=None))
    )
    with LogCapture() as logged:
        for _ in mocked_client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=100, stream=True
        ):
            pass
    [row] = rows(mocked_client)
    assert row["status"] == "ok" and row["estimated"] == 1
    assert "without usage" in row["note"] and "full reservation" in row["note"]
    assert row["cost_nanos"] == row["projected_nanos"] and row["completion_tokens"] == 100
    assert any("without usage" in message for message in logged)


def test_raw_and_streaming_responses_are_recorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200,
            json=completion(prompt=40, completion_tokens=2, cached=0),
            headers={"msh-request-id": "req-1"},
        )
    )
    raw = mocked_client.chat.completions.with_raw_response.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=10
    )
    assert raw.headers["msh-request-id"] == "req-1"  # not parsed by the caller, still recorded
    with mocked_client.chat.completions.with_streaming_response.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=10
    ) as response:
        assert response.parse().usage is not None
    recorded = rows(mocked_client)
    assert [r["prompt_tokens"] for r in recorded] == [40, 40]
    assert all(r["status"] == "ok" and r["estimated"] == 0 for r in recorded)
    assert recorded[0]["request_id"] == "req-1"


def test_parse_and_stream_helpers_are_recorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    body = completion(prompt=12, completion_tokens=3, cached=None, content='{"a": 1}')
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            httpx.Response(200, json=body),
            sse_response(stream_chunks(["x", "y"], usage=usage, model="kimi-k2.5")),
        ]
    )
    parsed = mocked_client.chat.completions.parse(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=10, response_format={"type": "json_object"}
    )
    assert parsed.choices[0].message.content == '{"a": 1}'
    with mocked_client.chat.completions.stream(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=10
    ) as stream:
        text = "".join(
            event.delta for event in stream if getattr(event, "type", "") == "content.delta"
        )
    assert text == "xy"
    assert [r["completion_tokens"] for r in rows(mocked_client)] == [3, 2]


def test_other_endpoints_pass_through_unrecorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.get("/models").mock(
        return_value=httpx.Response(
            200,
            json={
                "object": "list",
                "data": [
                    {"id": "kimi-k2.5", "object": "model", "created": 1, "owned_by": "moonshot"}
                ],
            },
        )
    )
    assert [m.id for m in mocked_client.models.list().data] == ["kimi-k2.5"]
    assert rows(mocked_client) == []


def test_unknown_model_is_refused_before_sending(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    with pytest.raises(kb.UnknownModelError, match="prices=") as info:
        mocked_client.chat.completions.create(model="kimi-k9", messages=MESSAGES)
    assert info.value.model == "kimi-k9"
    assert isinstance(info.value, openai.OpenAIError)
    assert route.call_count == 0 and rows(mocked_client) == []


def test_added_model_is_priced(moonshot_mock: respx.Router, ledger_path: Path) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, json=completion(prompt=100, completion_tokens=10, cached=50)
        )
    )
    client = kb.OpenAI(
        api_key=KEY,
        base_url=MOCK_BASE_URL,
        ledger=ledger_path,
        prices={
            "kimi-k2.6": {
                "cache_hit": "0.16",
                "cache_miss": "0.95",
                "output": "4.00",
                "context_window": 262144,
                "default_max_tokens": 32768,
            }
        },
    )
    client.chat.completions.create(model="kimi-k2.6", messages=MESSAGES, max_tokens=10)
    assert rows(client)[0]["cost_nanos"] == 50 * 950 + 50 * 160 + 10 * 4000


def test_context_window_is_checked_before_sending(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    route = moonshot_mock.post("/chat/completions")
    with pytest.raises(kb.ContextLengthExceededError) as info:
        mocked_client.chat.completions.create(
            model="kimi-k2-0711-preview", messages=MESSAGES, max_tokens=131_072
        )
    error_ = info.value
    assert (error_.model, error_.max_tokens, error_.context_window) == (
        "kimi-k2-0711-preview",
        131_072,
        131_072,
    )
    assert error_.prompt_tokens > 0 and error_.exact
    assert route.call_count == 0


def test_approximate_count_is_confirmed_before_refusing(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    # moonshot-v1's tokenizer is not public: the local count is approximate, so a request
    # it says does not fit is checked with Moonshot's free count before being refused.
    estimate = moonshot_mock.post("/tokenizers/estimate-token-count").mock(
        return_value=httpx.Response(
            200, json={"code": 0, "data": {"total_tokens": 12}, "scode": "0x0", "status": True}
        )
    )
    chat = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200,
            json=completion(prompt=12, completion_tokens=1, cached=None, model="moonshot-v1-8k"),
        )
    )
    local = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=mocked_client.ledger)
    from kimi_budget._tokens import count_request_tokens

    body = {"model": "moonshot-v1-8k", "messages": MESSAGES}
    approx = count_request_tokens(body, "approximate").tokens
    fits_exactly = 8192 - 12  # fits by the server's count...
    assert approx + fits_exactly > 8192  # ...but not by the approximation
    local.chat.completions.create(
        model="moonshot-v1-8k", messages=MESSAGES, max_tokens=fits_exactly
    )
    assert estimate.call_count == 1 and chat.call_count == 1
    assert json.loads(estimate.calls[0].request.content)["messages"] == MESSAGES

    estimate.mock(return_value=httpx.Response(200, json={"data": {"total_tokens": 13}}))
    with pytest.raises(kb.ContextLengthExceededError) as info:
        local.chat.completions.create(
            model="moonshot-v1-8k", messages=MESSAGES, max_tokens=fits_exactly
        )
    assert info.value.exact and info.value.prompt_tokens == 13
    assert chat.call_count == 1


def test_budget_refuses_before_sending(moonshot_mock: respx.Router, ledger_path: Path) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, json=completion(prompt=19, completion_tokens=3000, cached=0)
        )
    )
    client = kb.OpenAI(
        api_key=KEY,
        base_url=MOCK_BASE_URL,
        ledger=ledger_path,
        budget=kb.Budget(per_call="0.01", daily="0.02"),
    )
    with pytest.raises(kb.BudgetExceededError) as info:
        client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=4000)
    assert info.value.window == "per_call" and info.value.limit_usd == Decimal("0.01")
    assert info.value.projected_usd > Decimal("0.01")
    assert route.call_count == 0
    # Each call bills 3000 output tokens: $0.009 (+ the prompt).
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=3000)
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=3000)
    with pytest.raises(kb.BudgetExceededError) as daily:
        client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=3000)
    e = daily.value
    assert e.window == "daily" and e.spent_usd == client.ledger.spend() == Decimal("0.0180228")
    assert e.reserved_usd == 0
    assert e.spent_usd + e.projected_usd > e.limit_usd
    assert e.resets_at is not None and "Refused before sending" in str(e)
    assert route.call_count == 2
    # A smaller call still fits the headroom that is left: no needless refusal.
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=300)
    assert route.call_count == 3


def test_projection_counts_every_choice_and_the_default_output(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    mocked_client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, n=3, max_completion_tokens=7
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES)
    first, second = rows(mocked_client)
    assert first["projected_nanos"] == first["prompt_estimate"] * 600 + 7 * 3 * 3000
    assert second["projected_nanos"] == second["prompt_estimate"] * 600 + 1024 * 3000


def test_with_options_and_copy_keep_ledger_budget_and_tags(
    moonshot_mock: respx.Router, ledger_path: Path
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    budget = kb.Budget(daily="1")
    client = kb.OpenAI(
        api_key=KEY,
        base_url=MOCK_BASE_URL,
        ledger=ledger_path,
        budget=budget,
        tags={"project": "crawler"},
    )
    copied = client.copy(timeout=5)
    tagged = client.with_options(max_retries=0, tags={"job": "nightly"})
    assert isinstance(copied, kb.OpenAI) and isinstance(tagged, kb.OpenAI)
    assert copied.ledger is client.ledger and tagged.ledger is client.ledger
    assert copied.budgets == (budget,) and tagged.budgets == (budget,)
    assert tagged.max_retries == 0 and copied.max_retries == client.max_retries == 2
    tagged.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert json.loads(rows(client)[0]["tags"]) == {"job": "nightly", "project": "crawler"}
    assert client.ledger.spend(tags={"job": "nightly"}) > 0
    assert client.ledger.spend(tags={"job": "other"}) == 0


def test_client_accepts_every_parent_argument(ledger_path: Path) -> None:
    http_client = openai.DefaultHttpxClient()
    client = kb.OpenAI(
        api_key=KEY,
        base_url=MOCK_BASE_URL,
        ledger=ledger_path,
        organization="org",
        project="p",
        timeout=12.5,
        max_retries=4,
        default_headers={"x-a": "1"},
        default_query={"q": "1"},
        http_client=http_client,
    )
    assert isinstance(client, openai.OpenAI)
    assert (client.organization, client.project, client.timeout, client.max_retries) == (
        "org",
        "p",
        12.5,
        4,
    )
    assert client.default_headers["x-a"] == "1"


def test_defaults_come_from_moonshot_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MOONSHOT_API_KEY", "sk-from-env-0123456789")
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", str(tmp_path / "env.db"))
    client = kb.OpenAI()
    assert client.api_key == "sk-from-env-0123456789"
    assert str(client.base_url).startswith("https://api.moonshot.ai/v1")
    assert client.ledger.path == tmp_path / "env.db"
    monkeypatch.setenv("MOONSHOT_BASE_URL", "https://api.moonshot.cn/v1")
    china = kb.OpenAI()
    assert str(china.base_url).startswith("https://api.moonshot.cn/v1")
    assert china._kb.prices.currency == "CNY"
    monkeypatch.delenv("MOONSHOT_API_KEY")
    with pytest.raises(openai.OpenAIError, match="MOONSHOT_API_KEY"):
        kb.OpenAI()


def test_custom_token_counter_is_used(moonshot_mock: respx.Router, ledger_path: Path) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    seen: list[dict[str, Any]] = []

    def counter(body: Any) -> int:
        seen.append(body)
        return 5000

    client = kb.OpenAI(
        api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path, token_counter=counter
    )
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=1)
    assert seen[0]["messages"] == MESSAGES
    assert rows(client)[0]["prompt_estimate"] == 5000


def test_balance(mocked_client: kb.OpenAI, moonshot_mock: respx.Router) -> None:
    moonshot_mock.get("/users/me/balance").mock(
        return_value=httpx.Response(
            200,
            content=b'{"code":0,"data":{"available_balance":49.58894,"voucher_balance":46.58893,"cash_balance":3.00001},"scode":"0x0","status":true}',
        )
    )
    balance = mocked_client.balance()
    assert balance == kb.Balance(
        Decimal("49.58894"), Decimal("46.58893"), Decimal("3.00001"), "USD"
    )


async def _async_calls(ledger_path: Path) -> kb.AsyncOpenAI:
    client = kb.AsyncOpenAI(
        api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path, budget=kb.Budget(daily="1")
    )
    await client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=10)
    stream = await client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=10, stream=True
    )
    async for _ in stream:
        pass
    copied = client.with_options(tags={"a": "b"})
    assert isinstance(copied, kb.AsyncOpenAI) and copied.ledger is client.ledger
    return client


def test_async_client_records_calls_and_streams(
    moonshot_mock: respx.Router, ledger_path: Path
) -> None:
    import asyncio

    usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            httpx.Response(200, json=completion(prompt=8, completion_tokens=3, cached=0)),
            sse_response(stream_chunks(["a", "b"], usage=usage, model="kimi-k2.5")),
        ]
    )
    client = asyncio.run(_async_calls(ledger_path))
    recorded = list(reversed(client.ledger.calls(10)))
    assert [(r["completion_tokens"], r["stream"], r["estimated"]) for r in recorded] == [
        (3, 0, 0),
        (2, 1, 0),
    ]
    assert client.ledger.pending() == []


def test_error_response_is_recorded_at_zero_cost(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=error(
            400,
            "invalid_request_error",
            "Invalid request: Your request exceeded model token limit: 262144",
        )
    )
    with pytest.raises(openai.BadRequestError):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=10)
    [row] = rows(mocked_client)
    assert row["status"] == "error" and row["cost_nanos"] == 0 and row["attempts"] == 1
    assert "exceeded model token limit" in row["error"]
    assert mocked_client.ledger.pending() == []


def test_china_platform_uses_the_cny_price_table(ledger_path: Path) -> None:
    client = kb.OpenAI(api_key=KEY, base_url="https://api.moonshot.cn/v1", ledger=ledger_path)
    assert client._kb.prices.currency == "CNY"
    assert client._kb.prices.get("kimi-k3").cache_miss == 20_000  # ¥20 per million
    usd = kb.OpenAI(api_key=KEY, base_url="https://api.moonshot.ai/v1", ledger=ledger_path)
    assert usd._kb.prices.get("kimi-k3").cache_miss == 3_000
