"""The two ledger backends side by side: SQLite (one file) and PostgreSQL (loopback server).

For each backend and 1 and 8 processes: reserve+settle cycles for a fixed time against a budget
with every cap set (five windows checked and updated per call), from a common start. Reported:
cycles per second in total, the latency of one cycle (median, p99), errors, and a check that
the ledger is exact afterwards (one row per cycle, nothing pending). Then flatness: the same
cycle on a ledger of 1,000 and of 1,000,000 rows.

The PostgreSQL server is a throwaway cluster started for the run (``tests/pg_cluster.py``,
Debian's server binaries) with its default durability (fsync on, synchronous commit), on
127.0.0.1; or the server of ``KIMI_BUDGET_BENCH_POSTGRES`` (a URL of a superuser: the
benchmark creates and drops its own databases there).

    python benchmarks/backends.py [--tiny]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    CAPS,
    MODEL,
    TAGS,
    Sample,
    cycle,
    cycle_worker,
    fmt_us,
    make_budget,
    run_processes,
    scratch_dir,
    table,
)

UTC = timezone.utc


def _count(target: str) -> tuple[int, int]:
    """(rows, pending) of a ledger."""
    from kimi_budget.ledger import Ledger

    with Ledger(target) as ledger:
        pending = len(ledger.pending())
        if target.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(target) as conn:
                rows = conn.execute("SELECT count(*) FROM calls").fetchone()
        else:
            rows = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()  # type: ignore[attr-defined]
    return int(rows[0]), pending


def contention(target: str, processes: int, seconds: float) -> dict[str, Any]:
    from kimi_budget.ledger import Ledger

    with Ledger(target) as ledger:
        ledger.status(make_budget())  # register the budget before the workers start
    outcomes, _ = run_processes(
        cycle_worker, [(i, target, seconds) for i in range(processes)], timeout=seconds + 180
    )
    cycles = sum(o[1] for o in outcomes)
    rows, pending = _count(target)
    return {
        "processes": processes,
        "cycles": cycles,
        "rate": cycles / seconds,
        "errors": sum(o[2] + o[3] for o in outcomes),
        "first_error": next((o[5] for o in outcomes if o[5]), ""),
        "latency": Sample([v for o in outcomes for v in o[4]]),
        "exact": rows == cycles and pending == 0,
        "rows": rows,
    }


def flat(target: str, cycles: int) -> Sample:
    """Latency of ``cycles`` reserve+settle cycles on one process."""
    from kimi_budget.ledger import Ledger

    budgets = (make_budget(),)
    sample = Sample([])
    with Ledger(target) as ledger:
        for _ in range(min(20, cycles)):  # warm: connection, registration, caches
            cycle(ledger, budgets, dict(TAGS))
        for _ in range(cycles):
            started = time.perf_counter_ns()
            cycle(ledger, budgets, dict(TAGS))
            sample.add(time.perf_counter_ns() - started)
    return sample


# -- the two backends ------------------------------------------------------------------------


@contextmanager
def postgres_server() -> Iterator[Any]:
    from tests.pg_cluster import Cluster, Server

    configured = os.environ.get("KIMI_BUDGET_BENCH_POSTGRES")
    if configured:
        yield Server(configured, None, owned=False)
        return
    cluster = Cluster.temporary(durable=True, prefix="kb-bench-pg-")
    try:
        yield Server(cluster.url, cluster, owned=True)
    finally:
        cluster.destroy()


def fill_postgres(url: str, rows: int) -> None:
    """``rows`` settled calls spread over this month, written server-side (seconds for 1M)."""
    import psycopg

    from kimi_budget.ledger import Ledger

    Ledger(url).close()  # the schema
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = max((now - start).total_seconds() - 60, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO calls (call_id, created_at, finished_at, model, tags, status, "
            "prompt_tokens, cached_tokens, completion_tokens, cost_nanos, projected_nanos, "
            "prompt_estimate, price_cache_hit, price_cache_miss, price_output, attempts) "
            "SELECT md5(i::text || clock_timestamp()::text), "
            "%(start)s + (i * %(span)s / %(rows)s) * interval '1 second', "
            "%(start)s + (i * %(span)s / %(rows)s) * interval '1 second', "
            "%(model)s, %(tags)s::jsonb, 'ok', 40, 0, 35, 129000, 250000, 40, 100, 600, 3000, 1 "
            "FROM generate_series(1, %(rows)s) AS i",
            {
                "start": start,
                "span": span,
                "rows": rows,
                "model": MODEL,
                "tags": '{"project":"bench","team":"perf"}',
            },
        )
        # Measure the ledger, not the aftermath of the bulk load: vacuum (visibility map, no
        # autovacuum waking up mid-run) and flush its WAL to the data files now.
        conn.execute("VACUUM (ANALYZE) calls")
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")  # superusers only (a configured server may refuse)


def sqlite_ledger(name: str) -> str:
    path = scratch_dir() / f"backends-{name}-{os.getpid()}.db"
    for suffix in ("", "-wal", "-shm", ".fallback.jsonl"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return str(path)


BACKENDS = ("sqlite", "postgresql", "postgresql, synchronous_commit=off")


def run(*, tiny: bool = False) -> dict[str, Any]:
    try:
        import psycopg  # noqa: F401

        from tests.pg_cluster import find_bindir

        if not os.environ.get("KIMI_BUDGET_BENCH_POSTGRES"):
            find_bindir()
    except Exception as exc:  # no driver or no server binaries: say so, measure nothing
        return {
            "text": f"Not run: PostgreSQL is not available here ({exc}). Install the postgres "
            f'extra (pip install -e ".[postgres]") and Debian\'s postgresql package, or set '
            f"KIMI_BUDGET_BENCH_POSTGRES to a server URL.",
        }
    return _run(tiny=tiny)


def _run(*, tiny: bool) -> dict[str, Any]:
    seconds = 0.5 if tiny else 10.0
    counts = (1, 2) if tiny else (1, 8)
    sizes = (1_000, 5_000) if tiny else (1_000, 1_000_000)
    flat_cycles = 50 if tiny else 1000
    results: dict[str, Any] = {"contention": [], "flat": []}
    with postgres_server() as server:

        def database(asynchronous: bool) -> str:
            url = server.create_database()
            if asynchronous:
                # A database default (no SET from the client: PgBouncer-safe): COMMIT returns
                # before the WAL reaches the disk; a server crash can lose the last commits.
                import psycopg

                name = url.rsplit("/", 1)[1]
                with psycopg.connect(server.url, autocommit=True) as conn:
                    conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
            return url

        for processes in counts:
            for backend in BACKENDS:
                if backend == "sqlite":
                    target = sqlite_ledger(f"c{processes}")
                else:
                    target = database(asynchronous=backend != "postgresql")
                try:
                    outcome = contention(target, processes, seconds)
                finally:
                    if backend == "sqlite":
                        Path(target).unlink(missing_ok=True)
                    else:
                        server.drop_database(target)
                results["contention"].append((backend, outcome))
        # Both ledgers are filled first and measured in alternating rounds, so that the load
        # of a shared machine drifting over the run weighs on both sizes alike.
        urls = {rows: database(asynchronous=True) for rows in sizes}
        try:
            samples = {rows: Sample([]) for rows in sizes}
            for rows, url in urls.items():
                fill_postgres(url, rows)
            rounds = 4
            for _ in range(rounds):
                for rows, url in urls.items():
                    samples[rows].values.extend(flat(url, flat_cycles // rounds).values)
            results["flat"] = [(rows, samples[rows]) for rows in sizes]
        finally:
            for url in urls.values():
                server.drop_database(url)
    wrong = [f"{b} x{o['processes']}" for b, o in results["contention"] if not o["exact"]]
    assert not wrong, f"ledger not exact after the run: {wrong}"
    contention_rows = [
        [
            backend,
            o["processes"],
            f"{o['rate']:,.0f}",
            fmt_us(o["latency"].median_us),
            fmt_us(o["latency"].p99_us),
            o["errors"],
            "yes" if o["exact"] else f"NO ({o['rows']} rows for {o['cycles']} cycles)",
        ]
        for backend, o in results["contention"]
    ]
    flat_rows = [
        [f"{rows:,}", fmt_us(sample.median_us), fmt_us(sample.p99_us)]
        for rows, sample in results["flat"]
    ]
    pg8 = [o["rate"] for b, o in results["contention"] if b == "postgresql"][-1]
    pg8_async = [o["rate"] for b, o in results["contention"] if b == BACKENDS[2]][-1]
    errors = "; ".join(
        sorted({o["first_error"] for _, o in results["contention"] if o["first_error"]})
    )
    results["pg_rate_many"] = pg8
    results["pg_async_rate_many"] = pg8_async
    results["text"] = "\n\n".join(
        [
            f"Reserve+settle cycles for {seconds:g} s per run, budget with "
            f"{', '.join(CAPS)} caps (5 windows per call), every process on the same budget "
            f"(the same window-total rows). PostgreSQL 'postgresql' on 127.0.0.1 with fsync and "
            f"synchronous commit on (each COMMIT waits for the disk while it holds the window "
            f"rows); 'synchronous_commit=off' is the same server with that database default. "
            f"SQLite in WAL mode (synchronous=NORMAL).",
            table(
                [
                    "backend",
                    "processes",
                    "cycles/s (total)",
                    "cycle median",
                    "cycle p99",
                    "errors",
                    "exact afterwards",
                ],
                contention_rows,
            ),
            f"PostgreSQL (synchronous_commit=off, to leave the disk out), one process, "
            f"{flat_cycles:,} cycles on a ledger of N rows (the sizes in 4 alternating rounds):",
            table(["rows", "cycle median", "cycle p99"], flat_rows),
        ]
        + ([f"Errors: {errors}"] if errors else [])
    )
    return results


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
