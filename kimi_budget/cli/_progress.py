"""A progress bar for long command-line work, shown only on a terminal and only when it is long.

``with progress(total, "Copying rows") as step: ... step(n)`` draws ``click.progressbar`` on
stderr once the work has taken more than a second (a quick command stays quiet), and never when
stderr is not a terminal (a pipe, a file, CI logs): output meant for programs stays clean.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import click

__all__ = ["progress"]

AFTER_SECONDS = 1.0


@contextlib.contextmanager
def progress(
    total: int,
    label: str,
    *,
    file: TextIO | None = None,
    after: float = AFTER_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Callable[[int], None]]:
    """Yields ``step(n=1)``: ``n`` more units of ``total`` done (``total`` 0: unknown, no bar)."""
    stream = file if file is not None else sys.stderr
    shown: list[Any] = []  # the bar, once it is worth showing
    done = 0
    started = clock()
    on_terminal = _isatty(stream)

    def step(n: int = 1) -> None:
        nonlocal done
        done += n
        if not on_terminal or total <= 0:  # nowhere to draw, or no length to draw against
            return
        if not shown and clock() - started >= after:
            bar = click.progressbar(length=max(total, 1), label=label, file=stream, width=30)
            bar.__enter__()
            shown.append(bar)
            bar.update(done)
        elif shown:
            shown[0].update(n)

    try:
        yield step
    finally:
        if shown:
            shown[0].__exit__(None, None, None)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
