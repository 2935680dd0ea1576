"""Every example in examples/ runs offline (against the built-in stand-in) and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHECKED = ("quickstart", "streaming", "async_many", "per_tag_budgets", "batch_job")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """All examples at once, as subprocesses, with no key and no configuration."""
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("KIMI_BUDGET_", "MOONSHOT_", "OPENAI_"))
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py")],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in CHECKED
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    # Offline runs write only to temporary ledgers: the user's data directory stays empty.
    assert not (home / ".local" / "share" / "kimi-budget").exists()
    return results


def test_every_example_is_checked() -> None:
    found = {path.stem for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert found == set(CHECKED)


@pytest.mark.parametrize("name", CHECKED)
def test_example_runs_offline(name: str, runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = runs[name]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "offline: no MOONSHOT_API_KEY" in result.stdout


def test_quickstart(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["quickstart"].stdout
    recorded = re.search(
        r"recorded: (\d+) in / (\d+) out = \$([\d.]+) \(\$([\d.]+) was reserved", out
    )
    assert recorded, out
    cost, reserved = Decimal(recorded[3]), Decimal(recorded[4])
    assert 0 < cost <= reserved
    assert f"daily cap $1: ${cost} spent" in out


def test_streaming(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["streaming"].stdout
    assert re.search(r"read to the end: status ok, \d+ in / \d+ out, \$[\d.]+\n", out), out
    abandoned = re.search(
        r"closed after 3 chunks: status abandoned, \d+ in / (\d+) out, "
        r"\$([\d.]+) \(estimated\)",
        out,
    )
    assert abandoned, out
    assert Decimal(abandoned[2]) > 0  # an abandoned stream is still charged


def test_async_many(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["async_many"].stdout
    counts = re.search(r"answered (\d+), refused before sending (\d+), failed (\d+)", out)
    assert counts, out
    answered, refused, failed = map(int, counts.groups())
    assert answered + refused == 60 and failed == 0
    assert answered > 0 and refused > 0
    spent = re.search(r"spent \$([\d.]+) of \$([\d.]+): within the cap", out)
    assert spent and Decimal(spent[1]) <= Decimal(spent[2])
    assert re.search(r"up to (\d+) at once", out)[1] != "1"  # type: ignore[index]


def test_per_tag_budgets(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["per_tag_budgets"].stdout
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 5
    assert "research: answered" in rounds[0] and "research: REFUSED" in rounds[-1]
    assert all("support: answered" in line for line in rounds)
    for team in ("research", "support"):
        line = re.search(rf"{team}: \$([\d.]+) spent of \$([\d.]+) today", out)
        assert line and Decimal(line[1]) <= Decimal(line[2])


def test_batch_job(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = runs["batch_job"].stdout
    done = re.search(r"summarised (\d+) of (\d+) documents", out)
    assert done, out
    assert 0 < int(done[1]) < int(done[2]) == 40
    spent = re.search(r"spent \$([\d.]+) of its \$([\d.]+) cap", out)
    assert spent and 0 < Decimal(spent[1]) <= Decimal(spent[2])
    assert "stopped cleanly: the budget ran out" in out
    assert f"resume from document {int(done[1]) + 1}" in out
