"""Model prices, context windows and fees, in the currency of the platform that bills them.

The built-in tables are data: ``usd.toml`` (api.moonshot.ai, USD) and ``cny.toml``
(api.moonshot.cn, CNY), each entry with its source and as-of date, retired models kept with their
retirement date so that old ledgers can be re-priced. Users add or override models without a
release, with a price file (``KIMI_BUDGET_PRICES`` or the ``prices_file`` argument) or a
``prices={...}`` argument. Prices are read as exact decimals and kept as integer nano-units
(1e-9 of the table's currency) per token.

Besides tokens, Moonshot bills: cache writes (K3 family, ``prompt_cache_options``; a 5-minute
write costs the cache-miss price, a 1-hour write twice that), the ``$web_search`` builtin tool
(a fee per call), and the Batch API (a fixed share of the standard price). :class:`ModelPrice`
prices all of them; :mod:`kimi_budget.pricing._requests` reads what a request asks for.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from .._exceptions import PriceTableError, UnknownModelError
from .._money import call_cost_nanos, price_to_nanos_per_token
from .._tokens import TOKENIZER_NAMES
from ._requests import (
    CacheTTL,
    declares_web_search,
    requested_cache_ttl,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BATCH_RATE",
    "BUILTIN_SOURCE",
    "CURRENCIES",
    "WEB_SEARCH_FEE_NANOS",
    "CacheTTL",
    "ModelPrice",
    "PriceTable",
    "batch_cost_nanos",
    "currency_for_base_url",
    "declares_web_search",
    "requested_cache_ttl",
]

BUILTIN_SOURCE = "built-in (Moonshot pricing document)"
CURRENCIES = ("USD", "CNY")
TOKENIZERS = TOKENIZER_NAMES
# Nano-units of each currency charged per ``$web_search`` call: $0.005 (platform.kimi.ai/docs/
# pricing/tools; the help center says $0.004: the dearer figure is kept) and ¥0.03 on .cn.
WEB_SEARCH_FEE_NANOS: Mapping[str, int] = {"USD": 5_000_000, "CNY": 30_000_000}
# The Batch API bills 60 % of the standard price on every component (platform.kimi.ai/docs/
# pricing/batch), as an exact fraction.
BATCH_RATE = (3, 5)
_DATA_FILES = {"USD": "usd.toml", "CNY": "cny.toml"}
_PRICE_KEYS = ("cache_hit", "cache_miss", "output")
_WRITE_KEYS = ("cache_write_5m", "cache_write_1h")
_INT_KEYS = ("context_window", "default_max_tokens", "max_output_tokens")
_KNOWN_KEYS = {
    *_PRICE_KEYS,
    *_WRITE_KEYS,
    *_INT_KEYS,
    "tokenizer",
    "input",
    "source",
    "as_of",
    "retired",
    "batch",
}


def currency_for_base_url(base_url: object) -> str:
    """``"CNY"`` for Moonshot's China platform (api.moonshot.cn), else ``"USD"``."""
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(str(base_url)).hostname or "").lower()
    except ValueError:
        return "USD"
    return "CNY" if host == "moonshot.cn" or host.endswith(".moonshot.cn") else "USD"


