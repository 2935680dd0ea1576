"""Where the examples send their calls: a local stand-in, or Moonshot with ``--live``.

By default every example starts ``kimi_budget.testing.MoonshotStandIn`` (a loopback server that
answers like Moonshot) and calls it with a placeholder key, whatever the environment holds: an
exported ``MOONSHOT_API_KEY`` is not used and nothing leaves the machine.

``--live`` calls the real API with your ``MOONSHOT_API_KEY`` (and ``MOONSHOT_BASE_URL`` if set).
Each example caps its own spend with a small budget of its own.

Either way the calls are recorded in a temporary ledger, deleted at the end, never in your usual
one; ``--ledger PATH`` keeps them in a file of your choice instead (look at it afterwards with
``kimi-budget report --ledger PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python {sys.argv[0]}",
        description="A kimi-budget example. Offline (a local stand-in) unless --live.",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="call Moonshot's real API with MOONSHOT_API_KEY (this spends money, within the "
        "example's small cap)",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="record the calls in this file (default: a temporary ledger, deleted at the end)",
    )
    return parser.parse_args()


@contextlib.contextmanager
def moonshot(**standin_options: Any) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``kimi_budget.OpenAI`` / ``AsyncOpenAI``: key, base URL, ledger."""
    args = _arguments()
    with tempfile.TemporaryDirectory(prefix="kimi-budget-example-") as scratch:
        ledger = args.ledger if args.ledger is not None else Path(scratch) / "ledger.db"
        kept = "" if args.ledger is not None else " (temporary)"
        if args.live:
            key = os.environ.get("MOONSHOT_API_KEY")
            if not key:
                sys.exit(
                    "--live needs MOONSHOT_API_KEY (export MOONSHOT_API_KEY=sk-...); "
                    "without --live the example runs offline."
                )
            base_url = os.environ.get("MOONSHOT_BASE_URL") or "https://api.moonshot.ai/v1"
            print(f"(live: calling {base_url}; ledger {ledger}{kept})")
            yield {"api_key": key, "base_url": base_url, "ledger": ledger}
            return
        from kimi_budget.testing import MoonshotStandIn

        key = "sk-offline-example"
        with MoonshotStandIn(api_key=key, **standin_options) as server:
            print(f"(offline: calls go to a local stand-in at {server.base_url}; add --live for")
            print(f" Moonshot's real API; ledger {ledger}{kept})")
            yield {"api_key": key, "base_url": server.base_url, "ledger": ledger}
