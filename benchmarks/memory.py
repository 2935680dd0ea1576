"""Memory: a stream of 100,000 chunks through kimi-budget keeps the wrapper's memory flat, and
import time of ``kimi_budget`` beside ``openai``'s.

The stream is read chunk by chunk with ``tracemalloc`` on. At checkpoints we record the
memory still allocated (all of it, and the part allocated by kimi-budget's own code), and
the process's RSS. A wrapper that kept chunks would grow with every one of them; the tee
keeps a counter and at most one partial line.

    python benchmarks/memory.py [--tiny]
"""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    KEY,
    MESSAGES,
    MODEL,
    TAGS,
    fmt_s,
    ledger_copy,
    make_budget,
    remove_ledger,
    standin,
    table,
)

_OURS = tracemalloc.Filter(True, "*kimi_budget*")


def _rss_kib() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # peak, KiB on Linux


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated directly by kimi-budget's own code."""
    return sum(stat.size for stat in snapshot.filter_traces([_OURS]).statistics("filename"))


def _stream(client: Any, chunks: int) -> dict[str, Any]:
    checkpoints = sorted({1_000 if chunks >= 10_000 else chunks // 10, chunks // 2, chunks})
    marks: list[tuple[int, int, int, int]] = []
    gc.collect()
    tracemalloc.start(1)  # one frame: deeper tracebacks make each chunk 30x slower
    started = time.perf_counter()
    seen = 0
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=min(chunks * 4, 200_000), stream=True
    )
    for _ in stream:
        seen += 1
        if seen in checkpoints:
            gc.collect()
            current, _ = tracemalloc.get_traced_memory()
            marks.append((seen, current, _ours(tracemalloc.take_snapshot()), _rss_kib()))
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"chunks": seen, "marks": marks, "peak": peak, "seconds": elapsed}


def stream_memory(chunks: int) -> dict[str, Any]:
    import openai

    import kimi_budget as kb

    path = ledger_copy(1_000, "memory")
    ledger = kb.Ledger(path)
    try:
        with standin(stream_chunks=chunks) as url:
            raw = openai.OpenAI(api_key=KEY, base_url=url)
            guarded = kb.OpenAI(
                api_key=KEY, base_url=url, ledger=ledger, budget=make_budget(), tags=TAGS
            )
            for client in (raw, guarded):  # warm both (imports, connections, tokenizer)
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
            result = {"raw": _stream(raw, chunks), "kimi-budget": _stream(guarded, chunks)}
            raw.close()
            guarded.close()
        last = ledger.calls(1)[0]
        assert last["status"] == "ok" and last["completion_tokens"], last
        result["ledger_row"] = last
    finally:
        ledger.close()
        remove_ledger(path)
    return result


_IMPORT_PROBE = r"""
import importlib, sys, time
t = time.perf_counter()
module = importlib.import_module(sys.argv[1])
for name in sys.argv[2:]:
    getattr(module, name)
print(time.perf_counter() - t)
"""
# What is imported, and the names then read from it.
IMPORTS = {
    "import openai": ["openai"],
    "import kimi_budget": ["kimi_budget"],
    "from kimi_budget import OpenAI (includes openai)": ["kimi_budget", "OpenAI"],
}
CLIENT_IMPORT = "from kimi_budget import OpenAI (includes openai)"


def import_times(runs: int) -> dict[str, float]:
    """Median seconds to import each module in a fresh interpreter."""
    out = {}
    for label, argv in IMPORTS.items():
        samples = []
        for _ in range(runs):
            done = subprocess.run(
                [sys.executable, "-c", _IMPORT_PROBE, *argv],
                capture_output=True,
                text=True,
                check=True,
            )
            samples.append(float(done.stdout.strip()))
        out[label] = statistics.median(samples)
    return out


def run(*, tiny: bool = False) -> dict[str, Any]:
    chunks = 500 if tiny else 100_000
    streams = stream_memory(chunks)
    imports = import_times(1 if tiny else 7)
    rows = []
    for name in ("raw", "kimi-budget"):
        s = streams[name]
        first, last = s["marks"][0], s["marks"][-1]
        rows.append(
            [
                name,
                f"{s['chunks']:,}",
                fmt_s(s["seconds"]),
                f"{first[1] / 1024:,.0f} → {last[1] / 1024:,.0f} KiB",
                f"{first[2] / 1024:,.1f} → {last[2] / 1024:,.1f} KiB",
                f"{s['peak'] / 1024:,.0f} KiB",
                f"{first[3] / 1024:,.1f} → {last[3] / 1024:,.1f} MiB",
            ]
        )
    marks = streams["kimi-budget"]["marks"]
    text = "\n\n".join(
        [
            f"One streamed call of {chunks:,} chunks per client, read chunk by chunk, with "
            f"tracemalloc on (so the stream is slower than usual); memory at chunk "
            f"{marks[0][0]:,} → chunk {marks[-1][0]:,}.",
            table(
                [
                    "client",
                    "chunks",
                    "time",
                    "traced memory held",
                    "held by kimi_budget code",
                    "traced peak",
                    "RSS",
                ],
                rows,
            ),
            f"The guarded call was recorded: {streams['ledger_row']['completion_tokens']:,} "
            f"completion tokens, status {streams['ledger_row']['status']}.",
            table(
                ["import (fresh interpreter, median)", "time"],
                [
                    *([label, fmt_s(seconds)] for label, seconds in imports.items()),
                    [
                        "kimi_budget's own share of the client's import",
                        fmt_s(imports[CLIENT_IMPORT] - imports["import openai"]),
                    ],
                ],
            ),
        ]
    )
    return {"streams": streams, "imports": imports, "text": text}


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
