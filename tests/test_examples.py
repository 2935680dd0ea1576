"""Every example in examples/ runs offline (against the built-in stand-in) and does what it says.

Each runs as a process of its own, forked from a server that imported openai once
(``tests/python_processes.py``), with its own environment, folder and ``sys.argv``.

Offline means whatever the environment holds: the examples run here with a key, a base URL and
a ledger exported, and must use none of them. ``--live`` is the only way to the real API.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from kimi_budget.testing import MoonshotStandIn
from tests.python_processes import PythonProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHECKED = ("quickstart", "streaming", "async_many", "per_tag_budgets", "batch_job")
CANARY_KEY = "sk-examples-canary-0123456789abcdef"
# Each test runs its example as a subprocess: a hang guard of minutes, not a timing (a loaded
# machine is slow).
pytestmark = pytest.mark.timeout(600)


def _clean_env(home: Path) -> dict[str, str]:
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
    return env


def run_offline(name: str, tmp_path: Path) -> str:
    """Run one example as a subprocess, with a key, a base URL and a ledger exported (none of
    which it may use: the examples are offline unless asked with --live); its output."""
    home, work = tmp_path / "home", tmp_path / "work-example"
    work.mkdir()
    configured = work / "configured.db"
    env = _clean_env(home)
    env.update(
        MOONSHOT_API_KEY=CANARY_KEY,
        MOONSHOT_BASE_URL="http://127.0.0.1:9/v1",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        KIMI_BUDGET_LEDGER=str(configured),
    )
    result = PythonProcess.file(EXAMPLES / f"{name}.py", env=env, cwd=work).communicate(300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "offline: calls go to a local stand-in at http://127.0.0.1:" in result.stdout
    assert CANARY_KEY not in result.stdout + result.stderr
    # Offline runs write only to temporary ledgers: the user's data directory stays empty, and
    # the ledger named in the environment is not created.
    assert not (home / ".local" / "share" / "kimi-budget").exists()
    assert not configured.exists()
    assert list(work.iterdir()) == []
    return result.stdout


def test_every_example_is_checked() -> None:
    found = {path.stem for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert found == set(CHECKED)


def test_quickstart(tmp_path: Path) -> None:
    out = run_offline("quickstart", tmp_path)
    recorded = re.search(
        r"recorded: (\d+) in / (\d+) out = \$([\d.]+) \(\$([\d.]+) was reserved", out
    )
    assert recorded, out
    cost, reserved = Decimal(recorded[3]), Decimal(recorded[4])
    assert 0 < cost <= reserved
    assert f"daily cap $1: ${cost} spent" in out


def test_streaming(tmp_path: Path) -> None:
    out = run_offline("streaming", tmp_path)
    assert re.search(r"read to the end: status ok, \d+ in / \d+ out, \$[\d.]+\n", out), out
    abandoned = re.search(
        r"closed after 3 chunks: status abandoned, \d+ in / (\d+) out, "
        r"\$([\d.]+) \(estimated\)",
        out,
    )
    assert abandoned, out
    assert Decimal(abandoned[2]) > 0  # an abandoned stream is still charged


def test_async_many(tmp_path: Path) -> None:
    out = run_offline("async_many", tmp_path)
    counts = re.search(r"answered (\d+), refused before sending (\d+), failed (\d+)", out)
    assert counts, out
    answered, refused, failed = map(int, counts.groups())
    assert answered + refused == 60 and failed == 0
    assert answered > 0 and refused > 0
    spent = re.search(r"spent \$([\d.]+) of \$([\d.]+): within the cap", out)
    assert spent and Decimal(spent[1]) <= Decimal(spent[2])
    assert re.search(r"up to (\d+) at once", out)[1] != "1"  # type: ignore[index]


def test_per_tag_budgets(tmp_path: Path) -> None:
    out = run_offline("per_tag_budgets", tmp_path)
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 5
    assert "research: answered" in rounds[0] and "research: REFUSED" in rounds[-1]
    assert all("support: answered" in line for line in rounds)
    for team in ("research", "support"):
        line = re.search(rf"{team}: \$([\d.]+) spent of \$([\d.]+) today", out)
        assert line and Decimal(line[1]) <= Decimal(line[2])


def test_batch_job(tmp_path: Path) -> None:
    out = run_offline("batch_job", tmp_path)
    done = re.search(r"summarised (\d+) of (\d+) documents", out)
    assert done, out
    assert 0 < int(done[1]) < int(done[2]) == 40
    spent = re.search(r"spent \$([\d.]+) of its \$([\d.]+) cap", out)
    assert spent and 0 < Decimal(spent[1]) <= Decimal(spent[2])
    assert "stopped cleanly: the budget ran out" in out
    assert f"resume from document {int(done[1]) + 1}" in out


def test_live_calls_the_configured_api_and_keeps_the_ledger_asked_for(tmp_path: Path) -> None:
    """``--live`` uses MOONSHOT_API_KEY and MOONSHOT_BASE_URL (here a stand-in playing Moonshot)."""
    kept = tmp_path / "kept.db"
    with MoonshotStandIn(api_key=CANARY_KEY) as server:
        env = _clean_env(tmp_path / "home")
        env.update(MOONSHOT_API_KEY=CANARY_KEY, MOONSHOT_BASE_URL=server.base_url)
        result = PythonProcess.file(
            EXAMPLES / "quickstart.py", "--live", "--ledger", str(kept), env=env, cwd=tmp_path
        ).communicate(60)
        sent, base_url = len(server.chat_requests), server.base_url
    assert result.returncode == 0, result.stderr
    assert f"live: calling {base_url}" in result.stdout
    assert sent == 1
    with contextlib.closing(sqlite3.connect(kept)) as conn:
        rows = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    assert rows == 1
    assert not (tmp_path / "home" / ".local" / "share" / "kimi-budget").exists()


def test_live_without_a_key_says_what_is_missing(tmp_path: Path) -> None:
    result = PythonProcess.file(
        EXAMPLES / "quickstart.py", "--live", env=_clean_env(tmp_path / "home"), cwd=tmp_path
    ).communicate(60)
    assert result.returncode != 0
    assert "--live needs MOONSHOT_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr
