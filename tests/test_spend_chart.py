"""``kimi-budget report --chart``: spend per day in the terminal, by model, the cap as a line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget.cli import cli
from kimi_budget.cli._chart import ChartDay, money_short, spend_chart
from tests.test_cli import at, record

NANOS = 1_000_000_000


@pytest.fixture
def three_days(ledger_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Nov 1 and Nov 3 have calls (two models), Nov 2 none."""
    rows = []
    with kb.Ledger(ledger_path) as ledger:
        rows.append(record(ledger, at(2026, 11, 1, 9), prompt=200_000, completion=2000))
        rows.append(record(ledger, at(2026, 11, 1, 10), model="kimi-k2-thinking", prompt=9000))
        rows.append(record(ledger, at(2026, 11, 3, 9), prompt=50_000, cached=40_000))
    return ledger_path, rows


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env)


def test_chart_has_a_line_per_day_gaps_included_and_fits_80_columns(
    three_days: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = three_days
    result = invoke("report", "--ledger", str(path), "--by", "day", "--chart")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == f"in {path}"
    del lines[1]  # the ledger's path is as long as it is; the rest fits 80 columns
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    days = [line for line in lines if re.match(r"\d{4}-\d{2}-\d{2} ", line)]
    assert [d[:10] for d in days] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    # Not a terminal: plain ASCII, no colour codes, one character per model.
    assert "\x1b[" not in result.output and "█" not in result.output
    nov1 = sum(r["cost"] for r in rows[:2])
    assert days[0].endswith(money_short(nov1))
    assert days[1].split() == ["2026-11-02", "$0"]  # a day without calls keeps its place
    # Stacked: Nov 1 has both models' characters, the costlier (kimi-k2.5) first.
    bar = days[0][11:].rstrip()
    assert bar.startswith("#") and "=" in bar and bar.index("=") > bar.rindex("#")
    legend = "\n".join(lines[-2:])
    assert "# kimi-k2.5" in legend and "= kimi-k2-thinking" in legend


def test_the_daily_cap_is_a_line_across_the_days(
    three_days: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = three_days
    nov1 = sum(r["cost"] for r in rows[:2])
    cap = nov1 // 2  # Nov 1 went over it, Nov 3 did not
    cap_usd = f"{cap / NANOS:.9f}".rstrip("0")
    result = invoke(
        "report", "--ledger", str(path), "--by", "day", "--chart",
        env={"KIMI_BUDGET_DAILY_USD": cap_usd},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    days = [line for line in lines if re.match(r"\d{4}-\d{2}-\d{2} ", line)]
    columns = {line.index("|") for line in days}
    assert len(columns) == 1, days  # one vertical line
    column = columns.pop()
    assert days[0][column - 1] != " " and days[0][column + 1] != " "  # Nov 1 passes the cap
    header = next(line for line in lines if "daily cap" in line)
    assert "daily cap $" in header
    assert header.index("v") == column  # the marker sits on top of the line


def test_chart_on_a_terminal_is_coloured_blocks() -> None:
    days = [ChartDay("2026-11-01", {"a": 3 * NANOS, "b": NANOS}), ChartDay("2026-11-02", {})]
    text = spend_chart(days, cap_nanos=2 * NANOS, fancy=True)
    assert "█" in text and "\x1b[" in text
    plain = click.unstyle(text)
    assert all(len(line) <= 80 for line in plain.splitlines())


def test_chart_is_refused_where_it_cannot_draw(
    three_days: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = three_days
    by_model = invoke("report", "--ledger", str(path), "--by", "model", "--chart")
    assert (
        by_model.exit_code == 2 and "--chart" in by_model.output and "--by day" in by_model.output
    )
    as_json = invoke("report", "--ledger", str(path), "--by", "day", "--chart", "--json")
    assert as_json.exit_code == 2 and "--json" in as_json.output


def test_tiny_spend_still_shows_and_many_models_fold_into_other() -> None:
    models = {f"m{i}": (i + 1) * NANOS for i in range(9)}
    days = [ChartDay("2026-11-01", models), ChartDay("2026-11-02", {"m0": 1})]
    text = spend_chart(days, width=80)
    lines = text.splitlines()
    assert lines[1][11] != " "  # one nano-dollar still gets a cell
    assert lines[1].endswith("$0.000000001")
    legend = text.split("\n\n")[-1]
    assert "m8 $9.00" in legend and "other $6.00" in legend  # m0, m1, m2 folded: 1 + 2 + 3
    assert "m0" not in legend
    assert all(len(line) <= 80 for line in lines)


def test_money_short() -> None:
    assert money_short(0) == "$0"
    assert money_short(978_200) == "$0.000978"
    assert money_short(80_000_000) == "$0.08"
    assert money_short(12_345_000_000) == "$12.35"
    assert money_short(5 * NANOS, "CNY") == "¥5.00"


def test_the_chart_and_the_page_import_neither_openai_nor_pydantic(
    three_days: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    import subprocess
    import sys

    path, _ = three_days
    probe = (
        "import sys\n"
        "from kimi_budget.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('openai', 'pydantic'))\n"
        "print('HEAVY', heavy)\n"
    )
    for args in (
        ["--by", "day", "--chart"],
        ["--html", str(tmp_path / "spend.html")],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, "report", "--ledger", str(path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "HEAVY []" in done.stdout, done.stdout[-500:]
