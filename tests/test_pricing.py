"""Prices: every model of Moonshot's pricing document, exact to the nano-dollar."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

import kimi_budget as kb
from kimi_budget._money import call_cost_nanos, price_to_nanos_per_token, to_usd
from kimi_budget.pricing import BUILTIN_SOURCE, PriceTable
from tests.conftest import KEY, MOCK_BASE_URL
from tests.helpers import completion

# Copied by hand from the pricing document (USD per 1M tokens: cache hit, cache miss, output;
# context window). moonshot-v1 has one input price, used for hits and misses alike.
DOCUMENT = {
    "kimi-k2.5": ("0.10", "0.60", "3.00", 262_144),
    "kimi-k2-0905-preview": ("0.15", "0.60", "2.50", 262_144),
    "kimi-k2-0711-preview": ("0.15", "0.60", "2.50", 131_072),
    "kimi-k2-turbo-preview": ("0.15", "1.15", "8.00", 262_144),
    "kimi-k2-thinking": ("0.15", "0.60", "2.50", 262_144),
    "kimi-k2-thinking-turbo": ("0.15", "1.15", "8.00", 262_144),
    "moonshot-v1-8k": ("0.20", "0.20", "2.00", 8_192),
    "moonshot-v1-32k": ("1.00", "1.00", "3.00", 32_768),
    "moonshot-v1-128k": ("2.00", "2.00", "5.00", 131_072),
    "moonshot-v1-8k-vision-preview": ("0.20", "0.20", "2.00", 8_192),
    "moonshot-v1-32k-vision-preview": ("1.00", "1.00", "3.00", 32_768),
    "moonshot-v1-128k-vision-preview": ("2.00", "2.00", "5.00", 131_072),
}
SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_590a4b32a0d7b38a.txt"
RETIRED_ON = {
    **dict.fromkeys(
        (
            "kimi-k2-0711-preview",
            "kimi-k2-0905-preview",
            "kimi-k2-turbo-preview",
            "kimi-k2-thinking",
            "kimi-k2-thinking-turbo",
        ),
        date(2026, 5, 25),
    ),
    **{m: date(2026, 8, 31) for m in DOCUMENT if m == "kimi-k2.5" or m.startswith("moonshot")},
}
# Today's models, copied by hand from shared/moonshot-models-2026.md (USD per 1M: hit, miss,
# output, 5-minute write, 1-hour write; context window, default output, tokenizer).
CURRENT = {
    "kimi-k2.6": ("0.16", "0.95", "4.00", None, None, 262_144, 32_768, "kimi_k2"),
    "kimi-k2.7-code": ("0.19", "0.95", "4.00", None, None, 262_144, 32_768, "kimi_k2"),
    "kimi-k2.7-code-highspeed": ("0.38", "1.90", "8.00", None, None, 262_144, 32_768, "kimi_k2"),
    "kimi-k3": ("0.30", "3.00", "15.00", "3.00", "6.00", 1_048_576, 131_072, "kimi_k3"),
    "kimi-k3.1-pro": ("0.20", "2.00", "10.00", "2.00", "4.00", 1_048_576, 131_072, "kimi_k3"),
    # Hit 0.40, not the sheet's 0.20: "highspeed costs exactly 2x on every component" and the
    # dearer reading when sources disagree (see test_price_registry.py).
    "kimi-k3.1-pro-highspeed": (
        "0.40",
        "4.00",
        "20.00",
        "4.00",
        "8.00",
        1_048_576,
        131_072,
        "kimi_k3",
    ),
}


def test_builtin_table_keeps_the_document_with_retirement_dates() -> None:
    table = PriceTable.load()
    assert sorted(table.models) == sorted({**DOCUMENT, **CURRENT})
    for model, (hit, miss, output, window) in DOCUMENT.items():
        price = table.get(model)
        assert price.per_million_usd() == {
            "cache_hit": Decimal(hit),
            "cache_miss": Decimal(miss),
            "output": Decimal(output),
        }
        assert price.context_window == window and price.source == BUILTIN_SOURCE
        assert price.retired == RETIRED_ON[model] and not price.current
        assert price.default_max_tokens == 1024 and price.currency == "USD"
        assert price.reference and "pricing document" in price.reference


def test_builtin_table_has_todays_models() -> None:
    table = PriceTable.load()
    for model, (hit, miss, out, w5, w1, window, default, tokenizer) in CURRENT.items():
        price = table.get(model)
        expected = {"cache_hit": hit, "cache_miss": miss, "output": out}
        if w5 is not None:
            expected |= {"cache_write_5m": w5, "cache_write_1h": w1}
        assert price.per_million() == {k: Decimal(v) for k, v in expected.items()}, model
        assert (price.context_window, price.default_max_tokens) == (window, default)
        assert price.tokenizer == tokenizer and price.current and price.retired is None
        assert price.reference and price.as_of == "2026-11-30"
    # Highspeed variants: exactly twice their base model on every token price.
    for fast, base in (
        ("kimi-k2.7-code-highspeed", "kimi-k2.7-code"),
        ("kimi-k3.1-pro-highspeed", "kimi-k3.1-pro"),
    ):
        f, b = table.get(fast).per_million(), table.get(base).per_million()
        assert f == {k: 2 * v for k, v in b.items()}
    assert not table.get("kimi-k3").batch and table.get("kimi-k2.6").batch


def test_cny_table_is_the_china_platforms() -> None:
    table = PriceTable.load(currency="CNY")
    assert table.currency == "CNY"
    k3 = table.get("kimi-k3")
    assert k3.currency == "CNY" and k3.per_million() == {
        "cache_hit": Decimal("2.00"),
        "cache_miss": Decimal("20.00"),
        "output": Decimal("100.00"),
        "cache_write_5m": Decimal("20.00"),
        "cache_write_1h": Decimal("40.00"),
    }
    assert table.get("kimi-k2.6").per_million() == {
        "cache_hit": Decimal("1.10"),
        "cache_miss": Decimal("6.50"),
        "output": Decimal("27.00"),
    }
    assert table.get("kimi-k2-turbo-preview").per_million()["output"] == Decimal("58")
    assert table.get("moonshot-v1-128k").per_million()["cache_miss"] == Decimal("10")
    # No CNY price was published for kimi-k3.1-pro: unknown, never borrowed from USD.
    assert "kimi-k3.1-pro" not in table
    assert {p.currency for p in table} == {"CNY"}


@pytest.mark.skipif(not SEED.exists(), reason="the pricing document is not beside this checkout")
def test_hand_copy_matches_the_pricing_document() -> None:
    text = SEED.read_text("utf-8")
    for model, (hit, miss, output, window) in DOCUMENT.items():
        line = next(
            line
            for line in text.splitlines()
            if re.match(rf"\|?\s*{re.escape(model)}(Recommended)?\s*\|", line)
        )
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        prices = [cell.lstrip("$") for cell in cells if cell.startswith("$")]
        expected = [hit, miss, output] if model.startswith("kimi") else [miss, output]
        assert prices == expected, model
        assert f"{window:,} tokens" in line


@pytest.mark.parametrize("model", sorted(DOCUMENT))
def test_cost_of_a_call_to_a_retired_model_with_cache_hits_matches_hand_calculation(
    model: str, moonshot_mock: respx.Router, ledger_path: Path
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, json=completion(prompt=1000, cached=400, completion_tokens=250, model=model)
        )
    )
    client = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=300
    )
    hit, miss, output, _ = DOCUMENT[model]
    by_hand = (600 * Decimal(miss) + 400 * Decimal(hit) + 250 * Decimal(output)) / 1_000_000
    assert client.ledger.spend() == by_hand
    assert client.ledger.calls(1)[0]["cost_nanos"] == by_hand * 1_000_000_000


def test_past_rows_keep_the_prices_they_were_charged(
    moonshot_mock: respx.Router, ledger_path: Path
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, json=completion(prompt=100, cached=0, completion_tokens=10)
        )
    )
    messages = [{"role": "user", "content": "hi"}]
    old = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
    old.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=20)
    before = old.ledger.spend()
    new = kb.OpenAI(
        api_key=KEY,
        base_url=MOCK_BASE_URL,
        ledger=ledger_path,
        prices={"kimi-k2.5": {"cache_miss": "1.20", "output": "6.00"}},
    )
    new.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=20)
    first, second = reversed(new.ledger.calls(2))
    assert first["cost_nanos"] == 100 * 600 + 10 * 3000 and to_usd(first["cost_nanos"]) == before
    assert second["cost_nanos"] == 100 * 1200 + 10 * 6000
    assert second["price_cache_hit"] == 100  # unchanged keys keep the built-in price


def test_price_file_adds_and_overrides_models(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."kimi-k3"]\ncache_hit = "0.20"\ncache_miss = "1.00"\noutput = "5.00"\n'
        "context_window = 1048576\ndefault_max_tokens = 131072\n\n"
        '[models."moonshot-v1-8k"]\ninput = "0.30"\noutput = "2.00"\ncontext_window = 8192\n'
    )
    table = PriceTable.load(prices_file=path)
    k3 = table.get("kimi-k3")
    assert (k3.cache_hit, k3.cache_miss, k3.output) == (200, 1000, 5000)
    assert k3.tokenizer == "kimi_k3" and k3.source == str(path)
    assert table.get("moonshot-v1-8k").cache_miss == table.get("moonshot-v1-8k").cache_hit == 300
    assert table.get("kimi-k2.5").source == BUILTIN_SOURCE


@pytest.mark.parametrize(
    ("line", "value", "message"),
    [
        (3, '"-0.10"', "zero or more"),
        (4, '"abc"', "must be a number"),
        (5, "0.5", "as a string"),
        (3, '"0.0001"', "whole number of nano-dollars"),
    ],
)
def test_bad_price_file_names_path_and_line(
    tmp_path: Path, line: int, value: str, message: str
) -> None:
    lines = [
        "# my prices",
        '[models."kimi-k2.6"]',
        'cache_hit = "0.16"',
        'cache_miss = "0.95"',
        'output = "4.00"',
        "context_window = 262144",
    ]
    key = lines[line - 1].split("=")[0].strip()
    lines[line - 1] = f"{key} = {value}"
    path = tmp_path / "prices.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(kb.PriceTableError, match=message) as info:
        PriceTable.load(prices_file=path)
    assert f"{path}:{line}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_price_file_key_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[models."x"]\ncache_hit = "1"\ncache_miss = "1"\noutput = "1"\n'
        "context_window = 8\nspeed = 3\n"
    )
    with pytest.raises(kb.PriceTableError, match=rf"{path}:6: unknown key 'speed'"):
        PriceTable.load(prices_file=path)
    with pytest.raises(kb.PriceTableError, match="Cannot read price file"):
        PriceTable.load(prices_file=tmp_path / "missing.toml")


@given(
    prompt=st.integers(0, 10**7),
    cached=st.integers(-10, 10**7),
    out=st.integers(0, 10**7),
    hit=st.integers(0, 10**5),
    miss=st.integers(0, 10**5),
    output=st.integers(0, 10**5),
)
def test_integer_cost_equals_decimal_formula(
    prompt: int, cached: int, out: int, hit: int, miss: int, output: int
) -> None:
    nanos = call_cost_nanos(
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=out,
        cache_hit=hit,
        cache_miss=miss,
        output=output,
    )
    c = min(max(cached, 0), prompt)
    # The same formula in USD per million tokens, as the document writes prices.
    usd = (
        (prompt - c) * Decimal(miss) / 1000 + c * Decimal(hit) / 1000 + out * Decimal(output) / 1000
    ) / 1_000_000
    assert to_usd(nanos) == usd
    assert nanos >= 0


@given(st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False))
def test_three_decimal_prices_are_whole_nanos(price: Decimal) -> None:
    assert Decimal(price_to_nanos_per_token(price)) == price * 1000


def test_four_decimal_price_is_refused() -> None:
    with pytest.raises(ValueError, match="three decimals"):
        price_to_nanos_per_token(Decimal("0.0001"))


def test_prices_command_says_which_models_are_current_and_which_retired() -> None:
    import json

    from click.testing import CliRunner

    from kimi_budget.cli import cli

    result = CliRunner().invoke(cli, ["prices", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(result.output)}
    assert rows["kimi-k3"]["status"] == "current" and rows["kimi-k3"]["retired"] is None
    assert rows["kimi-k3"]["cache_write_1h"] == "6.00" and rows["kimi-k3"]["batch"] is False
    assert rows["kimi-k2.5"]["status"] == "retired" and rows["kimi-k2.5"]["retired"] == "2026-08-31"
    text = CliRunner().invoke(cli, ["prices"]).output
    assert "retired 2026-05-25" in text and "current" in text
    cny = json.loads(CliRunner().invoke(cli, ["prices", "--currency", "CNY", "--json"]).output)
    assert {row["currency"] for row in cny} == {"CNY"}
