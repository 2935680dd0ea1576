"""Where the examples send their calls: Moonshot when you have a key, else a local stand-in.

With ``MOONSHOT_API_KEY`` set, the examples call the real API (``MOONSHOT_BASE_URL`` if set) and
record to your usual ledger, like any program of yours would. Without it, they start
``kimi_budget.testing.MoonshotStandIn`` (a loopback server that answers like Moonshot) and write
to a temporary ledger, so nothing leaves the machine and your real ledger stays clean. With only
``MOONSHOT_BASE_URL`` set (say, to ``python -m kimi_budget.testing --port 8765``), they call that
server with a placeholder key, again with a temporary ledger.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def moonshot(**standin_options: Any) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``kimi_budget.OpenAI`` / ``AsyncOpenAI``."""
    if os.environ.get("MOONSHOT_API_KEY"):
        yield {}  # the client reads MOONSHOT_API_KEY, MOONSHOT_BASE_URL and KIMI_BUDGET_* itself
        return
    with tempfile.TemporaryDirectory(prefix="kimi-budget-example-") as scratch:
        ledger = Path(scratch) / "ledger.db"
        base_url = os.environ.get("MOONSHOT_BASE_URL")
        if base_url:
            print(f"(no MOONSHOT_API_KEY: calling {base_url} with a placeholder key)")
            yield {"api_key": "sk-placeholder", "base_url": base_url, "ledger": ledger}
            return
        from kimi_budget.testing import MoonshotStandIn

        with MoonshotStandIn(**standin_options) as server:
            print(
                f"(offline: no MOONSHOT_API_KEY; calls go to a local stand-in at {server.base_url})"
            )
            yield {"api_key": "sk-offline-example", "base_url": server.base_url, "ledger": ledger}
