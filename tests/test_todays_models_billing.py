"""Today's models billed end to end against the stand-in: exact costs with cache hits, default
outputs projected (and the refusal saying so), the 1 M window of K3, 1-hour cache writes, the
$web_search fee, and the CNY platform kept apart from USD."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

import kimi_budget as kb
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import Fault, MoonshotStandIn
from tests.conftest import KEY

CURRENT = [
    "kimi-k2.6",
    "kimi-k2.7-code",
    "kimi-k2.7-code-highspeed",
    "kimi-k3",
    "kimi-k3.1-pro",
    "kimi-k3.1-pro-highspeed",
]
# USD per 1M tokens, copied by hand from shared/moonshot-models-2026.md: (hit, miss, output).
BY_HAND = {
    "kimi-k2.6": ("0.16", "0.95", "4.00"),
    "kimi-k2.7-code": ("0.19", "0.95", "4.00"),
    "kimi-k2.7-code-highspeed": ("0.38", "1.90", "8.00"),
    "kimi-k3": ("0.30", "3.00", "15.00"),
    "kimi-k3.1-pro": ("0.20", "2.00", "10.00"),
    "kimi-k3.1-pro-highspeed": ("0.40", "4.00", "20.00"),
}
CNY_BY_HAND = {
    "kimi-k2.6": ("1.10", "6.50", "27.00"),
    "kimi-k2.7-code": ("1.30", "6.50", "27.00"),
    "kimi-k2.7-code-highspeed": ("2.60", "13.00", "54.00"),
    "kimi-k3": ("2.00", "20.00", "100.00"),
}
LONG = [{"role": "user", "content": "Summarise the history of tea in three lines. " * 60}]
WEB_SEARCH = {"type": "builtin_function", "function": {"name": "$web_search"}}
GET_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def _client(standin: MoonshotStandIn, ledger_path: Path, **kwargs: Any) -> kb.OpenAI:
    return kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger_path, **kwargs)


def _nanos(prompt: int, cached: int, completion: int, prices: tuple[str, str, str]) -> int:
    hit, miss, out = (Decimal(p) for p in prices)
    total = (prompt - cached) * miss + cached * hit + completion * out  # per million
    nanos = total * 1000  # 1e9 / 1e6
    assert nanos == nanos.to_integral_value()
    return int(nanos)


@pytest.mark.parametrize("model", CURRENT)
def test_every_current_model_is_charged_exactly_with_cache_hits(
    model: str, standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path)
    standin.queue_fault(Fault.cached(256))
    client.chat.completions.create(model=model, messages=LONG, max_tokens=30)  # type: ignore[arg-type]
    [bill] = standin.billed
    [row] = client.ledger.calls(1)
    assert bill["cached_tokens"] == 256 < bill["prompt_tokens"]
    expected = _nanos(bill["prompt_tokens"], 256, bill["completion_tokens"], BY_HAND[model])
    assert row["cost_nanos"] == expected and row["currency"] == "USD"
    assert row["fee_nanos"] == 0 and row["estimated"] == 0


def test_a_k3_call_without_max_tokens_is_refused_under_a_one_dollar_per_call_cap(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path, budget=kb.Budget(per_call="1"))
    with pytest.raises(kb.BudgetExceededError) as refused:
        client.chat.completions.create(
            model="kimi-k3", messages=[{"role": "user", "content": "hi"}]
        )
    message = str(refused.value)
    assert "set max_tokens" in message and "131,072" in message
    assert refused.value.projected_usd > Decimal("1.966")  # 131,072 x $15 / 1M alone
    assert standin.chat_requests == [] and client.ledger.calls(5) == []
    # With max_tokens the same request fits, and the refusal message has no such advice.
    client.chat.completions.create(
        model="kimi-k3", messages=[{"role": "user", "content": "hi"}], max_tokens=2000
    )
    with pytest.raises(kb.BudgetExceededError) as explicit:
        client.chat.completions.create(
            model="kimi-k3", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
    assert "set max_tokens" not in str(explicit.value)


def test_a_300k_token_prompt_fits_kimi_k3_and_not_kimi_k2_6(ledger_path: Path) -> None:
    def count(body: Any) -> int:
        return 300_000

    with MoonshotStandIn(api_key=KEY, count_tokens=count) as standin:
        client = _client(standin, ledger_path, token_counter=count)
        messages = [{"role": "user", "content": "a long document"}]
        client.chat.completions.create(model="kimi-k3", messages=messages, max_tokens=100)  # type: ignore[arg-type]
        [row] = client.ledger.calls(1)
        assert row["prompt_tokens"] == 300_000 and row["status"] == "ok"
        with pytest.raises(kb.ContextLengthExceededError):
            client.chat.completions.create(model="kimi-k2.6", messages=messages, max_tokens=100)  # type: ignore[arg-type]
        assert len(standin.chat_requests) == 1


def test_a_web_search_call_is_charged_its_fee_to_the_nano_dollar(ledger_path: Path) -> None:
    with MoonshotStandIn(api_key=KEY, call_tools=True) as standin:
        client = _client(standin, ledger_path)
        client.chat.completions.create(
            model="kimi-k2.6",
            messages=LONG,
            tools=[WEB_SEARCH],
            max_tokens=50,  # type: ignore[arg-type,list-item]
        )
        [bill] = standin.billed
        [row] = client.ledger.calls(1)
        tokens = _nanos(
            bill["prompt_tokens"],
            bill["cached_tokens"],
            bill["completion_tokens"],
            BY_HAND["kimi-k2.6"],
        )
        assert row["fee_nanos"] == 5_000_000  # $0.005
        assert row["cost_nanos"] == tokens + 5_000_000
        price = PriceTable.load().get("kimi-k2.6")
        assert row["projected_nanos"] == (
            bill["prompt_tokens"] * price.cache_miss + 50 * price.output + 5_000_000
        )


def test_web_search_fees_are_read_from_streams_and_per_choice(ledger_path: Path) -> None:
    with MoonshotStandIn(api_key=KEY, call_tools=True) as standin:
        client = _client(standin, ledger_path)
        stream = client.chat.completions.create(
            model="kimi-k2.6",
            messages=LONG,  # type: ignore[arg-type]
            tools=[WEB_SEARCH],  # type: ignore[list-item]
            max_tokens=50,
            n=2,
            stream=True,
        )
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
        assert "tool_calls" in finishes
        [row] = client.ledger.calls(1)
        [bill] = standin.billed
        tokens = _nanos(
            bill["prompt_tokens"],
            bill["cached_tokens"],
            bill["completion_tokens"],
            BY_HAND["kimi-k2.6"],
        )
        assert row["fee_nanos"] == 10_000_000 and row["cost_nanos"] == tokens + 10_000_000


def test_a_user_defined_tool_call_carries_no_fee(ledger_path: Path) -> None:
    with MoonshotStandIn(api_key=KEY, call_tools=True) as standin:
        client = _client(standin, ledger_path)
        resp = client.chat.completions.create(
            model="kimi-k2.6",
            messages=LONG,
            tools=[GET_WEATHER],
            max_tokens=50,  # type: ignore[arg-type,list-item]
        )
        assert resp.choices[0].finish_reason == "tool_calls"
        [row] = client.ledger.calls(1)
        [bill] = standin.billed
        assert row["fee_nanos"] == 0
        assert row["cost_nanos"] == _nanos(
            bill["prompt_tokens"],
            bill["cached_tokens"],
            bill["completion_tokens"],
            BY_HAND["kimi-k2.6"],
        )


def test_a_one_hour_cache_write_is_projected_and_charged_at_its_price(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path)
    client.chat.completions.create(
        model="kimi-k3",
        messages=LONG,  # type: ignore[arg-type]
        max_tokens=40,
        extra_body={"prompt_cache_options": {"ttl": "1h"}},
    )
    [bill] = standin.billed
    [row] = client.ledger.calls(1)
    written = bill["cache_write_tokens"]
    assert written == bill["prompt_tokens"] - bill["cached_tokens"] > 0
    # $6.00 per million written (1 h), $15.00 per million out.
    assert row["projected_nanos"] == bill["prompt_tokens"] * 6_000 + 40 * 15_000
    assert (
        row["cost_nanos"]
        == written * 6_000 + bill["cached_tokens"] * 300 + bill["completion_tokens"] * 15_000
    )
    assert row["cache_write_tokens"] == written and row["note"] is None
    assert json.loads(row["usage_json"])["prompt_tokens_details"]["cache_write_tokens"] == written


def test_unreported_cache_writes_are_charged_at_the_worst_case_and_the_usage_kept(
    ledger_path: Path,
) -> None:
    with MoonshotStandIn(api_key=KEY, cache_write_field=None) as standin:
        client = _client(standin, ledger_path)
        client.chat.completions.create(
            model="kimi-k3",
            messages=LONG,  # type: ignore[arg-type]
            max_tokens=40,
            extra_body={"prompt_cache_options": {"ttl": "1h"}},
        )
        [bill] = standin.billed
        [row] = client.ledger.calls(1)
        uncached = bill["prompt_tokens"] - bill["cached_tokens"]
        assert row["cost_nanos"] == uncached * 6_000 + bill["completion_tokens"] * 15_000
        assert "did not report cache-write tokens" in row["note"]
        assert json.loads(row["usage_json"])["prompt_tokens"] == bill["prompt_tokens"]


def test_a_call_to_a_retired_model_is_sent_and_the_servers_answer_recorded(
    ledger_path: Path,
) -> None:
    with MoonshotStandIn(api_key=KEY, retired=["kimi-k2.5"]) as standin:
        client = _client(standin, ledger_path)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        [row] = client.ledger.calls(1)
        assert len(standin.chat_requests) == 1
        assert row["status"] == "error" and row["cost_nanos"] == 0


def test_a_cny_client_records_cny_rows_that_never_reach_a_usd_total(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    cny = _client(standin, ledger_path, currency="CNY")
    usd = _client(standin, ledger_path)
    standin.queue_fault(Fault.cached(256))
    cny.chat.completions.create(model="kimi-k3", messages=LONG, max_tokens=20)  # type: ignore[arg-type]
    [bill] = standin.billed
    [row] = cny.ledger.calls(1)
    assert row["currency"] == "CNY"
    assert row["cost_nanos"] == _nanos(
        bill["prompt_tokens"], 256, bill["completion_tokens"], CNY_BY_HAND["kimi-k3"]
    )
    from kimi_budget.cli._report import build_report

    def total(currency: str) -> int:
        return build_report(usd.ledger, by="total", currency=currency).total.cost_nanos

    assert total("USD") == 0 and total("CNY") == row["cost_nanos"]
    usd.chat.completions.create(model="kimi-k2.6", messages=LONG, max_tokens=20)  # type: ignore[arg-type]
    usd_row = usd.ledger.calls(1)[0]
    assert usd_row["currency"] == "USD"
    assert total("USD") == usd_row["cost_nanos"] and total("CNY") == row["cost_nanos"]


def test_a_cny_client_needs_a_cny_budget_when_budgets_are_given(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    with pytest.raises(ValueError, match="CNY budget"):
        _client(standin, ledger_path, currency="CNY", budget=kb.Budget(daily="5"))
    with pytest.raises(ValueError, match="currency"):
        _client(standin, ledger_path, currency="EUR")


def test_the_base_url_of_the_china_platform_picks_the_cny_table(ledger_path: Path) -> None:
    client = kb.OpenAI(api_key=KEY, base_url="https://api.moonshot.cn/v1", ledger=ledger_path)
    assert client._kb.prices.currency == "CNY"


def test_cny_caps_from_the_environment_cap_only_cny_calls(
    monkeypatch: pytest.MonkeyPatch, standin: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_PER_CALL_CNY", "0.01")
    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", "0.000001")  # never counts or caps CNY calls
    client = _client(standin, ledger_path, currency="CNY")
    with pytest.raises(kb.BudgetExceededError, match=r"per-call cap of ¥0\.01"):
        client.chat.completions.create(model="kimi-k3", messages=LONG, max_tokens=2000)  # type: ignore[arg-type]
    client.chat.completions.create(
        model="kimi-k2.6", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    [row] = client.ledger.calls(1)
    assert row["currency"] == "CNY"
    assert client.ledger.spend() == 0  # the USD total never sees it
    assert client.ledger.spend(currency="CNY") == kb._money.to_usd(row["cost_nanos"])  # type: ignore[attr-defined]


def test_report_shows_web_search_fees_on_their_own_line(ledger_path: Path) -> None:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    with MoonshotStandIn(api_key=KEY, call_tools=True) as standin:
        client = _client(standin, ledger_path)
        client.chat.completions.create(
            model="kimi-k2.6",
            messages=LONG,
            tools=[WEB_SEARCH],
            max_tokens=50,  # type: ignore[arg-type,list-item]
        )
    result = CliRunner().invoke(cli, ["report", "--ledger", str(ledger_path)])
    assert result.exit_code == 0, result.output
    assert "$0.005 is $web_search fees" in result.output
    as_json = CliRunner().invoke(cli, ["report", "--ledger", str(ledger_path), "--json"])
    assert json.loads(as_json.output)["fees_usd"] == "0.005"
