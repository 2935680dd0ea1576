"""Commands that read the ledger: ``report``, ``status``, ``calls`` and ``path``.

They open the ledger read-only in spirit: a missing ledger is a user error, never created.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from .._config import FileConfig, resolve_budgets, resolve_ledger_path
from . import _report as rp
from . import _tables as tb
from ._app import (
    UserError,
    cli,
    config,
    csv_option,
    filter_options,
    json_option,
    ledger_file_option,
    open_ledger,
    output_mode,
    parse_filters,
    print_json,
    zone_name,
)

__all__ = ["calls", "path", "report", "status"]


@cli.command()
@filter_options
@click.option(
    "--by",
    default="model",
    show_default=True,
    metavar="day|week|month|model|tag:KEY|total",
    help="How to group the spend.",
)
@click.option(
    "--chart",
    is_flag=True,
    help="Draw the spend per day (week, month) as bars stacked by model, with the cap as a "
    "line (with --by day, week or month).",
)
@click.option(
    "--currency",
    type=click.Choice(["USD", "CNY"], case_sensitive=False),
    default=None,
    help="Only calls billed in this currency (a ledger may hold api.moonshot.ai's USD and "
    "api.moonshot.cn's CNY calls; amounts in two currencies are never added).",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Write one self-contained HTML page (no network needed to view it): spend per day "
    "by model with the caps, by tag, cache savings and the most expensive calls.",
)
@ledger_file_option()
@json_option
@csv_option
def report(
    since: str | None,
    until: str | None,
    model: str | None,
    tag_pairs: tuple[str, ...],
    tz: str | None,
    by: str,
    chart: bool,
    currency: str | None,
    html_file: Path | None,
    ledger_option: Path | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Spend, calls, input (cache hit/miss) and output tokens, and cache savings.

    Only settled calls count; reservations in flight are listed apart.
    """
    mode = output_mode(as_json, as_csv)
    if by not in ("day", "week", "month", "model", "total") and not (
        by.startswith("tag:") and len(by) > 4
    ):
        raise UserError(f"--by must be day, week, month, model, tag:KEY or total, not {by!r}.")
    if chart and by not in ("day", "week", "month"):
        raise UserError(
            f"--chart draws spend over time: use it with --by day, week or month, not --by {by}."
        )
    if chart and mode != "text":
        raise UserError(f"--chart draws text for a person; it cannot be combined with --{mode}.")
    file = config()
    zone = zone_name(tz, file)
    start, end, tags = parse_filters(since, until, tag_pairs, zone)
    if html_file is not None:
        from ._html import write_report_page

        write_report_page(
            html_file, ledger_option, file, since=start, until=end, model=model, tags=tags, tz=zone
        )
        return
    if chart:
        _draw_chart(
            ledger_option, file, by=by, since=start, until=end, model=model, tags=tags, tz=zone
        )
        return
    results = []
    with open_ledger(ledger_option, file) as ledger:
        found = rp.currencies(ledger)
        wanted = [currency.upper()] if currency else found
        if mode != "text" and len(wanted) > 1:
            raise UserError(
                f"this ledger has calls billed in {' and '.join(found)}, which are never added "
                f"together: pass --currency {found[0]} (or {', '.join(found[1:])}) with --{mode}."
            )
        for code in wanted:
            # One currency alone reads the fast rollup; several, each its own rows.
            only = code if (len(found) > 1 or code not in found) else None
            result = rp.build_report(
                ledger,
                by=by,
                since=start,
                until=end,
                model=model,
                tags=tags,
                tz=zone,
                currency=only,
            )
            result.currency = code
            results.append(result)
    if mode == "json":
        print_json(results[0].to_json())
    elif mode == "csv":
        click.echo(tb.to_csv(tb.REPORT_CSV_HEADERS, tb.report_csv_rows(results[0])), nl=False)
    else:
        for index, result in enumerate(results):
            what = "" if by == "total" else f" by {by}"
            scope = tb.describe_filters(result)
            money = f", {result.currency}" if len(results) > 1 or result.currency != "USD" else ""
            if index:
                click.echo()
            click.echo(
                f"Spend{what} ({zone}{', ' + scope if scope else ''}{money}) in {result.ledger}"
            )
            click.echo()
            click.echo(tb.report_table(result))


