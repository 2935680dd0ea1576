"""Run the stress suite at full size and print its figures.

    python tests/stress/run.py --full      # the published run (several minutes)
    python tests/stress/run.py             # the reduced size CI runs, as a quick check
    python tests/stress/run.py --full --backend postgresql   # the concurrency run on a
                                           # throwaway PostgreSQL cluster, restarted midway

It runs, in this order: the concurrency run (processes x threads + an asyncio client sharing
one ledger and one daily cap), the crash run (SIGKILL at every point of a call's life), the
unknown-bills run (abandoned, dropped and unread streams, timeouts after sending, missing and
malformed usage, processes killed mid-stream, under one cap: server-billed spend), and
the hypothesis suites (fuzz, money properties, time windows) at the chosen size, counting the
examples they tried. Exit status 1 if any guarantee failed; the problems are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from stress._harness import (  # noqa: E402
    FULL,
    REDUCED,
    Size,
    run_concurrency,
    run_crashes,
    run_unknown_bills,
)

HYPOTHESIS_SUITES = ("test_fuzz.py", "test_money_properties.py", "test_time_windows.py")


def usd(nanos: int) -> str:
    return f"${Decimal(nanos) / 10**9:f}"


def run_hypothesis(size: Size) -> tuple[int, bool, str]:
    """(examples tried, passed, pytest's last lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally.txt"
        env = {**os.environ, "KB_STRESS_SIZE": size.name, "KB_FUZZ_TALLY": str(tally)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "timeout=3600",
                *(str(TESTS / s) for s in HYPOTHESIS_SUITES),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        examples = 0
        if tally.exists():
            examples = sum(int(line.split()[1]) for line in tally.read_text().splitlines())
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return examples, proc.returncode == 0, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full size (default: reduced)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: only the concurrency run, on a new local cluster (Debian's "
        "postgresql package) restarted in the middle of the run",
    )
    args = parser.parse_args()
    if args.backend == "postgresql":
        return main_postgres(FULL if args.full else REDUCED, args.json)
    size = FULL if args.full else REDUCED
    os.environ["KB_STRESS_SIZE"] = size.name
    problems: list[str] = []
    started = time.perf_counter()

    print(f"kimi-budget stress run, {size.name} size", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        conc = run_concurrency(size, Path(tmp))
    problems += [f"concurrency: {p}" for p in conc.problems]
    print(
        f"  concurrency: {conc.calls} calls from {conc.processes} processes "
        f"({conc.threads} threads in {size.processes} processes + 1 asyncio process with "
        f"{conc.async_concurrency} concurrent calls) in {conc.seconds:.1f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        crash = run_crashes(size, Path(tmp))
    problems += [f"crashes: {p}" for p in crash.problems]
    print(f"  crashes: {crash.kills} SIGKILLs in {crash.seconds:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        unknown = run_unknown_bills(size, Path(tmp))
    problems += [f"unknown bills: {p}" for p in unknown.problems]
    print(
        f"  unknown bills: {unknown.calls} calls ({unknown.estimated_rows} with unknown bills), "
        f"{unknown.kills} killed mid-stream, in {unknown.seconds:.1f} s",
        flush=True,
    )
    examples, fuzz_ok, fuzz_tail = run_hypothesis(size)
    if not fuzz_ok:
        problems.append(f"hypothesis suites failed:\n{fuzz_tail}")
    print(f"  hypothesis: {examples} examples", flush=True)

    figures = {
        "size": size.name,
        "calls": conc.calls,
        "processes": conc.processes,
        "threads": conc.threads,
        "async_concurrency": conc.async_concurrency,
        "server_requests": conc.server_requests,
        "ok": conc.ok,
        "refused": conc.refused,
        "errors_after_retries": conc.errors,
        "retried_calls": conc.retried_rows,
        "cache_hit_calls": conc.cache_hit_rows,
        "streamed_calls": conc.stream_rows,
        "daily_cap_usd": usd(conc.cap_nanos),
        "spent_usd": usd(conc.spent_nanos),
        "server_billed_usd": usd(conc.billed_nanos),
        "overshoot_usd": usd(max(conc.overshoot_nanos, 0)),
        "lost_rows": conc.lost_rows,
        "duplicate_rows": conc.duplicate_rows,
        "kills_survived": crash.kills if not crash.problems else 0,
        "kills_by_point": crash.kills_by_point,
        "expired_reservations_recovered": crash.expired_rows,
        "integrity_check": crash.integrity,
        "unknown_bill_calls": unknown.calls,
        "unknown_bill_kinds": unknown.kinds,
        "unknown_bill_rows_estimated": unknown.estimated_rows,
        "unknown_bill_kills_mid_stream": unknown.kills,
        "unknown_bill_refused": unknown.refused,
        "unknown_bill_cap_usd": usd(unknown.cap_nanos),
        "unknown_bill_server_billed_usd": usd(unknown.billed_nanos),
        "unknown_bill_ledger_charged_usd": usd(unknown.spent_nanos),
        "unknown_bill_overshoot_usd": usd(unknown.overshoot_nanos),
        "fuzz_examples": examples,
        "seconds": round(time.perf_counter() - started, 1),
        "problems": len(problems),
    }
    print()
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", "utf-8")
    if problems:
        print("\nPROBLEMS:")
        for p in problems[:60]:
            print(f"  - {p}")
        return 1
    print("\nAll guarantees held.")
    return 0


def main_postgres(size: Size, json_path: str | None) -> int:
    """The concurrency run on PostgreSQL, with a server restart when a third of it is done."""
    sys.path.insert(0, str(ROOT))
    from tests.pg_cluster import Cluster

    os.environ["KB_STRESS_SIZE"] = size.name
    print(f"kimi-budget stress run on PostgreSQL, {size.name} size", flush=True)
    cluster = Cluster.temporary(durable=True, prefix="kb-stress-pg-")
    try:
        url = cluster.url_for("postgres")
        with tempfile.TemporaryDirectory() as tmp:
            conc = run_concurrency(size, Path(tmp), ledger=url, restart=cluster.restart)
    finally:
        cluster.destroy()
    figures = {
        "backend": "postgresql (loopback, restarted midway)",
        "size": size.name,
        "calls": conc.calls,
        "processes": conc.processes,
        "threads": conc.threads,
        "async_concurrency": conc.async_concurrency,
        "server_restarts": conc.restarts,
        "server_requests": conc.server_requests,
        "ok": conc.ok,
        "refused": conc.refused,
        "errors_after_retries": conc.errors,
        "retried_calls": conc.retried_rows,
        "streamed_calls": conc.stream_rows,
        "daily_cap_usd": usd(conc.cap_nanos),
        "spent_usd": usd(conc.spent_nanos),
        "server_billed_usd": usd(conc.billed_nanos),
        "overshoot_usd": usd(max(conc.overshoot_nanos, 0)),
        "lost_rows": conc.lost_rows,
        "duplicate_rows": conc.duplicate_rows,
        "seconds": round(conc.seconds, 1),
        "problems": len(conc.problems),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n", "utf-8")
    if conc.problems:
        print("\nPROBLEMS:")
        for p in conc.problems[:60]:
            print(f"  - {p}")
        return 1
    print("\nAll guarantees held.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
