"""``kimi-budget balance``: the account balance from Moonshot's API."""

from __future__ import annotations

from pathlib import Path

import click

from . import _tables as tb
from ._app import NO_KEY_HELP, UserError, cli, json_option, ledger_file_option, print_json

__all__ = ["balance"]


@cli.command()
@click.option(
    "--base-url",
    default=None,
    help="API base URL (default: MOONSHOT_BASE_URL, else https://api.moonshot.ai/v1).",
)
@ledger_file_option(hidden=True)
@json_option
def balance(base_url: str | None, ledger_option: Path | None, as_json: bool) -> None:
    """The account balance from Moonshot's API (needs MOONSHOT_API_KEY)."""
    import tempfile

    from openai import OpenAIError

    from .._client import OpenAI
    from .._provider import resolve_provider

    if base_url is not None:
        _check_url(base_url, "--base-url")
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
        print_json(
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
    click.echo(tb.table(["", ""], rows, right=(1,)).split("\n", 1)[1])


def _check_url(url: str, where: str) -> None:
    """A base URL is http(s)://host[...]: anything else is a user error, not a network error."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"{where} {url!r} is not a URL: give one such as https://api.moonshot.ai/v1 "
            "(scheme, host, path)."
        )
