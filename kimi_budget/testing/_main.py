"""``python -m kimi_budget.testing``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ._models import (
    DEFAULT_REPLY,
)
from ._standin import MoonshotStandIn


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kimi_budget.testing``: serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m kimi_budget.testing",
        description="Run a loopback stand-in for Moonshot's Kimi API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--latency",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(0.0, 0.0),
        help="random delay per request, seconds",
    )
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--stream-chunks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    args = parser.parse_args(argv)
    server = MoonshotStandIn(
        host=args.host,
        port=args.port,
        latency=tuple(args.latency),
        error_rate=args.error_rate,
        stream_chunks=args.stream_chunks,
        seed=args.seed,
        reply=args.reply,
    ).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
