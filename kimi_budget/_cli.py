"""The ``kimi-budget`` command: what did we spend, how much is left, and a demo.

Each sub-command does one thing. Reading commands never create a ledger: a missing ledger is a
one-line error. Every user error (a bad date, a missing ledger, an unknown model, a malformed
configuration value) is one line on stderr and exit status 2, never a traceback; that is done
once, in ``_Group``, not in each command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import click

from . import _report as rp
from ._config import (
    FileConfig,
    load_file_config,
    parse_tags,
    resolve_budgets,
    resolve_ledger_path,
    resolve_prices,
    resolve_tz,
)

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])
NO_KEY_HELP = (
    "no API key: set MOONSHOT_API_KEY (export MOONSHOT_API_KEY=sk-...; keys are made in the "
    "console of https://platform.moonshot.ai). OPENAI_API_KEY is used only with --base-url or "
    "OPENAI_BASE_URL."
)


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"kimi-budget: error: {_one_line(self.format_message())}", err=True)


class RemoteError(UserError):
    """Moonshot could not be reached or refused the request: one line, exit status 1."""

    exit_code = 1


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    from openai import APIConnectionError, APIStatusError, OpenAIError

    from ._exceptions import KimiBudgetError
    from ._redact import redact

    secrets = tuple(os.environ.get(name, "") for name in ("MOONSHOT_API_KEY", "OPENAI_API_KEY"))
    try:
        yield
    except UserError:
        raise
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise UserError(exc.format_message() + hint) from None
    except (KimiBudgetError, ValueError) as exc:
        # LedgerError, PriceTableError, UnknownModelError and malformed settings all say what
        # to fix in their message; the traceback would only hide it.
        if os.environ.get("KIMI_BUDGET_DEBUG"):
            raise
        raise UserError(redact(str(exc), secrets)) from None
    except APIStatusError as exc:
        raise RemoteError(
            redact(f"Moonshot answered HTTP {exc.status_code}: {exc.message}", secrets)
        ) from None
    except APIConnectionError as exc:
        where = getattr(getattr(exc, "request", None), "url", None) or "the API"
        raise RemoteError(redact(f"could not reach {where}: {exc}", secrets)) from None
    except OpenAIError as exc:
        raise RemoteError(redact(str(exc), secrets)) from None


class _Group(click.Group):
    """Turns user errors from parsing or from any command into one line and exit status 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _user_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _user_errors():
            return super().invoke(ctx)


# -- shared options ------------------------------------------------------------------------------


def _ledger_option(hidden: bool = False) -> Callable[[F], F]:
    return click.option(
        "--ledger",
        "ledger_option",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        hidden=hidden,
        help="Ledger file. Default: KIMI_BUDGET_LEDGER, then `ledger` in the config file, then "
        "ledger.db in the user data directory.",
    )


def _json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable JSON (money as exact strings)."
    )(f)


def _csv_option(f: F) -> F:
    return click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per line.")(f)


def _filter_options(f: F) -> F:
    f = click.option(
        "--tz",
        help="Time zone of dates and buckets. Default: KIMI_BUDGET_TZ, then the config's "
        "[budget] tz, else UTC.",
    )(f)
    f = click.option(
        "--tag", "tag_pairs", multiple=True, metavar="K=V", help="Only calls with this tag."
    )(f)
    f = click.option("--model", help="Only calls to this model.")(f)
    f = click.option("--until", metavar="DATE", help="Calls before this date (exclusive).")(f)
    f = click.option("--since", metavar="DATE", help="Calls from this date (e.g. 2026-11-01).")(f)
    return f


def _config() -> FileConfig:
    return load_file_config()


def _open_ledger(option: Path | None, file: FileConfig) -> Any:
    """The existing ledger; a missing one is a user error, never silently created."""
    from ._ledger import Ledger

    path, source = resolve_ledger_path(option, file)
    if not path.exists():
        named = "--ledger" if source == "argument" else source
        raise UserError(
            f"no ledger at {path} (from {named}): nothing has been recorded there yet. "
            f"Pass --ledger PATH, or run `kimi-budget demo --ledger {path}` to make one."
        )
    busy = file.data.get("busy_timeout", 30.0)
    return Ledger(path, busy_timeout=float(busy) if isinstance(busy, int | float) else 30.0)


def _zone(option: str | None, file: FileConfig) -> str:
    if option is None:
        return resolve_tz(file)[0]
    from ._budget import Budget

    try:
        Budget(tz=option)
    except ValueError as exc:
        raise UserError(f"--tz: {exc}") from None
    return option


