"""Every kimi-budget benchmark in one run, printed as Markdown tables, with the targets of
issues 6 and 13 marked met or not.

    python benchmarks/run.py            # full size: a 1,000,000-row ledger, several minutes
    python benchmarks/run.py --tiny     # seconds; what CI runs to keep the scripts working
    python benchmarks/run.py --only overhead,flatness --output bench.md

Big ledgers are built once per month into ``$KIMI_BUDGET_BENCH_DIR`` (default
``$TMPDIR/kimi-budget-bench``) and copied for each benchmark; the 1M-row template is ~330 MB.
Ratios are measured side by side in one run on the same loopback stand-in (a subprocess), so
machine load affects both sides; absolute times depend on the machine and its load, which is
printed at the start and the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backends
import contention
import flatness
import loop_lag
import memory
import overhead
import profile_call
import reports
import tokens
from _common import fmt_s, fmt_us, load_average, machine_info, table, verdict

BENCHMARKS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "overhead": ("1. Per-call overhead against the raw openai client", overhead.run),
    "flatness": ("2. Flat in ledger size", flatness.run),
    "reports": ("3. Reports and status on a big ledger", reports.run),
    "tokens": ("4. Token counting", tokens.run),
    "contention": ("5. Throughput under contention", contention.run),
    "memory": ("6. Memory of a long stream; import time", memory.run),
    "profile": (
        "7. Where the added time goes: the ledger's SQL inside real calls",
        profile_call.run,
    ),
    "loop_lag": ("8. The async event loop under contention", loop_lag.run),
    "backends": ("9. The two ledger backends: SQLite and PostgreSQL", backends.run),
}


def targets(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The issue's targets against what was measured (full-size runs only)."""
    rows: list[list[str]] = []
    if "overhead" in results:
        o = results["overhead"]
        small, stream, conc = o["small"], o["stream"], o["async"]
        rows.append(
            [
                "small call: median ≤ 1.15 × raw (goal 1.10), 1M-row ledger, several caps",
                f"{small.ratio:.3f}× ({fmt_us(small.added_us)} added; "
                f"{fmt_us(small.added_cpu_us)} CPU added)",
                verdict(small.ratio <= 1.15) + (", goal met" if small.ratio <= 1.10 else ""),
            ]
        )
        rows.append(
            [
                "small call: p99 ≤ 1.5 × raw's p99",
                f"{small.p99_ratio:.2f}× ({fmt_us(small.guarded.p99_us)} vs "
                f"{fmt_us(small.raw.p99_us)})",
                verdict(small.p99_ratio <= 1.5),
            ]
        )
        rows.append(
            [
                "small call back to back, in blocks (reported: a background writer's work "
                "counts; same 1.15× for reference)",
                f"{small.block_ratio:.3f}×",
                verdict(small.block_ratio <= 1.15),
            ]
        )
        rows.append(
            [
                "200-chunk stream: median ≤ 1.03 × raw",
                f"{stream.ratio:.3f}×",
                verdict(stream.ratio <= 1.03),
            ]
        )
        rows.append(
            [
                "AsyncOpenAI, 50 concurrent (reported; same 1.15× for reference)",
                f"{conc.ratio:.3f}×, {fmt_us(conc.added_us)} per call",
                verdict(conc.ratio <= 1.15),
            ]
        )
    if "flatness" in results:
        f = results["flatness"]
        rows.append(
            [
                f"check+reserve+settle at {f['sizes'][-1]:,} rows ≤ 1.2 × at {f['sizes'][0]:,}",
                f"{f['ratio']:.2f}×",
                verdict(f["ratio"] <= 1.2),
            ]
        )
    if "reports" in results:
        r = results["reports"]
        for name, (fresh, warm) in r["timings"].items():
            limit = reports.LIMITS[name]
            where = "" if name == "--help" else f" on {r['rows']:,} rows"
            rows.append(
                [
                    f"kimi-budget {name} ≤ {limit:g} s{where} (fresh process)",
                    f"{fmt_s(fresh)} (command alone {fmt_s(warm)})",
                    verdict(fresh <= limit),
                ]
            )
    if "tokens" in results:
        t = results["tokens"]
        median = t["timings"]["kimi_k2"][0]
        rows.append(
            [
                f"count {t['tokens']:,} tokens ≤ 50 ms",
                fmt_us(median * 1e6),
                verdict(median <= 0.050),
            ]
        )
        rows.append(
            [
                "counter loads once per process",
                "same object on every call" if t["load"]["same_object"] else "reloaded",
                verdict(t["load"]["same_object"]),
            ]
        )
    if "contention" in results:
        c = results["contention"]
        rows.append(
            [
                f"{c['processes']} processes: ≥ 2,000 reserve+settle cycles/s",
                f"{c['rate']:,.0f}/s",
                verdict(c["rate"] >= 2000),
            ]
        )
        rows.append(['zero "database is locked"', str(c["locked"]), verdict(c["locked"] == 0)])
    if "memory" in results:
        s = results["memory"]["streams"]["kimi-budget"]
        first, last = s["marks"][0], s["marks"][-1]
        growth = last[1] - first[1]
        ours = last[2] - first[2]
        rows.append(
            [
                f"flat memory over a {s['chunks']:,}-chunk stream",
                f"traced {growth / 1024:+,.1f} KiB, kimi_budget code {ours / 1024:+,.1f} KiB "
                f"from chunk {first[0]:,} to {last[0]:,}",
                verdict(growth < 256 * 1024 and ours < 16 * 1024),
            ]
        )
    if "loop_lag" in results:
        lag = results["loop_lag"]
        rows.append(
            [
                f"async loop never blocked more than a few ms ({lag['processes']} processes × "
                f"{lag['tasks']} tasks; worst probe lateness, raw client's beside it)",
                f"{lag['worst_ms']:,.1f} ms (raw {lag['worst_raw_ms']:,.1f} ms)",
                "reported",
            ]
        )
    if "pg_rate_many" in results.get("backends", {}):
        b = results["backends"]
        rows.append(
            [
                "PostgreSQL (loopback), 8 processes: ≥ 1,000 reserve+settle cycles/s "
                "(durable commits; with synchronous_commit=off beside it)",
                f"{b['pg_rate_many']:,.0f}/s ({b['pg_async_rate_many']:,.0f}/s)",
                verdict(b["pg_rate_many"] >= 1000),
            ]
        )
        (small, s1), (big, s2) = b["flat"][0], b["flat"][-1]
        rows.append(
            [
                f"PostgreSQL flat in ledger size: cycle median at {big:,} rows vs {small:,}",
                f"{fmt_us(s2.median_us)} vs {fmt_us(s1.median_us)}",
                verdict(s2.median_us <= 1.25 * s1.median_us),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the kimi-budget benchmarks.")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes (seconds): checks the scripts work, not the targets",
    )
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.perf_counter()
    say(f"# kimi-budget benchmarks{' (tiny)' if args.tiny else ''}")
    say()
    say(table(["environment", ""], machine_info()))
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        title, bench = BENCHMARKS[name]
        say()
        say(f"## {title}")
        say()
        t0 = time.perf_counter()
        results[name] = bench(tiny=args.tiny)
        say(results[name]["text"])
        say()
        say(f"({name}: {fmt_s(time.perf_counter() - t0)})")
    say()
    say("## Targets")
    say()
    if args.tiny:
        say("Tiny run: sizes are too small to judge the targets; run without --tiny.")
    else:
        say(table(["target", "measured", ""], targets(results)))
    say()
    say(
        f"Load average at the end (1/5/15 min): {load_average()}; "
        f"total {fmt_s(time.perf_counter() - started)}."
    )
    say(
        f"Command: python benchmarks/run.py{' --tiny' if args.tiny else ''}"
        f"{' --only ' + args.only if args.only else ''}"
    )
    if args.output:
        args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
