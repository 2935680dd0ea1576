"""``kimi-budget demo``: the whole thing, offline, in a few seconds.

It starts :class:`kimi_budget.testing.MoonshotStandIn` (a real HTTP server on 127.0.0.1 that
answers like Moonshot) and makes real calls through :class:`kimi_budget.OpenAI`: a normal call, a
streamed one, the same long prompt twice (the second is served from the simulated prefix cache),
and one that a budget cap refuses before it is sent. Then it prints the report of those calls.
No key and no network: the demo's key is random and only the loopback server ever sees it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, cast

import click

from . import _report as rp
from . import _tables as tb
from ._app import UserError, cli, json_option, ledger_file_option

__all__ = ["demo", "run_demo"]

MODEL = "kimi-k2.6"
DAILY_CAP = "0.005"
# Moonshot's cache serves prompts over 256 tokens; this system prompt is about 400 on its own.
LONG_PREFIX = " ".join(
    [
        "You are the support assistant of a small bookshop that sells new and second-hand books,",
        "maps and postcards. Answer in plain English, in at most three sentences, and never",
        "invent a title, a price or an opening hour that is not written below.",
    ]
    + [
        f"Shelf {n}: {genre}, sorted by author; second-hand copies carry a pencilled price on "
        f"the first page and may be returned within {n + 6} days with the receipt."
        for n, genre in enumerate(
            [
                "history and biography",
                "travel writing and maps",
                "poetry and drama",
                "crime fiction",
                "science fiction and fantasy",
                "children's books",
                "cookery and gardening",
                "philosophy and religion",
                "art, architecture and photography",
                "natural history",
                "languages and dictionaries",
                "local authors and the town's history",
            ],
            start=1,
        )
    ]
    + [
        "Opening hours: Monday to Saturday 9:30 to 18:00, Sunday 11:00 to 16:00. Gift cards",
        "are sold at the till and never expire. Orders of out-of-print books take two to six",
        "weeks; we e-mail when a copy is found and hold it for ten days.",
    ]
)


@cli.command()
@ledger_file_option()
@json_option
def demo(ledger_option: Path | None, as_json: bool) -> None:
    """Run real guarded calls against a built-in loopback stand-in for Moonshot (offline).

    A normal call, a streamed one, a call with cache hits and one refused by a budget cap,
    then the report. Uses a temporary ledger unless --ledger is given. No key, no network.
    """
    if ledger_option is not None:
        folder = ledger_option.expanduser().absolute().parent
        if not folder.is_dir():
            # The library makes the default ledger's folder; a path typed by hand is checked,
            # so that a typo never leaves new folders behind (at the root, say).
            raise UserError(
                f"--ledger {ledger_option}: the folder {folder} does not exist; create it first "
                "(mkdir -p) or choose another path."
            )
    run_demo(ledger_option, as_json=as_json)


def run_demo(ledger: Path | None, *, as_json: bool = False) -> None:
    """Run the demo, printing as it goes (or one JSON document at the end)."""
    # Imported here, not at the top: `kimi-budget --help` loads this module too.
    import secrets
    import tempfile
    import textwrap

    from .._budget import Budget
    from .._client import OpenAI
    from .._exceptions import BudgetExceededError
    from ..testing import MoonshotStandIn

    run = secrets.token_hex(3)
    key = "sk-demo-" + secrets.token_hex(16)
    steps: list[dict[str, Any]] = []

    def say(text: str = "") -> None:
        if not as_json:
            click.echo(text)

    with contextlib.ExitStack() as stack:
        if ledger is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="kimi-budget-demo-"))
            path, temporary = Path(scratch) / "ledger.db", True
        else:
            path, temporary = ledger.expanduser(), False
        server = stack.enter_context(MoonshotStandIn(api_key=key))
        tags = {"app": "kimi-budget-demo", "demo-run": run}
        budget = Budget(daily=DAILY_CAP, scope={"demo-run": run})
        client = OpenAI(
            api_key=key,
            base_url=server.base_url,
            ledger=path,
            budget=budget,
            tags=tags,
            max_retries=0,
        )
        stack.callback(client.ledger.close)
        stack.callback(client.close)

        say("kimi-budget demo: real calls through kimi_budget.OpenAI to a loopback stand-in")
        say(f"for Moonshot's API at {server.base_url} (no network, no key needed).")
        say(f"ledger  {path}{' (temporary)' if temporary else ''}")
        say(f"budget  daily cap ${DAILY_CAP} for this run (calls tagged demo-run={run}, UTC)")
        say()

        def record(name: str, reply: str | None = None, **extra: Any) -> dict[str, Any]:
            row = client.ledger.calls(1)[0]
            step = {
                "step": name,
                "model": row["model"],
                "status": row["status"],
                "prompt_tokens": row["prompt_tokens"],
                "cached_tokens": row["cached_tokens"],
                "completion_tokens": row["completion_tokens"],
                "cost_usd": tb.usd(row["cost_nanos"]),
                "reserved_usd": tb.usd(row["projected_nanos"]),
                **extra,
            }
            cached = f" ({row['cached_tokens']} cached)" if row["cached_tokens"] else ""
            usage = f"{row['prompt_tokens']} in{cached} / {row['completion_tokens']} out"
            note = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in extra.items())
            say(
                f"{name:<26} {usage:<29} ${step['cost_usd']:<10} reserved "
                f"${step['reserved_usd']:<10}{'  ' + note if note else ''}".rstrip()
            )
            if reply:
                say(f"{'':<26} reply: {_clip(reply, 60)}")
            steps.append(step)
            return step

        question: Any = [{"role": "user", "content": "In one sentence: what does kimi-budget do?"}]
        response = client.chat.completions.create(model=MODEL, messages=question, max_tokens=200)
        record("1. a normal call", response.choices[0].message.content)

        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Stream me a short greeting."}],
            max_tokens=200,
            stream=True,
        )
        chunks = sum(1 for _ in stream)
        record("2. a streamed call", chunks=chunks)

        for number, ask in ((1, "When are you open on Sunday?"), (2, "Do gift cards expire?")):
            client.chat.completions.create(
                model=MODEL,
                messages=cast(
                    Any,
                    [{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": ask}],
                ),
                max_tokens=200,
            )
            label = "3. a long prompt" if number == 1 else "   the same prefix again"
            row = client.ledger.calls(1)[0]
            saved = (row["cached_tokens"] or 0) * (row["price_cache_miss"] - row["price_cache_hit"])
            record(label, **({"cache_saved": f"${tb.usd(saved)}"} if saved else {}))

        sent_before = len(server.chat_requests)
        try:
            client.chat.completions.create(model=MODEL, messages=question, max_tokens=4000)
        except BudgetExceededError as exc:
            sent = len(server.chat_requests) - sent_before
            steps.append(
                {
                    "step": "4. a call over the cap",
                    "refused": True,
                    "window": exc.window,
                    "projected_usd": format(exc.projected_usd, "f"),
                    "requests_sent": sent,
                    "error": str(exc),
                }
            )
            say(f"{'4. a call over the cap':<26} refused before sending ({sent} requests sent):")
            say(
                textwrap.fill(
                    f"BudgetExceededError: {exc}",
                    width=100,
                    initial_indent=" " * 27,
                    subsequent_indent=" " * 27,
                )
            )
        else:  # pragma: no cover - the cap is sized so that this cannot happen
            raise RuntimeError("the demo's over-the-cap call was not refused")

        result = rp.build_report(client.ledger, by="model", tags={"demo-run": run})
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ledger": str(path),
                        "temporary": temporary,
                        "base_url": server.base_url,
                        "daily_cap_usd": DAILY_CAP,
                        "steps": steps,
                        "report": result.to_json(),
                    },
                    indent=2,
                )
            )
            return
        say()
        say(f"Report of this run (kimi-budget report --by model --tag demo-run={run}):")
        say()
        say(tb.report_table(result))
        say()
        if temporary:
            say("The ledger was temporary. Keep one and explore it:")
            me = _command_name()
            say(f"  {me} demo --ledger demo.db && {me} report --ledger demo.db")
        else:
            me = _command_name()
            say(f"Explore it: {me} calls --ledger {path}")
            say(f"            {me} report --ledger {path} --by day --chart")


def _command_name() -> str:
    """How to type this command again: ``kimi-budget``, or its path when that is not on PATH
    (run from a virtual environment that is not activated, as ``.venv/bin/kimi-budget``)."""
    import os
    import shutil
    import sys

    typed = sys.argv[0] if sys.argv else ""
    if os.path.basename(typed) != "kimi-budget":
        return "kimi-budget"
    found = shutil.which("kimi-budget")
    if found and os.path.realpath(found) == os.path.realpath(typed):
        return "kimi-budget"
    relative = os.path.relpath(typed)
    return typed if relative.startswith("..") else relative


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return json.dumps(flat if len(flat) <= limit else flat[: limit - 1] + "…", ensure_ascii=False)
