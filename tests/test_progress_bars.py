"""Long command-line work shows a progress bar on a terminal, and only there."""

from __future__ import annotations

import io
from pathlib import Path

import kimi_budget as kb
from kimi_budget.cli._progress import progress
from kimi_budget.ledger._copy import copy_ledger, count_calls
from tests.test_cli import at, record


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_only_when_slow() -> None:
    ticks = iter([0.0, 0.2, 0.5, 2.0, 2.5, 3.0, 3.5])
    terminal = _Terminal()
    with progress(4, "Reading the ledger", file=terminal, clock=lambda: next(ticks)) as step:
        step(1)  # 0.2 s: quiet
        assert terminal.getvalue() == ""
        step(1)  # 2.0 s: the bar appears
        step(2)
    assert "Reading the ledger" in terminal.getvalue() and "100%" in terminal.getvalue()

    piped = io.StringIO()
    slow = iter([0.0, 5.0, 10.0])
    with progress(2, "Reading the ledger", file=piped, clock=lambda: next(slow)) as step:
        step(1)
        step(1)
    assert piped.getvalue() == ""


def test_no_bar_without_a_length() -> None:
    terminal = _Terminal()
    slow = iter([0.0, 5.0, 10.0])
    with progress(0, "Copying calls", file=terminal, clock=lambda: next(slow)) as step:
        step(1)
        step(1)
    assert terminal.getvalue() == ""


def test_copying_a_ledger_moves_the_bar_once_per_call(tmp_path: Path) -> None:
    source, destination = tmp_path / "a.db", tmp_path / "b.db"
    with kb.Ledger(source) as ledger:
        for hour in range(7):
            record(ledger, at(2026, 11, 1, hour))
    steps: list[int] = []
    with kb.Ledger(source, read_only=True) as src, kb.Ledger(destination) as dst:
        assert count_calls(src) == 7
        result = copy_ledger(src, dst, step=steps.append)
    assert result.copied == 7 and steps == [1] * 7