def _filters(
    since: str | None, until: str | None, tag_pairs: tuple[str, ...], tz: str
) -> tuple[datetime | None, datetime | None, dict[str, str]]:
    zone = ZoneInfo(tz)
    start = rp.parse_when(since, zone, option="--since") if since else None
    end = rp.parse_when(until, zone, option="--until") if until else None
    if start and end and end <= start:
        raise UserError(f"--until ({until}) must be after --since ({since}).")
    tags = parse_tags(",".join(tag_pairs), where="--tag") if tag_pairs else {}
    return start, end, tags


def _output_mode(as_json: bool, as_csv: bool = False) -> str:
    if as_json and as_csv:
        raise UserError("--json and --csv cannot be used together.")
    return "json" if as_json else "csv" if as_csv else "text"


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


# -- the commands --------------------------------------------------------------------------------


@click.group(
    name="kimi-budget",
    cls=_Group,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="kimi-budget", prog_name="kimi-budget")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """A hard cap on what Moonshot's Kimi API can cost you: spend, budgets, prices, demo.

    Start with `kimi-budget demo` (offline, no key needed).
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@_filter_options
@click.option(
    "--by",
    default="model",
    show_default=True,
    metavar="day|week|month|model|tag:KEY|total",
    help="How to group the spend.",
)
@_ledger_option()
@_json_option
@_csv_option
def report(
    since: str | None,
    until: str | None,
    model: str | None,
    tag_pairs: tuple[str, ...],
    tz: str | None,
    by: str,
    ledger_option: Path | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Spend in USD, calls, input (cache hit/miss) and output tokens, and cache savings.

    Only settled calls count; reservations in flight are listed apart.
    """
    mode = _output_mode(as_json, as_csv)
    if by not in ("day", "week", "month", "model", "total") and not (
        by.startswith("tag:") and len(by) > 4
    ):
        raise UserError(f"--by must be day, week, month, model, tag:KEY or total, not {by!r}.")
    file = _config()
    zone = _zone(tz, file)
    start, end, tags = _filters(since, until, tag_pairs, zone)
    with _open_ledger(ledger_option, file) as ledger:
        result = rp.build_report(
            ledger, by=by, since=start, until=end, model=model, tags=tags, tz=zone
        )
    if mode == "json":
        _print_json(result.to_json())
    elif mode == "csv":
        click.echo(rp.to_csv(rp.REPORT_CSV_HEADERS, rp.report_csv_rows(result)), nl=False)
    else:
        what = "" if by == "total" else f" by {by}"
        scope = rp.describe_filters(result)
        click.echo(f"Spend{what} ({zone}{', ' + scope if scope else ''}) in {result.ledger}")
        click.echo()
        click.echo(rp.report_table(result))


@cli.command()
@_ledger_option()
@_json_option
def status(ledger_option: Path | None, as_json: bool) -> None:
    """Every budget cap: spent, reserved, remaining, % used, when it resets; calls in flight.

    Budgets come from the same configuration as the library (KIMI_BUDGET_*_USD, then the
    config file's [budget] and [[budgets]]).
    """
    file = _config()
    budgets = resolve_budgets(None, file)
    with _open_ledger(ledger_option, file) as ledger:
        statuses = rp.budget_status(ledger, budgets)
        pending = ledger.pending()
        now = ledger.clock()
        path = str(ledger.path)
    if as_json:
        _print_json(
            {
                "ledger": path,
                "budgets": [
                    {
                        "tz": s.budget.tz_name,
                        "scope": s.budget.scope,
                        "caps": [rp.window_json(w) for w in s.windows],
                    }
                    for s in statuses
                ],
                "pending": [rp.pending_json(row) for row in pending],
                "pending_reserved_usd": rp.usd(sum(int(r["projected_nanos"]) for r in pending)),
            }
        )
        return
    click.echo(f"Ledger {path}")
    if not statuses:
        click.echo(
            "\nNo budget configured. Set one with KIMI_BUDGET_DAILY_USD=5 (or _MONTHLY_, "
            "_PER_CALL_, ...) or a [budget] table in kimi-budget.toml."
        )
    for s in statuses:
        scope = " ".join(f"{k}={v}" for k, v in s.budget.scope.items())
        click.echo(f"\nBudget ({s.budget.tz_name}{', calls tagged ' + scope if scope else ''})")
        rows = []
        for w in s.windows:
            if w.window == "per_call":
                rows.append(["per call", rp.dollars_usd(w.limit_usd), "", "", "", "", "each call"])
                continue
            fraction = rp.used_fraction(w)
            if w.resets_at is None:
                resets = "never"
            else:
                local = w.resets_at.astimezone(ZoneInfo(w.tz)).strftime("%Y-%m-%d %H:%M %Z")
                resets = f"{local} ({rp.until_text(w.resets_at, now)})"
            rows.append(
                [
                    w.window,
                    rp.dollars_usd(w.limit_usd),
                    rp.dollars_usd(w.spent_usd),
                    rp.dollars_usd(w.reserved_usd),
                    rp.dollars_usd(w.remaining_usd),
                    f"{rp.bar(fraction)} {rp.percent(fraction):>6}",
                    resets,
                ]
            )
        headers = ["cap", "limit", "spent", "reserved", "remaining", "used", "resets"]
        click.echo(rp.table(headers, rows, right=(1, 2, 3, 4)))
    if pending:
        total = sum(int(r["projected_nanos"]) for r in pending)
        click.echo(f"\nIn flight: {len(pending)} reservation(s), {rp.dollars(total)} reserved")
        rows = [
            [
                r["call_id"][:12],
                r["model"],
                rp.dollars(int(r["projected_nanos"])),
                r["created_at"][:19].replace("T", " ") + "Z",
                (r["expires_at"] or "")[:19].replace("T", " ") + "Z",
                " ".join(f"{k}={v}" for k, v in json.loads(r["tags"] or "{}").items()),
            ]
            for r in pending
        ]
        headers = ["call", "model", "reserved", "since", "expires", "tags"]
        click.echo(rp.table(headers, rows, right=(2,)))
    else:
        click.echo("\nIn flight: none")


