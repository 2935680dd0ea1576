"""A second opinion on prices: pydantic's genai-prices registry, model by model, component by
component. A disagreement fails unless it is listed in KNOWN_DISAGREEMENTS with its reason.

genai-prices is a test dependency only (the ``test`` extra): kimi-budget never prices a call from
it at run time (see the "Prices" section of README.md for why).
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from kimi_budget.pricing import PriceTable

genai_prices = pytest.importorskip("genai_prices")
from genai_prices import data_snapshot  # noqa: E402

# (model, component) -> why our figure differs from the registry's. Each entry must still be a
# disagreement (test_every_listed_disagreement_is_real), so the list cannot go stale.
KNOWN_DISAGREEMENTS: dict[tuple[str, str], str] = {
    ("kimi-k3.1-pro-highspeed", "cache_hit"): (
        "genai-prices (the only source for this model) lists $0.20, the same as kimi-k3.1-pro, "
        "while every other component is exactly 2x kimi-k3.1-pro, as for every other highspeed "
        "variant; when sources disagree we keep the dearer reading ($0.40): a cap may overstate "
        "spend, never understate it"
    ),
}
# Ours -> the registry's name for the same figure (USD per million tokens).
COMPONENTS = {
    "cache_miss": "input_mtok",
    "cache_hit": "cache_read_mtok",
    "output": "output_mtok",
    "cache_write_5m": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
}
AS_OF = datetime(2026, 11, 30, tzinfo=timezone.utc)


def _registry_models() -> Any:
    snapshot = data_snapshot.get_snapshot()
    provider = data_snapshot.find_provider_by_id(snapshot.providers, "moonshotai")
    assert provider is not None, "genai-prices no longer has a moonshotai provider"
    return provider


def _comparisons() -> list[tuple[str, str, Decimal | None, Decimal | None]]:
    provider = _registry_models()
    rows: list[tuple[str, str, Decimal | None, Decimal | None]] = []
    for price in PriceTable.load():
        info = provider.find_model(price.model)
        if info is None:
            continue
        theirs = info.get_prices(AS_OF)
        ours = {key: Decimal(value) for key, value in price.per_million().items()}
        for component, their_key in COMPONENTS.items():
            their = getattr(theirs, their_key, None)
            if their is None and component == "cache_hit":
                their = getattr(theirs, "input_mtok", None)  # no cache discount: hit = miss
            mine = ours.get(component)
            rows.append((price.model, component, mine, None if their is None else Decimal(their)))
        window = info.context_window
        rows.append(
            (
                price.model,
                "context_window",
                Decimal(price.context_window),
                None if window is None else Decimal(window),
            )
        )
        rows.append(
            (
                price.model,
                "retired",
                Decimal(price.retired is not None),
                Decimal(bool(info.deprecated)),
            )
        )
    return rows


def test_the_registry_knows_every_current_model() -> None:
    provider = _registry_models()
    current = [p.model for p in PriceTable.load() if p.current]
    assert len(current) == 6
    assert [m for m in current if provider.find_model(m) is None] == []


def test_every_model_both_tables_know_agrees_component_by_component() -> None:
    disagreements = {
        (model, component): (mine, theirs)
        for model, component, mine, theirs in _comparisons()
        if mine != theirs and (model, component) not in KNOWN_DISAGREEMENTS
    }
    assert disagreements == {}, (
        "kimi-budget's prices disagree with genai-prices; check the sources, then fix the table "
        "or list the disagreement with its reason in KNOWN_DISAGREEMENTS"
    )


def test_every_listed_disagreement_is_real() -> None:
    found = {
        (model, component) for model, component, mine, theirs in _comparisons() if mine != theirs
    }
    assert set(KNOWN_DISAGREEMENTS) <= found


def test_comparison_covers_every_model_of_the_table_the_registry_prices() -> None:
    compared = {model for model, *_ in _comparisons()}
    assert {p.model for p in PriceTable.load()} == compared
