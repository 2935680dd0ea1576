"""Money arithmetic of what Moonshot bills beyond plain tokens, checked as properties: cache
writes, the $web_search fee and the Batch API's rate never make a bill exceed its projection,
and every figure is the exact integer a hand calculation gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kimi_budget.pricing import (
    BATCH_RATE,
    WEB_SEARCH_FEE_NANOS,
    ModelPrice,
    PriceTable,
    batch_cost_nanos,
)

nanos = st.integers(min_value=0, max_value=50_000)
tokens = st.integers(min_value=0, max_value=2_000_000)
ttls = st.sampled_from([None, "5m", "1h"])


@st.composite
def prices(draw: st.DrawFn) -> ModelPrice:
    miss = draw(nanos)
    return ModelPrice(
        model="m",
        cache_hit=draw(st.integers(min_value=0, max_value=miss)),
        cache_miss=miss,
        output=draw(nanos),
        context_window=2_000_000,
        cache_write_5m=draw(st.none() | st.just(miss)),
        cache_write_1h=draw(st.none() | st.integers(min_value=miss, max_value=3 * miss)),
        currency=draw(st.sampled_from(["USD", "CNY"])),
    )


@given(
    price=prices(),
    prompt=tokens,
    cached=tokens,
    written=tokens,
    per_choice=tokens,
    choices=st.integers(min_value=1, max_value=5),
    calls=st.integers(min_value=0, max_value=5),
    ttl=ttls,
    data=st.data(),
)
def test_a_bill_never_exceeds_its_projection(
    price: ModelPrice,
    prompt: int,
    cached: int,
    written: int,
    per_choice: int,
    choices: int,
    calls: int,
    ttl: str | None,
    data: st.DataObject,
) -> None:
    output = data.draw(st.integers(min_value=0, max_value=per_choice * choices))
    web_calls = min(calls, choices)
    billed = price.cost_nanos(
        prompt,
        cached,
        output,
        cache_write_tokens=written,
        cache_ttl=ttl,  # type: ignore[arg-type]
        web_search_calls=web_calls,
    )
    projected = price.projected_nanos(
        prompt,
        per_choice,
        choices,
        cache_ttl=ttl,
        web_search=web_calls > 0,  # type: ignore[arg-type]
    )
    assert 0 <= billed <= projected


@given(price=prices(), prompt=tokens, data=st.data(), output=tokens, calls=st.integers(0, 9))
def test_a_bill_is_the_hand_calculation(
    price: ModelPrice, prompt: int, data: st.DataObject, output: int, calls: int
) -> None:
    cached = data.draw(st.integers(min_value=0, max_value=prompt))
    written = data.draw(st.integers(min_value=0, max_value=prompt - cached))
    write = max(price.cache_write_1h or 0, price.cache_miss)
    by_hand = (
        (prompt - cached - written) * price.cache_miss
        + cached * price.cache_hit
        + written * write
        + output * price.output
        + calls * WEB_SEARCH_FEE_NANOS[price.currency]
    )
    got = price.cost_nanos(
        prompt, cached, output, cache_write_tokens=written, cache_ttl="1h", web_search_calls=calls
    )
    assert got == by_hand


@given(standard=st.integers(min_value=0, max_value=10**15))
def test_the_batch_rate_rounds_up_by_less_than_one_nano(standard: int) -> None:
    num, den = BATCH_RATE
    charged = batch_cost_nanos(standard)
    assert charged * den >= standard * num > (charged - 1) * den


@given(prompt=tokens, cached=tokens, output=tokens, data=st.data())
def test_every_built_in_batch_price_is_exactly_sixty_percent(
    prompt: int, cached: int, output: int, data: st.DataObject
) -> None:
    table = PriceTable.load(currency=data.draw(st.sampled_from(["USD", "CNY"])))
    price = data.draw(st.sampled_from(sorted(table, key=lambda p: p.model)))
    cached = min(cached, prompt)
    standard = price.cost_nanos(prompt, cached, output)
    assert price.at_batch_price().cost_nanos(prompt, cached, output) * 5 == standard * 3
    assert batch_cost_nanos(standard) * 5 == standard * 3
