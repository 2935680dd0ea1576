"""Model prices and context windows.

The built-in table is data (``usd.toml``, copied from Moonshot's pricing document). Users add
or override models without a release, with a price file (``KIMI_BUDGET_PRICES`` or the
``prices_file`` argument) or a ``prices={...}`` argument. Prices are read as exact decimals and
kept as integer nano-dollars per token.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from .._exceptions import PriceTableError, UnknownModelError
from .._money import call_cost_nanos, price_to_nanos_per_token
from .._tokens import TOKENIZER_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BUILTIN_SOURCE", "ModelPrice", "PriceTable"]

BUILTIN_SOURCE = "built-in (Moonshot pricing document)"
TOKENIZERS = TOKENIZER_NAMES
_PRICE_KEYS = ("cache_hit", "cache_miss", "output")
_KNOWN_KEYS = {*_PRICE_KEYS, "context_window", "default_max_tokens", "tokenizer", "input"}
_DEFAULT_MAX_TOKENS = 1024  # "we will use a good default integer like 1024" (Moonshot chat docs)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices, in nano-dollars per token, and its token limits."""

    model: str
    cache_hit: int
    cache_miss: int
    output: int
    context_window: int
    default_max_tokens: int = _DEFAULT_MAX_TOKENS
    tokenizer: str = "kimi_k2"
    source: str = BUILTIN_SOURCE

    def cost_nanos(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        return call_cost_nanos(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cache_hit=self.cache_hit,
            cache_miss=self.cache_miss,
            output=self.output,
        )

    def per_million_usd(self) -> dict[str, Decimal]:
        """Prices as USD per million tokens, as the pricing document writes them."""
        return {key: Decimal(getattr(self, key)) / 1000 for key in _PRICE_KEYS}


@dataclass(frozen=True)
class PriceTable:
    """Every model kimi-budget can price, built-in entries first, then the user's."""

    models: Mapping[str, ModelPrice] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        *,
        prices_file: str | Path | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> PriceTable:
        """The built-in table, then ``prices_file``, then ``overrides`` (later entries win)."""
        table = dict(_builtin_models())
        if prices_file is not None:
            table.update(_read_price_file(Path(prices_file)))
        for name, entry in (overrides or {}).items():
            table[name] = _parse_entry(
                name, entry, base=table.get(name), source="prices= argument", locate=None
            )
        return cls(table)

    def get(self, model: str) -> ModelPrice:
        try:
            return self.models[model]
        except KeyError:
            raise UnknownModelError(model, sorted(self.models)) from None

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.models.values())


_BUILTIN: dict[str, ModelPrice] | None = None


def _builtin_models() -> dict[str, ModelPrice]:
    global _BUILTIN
    if _BUILTIN is None:
        text = resources.files("kimi_budget.pricing").joinpath("usd.toml").read_text("utf-8")
        _BUILTIN = _parse_price_text(
            text, source=BUILTIN_SOURCE, path="pricing/usd.toml (built in)"
        )
    return _BUILTIN


def _read_price_file(path: Path) -> dict[str, ModelPrice]:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PriceTableError(
            f"Cannot read price file {path}: {exc.strerror or exc}. Check KIMI_BUDGET_PRICES."
        ) from None
    return _parse_price_text(text, source=str(path), path=str(path))


def _parse_price_text(text: str, *, source: str, path: str) -> dict[str, ModelPrice]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceTableError(f"Price file {path} is not valid TOML: {exc}.") from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise PriceTableError(
            f'Price file {path} has no [models."<name>"] tables; '
            "see kimi_budget/pricing/usd.toml in the package."
        )
    lines = text.splitlines()

    def locate(model: str, key: str | None) -> str:
        return f"{path}:{_line_of(lines, model, key)}"

    return {
        name: _parse_entry(name, entry, base=None, source=source, locate=locate)
        for name, entry in models.items()
    }


def _parse_entry(
    name: str,
    entry: Any,
    *,
    base: ModelPrice | None,
    source: str,
    locate: Any,
) -> ModelPrice:
    def where(key: str | None) -> str:
        return locate(name, key) if locate else f"prices[{name!r}]"

    if not isinstance(entry, Mapping):
        raise PriceTableError(f"{where(None)}: the entry for {name!r} must be a table of prices.")
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise PriceTableError(
            f"{where(sorted(unknown)[0])}: unknown key {sorted(unknown)[0]!r} for {name!r}; "
            f"expected {', '.join(sorted(_KNOWN_KEYS - {'input'}))}."
        )
    values: dict[str, Any] = {}
    raw = dict(entry)
    if "input" in raw:  # moonshot-v1 style: one input price, no cache discount
        raw.setdefault("cache_hit", raw["input"])
        raw.setdefault("cache_miss", raw["input"])
    for key in _PRICE_KEYS:
        if key in raw:
            values[key] = _price(raw[key], where(key), name, key)
        elif base is None:
            raise PriceTableError(f"{where(None)}: {name!r} needs a {key!r} price (USD per 1M).")
    for key in ("context_window", "default_max_tokens"):
        if key in raw:
            values[key] = _positive_int(raw[key], where(key), name, key)
        elif base is None and key == "context_window":
            raise PriceTableError(f"{where(None)}: {name!r} needs a 'context_window' (tokens).")
    if "tokenizer" in raw:
        if raw["tokenizer"] not in TOKENIZERS:
            raise PriceTableError(
                f"{where('tokenizer')}: tokenizer of {name!r} must be one of "
                f"{', '.join(TOKENIZERS)}, not {raw['tokenizer']!r}."
            )
        values["tokenizer"] = raw["tokenizer"]
    if base is not None:
        return replace(base, source=source, **values)
    values.setdefault("tokenizer", _guess_tokenizer(name))
    return ModelPrice(model=name, source=source, **values)


def _price(value: Any, where: str, name: str, key: str) -> int:
    if isinstance(value, bool | float):
        # A TOML float has already lost exactness; ask for a string instead.
        raise PriceTableError(
            f'{where}: write the {key} price of {name!r} as a string such as "0.60", '
            f"not {value!r}, so that it stays exact."
        )
    try:
        amount = Decimal(str(value)) if isinstance(value, int) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise PriceTableError(
            f"{where}: the {key} price of {name!r} must be a number of USD per million tokens, "
            f"not {value!r}."
        ) from None
    if not amount.is_finite() or amount < 0:
        raise PriceTableError(
            f"{where}: the {key} price of {name!r} must be zero or more, not {value!r}."
        )
    try:
        return price_to_nanos_per_token(amount)
    except ValueError as exc:
        raise PriceTableError(f"{where}: {name!r} {key}: {exc}") from None


def _positive_int(value: Any, where: str, name: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PriceTableError(f"{where}: {key} of {name!r} must be a positive whole number.")
    return value


def _guess_tokenizer(model: str) -> str:
    if model.startswith("kimi-k3"):
        return "kimi_k3"
    if model.startswith("kimi-"):
        return "kimi_k2"
    return "approximate"


def _line_of(lines: list[str], model: str, key: str | None) -> int:
    """The 1-based line of ``key`` in the table of ``model`` (or of the table header)."""
    header = re.compile(
        r'^\s*\[\s*models\s*\.\s*(?:"' + re.escape(model) + r'"|' + re.escape(model) + r")\s*\]"
    )
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    key_line = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if key_line.match(lines[i]):
            return i + 1
    return start + 1
