"""The benchmarks still run: ``benchmarks/run.py --tiny`` end to end (CI keeps them working).

These are not timed tests: the tiny sizes say nothing about the targets. They check that every
benchmark runs, prints its table, and that the checks built into the benchmarks (one ledger row
per guarded call, no reservation left pending, window totals equal to a scan of the rows)
passed, since a failing check makes the script exit non-zero.

They take about a minute of CPU, a quarter of the suite: they are kept out of the default
command and run as a CI step of their own, ``python -m pytest -q -m benchmarks``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.benchmarks

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


# Hang guards, not timings: on a loaded 2-core machine the tiny run alone can take minutes.
HANG = 840


@pytest.mark.timeout(HANG + 60)
def test_run_tiny_prints_every_benchmark(tmp_path: Path) -> None:
    env = {**os.environ, "KIMI_BUDGET_BENCH_DIR": str(tmp_path / "bench")}
    out_file = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, str(RUN), "--tiny", "--output", str(out_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out_file.read_text(encoding="utf-8").strip() == out.strip()
    # Machine, Python and openai versions head the report.
    assert re.search(rf"\|\s*openai\s*\|\s*{re.escape(openai.__version__)} ", out)
    assert re.search(r"\|\s*python\s*\|\s*CPython 3\.\d+", out)
    for title in (
        "1. Per-call overhead",
        "2. Flat in ledger size",
        "3. Reports and status",
        "4. Token counting",
        "5. Throughput under contention",
        "6. Memory of a long stream",
        "7. Where the added time goes",
        "8. The async event loop",
        "9. The two ledger backends",
        "## Targets",
    ):
        assert title in out, f"missing section {title!r}"
    # Each per-call row carries a ratio, and every stage has a figure.
    assert len(re.findall(r"\|\s*\d+\.\d{3}×\s*\|", out)) == 3
    assert re.search(
        r"\|\s*estimate\s*\|\s*check\+reserve\s*\|\s*send hooks\s*\|\s*settle\s*\|", out
    )
    assert re.search(r"\| 2 +\| [\d,]+ +\| 0 +\| 0 +\|", out), "contention: locked/other errors"
    assert "window totals equal to a scan of the rows" in out


@pytest.mark.timeout(HANG + 60)
def test_each_benchmark_runs_alone(tmp_path: Path) -> None:
    env = {**os.environ, "KIMI_BUDGET_BENCH_DIR": str(tmp_path / "bench")}
    done = subprocess.run(
        [sys.executable, str(RUN), "--tiny", "--only", "flatness,tokens"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2. Flat in ledger size" in done.stdout
    assert "1. Per-call overhead" not in done.stdout
    bad = subprocess.run(
        [sys.executable, str(RUN), "--only", "nonsense"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert bad.returncode == 2
    assert "unknown benchmark" in bad.stderr
