"""``kimi-budget ledger copy SRC DST``: move a ledger's history between SQLite and PostgreSQL.

Either side is a ledger file path or a ``postgresql://`` URL. Idempotent (keyed on each call's
``call_id``): running it twice copies nothing the second time. The source is opened read-only
and must exist; a SQLite destination is created if it does not.
"""

from __future__ import annotations

from pathlib import Path

import click

from ._app import UserError, cli, json_option, print_json

__all__ = ["copy", "ledger"]


@cli.group()
def ledger() -> None:
    """Ledger maintenance: copy a ledger into another (SQLite <-> PostgreSQL)."""


@ledger.command()
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@json_option
def copy(source: str, destination: str, as_json: bool) -> None:
    """Copy every call of SRC into DST (a ledger file or a postgresql:// URL).

    Calls already in DST (same call_id) are left as they are, so a second run copies nothing.
    DST's budget totals are kept exact. Example:

        kimi-budget ledger copy ~/.local/share/kimi-budget/ledger.db postgresql://me@db/kb
    """
    from ..ledger import Ledger, is_server_url
    from ..ledger._copy import copy_ledger, count_calls
    from ._progress import progress

    src_target = _target(source, "SRC", must_exist=True)
    dst_target = _target(destination, "DST", must_exist=False)
    both_files = not is_server_url(src_target) and not is_server_url(dst_target)
    if both_files and Path(src_target).resolve() == Path(dst_target).resolve():
        raise UserError("SRC and DST are the same ledger file; nothing to copy.")
    with Ledger(src_target, read_only=True) as src, Ledger(dst_target) as dst:
        if src.location == dst.location:
            raise UserError("SRC and DST are the same ledger; nothing to copy.")
        # Millions of rows take a while: a progress bar on a terminal (none in a pipe).
        with progress(count_calls(src) or 0, "Copying calls") as step:
            result = copy_ledger(src, dst, step=step)
        where = (src.location, dst.location)
    if as_json:
        print_json({"source": where[0], "destination": where[1], **result.to_json()})
        return
    click.echo(
        f"Copied {result.copied:,} of {result.read:,} calls from {where[0]} to {where[1]}"
        + (f" ({result.pending:,} reservations in flight)" if result.pending else "")
        + f"; {result.already_there:,} were already there."
    )


def _target(value: str, name: str, *, must_exist: bool) -> str:
    from ..ledger import is_server_url

    if is_server_url(value):
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"{name} {path} is a directory; give a ledger file or a postgresql:// URL.")
    if must_exist and not path.exists():
        raise UserError(f"{name}: no ledger at {path}.")
    return str(path)
