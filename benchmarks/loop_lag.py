"""How long the async client blocks its event loop: a probe task's lateness under contention.

One process runs an event loop with ``tasks`` (50) tasks making ``AsyncOpenAI`` calls back to
back against the loopback stand-in (which answers after a delay, as a real API does), and one
probe task that sleeps 2 ms again and again and records how late each wake-up is. Meanwhile
``processes`` (8) other processes run reserve+settle cycles on the same ledger file (2 ms
apart each), so the file's write lock is contended all the time. A loop blocked by ledger
work (waiting for that lock, or doing SQLite work inline) shows up as a late wake-up. The
same run with the raw ``openai.AsyncOpenAI`` client, beside the same eight writers, gives the
floor: the lateness that the HTTP work and a busy machine cause by themselves. Raw and
guarded rounds alternate.

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
    cycle_worker,
    fmt_us,
    make_budget,
    remove_ledger,
    run_processes,
    scratch_dir,
    standin,
    table,
)

PROBE_SLEEP = 0.002
# Each writer sleeps this long between its cycles: the file's lock stays busy (hundreds of
# cycles a second each) without the writers taking every CPU of a small machine for themselves.
WRITER_PAUSE = 0.002
LATENCY = (0.05, 0.15)  # the stand-in's answer delay, seconds


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
    path: str,
    guarded: bool,
    tasks: int,
    seconds: float,
) -> None:
    """Worker 0 is the async service (``guarded`` or raw); the others write the ledger."""
    if worker:
        cycle_worker(barrier, results, worker, path, seconds, pause=WRITER_PAUSE)
        return
    calls, lateness = asyncio.run(
        _load(url, path if guarded else None, worker, tasks, seconds, barrier)
    )
    results.put((worker, calls, lateness))


def _round(
    url: str, path: str, guarded: bool, processes: int, tasks: int, seconds: float
) -> tuple[int, Sample, int]:
    """(the service's calls, its probe's lateness, the writers' cycles) of one round."""
    outcomes, _ = run_processes(
        _worker,
        [(i, url, path, guarded, tasks, seconds) for i in range(processes + 1)],
        timeout=seconds + 120,
    )
    service, writers = outcomes[0], outcomes[1:]
    return service[1], Sample(service[2]), sum(o[1] for o in writers)


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
    cycles = {"raw": 0, "kimi-budget": 0}
    try:
        with standin(latency=LATENCY) as url:
            for i in range(rounds):
                order = [("raw", False), ("kimi-budget", True)]
                for name, guarded in order if i % 2 == 0 else order[::-1]:
                    done, sample, written = _round(
                        url, str(path), guarded, processes, tasks, seconds
                    )
                    calls[name] += done
                    cycles[name] += written
                    lags[name].values.extend(sample.values)
        with kb.Ledger(path) as ledger:
            rows = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            pending = len(ledger.pending())
    finally:
        remove_ledger(path)
    expected = calls["kimi-budget"] + 4 * rounds + sum(cycles.values())
    assert rows == expected, f"{rows} rows for {expected} calls and cycles"
    assert pending == 0, f"{pending} reservations left pending"
    out_rows = []
    for name, sample in lags.items():
        out_rows.append(
            [
                name,
                f"{calls[name] / (seconds * rounds):,.0f}",
                f"{cycles[name] / (seconds * rounds):,.0f}",
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
            f"One async service of {tasks} tasks making back-to-back calls (stand-in latency "
            f"{LATENCY[0] * 1000:g}–{LATENCY[1] * 1000:g} ms) beside {processes} processes "
            f"writing reserve+settle cycles to the same ledger ({WRITER_PAUSE * 1000:g} ms apart "
            f"each); {rounds} × {seconds:g} s per "
            f"client (alternating); budget with {', '.join(CAPS)} caps; probe: "
            f"asyncio.sleep({PROBE_SLEEP * 1000:g} ms), lateness of each wake-up.",
            table(
                [
                    "service's client",
                    "its calls/s",
                    "writers' cycles/s",
                    "probe wake-ups",
                    "median late",
                    "p99 late",
                    "worst",
                ],
                out_rows,
            ),
            f"Afterwards: {rows:,} rows = every guarded call and cycle, {pending} pending.",
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
