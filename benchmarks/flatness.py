"""Flat in ledger size: the budget check + reserve + settle at 1k, 10k, 100k and 1M rows.

Each ledger holds ``rows`` finished calls in the current month and a budget with every cap
set (registered, so its window totals were backfilled once from the rows). Cycles run
round-robin across the ledgers, so a change in machine load hits every size alike.

    python benchmarks/flatness.py [--tiny]
"""

from __future__ import annotations

import gc
import sys
from datetime import timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CAPS,
    Sample,
    check_totals,
    cycle,
    fmt_us,
    ledger_copy,
    make_budget,
    remove_ledger,
    table,
)

UTC = timezone.utc


def run(
    *,
    tiny: bool = False,
    sizes: list[int] | None = None,
    cycles: int | None = None,
    settle: str = "background",
) -> dict[str, Any]:
    """Cycles at each ledger size; ``settle`` as in ``_common.cycle`` ("background": the call
    path, reserve + hand-off to the background writer; "sync": reserve + settle)."""
    import kimi_budget as kb

    sizes = sizes or ([100, 1_000] if tiny else [1_000, 10_000, 100_000, 1_000_000])
    cycles = cycles or (30 if tiny else 2_000)
    budgets = (make_budget(),)
    ledgers = []
    for rows in sizes:
        ledger = kb.Ledger(ledger_copy(rows, f"flat-{rows}"))
        check_totals(ledger, budgets[0])
        ledgers.append(ledger)
    reserve = {rows: Sample() for rows in sizes}
    handed = {rows: Sample() for rows in sizes}
    both = {rows: Sample() for rows in sizes}
    try:
        for _ in range(max(cycles // 10, 5)):  # warm each file's pages and statement cache
            for ledger in ledgers:
                cycle(ledger, budgets, settle=settle)
        gc.collect()
        for i in range(cycles):
            order = list(zip(sizes, ledgers, strict=True))
            for rows, ledger in order if i % 2 else order[::-1]:
                r, s = cycle(ledger, budgets, settle=settle)
                reserve[rows].add(r)
                handed[rows].add(s)
                both[rows].add(r + s)
        for ledger in ledgers:
            ledger.flush()
            check_totals(ledger, budgets[0])  # the totals still agree with the rows
    finally:
        for ledger in ledgers:
            ledger.close()
            remove_ledger(ledger.path)
    base = both[sizes[0]].median_us
    rows_out = [
        [
            f"{rows:,}",
            fmt_us(reserve[rows].median_us),
            fmt_us(handed[rows].median_us),
            fmt_us(both[rows].median_us),
            fmt_us(both[rows].p99_us),
            f"{both[rows].median_us / base:.2f}×",
        ]
        for rows in sizes
    ]
    ratio = both[sizes[-1]].median_us / base
    text = "\n\n".join(
        [
            f"{cycles:,} reserve+settle cycles per ledger, round-robin; budget with "
            f"{', '.join(CAPS)} caps; rows all in the current month; settlements "
            + (
                "written by the caller." if settle == "sync" else "handed to the background writer."
            ),
            table(
                [
                    "rows in ledger",
                    "check+reserve median",
                    "settle median" if settle == "sync" else "hand-off median",
                    "cycle median",
                    "cycle p99",
                    f"vs {sizes[0]:,} rows",
                ],
                rows_out,
            ),
        ]
    )
    return {"settle": settle, "sizes": sizes, "ratio": ratio, "cycle": both, "text": text}


def main() -> None:
    out = run(tiny="--tiny" in sys.argv, settle="sync" if "--sync" in sys.argv else "background")
    print(out["text"])


if __name__ == "__main__":
    main()