@cli.command()
@click.argument("source", required=False, metavar="[FILE|-]")
@click.option("--model", help="The model to price (default: the request's `model`).")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), help="Output limit (default: the request's)."
)
@click.option("--text", "as_text", is_flag=True, help="Treat the input as plain text, not JSON.")
@_ledger_option(hidden=True)
@_json_option
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
    prices = resolve_prices(None, None, _config())
    if body["model"] not in prices:
        known = ", ".join(sorted(prices.models))
        raise UserError(
            f"no price for model {body['model']!r}; known models: {known}. Add one in a price "
            f'file (KIMI_BUDGET_PRICES) or a [prices."{body["model"]}"] table in kimi-budget.toml.'
        )
    result = rp.estimate_request(body, prices)
    if as_json:
        _print_json(result.to_json())
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
        limit = f"{rp.tokens(result.max_output)} tokens (max_tokens)"
    else:
        limit = f"{rp.tokens(result.max_output)} tokens (the API's default; set --max-tokens)"
    if result.fits:
        fits = f"yes: {rp.tokens(need)} of {rp.tokens(price.context_window)} tokens"
    else:
        fits = (
            f"NO: {rp.tokens(est.tokens)} + {rp.tokens(result.max_output)} = {rp.tokens(need)} "
            f"exceeds {rp.tokens(price.context_window)}; the call would be refused"
        )
    n = f" x {result.choices} choices" if result.choices > 1 else ""
    rows = [
        ["model", f"{price.model} (context window {rp.tokens(price.context_window)} tokens)"],
        ["prompt", f"{rp.tokens(est.tokens)} tokens ({exactness})"],
        ["max output", limit + n],
        ["fits", fits],
        [
            "worst case",
            f"{rp.dollars(result.projected_nanos)} (all input at the cache-miss price "
            f"${rp.per_million(price.cache_miss)}/M, full output at "
            f"${rp.per_million(price.output)}/M)",
        ],
    ]
    click.echo(rp.table(["", ""], rows).split("\n", 1)[1])


@cli.command()
@_ledger_option(hidden=True)
@_json_option
@_csv_option
def prices(ledger_option: Path | None, as_json: bool, as_csv: bool) -> None:
    """The price table in use (USD per million tokens) and where each entry comes from."""
    from ._pricing import BUILTIN_SOURCE

    mode = _output_mode(as_json, as_csv)
    table = resolve_prices(None, None, _config())
    entries: list[dict[str, Any]] = [
        {
            "model": p.model,
            "cache_hit": rp.per_million(p.cache_hit),
            "cache_miss": rp.per_million(p.cache_miss),
            "output": rp.per_million(p.output),
            "context_window": p.context_window,
            "default_max_tokens": p.default_max_tokens,
            "tokenizer": p.tokenizer,
            "source": p.source,
        }
        for p in table.models.values()
    ]
    if mode == "json":
        _print_json(entries)
        return
    headers = list(entries[0]) if entries else []
    if mode == "csv":
        click.echo(rp.to_csv(headers, [list(e.values()) for e in entries]), nl=False)
        return
    rows = [
        [
            e["model"],
            f"${e['cache_hit']}",
            f"${e['cache_miss']}",
            f"${e['output']}",
            rp.tokens(e["context_window"]),
            e["tokenizer"],
            "built in" if e["source"] == BUILTIN_SOURCE else e["source"],
        ]
        for e in entries
    ]
    click.echo("USD per million tokens; built in = Moonshot's pricing document.\n")
    click.echo(
        rp.table(
            ["model", "cache hit", "cache miss", "output", "context", "tokenizer", "source"],
            rows,
            right=(1, 2, 3, 4),
        )
    )


