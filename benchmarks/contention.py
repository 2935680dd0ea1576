"""Throughput under contention: N processes reserving and settling on one ledger.

Every process opens its own ``Ledger`` on the same file and, from a common start, runs
reserve+settle cycles against a budget with every cap set for a fixed time. Reported: cycles
per second in total, "database is locked" errors (and any other error), the latency of one
cycle, and a check that the ledger is exact afterwards (one row per cycle, nothing pending,
window totals equal to a scan of the rows).

``settle="background"`` (the call path): the caller pays one transaction, the reservation,
and hands the settlement to the ledger's background writer (batches; WAL checkpoints between
them); cycles/s counts until every settlement is written. ``settle="sync"``: two write
transactions per cycle on the caller's thread, as before issue 13.

    python benchmarks/contention.py [--tiny] [--processes N] [--sync]
"""

from __future__ import annotations

import os
import sys
from datetime import timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CAPS,
    Sample,
    check_totals,
    cycle_worker,
    fmt_us,
    make_budget,
    remove_ledger,
    run_processes,
    scratch_dir,
    table,
)

UTC = timezone.utc


def run(
    *,
    tiny: bool = False,
    processes: int | None = None,
    seconds: float | None = None,
    settle: str = "background",
) -> dict[str, Any]:
    """``processes`` processes for ``seconds`` on one ledger; ``settle``: "background" (the
    call path) or "sync" (two transactions per cycle)."""
    import kimi_budget as kb

    if settle not in ("background", "sync"):
        raise ValueError(f"settle must be 'background' or 'sync', not {settle!r}")
    processes = processes or (2 if tiny else 8)
    seconds = seconds or (0.5 if tiny else 10.0)
    path = scratch_dir() / f"contention-{os.getpid()}.db"
    remove_ledger(path)
    budget = make_budget()
    with kb.Ledger(path) as ledger:
        ledger.status(budget)  # register the budget before the workers start
    outcomes, method = run_processes(
        cycle_worker,
        [(i, str(path), seconds, settle) for i in range(processes)],
        timeout=seconds + 120,
    )
    try:
        with kb.Ledger(path) as ledger:
            rows = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            pending = len(ledger.pending())
            check_totals(ledger, budget)
    finally:
        remove_ledger(path)
    cycles = sum(o[1] for o in outcomes)
    locked = sum(o[2] for o in outcomes)
    other = sum(o[3] for o in outcomes)
    latency = Sample([v for o in outcomes for v in o[4]])
    per_worker = sorted(o[1] for o in outcomes)
    assert rows == cycles, f"{rows} rows for {cycles} cycles"
    assert pending == 0, f"{pending} reservations left pending"
    wall = max((o[6] for o in outcomes), default=seconds)
    rate = cycles / wall
    errors = "; ".join(sorted({o[5] for o in outcomes if o[5]}))
    text = "\n\n".join(
        [
            f"{processes} processes ({method}), {seconds:g} s each, one ledger (WAL), budget "
            f"with {', '.join(CAPS)} caps; "
            + (
                "each cycle is a reserve and a settle (two write transactions)."
                if settle == "sync"
                else "each cycle is a reserve (one write transaction) and a settlement handed "
                "to the background writer; cycles/s counts until all are written."
            ),
            table(
                [
                    "processes",
                    "cycles/s (total)",
                    '"database is locked"',
                    "other errors",
                    "cycle median",
                    "cycle p99",
                    "cycle max",
                    "cycles per process (min–max)",
                ],
                [
                    [
                        processes,
                        f"{rate:,.0f}",
                        locked,
                        other,
                        fmt_us(latency.median_us),
                        fmt_us(latency.p99_us),
                        fmt_us(max(latency.values, default=0) / 1000),
                        f"{per_worker[0]:,}–{per_worker[-1]:,}",
                    ]
                ],
            ),
            f"Afterwards: {rows:,} rows = {cycles:,} cycles, {pending} pending, window totals "
            f"equal to a scan of the rows." + (f" Errors: {errors}" if errors else ""),
        ]
    )
    return {
        "settle": settle,
        "processes": processes,
        "rate": rate,
        "locked": locked,
        "other": other,
        "latency": latency,
        "text": text,
    }


def main() -> None:
    args = sys.argv[1:]
    processes = int(args[args.index("--processes") + 1]) if "--processes" in args else None
    settle = "sync" if "--sync" in args else "background"
    print(run(tiny="--tiny" in args, processes=processes, settle=settle)["text"])


if __name__ == "__main__":
    main()