def batch_cost_nanos(standard_nanos: int) -> int:
    """The Batch API's charge for what would cost ``standard_nanos`` at standard prices.

    Exact when every price is a whole number of nano-units after the discount (all built-in
    prices are); otherwise rounded up to the next nano-unit, never down.
    """
    num, den = BATCH_RATE
    return -(-max(standard_nanos, 0) * num // den)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices, in nano-units of ``currency`` per token, and its token limits.

    ``default_max_tokens`` is the output limit the API applies when a request sets none (None:
    unknown, so the whole context window is projected). ``retired`` is the date Moonshot
    retired the model (None while it is current): a call to it is still sent, the server
    decides, and it is priced if billed.
    """

    model: str
    cache_hit: int
    cache_miss: int
    output: int
    context_window: int
    default_max_tokens: int | None = None
    tokenizer: str = "kimi_k2"
    source: str = BUILTIN_SOURCE
    """Where the entry came from: built in, a price file, or the ``prices=`` argument."""
    currency: str = "USD"
    cache_write_5m: int | None = None
    cache_write_1h: int | None = None
    max_output_tokens: int | None = None
    as_of: str | None = None
    """When its figures were last checked against ``reference``."""
    reference: str | None = None
    """Where its figures come from (a pricing page, a registry)."""
    retired: _dt.date | None = None
    batch: bool = True
    """Whether the Batch API serves this model."""

    @property
    def current(self) -> bool:
        return self.retired is None

    def write_price(self, ttl: CacheTTL | None) -> int:
        """Nano-units per token written to the cache with ``ttl`` (the miss price if none)."""
        if ttl == "1h":
            return max(self.cache_write_1h or 0, self.cache_miss)
        if ttl == "5m":
            return max(self.cache_write_5m or 0, self.cache_miss)
        return self.cache_miss

    @property
    def web_search_fee(self) -> int:
        """Nano-units charged per ``$web_search`` call."""
        return WEB_SEARCH_FEE_NANOS.get(self.currency, WEB_SEARCH_FEE_NANOS["USD"])

    def fee_nanos(self, web_search_calls: int) -> int:
        return max(web_search_calls, 0) * self.web_search_fee

    def cost_nanos(
        self,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        *,
        cache_write_tokens: int = 0,
        cache_ttl: CacheTTL | None = None,
        web_search_calls: int = 0,
    ) -> int:
        """The charge for a billed usage: tokens, cache writes and fees (nano-units).

        Cache-write tokens are part of the prompt, like cache hits: ``prompt - cached -
        written`` tokens are plain misses. ``written`` is clamped to what is left of the
        prompt, so malformed usage never makes a cost negative.
        """
        tokens = call_cost_nanos(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            cache_hit=self.cache_hit,
            cache_miss=self.cache_miss,
            output=self.output,
        )
        prompt = max(prompt_tokens, 0)
        uncached = prompt - min(max(cached_tokens, 0), prompt)
        written = min(max(cache_write_tokens, 0), uncached)
        surcharge = written * (self.write_price(cache_ttl) - self.cache_miss)
        return tokens + surcharge + self.fee_nanos(web_search_calls)

    def projected_nanos(
        self,
        prompt_tokens: int,
        max_output: int,
        choices: int = 1,
        *,
        cache_ttl: CacheTTL | None = None,
        web_search: bool = False,
    ) -> int:
        """The worst case of a request: every prompt token a miss (written to the cache at the
        requested TTL's price), every choice at its full output, and a ``$web_search`` fee per
        choice if the request declares the tool."""
        choices = max(choices, 1)
        prompt = max(prompt_tokens, 0) * self.write_price(cache_ttl)
        output = max(max_output, 0) * choices * self.output
        return prompt + output + (self.fee_nanos(choices) if web_search else 0)

    def at_batch_price(self) -> ModelPrice:
        """This model at the Batch API's price (60 % of standard, rounded up per token)."""
        num, den = BATCH_RATE

        def cut(nanos: int | None) -> int | None:
            return None if nanos is None else -(-nanos * num // den)

        return replace(
            self,
            cache_hit=cut(self.cache_hit) or 0,
            cache_miss=cut(self.cache_miss) or 0,
            output=cut(self.output) or 0,
            cache_write_5m=cut(self.cache_write_5m),
            cache_write_1h=cut(self.cache_write_1h),
        )

    def per_million(self) -> dict[str, Decimal]:
        """Prices in ``currency`` per million tokens, as the pricing documents write them."""
        prices = {key: Decimal(getattr(self, key)) / 1000 for key in _PRICE_KEYS}
        for key in _WRITE_KEYS:
            value = getattr(self, key)
            if value is not None:
                prices[key] = Decimal(value) / 1000
        return prices

    def per_million_usd(self) -> dict[str, Decimal]:
        """Prices per million tokens (kept for callers of 0.1; see :meth:`per_million`)."""
        return {key: Decimal(getattr(self, key)) / 1000 for key in _PRICE_KEYS}


@dataclass(frozen=True)
class PriceTable:
    """Every model kimi-budget can price in one currency, built-in entries first, then the
    user's."""

    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    currency: str = "USD"

    @classmethod
    def load(
        cls,
        *,
        prices_file: str | Path | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        currency: str = "USD",
    ) -> PriceTable:
        """The built-in table of ``currency``, then ``prices_file``, then ``overrides`` (later
        entries win)."""
        currency = check_currency(currency)
        table = dict(_builtin_models(currency))
        if prices_file is not None:
            table.update(_read_price_file(Path(prices_file), currency))
        for name, entry in (overrides or {}).items():
            table[name] = _parse_entry(
                name,
                entry,
                base=table.get(name),
                source="prices= argument",
                locate=None,
                currency=currency,
            )
        return cls(table, currency)

    def get(self, model: str) -> ModelPrice:
        try:
            return self.models[model]
        except KeyError:
            raise UnknownModelError(model, sorted(self.models)) from None

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(self.models.values())


def check_currency(currency: object) -> str:
    value = str(currency).upper() if isinstance(currency, str) else currency
    if value not in CURRENCIES:
        raise ValueError(f"currency must be 'USD' or 'CNY', not {currency!r}.")
    return str(value)


_BUILTIN: dict[str, dict[str, ModelPrice]] = {}


def _builtin_models(currency: str = "USD") -> dict[str, ModelPrice]:
    cached = _BUILTIN.get(currency)
    if cached is None:
        name = _DATA_FILES[currency]
        text = resources.files("kimi_budget.pricing").joinpath(name).read_text("utf-8")
        cached = _parse_price_text(
            text,
            source=BUILTIN_SOURCE,
            path=f"kimi_budget/pricing/{name} (built in)",
            currency=currency,
        )
        _BUILTIN[currency] = cached
    return cached


def _read_price_file(path: Path, currency: str = "USD") -> dict[str, ModelPrice]:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PriceTableError(
            f"Cannot read price file {path}: {exc.strerror or exc}. Check KIMI_BUDGET_PRICES."
        ) from None
    return _parse_price_text(text, source=str(path), path=str(path), currency=currency)


def _parse_price_text(
    text: str, *, source: str, path: str, currency: str = "USD"
) -> dict[str, ModelPrice]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceTableError(f"Price file {path} is not valid TOML: {exc}.") from None
    declared = data.get("currency", currency)
    if declared != currency:
        raise PriceTableError(
            f"Price file {path} holds {declared!r} prices, but this client bills in {currency!r} "
            f"(api.moonshot.{'cn' if currency == 'CNY' else 'ai'}); give it prices in {currency}."
        )
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
        name: _parse_entry(name, entry, base=None, source=source, locate=locate, currency=currency)
        for name, entry in models.items()
    }


def _parse_entry(
    name: str,
    entry: Any,
    *,
    base: ModelPrice | None,
    source: str,
    locate: Any,
    currency: str = "USD",
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
            values[key] = _price(raw[key], where(key), name, key, currency)
        elif base is None:
            raise PriceTableError(
                f"{where(None)}: {name!r} needs a {key!r} price ({currency} per 1M)."
            )
    for key in _WRITE_KEYS:
        if key in raw:
            values[key] = _price(raw[key], where(key), name, key, currency)
    for key in _INT_KEYS:
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
    for key, attr in (("as_of", "as_of"), ("source", "reference")):
        if key in raw:
            if not isinstance(raw[key], str | _dt.date):
                raise PriceTableError(f"{where(key)}: {key} of {name!r} must be text.")
            values[attr] = str(raw[key])
    if "retired" in raw:
        values["retired"] = _date(raw["retired"], where("retired"), name)
    if "batch" in raw:
        if not isinstance(raw["batch"], bool):
            raise PriceTableError(f"{where('batch')}: batch of {name!r} must be true or false.")
        values["batch"] = raw["batch"]
    values["source"] = source
    if base is not None:
        return replace(base, **values)
    values.setdefault("tokenizer", _guess_tokenizer(name))
    return ModelPrice(model=name, currency=currency, **values)


def _date(value: Any, where: str, name: str) -> _dt.date:
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    try:
        return _dt.date.fromisoformat(str(value))
    except ValueError:
        raise PriceTableError(
            f"{where}: retired of {name!r} must be a date such as 2026-08-31, not {value!r}."
        ) from None


def _price(value: Any, where: str, name: str, key: str, currency: str = "USD") -> int:
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
            f"{where}: the {key} price of {name!r} must be a number of {currency} per million "
            "tokens, "
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