@cli.command()
@click.option(
    "--base-url",
    default=None,
    help="API base URL (default: MOONSHOT_BASE_URL, else https://api.moonshot.ai/v1).",
)
@_ledger_option(hidden=True)
@_json_option
def balance(base_url: str | None, ledger_option: Path | None, as_json: bool) -> None:
    """The account balance from Moonshot's API (needs MOONSHOT_API_KEY)."""
    import tempfile

    from openai import OpenAIError

    from ._client import OpenAI
    from ._provider import resolve_provider

    try:
        # The same rule as the client's: a key only goes to the provider it belongs to.
        key, base_url = resolve_provider(None, base_url)
    except OpenAIError as exc:
        raise UserError(NO_KEY_HELP if "No API key" in str(exc) else str(exc)) from None
    # The balance endpoint records nothing; a throw-away ledger keeps the user's untouched.
    with tempfile.TemporaryDirectory(prefix="kimi-budget-") as scratch:
        client = OpenAI(
            api_key=key, base_url=base_url, ledger=Path(scratch) / "ledger.db", budget=[]
        )
        try:
            result = client.balance()
        finally:
            client.close()
            client.ledger.close()
    if as_json:
        _print_json(
            {
                "available": format(result.available, "f"),
                "voucher": format(result.voucher, "f"),
                "cash": format(result.cash, "f"),
                "currency": result.currency,
            }
        )
        return
    rows = [
        ["available", f"{result.available:f} {result.currency}"],
        ["  voucher", f"{result.voucher:f} {result.currency}"],
        ["  cash", f"{result.cash:f} {result.currency}"],
    ]
    click.echo(rp.table(["", ""], rows, right=(1,)).split("\n", 1)[1])


@cli.command()
@click.option("-n", "--count", "limit", default=20, show_default=True, type=click.IntRange(1))
@_filter_options
@_ledger_option()
@_json_option
@_csv_option
def calls(
    limit: int,
    since: str | None,
    until: str | None,
    model: str | None,
    tag_pairs: tuple[str, ...],
    tz: str | None,
    ledger_option: Path | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """The latest calls, newest first, one per line."""
    mode = _output_mode(as_json, as_csv)
    file = _config()
    zone = _zone(tz, file)
    start, end, tags = _filters(since, until, tag_pairs, zone)
    with _open_ledger(ledger_option, file) as ledger:
        rows = rp.list_calls(ledger, limit=limit, since=start, until=end, model=model, tags=tags)
    if mode == "json":
        _print_json(rows)
    elif mode == "csv":
        headers = list(rows[0]) if rows else []
        out = [[json.dumps(v) if isinstance(v, dict) else v for v in r.values()] for r in rows]
        click.echo(rp.to_csv(headers, out), nl=False)
    elif not rows:
        click.echo("No calls recorded.")
    else:
        for row in rows:
            click.echo(rp.format_call(row, ZoneInfo(zone)))


@cli.command()
@_ledger_option()
@_json_option
def path(ledger_option: Path | None, as_json: bool) -> None:
    """Where the ledger is (it may not exist yet)."""
    file = _config()
    where, source = resolve_ledger_path(ledger_option, file)
    if as_json:
        _print_json(
            {
                "ledger": str(where),
                "source": "--ledger" if source == "argument" else source,
                "exists": where.exists(),
                "config_file": str(file.path) if file.path else None,
            }
        )
    else:
        click.echo(str(where))


@cli.command()
@_ledger_option()
@_json_option
def demo(ledger_option: Path | None, as_json: bool) -> None:
    """Run real guarded calls against a built-in loopback stand-in for Moonshot (offline).

    A normal call, a streamed one, a call with cache hits and one refused by a budget cap,
    then the report. Uses a temporary ledger unless --ledger is given. No key, no network.
    """
    from ._demo import run_demo

    run_demo(ledger_option, as_json=as_json)


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """The console script ``kimi-budget`` (and ``python -m kimi_budget``)."""
    cli.main(args=argv, prog_name="kimi-budget")