@cli.command()
@ledger_file_option()
@json_option
def status(ledger_option: Path | None, as_json: bool) -> None:
    """Every budget cap: spent, reserved, remaining, % used, when it resets; calls in flight.

    Budgets come from the same configuration as the library (KIMI_BUDGET_*_USD, then the
    config file's [budget] and [[budgets]]).
    """
    file = config()
    budgets = resolve_budgets(None, file)
    with open_ledger(ledger_option, file) as ledger:
        statuses = rp.budget_status(ledger, budgets)
        pending = ledger.pending()
        now = ledger.clock()
        path = ledger.location
    if as_json:
        print_json(
            {
                "ledger": path,
                "budgets": [
                    {
                        "tz": s.budget.tz_name,
                        "scope": s.budget.scope,
                        "caps": [tb.window_json(w) for w in s.windows],
                    }
                    for s in statuses
                ],
                "pending": [tb.pending_json(row) for row in pending],
                "pending_reserved_usd": tb.usd(sum(int(r["projected_nanos"]) for r in pending)),
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
                rows.append(["per call", tb.dollars_usd(w.limit_usd), "", "", "", "", "each call"])
                continue
            fraction = tb.used_fraction(w)
            if w.resets_at is None:
                resets = "never"
            else:
                local = w.resets_at.astimezone(ZoneInfo(w.tz)).strftime("%Y-%m-%d %H:%M %Z")
                resets = f"{local} ({tb.until_text(w.resets_at, now)})"
            rows.append(
                [
                    w.window,
                    tb.dollars_usd(w.limit_usd),
                    tb.dollars_usd(w.spent_usd),
                    tb.dollars_usd(w.reserved_usd),
                    tb.dollars_usd(w.remaining_usd),
                    f"{tb.bar(fraction)} {tb.percent(fraction):>6}",
                    resets,
                ]
            )
        headers = ["cap", "limit", "spent", "reserved", "remaining", "used", "resets"]
        click.echo(tb.table(headers, rows, right=(1, 2, 3, 4)))
    if pending:
        total = sum(int(r["projected_nanos"]) for r in pending)
        click.echo(f"\nIn flight: {len(pending)} reservation(s), {tb.dollars(total)} reserved")
        rows = [
            [
                r["call_id"][:12],
                r["model"],
                tb.dollars(int(r["projected_nanos"])),
                r["created_at"][:19].replace("T", " ") + "Z",
                (r["expires_at"] or "")[:19].replace("T", " ") + "Z",
                " ".join(f"{k}={v}" for k, v in json.loads(r["tags"] or "{}").items()),
            ]
            for r in pending
        ]
        headers = ["call", "model", "reserved", "since", "expires", "tags"]
        click.echo(tb.table(headers, rows, right=(2,)))
    else:
        click.echo("\nIn flight: none")


@cli.command()
@click.option("-n", "--count", "limit", default=20, show_default=True, type=click.IntRange(1))
@filter_options
@ledger_file_option()
@json_option
@csv_option
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
    mode = output_mode(as_json, as_csv)
    file = config()
    zone = zone_name(tz, file)
    start, end, tags = parse_filters(since, until, tag_pairs, zone)
    with open_ledger(ledger_option, file) as ledger:
        rows = rp.list_calls(ledger, limit=limit, since=start, until=end, model=model, tags=tags)
    if mode == "json":
        print_json(rows)
    elif mode == "csv":
        headers = list(rows[0]) if rows else []
        out = [[json.dumps(v) if isinstance(v, dict) else v for v in r.values()] for r in rows]
        click.echo(tb.to_csv(headers, out), nl=False)
    elif not rows:
        click.echo("No calls recorded.")
    else:
        secrets = [os.environ.get(n, "") for n in ("MOONSHOT_API_KEY", "OPENAI_API_KEY")]
        for line in tb.format_calls(rows, ZoneInfo(zone), [s for s in secrets if s]):
            click.echo(line)


@cli.command()
@ledger_file_option()
@json_option
def path(ledger_option: Path | None, as_json: bool) -> None:
    """Where the ledger is (it may not exist yet)."""
    file = config()
    where, source = resolve_ledger_path(ledger_option, file)
    if isinstance(where, Path):
        shown, exists = str(where), where.exists()
    else:
        from .._redact import redact_url

        shown, exists = redact_url(where), None  # a server: not checked without connecting
    if as_json:
        print_json(
            {
                "ledger": shown,
                "source": "--ledger" if source == "argument" else source,
                "exists": exists,
                "config_file": str(file.path) if file.path else None,
            }
        )
    else:
        click.echo(shown)


def _draw_chart(
    ledger_option: Path | None,
    file: FileConfig,
    *,
    by: str,
    since: datetime | None,
    until: datetime | None,
    model: str | None,
    tags: dict[str, str],
    tz: str,
) -> None:
    import shutil
    import sys

    from . import _chart, _figures
    from ._progress import progress

    budgets = resolve_budgets(None, file)
    charts = []
    with open_ledger(ledger_option, file) as ledger:
        found = rp.currencies(ledger)
        for currency in found:
            # Never one bar for two currencies: a chart per currency when there are several.
            filters: dict[str, Any] = {
                "since": since,
                "until": until,
                "tags": tags,
                "tz": tz,
                "currency": currency if len(found) > 1 else None,
            }
            models = _figures.models_spent(ledger, model=model, **filters)
            with progress(len(models), "Reading the ledger") as step:
                days = _figures.chart_days(ledger, models, by=by, step=step, **filters)
            caps = _figures.budget_caps(ledger, budgets, currency)
            charts.append((currency, days, _figures.period_cap(caps, by, tags)))
        where = ledger.location
    terminal = sys.stdout.isatty()
    width = min(shutil.get_terminal_size((80, 24)).columns, 120) if terminal else 80
    scope = tb.describe(since, until, model, tags, tz)
    for index, (currency, days, cap) in enumerate(charts):
        what = f", {currency}" if len(charts) > 1 else ""
        if index:
            click.echo()
        click.echo(f"Spend by {by} ({tz}{', ' + scope if scope else ''}{what}), stacked by model")
        click.echo(f"in {where}")
        click.echo()
        click.echo(
            _chart.spend_chart(
                days,
                cap_nanos=cap.limit_nanos if cap else None,
                cap_label=cap.label if cap else "cap",
                currency=currency,
                width=max(width, 60),
                fancy=terminal,
            )
        )
