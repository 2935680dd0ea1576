"""Where a guarded call's added time goes: every SQL statement of the ledger, timed inside real
calls (caches as cold as they really are between two HTTP round trips), and the same
statements run back to back for comparison; then kimi-budget's own Python, function by
function, from ``cProfile`` over real calls.

    python benchmarks/profile_call.py [--tiny]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from datetime import timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    KEY,
    MESSAGES,
    MODEL,
    TAGS,
    check_totals,
    cycle,
    fmt_us,
    ledger_copy,
    make_budget,
    remove_ledger,
    standin,
    table,
)

UTC = timezone.utc


class _TimedConnection:
    """Stands in for the ledger's sqlite3 connection and times each statement."""

    def __init__(self, conn: Any, timings: dict[str, list[int]]) -> None:
        self._conn = conn
        self._timings = timings

    def _label(self, sql: str, many: bool) -> str:
        words = sql.split()
        label = " ".join(words[:3]) if words[0] != "SELECT" else f"SELECT … FROM {_table(words)}"
        return ("executemany " if many else "") + label

    def execute(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter_ns()
        cursor = self._conn.execute(sql, *args)
        self._timings[self._label(sql, False)].append(time.perf_counter_ns() - started)
        return cursor

    def executemany(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter_ns()
        cursor = self._conn.executemany(sql, *args)
        self._timings[self._label(sql, True)].append(time.perf_counter_ns() - started)
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _table(words: list[str]) -> str:
    return words[words.index("FROM") + 1] if "FROM" in words else "?"


def _back_to_back(ledger: Any, budget: Any, cycles: int) -> None:
    for _ in range(cycles):
        cycle(ledger, (budget,))


def python_profile(client: Any, calls: int, top: int = 15) -> tuple[list[list[str]], float]:
    """kimi-budget's own Python per call, by function (``cProfile``'s own time, µs per call).

    Only functions in kimi_budget's files are listed; their own time leaves out the C
    functions they call (SQLite's statements: the table above; json, datetime). cProfile
    slows Python code down (about 2x), so read shares, not absolute figures. Returns the
    rows and the total of kimi_budget's own time per call.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
    profiler.disable()
    stats: Any = pstats.Stats(profiler)
    ours: list[tuple[float, int, str]] = []
    for (filename, line, name), (_, ncalls, own, *_rest) in stats.stats.items():
        path = filename.replace("\\", "/")
        if "/kimi_budget/" not in path:
            continue
        where = path.split("/kimi_budget/", 1)[1]
        ours.append((own, ncalls, f"{where}:{line} {name}"))
    ours.sort(reverse=True)
    total = sum(own for own, _, _ in ours) / calls * 1e6
    rows = [
        [
            label,
            f"{ncalls / calls:g}",
            fmt_us(own / calls * 1e6),
            f"{own / calls * 1e6 / total:.0%}",
        ]
        for own, ncalls, label in ours[:top]
    ]
    return rows, total


def run(*, tiny: bool = False, rows: int | None = None, calls: int | None = None) -> dict[str, Any]:
    import kimi_budget as kb

    rows = rows or (1_000 if tiny else 1_000_000)
    calls = calls or (30 if tiny else 1_000)
    path = ledger_copy(rows, "profile")
    ledger: Any = kb.Ledger(path)  # Any: its connection is swapped for a timing proxy
    budget = make_budget()
    in_calls: dict[str, list[int]] = defaultdict(list)
    b2b: dict[str, list[int]] = defaultdict(list)
    profiled: list[list[str]] = []
    python_total = 0.0
    try:
        check_totals(ledger, budget)
        with standin(stream_chunks=200) as url:
            client = kb.OpenAI(api_key=KEY, base_url=url, ledger=ledger, budget=budget, tags=TAGS)
            for _ in range(20):
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
            real = ledger._conn
            ledger._conn = _TimedConnection(real, in_calls)
            try:
                for _ in range(calls):
                    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
                ledger._conn = _TimedConnection(real, b2b)
                _back_to_back(ledger, budget, calls)
            finally:
                ledger._conn = real
            profiled, python_total = python_profile(client, calls)
            client.close()
    finally:
        ledger.close()
        remove_ledger(path)
    out_rows = []
    total_in = total_b2b = 0.0
    for label, values in in_calls.items():
        per_call = len(values) / calls
        med_in = statistics.median(values) / 1000
        med_b2b = statistics.median(b2b[label]) / 1000 if b2b.get(label) else float("nan")
        total_in += med_in * per_call
        total_b2b += med_b2b * per_call
        out_rows.append([label, f"{per_call:g}", fmt_us(med_in), fmt_us(med_b2b)])
    out_rows.append(["all ledger SQL of one call", "", fmt_us(total_in), fmt_us(total_b2b)])
    text = "\n\n".join(
        [
            f"Ledger: {rows:,} rows; {calls:,} guarded small calls, then {calls:,} reserve+settle "
            f"cycles back to back; median per statement.",
            table(
                ["statement", "per call", "inside real calls", "back to back"],
                out_rows,
            ),
            "A guarded call makes two short write transactions (reserve, settle). Between "
            "them the HTTP stack, pydantic and the SDK run, so the same SQLite and Python code "
            "runs with cold CPU caches: each statement costs about twice its back-to-back time.",
            f"kimi-budget's own Python (cProfile, {calls:,} more calls, own time per call, "
            f"without the C functions called (SQL: above); cProfile about doubles "
            f"Python's cost, so read the shares): {fmt_us(python_total)} per call in all.",
            table(["function", "calls per call", "own time", "share"], profiled),
        ]
    )
    return {
        "in_calls": total_in,
        "b2b": total_b2b,
        "python_us": python_total,
        "python": profiled,
        "text": text,
    }


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
