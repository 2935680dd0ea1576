"""How long the async client blocks its event loop: a probe task's lateness under contention.

``processes`` processes (8) share one ledger file; each runs an event loop with ``tasks`` (50)
tasks making guarded ``AsyncOpenAI`` calls back to back against the loopback stand-in (with a
few milliseconds of latency, as a real API has), and one probe task that sleeps 2 ms again
and again and records how late each wake-up was. A loop blocked by ledger work (a busy
SQLite file, a lock held by another process) shows up as a late wake-up. The same run with
the raw ``openai.AsyncOpenAI`` client gives the floor: the lateness that the HTTP work, the
other tasks and eight processes on a small machine cause by themselves. Raw and guarded
rounds alternate.

    python benchmarks/loop_lag.py [--tiny]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CAPS,
    KEY,
    MESSAGES,
    MODEL,
    TAGS,
    Sample,
    fmt_us,
    make_budget,
    remove_ledger,
    run_processes,
    scratch_dir,
    standin,
    table,
)

PROBE_SLEEP = 0.002
LATENCY = (0.002, 0.010)  # the stand-in's answer delay, seconds


async def _load(
    url: str, path: str | None, worker: int, tasks: int, seconds: float, barrier: Any
) -> tuple[int, list[int]]:
    if path is None:
        import openai

        client: Any = openai.AsyncOpenAI(api_key=KEY, base_url=url)
    else:
        import kimi_budget as kb

        client = kb.AsyncOpenAI(
            api_key=KEY,
            base_url=url,
            ledger=path,
            budget=make_budget(),
            tags={**TAGS, "worker": str(worker)},
        )

    async def call() -> None:
        response = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=64
        )
        assert response.usage is not None

    await asyncio.gather(*(call() for _ in range(4)))  # connections and caches warm
    barrier.wait()  # blocks the loop, but nothing is measured yet
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    lateness: list[int] = []
    calls = 0

    async def probe() -> None:
        while loop.time() < stop:
            started = time.perf_counter_ns()
            await asyncio.sleep(PROBE_SLEEP)
            lateness.append(time.perf_counter_ns() - started - int(PROBE_SLEEP * 1e9))

    async def worker_task() -> None:
        nonlocal calls
        while loop.time() < stop:
            await call()
            calls += 1

    await asyncio.gather(probe(), *(worker_task() for _ in range(tasks)))
    await client.close()
    if path is not None:
        client.ledger.close()
    return calls, lateness


def _worker(
    barrier: Any,
    results: Any,
    worker: int,
    url: str,
    path: str | None,
    tasks: int,
    seconds: float,
) -> None:
    calls, lateness = asyncio.run(_load(url, path, worker, tasks, seconds, barrier))
    results.put((worker, calls, lateness))


def _round(
    url: str, path: str | None, processes: int, tasks: int, seconds: float
) -> tuple[int, Sample]:
    outcomes, _ = run_processes(
        _worker,
        [(i, url, path, tasks, seconds) for i in range(processes)],
        timeout=seconds + 120,
    )
    return sum(o[1] for o in outcomes), Sample([v for o in outcomes for v in o[2]])


def run(
    *,
    tiny: bool = False,
    processes: int | None = None,
    tasks: int = 50,
    seconds: float | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    import kimi_budget as kb

    processes = processes or (2 if tiny else 8)
    tasks = 5 if tiny else tasks
    seconds = seconds or (0.5 if tiny else 5.0)
    rounds = rounds or (1 if tiny else 2)
    path = scratch_dir() / f"loop-lag-{time.time_ns()}.db"
    remove_ledger(path)
    with kb.Ledger(path) as ledger:
        ledger.status(make_budget())  # register the budget before the workers start
    lags = {"raw": Sample(), "kimi-budget": Sample()}
    calls = {"raw": 0, "kimi-budget": 0}
    try:
        with standin(latency=LATENCY) as url:
            for i in range(rounds):
                order = [("raw", None), ("kimi-budget", str(path))]
                for name, ledger_path in order if i % 2 == 0 else order[::-1]:
                    done, sample = _round(url, ledger_path, processes, tasks, seconds)
                    calls[name] += done
                    lags[name].values.extend(sample.values)
        with kb.Ledger(path) as ledger:
            rows = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            pending = len(ledger.pending())
    finally:
        remove_ledger(path)
    warmup = 4 * processes * rounds
    assert rows == calls["kimi-budget"] + warmup, f"{rows} rows for {calls['kimi-budget']} calls"
    assert pending == 0, f"{pending} reservations left pending"
    out_rows = []
    for name, sample in lags.items():
        out_rows.append(
            [
                name,
                f"{calls[name] / (seconds * rounds):,.0f}",
                f"{len(sample.values):,}",
                fmt_us(sample.median_us),
                fmt_us(sample.p99_us),
                fmt_us(max(sample.values, default=0) / 1000),
            ]
        )
    worst = max(lags["kimi-budget"].values, default=0) / 1e6
    worst_raw = max(lags["raw"].values, default=0) / 1e6
    text = "\n\n".join(
        [
            f"{processes} processes × {tasks} tasks of back-to-back calls, {rounds} × "
            f"{seconds:g} s per client (alternating), one shared ledger, budget with "
            f"{', '.join(CAPS)} caps; stand-in latency {LATENCY[0] * 1000:g}–"
            f"{LATENCY[1] * 1000:g} ms; probe: asyncio.sleep({PROBE_SLEEP * 1000:g} ms), "
            "lateness of each wake-up.",
            table(
                ["client", "calls/s (all)", "probe wake-ups", "median late", "p99 late", "worst"],
                out_rows,
            ),
            f"Afterwards: {rows:,} rows = every guarded call, {pending} pending.",
        ]
    )
    return {
        "processes": processes,
        "tasks": tasks,
        "lags": lags,
        "worst_ms": worst,
        "worst_raw_ms": worst_raw,
        "text": text,
    }


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
