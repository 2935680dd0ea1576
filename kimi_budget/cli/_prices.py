"""Commands about prices: ``estimate`` (a request's worst case before sending) and ``prices``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .._config import resolve_prices
from . import _report as rp
from . import _tables as tb
from ._app import (
    UserError,
    cli,
    config,
    csv_option,
    json_option,
    ledger_file_option,
    output_mode,
    print_json,
)

__all__ = ["estimate", "prices"]


@cli.command()
@click.argument("source", required=False, metavar="[FILE|-]")
@click.option("--model", help="The model to price (default: the request's `model`).")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), help="Output limit (default: the request's)."
)
@click.option("--text", "as_text", is_flag=True, help="Treat the input as plain text, not JSON.")
@ledger_file_option(hidden=True)
@json_option
def estimate(
    source: str | None,
    model: str | None,
    max_tokens: int | None,
    as_text: bool,
    ledger_option: Path | None,
    as_json: bool,
) -> None:
    """Tokens, context-window fit and worst-case cost of a request, before sending it.

    Reads a chat request JSON ({"model": ..., "messages": [...]}), a JSON list of messages,
    or plain text (one user message) from FILE or stdin.
    """
    text, name = _read_input(source)
    body = _request_body(text, name, as_text)
    if model is not None:
        body["model"] = model
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise UserError("which model? Pass --model (e.g. --model kimi-k2.5).")
    if max_tokens is not None:
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
    prices = resolve_prices(None, None, config())
    if body["model"] not in prices:
        known = ", ".join(sorted(prices.models))
        raise UserError(
            f"no price for model {body['model']!r}; known models: {known}. Add one in a price "
            f'file (KIMI_BUDGET_PRICES) or a [prices."{body["model"]}"] table in kimi-budget.toml.'
        )
    result = rp.estimate_request(body, prices)
    if as_json:
        print_json(result.to_json())
        return
    price, est = result.price, result.estimate
    if est.exact:
        exactness = f"exact, counted with the {est.method} tokenizer"
    elif est.method == "approximate":
        exactness = "approximate, an over-estimate: this model's tokenizer is not public"
    else:
        exactness = f"approximate: {est.method} tokenizer, some parts estimated (e.g. images)"
    need = est.tokens + result.max_output
    if result.explicit_max:
        limit = f"{tb.tokens(result.max_output)} tokens (max_tokens)"
    else:
        limit = f"{tb.tokens(result.max_output)} tokens (the API's default; set --max-tokens)"
    if result.fits:
        fits = f"yes: {tb.tokens(need)} of {tb.tokens(price.context_window)} tokens"
    else:
        fits = (
            f"NO: {tb.tokens(est.tokens)} + {tb.tokens(result.max_output)} = {tb.tokens(need)} "
            f"exceeds {tb.tokens(price.context_window)}; the call would be refused"
        )
    n = f" x {result.choices} choices" if result.choices > 1 else ""
    rows = [
        ["model", f"{price.model} (context window {tb.tokens(price.context_window)} tokens)"],
        ["prompt", f"{tb.tokens(est.tokens)} tokens ({exactness})"],
        ["max output", limit + n],
        ["fits", fits],
        [
            "worst case",
            f"{tb.dollars(result.projected_nanos)} (all input at the cache-miss price "
            f"${tb.per_million(price.cache_miss)}/M, full output at "
            f"${tb.per_million(price.output)}/M)",
        ],
    ]
    click.echo(tb.table(["", ""], rows).split("\n", 1)[1])


@cli.command()
@click.option(
    "--currency",
    type=click.Choice(["USD", "CNY"], case_sensitive=False),
    default="USD",
    show_default=True,
    help="USD: api.moonshot.ai's table; CNY: api.moonshot.cn's.",
)
@ledger_file_option(hidden=True)
@json_option
@csv_option
def prices(currency: str, ledger_option: Path | None, as_json: bool, as_csv: bool) -> None:
    """The price table in use (per million tokens), which models are current or retired, and
    where each entry comes from."""
    from ..pricing import BUILTIN_SOURCE

    mode = output_mode(as_json, as_csv)
    currency = currency.upper()
    table = resolve_prices(None, None, config(), currency=currency)

    def optional(nanos: int | None) -> str | None:
        return None if nanos is None else tb.per_million(nanos)

    entries: list[dict[str, Any]] = [
        {
            "model": p.model,
            "status": "current" if p.current else "retired",
            "retired": p.retired.isoformat() if p.retired else None,
            "currency": p.currency,
            "cache_hit": tb.per_million(p.cache_hit),
            "cache_miss": tb.per_million(p.cache_miss),
            "output": tb.per_million(p.output),
            "cache_write_5m": optional(p.cache_write_5m),
            "cache_write_1h": optional(p.cache_write_1h),
            "context_window": p.context_window,
            "default_max_tokens": p.default_max_tokens,
            "max_output_tokens": p.max_output_tokens,
            "batch": p.batch,
            "tokenizer": p.tokenizer,
            "source": p.source,
            "reference": p.reference,
            "as_of": p.as_of,
        }
        for p in sorted(table.models.values(), key=lambda p: (p.retired is not None, p.model))
    ]
    if mode == "json":
        print_json(entries)
        return
    headers = list(entries[0]) if entries else []
    if mode == "csv":
        click.echo(tb.to_csv(headers, [list(e.values()) for e in entries]), nl=False)
        return
    sign = "¥" if currency == "CNY" else "$"
    rows = [
        [
            e["model"],
            "current" if e["status"] == "current" else f"retired {e['retired']}",
            f"{sign}{e['cache_hit']}",
            f"{sign}{e['cache_miss']}",
            f"{sign}{e['output']}",
            f"{sign}{e['cache_write_1h']}" if e["cache_write_1h"] else "-",
            tb.tokens(e["context_window"]),
            tb.tokens(e["default_max_tokens"]) if e["default_max_tokens"] else "window",
            e["tokenizer"],
            "built in" if e["source"] == BUILTIN_SOURCE else e["source"],
        ]
        for e in entries
    ]
    platform = "api.moonshot.cn" if currency == "CNY" else "api.moonshot.ai"
    click.echo(
        f"{currency} per million tokens ({platform}); built in = Moonshot's published prices "
        "(kimi-budget prices --json shows each entry's reference and date).\n"
        "Retired models answer 404; their prices stay for old ledgers. The Batch API bills "
        "60 % of these prices.\n"
    )
    click.echo(
        tb.table(
            [
                "model",
                "status",
                "cache hit",
                "cache miss",
                "output",
                "1h write",
                "context",
                "default out",
                "tokenizer",
                "source",
            ],
            rows,
            right=(2, 3, 4, 5, 6, 7),
        )
    )


# -- input ---------------------------------------------------------------------------------------


def _read_input(source: str | None) -> tuple[str, str]:
    if source is None or source == "-":
        if source is None and sys.stdin.isatty():
            raise UserError("give a FILE, or pipe the request in (use - for stdin).")
        return sys.stdin.read(), "stdin"
    try:
        return Path(source).read_text("utf-8"), source
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{source} is not UTF-8 text.") from None


def _request_body(text: str, name: str, as_text: bool) -> dict[str, Any]:
    stripped = text.strip()
    if not stripped:
        raise UserError(f"{name} is empty.")
    if as_text or not stripped.startswith(("{", "[")):
        return {"messages": [{"role": "user", "content": text}]}
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{name} looks like JSON but is not valid ({exc}); pass --text to count it as text."
        ) from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise UserError(f'{name}: a chat request needs "messages": [...].')
    return data
