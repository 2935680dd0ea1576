"""The ``kimi-budget`` click group, its error handling and the options its commands share.

Each sub-command does one thing (they live in ``_spend``, ``_prices``, ``_account`` and
``_demo``). Reading commands never create a ledger: a missing ledger is a one-line error. Every
user error (a bad date, a missing ledger, an unknown model, a malformed configuration value) is
one line on stderr and exit status 2, never a traceback; that is done once, in ``_Group``, not in
each command.
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

from .._config import FileConfig, load_file_config, parse_tags, resolve_ledger_path, resolve_tz
from ._report import parse_when

__all__ = [
    "NO_KEY_HELP",
    "RemoteError",
    "UserError",
    "cli",
    "config",
    "csv_option",
    "filter_options",
    "json_option",
    "ledger_file_option",
    "main",
    "open_ledger",
    "output_mode",
    "parse_filters",
    "print_json",
    "zone_name",
]

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
    try:
        yield
    except UserError:
        raise
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise UserError(exc.format_message() + hint) from None
    except Exception as exc:
        _translate(exc)
        raise


def _translate(exc: Exception) -> None:
    """Raise the one-line form of ``exc`` if it is a user's or Moonshot's error; else return.

    ``openai`` is imported here only if it is already loaded: kimi-budget's own exceptions
    subclass ``openai.OpenAIError`` (see ``_exceptions``), so when no command imported openai,
    none of them, nor any of openai's, can have been raised. Read-only commands stay fast.
    """
    from .._redact import redact

    secrets = tuple(os.environ.get(name, "") for name in ("MOONSHOT_API_KEY", "OPENAI_API_KEY"))
    openai_loaded = "openai" in sys.modules
    if openai_loaded:
        from openai import APIConnectionError, APIStatusError, OpenAIError

        from .._exceptions import KimiBudgetError

        ours: tuple[type[Exception], ...] = (KimiBudgetError, ValueError)
    else:
        ours = (ValueError,)
    if isinstance(exc, ours):
        # LedgerError, PriceTableError, UnknownModelError and malformed settings all say what
        # to fix in their message; the traceback would only hide it.
        if os.environ.get("KIMI_BUDGET_DEBUG"):
            return
        raise UserError(_cli_words(redact(str(exc), secrets))) from None
    if not openai_loaded:
        return
    if isinstance(exc, APIStatusError):
        raise RemoteError(
            redact(f"Moonshot answered HTTP {exc.status_code}: {exc.message}", secrets)
        ) from None
    if isinstance(exc, APIConnectionError):
        where = getattr(getattr(exc, "request", None), "url", None) or "the API"
        raise RemoteError(redact(f"could not reach {where}: {exc}", secrets)) from None
    if isinstance(exc, OpenAIError):
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


class _LedgerTarget(click.ParamType):  # type: ignore[type-arg]
    """A ledger file path, or a ``postgresql://`` URL kept as it is."""

    name = "path_or_url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if value.lower().startswith(("postgresql://", "postgres://")):
            return value
        return Path(value)


def ledger_file_option(hidden: bool = False) -> Callable[[F], F]:
    return click.option(
        "--ledger",
        "ledger_option",
        type=_LedgerTarget(),
        default=None,
        hidden=hidden,
        metavar="PATH|URL",
        help="Ledger file, or a postgresql:// URL. Default: KIMI_BUDGET_LEDGER, then `ledger` "
        "in the config file, then ledger.db in the user data directory.",
    )


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable JSON (money as exact strings)."
    )(f)


def csv_option(f: F) -> F:
    return click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per line.")(f)


def filter_options(f: F) -> F:
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


def config() -> FileConfig:
    return load_file_config()


def open_ledger(option: Path | None, file: FileConfig) -> Any:
    """The existing ledger; a missing one is a user error, never silently created."""
    from ..ledger import Ledger

    path, source = resolve_ledger_path(option, file)
    if isinstance(path, Path) and not path.exists():
        named = "--ledger" if source == "argument" else source
        if not path.absolute().parent.is_dir():
            raise UserError(
                f"no ledger at {path} (from {named}): the folder {path.absolute().parent} does "
                "not exist. Pass --ledger with the path of a kimi-budget ledger."
            )
        raise UserError(
            f"no ledger at {path} (from {named}): nothing has been recorded there yet. "
            f"Pass --ledger PATH, or run `kimi-budget demo --ledger {path}` to make one."
        )
    from ._report import ledger_file_problem

    problem = ledger_file_problem(path) if isinstance(path, Path) else None
    if problem is not None:
        # Opening it as a ledger would write our schema into it: read-only commands never do.
        raise UserError(f"{path} {problem}; pass --ledger with the path of a kimi-budget ledger.")
    busy = file.data.get("busy_timeout", 30.0)
    timeout = float(busy) if isinstance(busy, int | float) else 30.0
    # Reading commands never write: no schema, no migration, no expiry, no merge (issue 9).
    return Ledger(path, busy_timeout=timeout, read_only=True)


def zone_name(option: str | None, file: FileConfig) -> str:
    if option is None:
        return resolve_tz(file)[0]
    from .._budget import Budget

    try:
        Budget(tz=option)
    except ValueError as exc:
        raise UserError(f"--tz: {exc}") from None
    return option


def parse_filters(
    since: str | None, until: str | None, tag_pairs: tuple[str, ...], tz: str
) -> tuple[datetime | None, datetime | None, dict[str, str]]:
    zone = ZoneInfo(tz)
    start = parse_when(since, zone, option="--since") if since else None
    end = parse_when(until, zone, option="--until") if until else None
    if start and end and end <= start:
        raise UserError(f"--until ({until}) must be after --since ({since}).")
    tags = parse_tags(",".join(tag_pairs), where="--tag") if tag_pairs else {}
    return start, end, tags


def output_mode(as_json: bool, as_csv: bool = False) -> str:
    if as_json and as_csv:
        raise UserError("--json and --csv cannot be used together.")
    return "json" if as_json else "csv" if as_csv else "text"


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


# -- the group -----------------------------------------------------------------------------------


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


# The library's errors name its arguments; on the command line the options have other names.
_CLI_WORDS = (("ledger=", "--ledger"), ("base_url=", "--base-url"))


def _cli_words(text: str) -> str:
    for library, command_line in _CLI_WORDS:
        text = text.replace(library, command_line)
    return text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """The console script ``kimi-budget`` (and ``python -m kimi_budget``)."""
    cli.main(args=argv, prog_name="kimi-budget")
