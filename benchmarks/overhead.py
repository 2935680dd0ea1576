"""Per-call overhead: kimi-budget against the raw ``openai`` client, side by side.

Both clients talk to the same MoonshotStandIn (in a subprocess, so its CPU stays off the
client's GIL) and their calls are interleaved (ABBA order), so drift in machine load hits both
alike. The guarded client has a budget with every cap set and a ledger that already holds
``rows`` calls in the current month. A second, instrumented pass splits the wrapper's time
into its stages.

    python benchmarks/overhead.py [--tiny]
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
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
    StageTimer,
    check_totals,
    fmt_us,
    ledger_copy,
    make_budget,
    remove_ledger,
    standin,
    table,
)


@dataclass
class Comparison:
    label: str
    raw: Sample
    guarded: Sample
    stages: StageTimer | None = None
    per: str = "call"
    notes: list[str] = field(default_factory=list)
    cpu_raw_us: float = float("nan")  # process CPU per call (all threads), blocks of calls
    cpu_guarded_us: float = float("nan")
    block_ratio: float = float("nan")  # wall time per call, back to back in blocks

    @property
    def ratio(self) -> float:
        return self.guarded.median_us / self.raw.median_us

    @property
    def added_us(self) -> float:
        return self.guarded.median_us - self.raw.median_us

    @property
    def p99_ratio(self) -> float:
        return self.guarded.p99_us / self.raw.p99_us

    @property
    def added_cpu_us(self) -> float:
        return self.cpu_guarded_us - self.cpu_raw_us

    @property
    def paired_added_us(self) -> float:
        """Median of (guarded - raw) over adjacent pairs: robust to drift in machine load."""
        pairs = zip(self.guarded.values, self.raw.values, strict=True)
        return statistics.median(g - r for g, r in pairs) / 1000


def _clients(url: str, rows: int, name: str, *, asynchronous: bool = False) -> tuple[Any, Any, Any]:
    import openai

    import kimi_budget as kb

    path = ledger_copy(rows, name)
    ledger = kb.Ledger(path)
    budget = make_budget()
    check_totals(ledger, budget)  # registers the budget (backfilling its totals) and checks them
    if asynchronous:
        raw: Any = openai.AsyncOpenAI(api_key=KEY, base_url=url)
        guarded: Any = kb.AsyncOpenAI(
            api_key=KEY, base_url=url, ledger=ledger, budget=budget, tags=TAGS
        )
    else:
        raw = openai.OpenAI(api_key=KEY, base_url=url)
        guarded = kb.OpenAI(api_key=KEY, base_url=url, ledger=ledger, budget=budget, tags=TAGS)
    return raw, guarded, ledger


def _one(client: Any, stream: bool) -> int:
    started = time.perf_counter_ns()
    if stream:
        chunks = 0
        for _ in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=400, stream=True
        ):
            chunks += 1
        assert chunks >= 200, chunks
    else:
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
        assert response.usage is not None
    return time.perf_counter_ns() - started


def _flush(ledger: Any) -> None:
    """Wait for settlements queued by a background writer, if the ledger has one."""
    flush = getattr(ledger, "flush", None)
    if callable(flush):
        flush()


def cpu_per_call(
    raw: Any, guarded: Any, ledger: Any, stream: bool, calls: int
) -> tuple[int, dict[str, float], dict[str, float]]:
    """Process CPU and wall time per call (µs) of each client: blocks of calls back to back,
    alternating, all threads; and the block size.

    Blocks rather than single calls, so the work a background writer does after a guarded
    call returns is charged to the guarded block (each block ends with a flush). Interleaved
    single calls (the median above) let that work overlap the raw call that follows.
    """
    cpu = {"raw": 0, "guarded": 0}
    wall = {"raw": 0, "guarded": 0}
    block = max(calls // 16, 5)
    for i in range(8):
        order = [("raw", raw), ("guarded", guarded)]
        for name, client in order if i % 2 else order[::-1]:
            started, clock = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(block):
                _one(client, stream)
            if name == "guarded":
                _flush(ledger)
            cpu[name] += time.process_time_ns() - started
            wall[name] += time.perf_counter_ns() - clock
    per_call = 8 * block * 1000
    return (
        block,
        {name: spent / per_call for name, spent in cpu.items()},
        {name: spent / per_call for name, spent in wall.items()},
    )


def sync_comparison(
    url: str, *, rows: int, calls: int, stream: bool, warmup: int = 30
) -> Comparison:
    raw, guarded, ledger = _clients(url, rows, "overhead-stream" if stream else "overhead")
    try:
        for _ in range(warmup):
            _one(raw, stream)
            _one(guarded, stream)
        _flush(ledger)  # the warm-up's settlements are written before the count
        before = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        raw_s, kb_s = Sample(), Sample()
        gc.collect()
        for i in range(calls):
            if i % 2:
                raw_s.add(_one(raw, stream))
                kb_s.add(_one(guarded, stream))
            else:
                kb_s.add(_one(guarded, stream))
                raw_s.add(_one(raw, stream))
        _flush(ledger)
        after = ledger.conn.execute("SELECT count(*) FROM calls").fetchone()[0]
        assert after - before == calls, "every guarded call must leave one ledger row"
        block, cpu, wall = cpu_per_call(raw, guarded, ledger, stream, calls)
        stages = StageTimer().install(ledger)
        try:
            for _ in range(max(calls // 2, 10)):
                _one(guarded, stream)
                stages.end_call()
        finally:
            stages.uninstall()
        pending = ledger.pending()
        assert not pending, f"{len(pending)} reservations were left pending"
    finally:
        raw.close()
        guarded.close()
        ledger.close()
        remove_ledger(ledger.path)
    label = "200-chunk stream" if stream else "small call, not streamed"
    result = Comparison(f"sync {label}", raw_s, kb_s, stages)
    result.cpu_raw_us, result.cpu_guarded_us = cpu["raw"], cpu["guarded"]
    result.block_ratio = wall["guarded"] / wall["raw"]
    result.notes.append(
        f"sync {label}: median of paired differences (adjacent calls) "
        f"{fmt_us(result.paired_added_us)}"
    )
    result.notes.append(
        f"sync {label}, back to back in blocks of {block} calls (the background writer's work "
        f"inside each block): raw {fmt_us(wall['raw'])}, kimi-budget "
        f"{fmt_us(wall['guarded'])} per call, {result.block_ratio:.3f}×"
    )
    return result


async def _async_round(client: Any, concurrency: int, latencies: Sample) -> int:
    async def one() -> None:
        started = time.perf_counter_ns()
        response = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=64
        )
        assert response.usage is not None
        latencies.add(time.perf_counter_ns() - started)

    started = time.perf_counter_ns()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return time.perf_counter_ns() - started


async def _async_comparison(url: str, rows: int, rounds: int, concurrency: int) -> Comparison:
    raw, guarded, ledger = _clients(url, rows, "overhead-async", asynchronous=True)
    try:
        scratch = Sample()
        for _ in range(3):
            await _async_round(raw, concurrency, scratch)
            await _async_round(guarded, concurrency, scratch)
        raw_lat, kb_lat, raw_rounds, kb_rounds = Sample(), Sample(), Sample(), Sample()
        gc.collect()
        for i in range(rounds):
            order = [(raw, raw_lat, raw_rounds), (guarded, kb_lat, kb_rounds)]
            for client, latencies, per_round in order if i % 2 else order[::-1]:
                per_round.add(await _async_round(client, concurrency, latencies))
        stages = StageTimer().install(ledger)
        try:
            for _ in range(max(rounds // 2, 2)):
                await _async_round(guarded, concurrency, scratch)
                # Calls interleave on the loop: keep the per-call mean of each round.
                stages.calls.append({k: v // concurrency for k, v in stages.current.items()})
                stages.current.clear()
        finally:
            stages.uninstall()
        assert not ledger.pending()
    finally:
        await raw.close()
        await guarded.close()
        ledger.close()
        remove_ledger(ledger.path)
    # Per call: the round's wall time shared by its calls (what the wrapper costs in throughput).
    per_call_raw = Sample([v // concurrency for v in raw_rounds.values])
    per_call_kb = Sample([v // concurrency for v in kb_rounds.values])
    result = Comparison(
        f"async, {concurrency} concurrent calls",
        per_call_raw,
        per_call_kb,
        stages,
        per="call (round / 50)",
    )
    result.notes.append(
        f"latency of one call within a round: raw median {fmt_us(raw_lat.median_us)}, "
        f"p99 {fmt_us(raw_lat.p99_us)}; kimi-budget median {fmt_us(kb_lat.median_us)}, "
        f"p99 {fmt_us(kb_lat.p99_us)}"
    )
    result.notes.append(
        f"round of {concurrency}: raw median {fmt_us(raw_rounds.median_us)}, "
        f"kimi-budget median {fmt_us(kb_rounds.median_us)}"
    )
    return result


def async_comparison(url: str, *, rows: int, rounds: int, concurrency: int = 50) -> Comparison:
    return asyncio.run(_async_comparison(url, rows, rounds, concurrency))


def comparison_rows(results: list[Comparison]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append(
            [
                r.label,
                fmt_us(r.raw.median_us),
                fmt_us(r.raw.p99_us),
                fmt_us(r.guarded.median_us),
                fmt_us(r.guarded.p99_us),
                f"{r.ratio:.3f}×",
                fmt_us(r.added_us),
                f"{r.p99_ratio:.2f}×",
                "n/a" if r.added_cpu_us != r.added_cpu_us else fmt_us(r.added_cpu_us),
            ]
        )
    return rows


def stage_rows(results: list[Comparison]) -> list[list[str]]:
    rows = []
    for r in results:
        assert r.stages is not None
        medians = [r.stages.median_us(s) for s in StageTimer.STAGES]
        rest = r.added_us - sum(medians)
        rows.append([r.label, *(fmt_us(m) for m in medians), fmt_us(sum(medians)), fmt_us(rest)])
    return rows


COMPARISON_HEADERS = [
    "per-call wall time",
    "raw median",
    "raw p99",
    "kimi-budget median",
    "kimi-budget p99",
    "ratio",
    "added",
    "p99 ratio",
    "added CPU",
]
STAGE_HEADERS = [
    "added time by stage (median)",
    *StageTimer.STAGES,
    "sum of stages",
    "rest (SDK hooks, tags, ids), by difference",
]


def run(
    *,
    tiny: bool = False,
    subprocess_server: bool = True,
    rows: int | None = None,
    calls: int | None = None,
) -> dict[str, Any]:
    rows = rows if rows is not None else 1_000 if tiny else 1_000_000
    calls = calls if calls is not None else 20 if tiny else 2_000
    stream_calls = max(calls // 5, 6)
    rounds = max(calls // 50, 2)
    with standin(stream_chunks=200, subprocess_=subprocess_server) as url:
        small = sync_comparison(
            url, rows=rows, calls=calls, stream=False, warmup=5 if tiny else 100
        )
        streamed = sync_comparison(
            url, rows=rows, calls=stream_calls, stream=True, warmup=3 if tiny else 20
        )
        concurrent = async_comparison(url, rows=rows, rounds=rounds)
    results = [small, streamed, concurrent]
    return {
        "rows": rows,
        "results": results,
        "small": small,
        "stream": streamed,
        "async": concurrent,
        "text": "\n\n".join(
            [
                f"Ledger: {rows:,} rows this month; budget: {', '.join(CAPS)} caps; "
                f"{calls:,} small calls, {stream_calls:,} streams, {rounds} async rounds per "
                "client.",
                table(COMPARISON_HEADERS, comparison_rows(results)),
                "p99 ratio: kimi-budget's p99 over raw's. Added CPU: process CPU per call (all "
                "threads, a background writer's included: each block of calls ends with a "
                "flush), kimi-budget minus raw, from alternating blocks of calls.",
                table(STAGE_HEADERS, stage_rows(results)),
                "\n".join(f"- {note}" for r in results for note in r.notes),
            ]
        ),
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few calls on a 1k-row ledger")
    parser.add_argument("--in-process", action="store_true", help="serve from this process")
    parser.add_argument("--rows", type=int, help="ledger rows (default 1,000,000)")
    parser.add_argument("--calls", type=int, help="small calls per client (default 2,000)")
    args = parser.parse_args()
    out = run(
        tiny=args.tiny, subprocess_server=not args.in_process, rows=args.rows, calls=args.calls
    )
    print(out["text"])


if __name__ == "__main__":
    main()
