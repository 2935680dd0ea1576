"""``kimi-budget report --by day``, ``--by model``, ``status`` on a big ledger, and ``--help``.

Each command is timed twice: as the user runs it (a fresh ``kimi-budget`` process, the
installed console script, interpreter start-up and imports included; the commands take turns,
so a change in machine load hits each alike), and in a warm process through click's test
runner (the command's own work). ``status`` is run once on a copy where the budget is new
(it registers the budget and backfills its totals from the rows: a one-off scan), then again.

    python benchmarks/reports.py [--tiny]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CAPS, fmt_s, ledger_copy, make_budget, remove_ledger, table

ENV_CAPS = {
    "KIMI_BUDGET_HOURLY_USD": CAPS["hourly"],
    "KIMI_BUDGET_DAILY_USD": CAPS["daily"],
    "KIMI_BUDGET_WEEKLY_USD": CAPS["weekly"],
    "KIMI_BUDGET_MONTHLY_USD": CAPS["monthly"],
    "KIMI_BUDGET_TOTAL_USD": CAPS["total"],
}
COMMANDS = {
    "--help": ["--help"],
    "report --by day": ["report", "--by", "day"],
    "report --by model": ["report", "--by", "model"],
    "status": ["status"],
}
# Fresh-process targets (issue 13): seconds.
LIMITS = {"--help": 0.25, "report --by day": 0.3, "report --by model": 0.3, "status": 0.3}


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_BUDGET_", "MOONSHOT_"))}
    env.update(ENV_CAPS)
    # No config file of the developer's may change what is measured.
    env.update(HOME=home, XDG_CONFIG_HOME=str(Path(home) / ".config"))
    return env


def _command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m kimi_budget``."""
    script = Path(sys.executable).with_name("kimi-budget")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kimi_budget"]


def _with_ledger(args: list[str], ledger: Path) -> list[str]:
    return args if args == ["--help"] else [*args, "--ledger", str(ledger)]


def _fresh(args: list[str], ledger: Path, home: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [*_command(), *_with_ledger(args, ledger)],
        env=_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"kimi-budget {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed, done.stdout


def _warm(args: list[str], ledger: Path, home: str) -> float:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    runner = CliRunner()
    old = os.getcwd()
    os.chdir(home)
    try:
        started = time.perf_counter()
        result = runner.invoke(cli, _with_ledger(args, ledger), env=_env(home))
        elapsed = time.perf_counter() - started
    finally:
        os.chdir(old)
    if result.exit_code != 0:
        raise RuntimeError(f"kimi-budget {' '.join(args)} failed: {result.output.strip()}")
    return elapsed


def _startup(home: str, runs: int) -> tuple[float, float]:
    """Seconds for ``python -c pass`` and for importing the command line, fresh processes."""

    def once(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=_env(home), cwd=home, check=True)
        return time.perf_counter() - started

    bare = statistics.median(once("pass") for _ in range(runs))
    cli = statistics.median(once("import kimi_budget.cli") for _ in range(runs))
    return bare, cli


def fresh_timings(ledger: Path, home: str, runs: int) -> dict[str, float]:
    """Median seconds of each command as a fresh process, the commands taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, args in COMMANDS.items():
            samples[name].append(_fresh(args, ledger, home)[0])
    return {name: statistics.median(values) for name, values in samples.items()}


def run(*, tiny: bool = False, rows: int | None = None, runs: int | None = None) -> dict[str, Any]:
    rows = rows or (1_000 if tiny else 1_000_000)
    runs = runs or (1 if tiny else 9)
    ledger = ledger_copy(rows, "reports")
    timings: dict[str, tuple[float, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="kimi-budget-bench-") as home:
            # A client's first call registers its budget (the totals are backfilled from the
            # rows once); the reading commands, read-only, never do. Without it `status` sums
            # each window from the rows on every run.
            import kimi_budget as kb

            started = time.perf_counter()
            with kb.Ledger(ledger) as writer:
                writer.status(make_budget())
            first_status = time.perf_counter() - started
            fresh = fresh_timings(ledger, home, runs)
            for name, args in COMMANDS.items():
                warm = statistics.median(_warm(args, ledger, home) for _ in range(runs))
                timings[name] = (fresh[name], warm)
            bare, cli_import = _startup(home, runs)
    finally:
        remove_ledger(ledger)
    out_rows = [
        [
            f"registering the budget (a client's first call; backfill from {rows:,} rows)",
            fmt_s(first_status),
            "",
            "",
        ]
    ]
    for name, (fresh, warm) in timings.items():
        out_rows.append([name, fmt_s(fresh), fmt_s(warm), f"≤ {LIMITS[name]:g} s"])
    text = "\n\n".join(
        [
            f"Ledger: {rows:,} rows this month; median of {runs} run(s); budget from "
            f"KIMI_BUDGET_*_USD ({', '.join(k.split('_')[2].lower() for k in ENV_CAPS)}).",
            table(
                ["command", "fresh process (as run)", "command only (warm process)", "target"],
                out_rows,
            ),
            f"Start-up floor of any fresh process: `python -c pass` {fmt_s(bare)}; "
            f"`import kimi_budget.cli` {fmt_s(cli_import)}.",
        ]
    )
    return {
        "rows": rows,
        "timings": timings,
        "first_status": first_status,
        "startup": (bare, cli_import),
        "text": text,
    }


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
