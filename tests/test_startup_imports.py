"""The command line's read-only commands start without importing openai or pydantic.

``import openai`` is most of a fresh process's start-up; ``--help``, ``report``, ``status`` and
``calls`` never use it. Each case runs in a fresh interpreter and lists what got imported (no
timings here: those are in ``benchmarks/``). Library users still get exceptions that are
``openai.OpenAIError`` subclasses, however they reach them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget.cli import cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("openai", "pydantic", "pydantic_core", "httpx", "httpx2", "tenacity", "sqlite_utils")

# Runs the console script's main() with argv, then prints the heavy top-level packages loaded.
PROBE = """
import json, sys
from kimi_budget.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(@HEAVY@))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
""".replace("@HEAVY@", repr(HEAVY))


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    return json.loads(last), done.stdout + done.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger with real calls in it (the demo's, made through the guarded client)."""
    path = tmp_path_factory.mktemp("startup") / "ledger.db"
    result = CliRunner().invoke(cli, ["demo", "--ledger", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["report", "--help"],
        ["report", "--by", "day"],
        ["report", "--by", "model", "--json"],
        ["status"],
        ["status", "--json"],
        ["calls", "-n", "3"],
        ["calls", "--model", "kimi-k2.6", "--json"],
    ],
    ids=" ".join,
)
def test_read_only_commands_import_neither_openai_nor_pydantic(
    recorded: Path, args: list[str]
) -> None:
    with_ledger = args if "--help" in args else [*args, "--ledger", str(recorded)]
    env = {**os.environ, "KIMI_BUDGET_DAILY_USD": "5"}
    result, output = _run(PROBE, *with_ledger, env=env)
    assert result["code"] == 0, output
    assert result["loaded"] == [], output
    if "--help" not in args:
        assert str(recorded) in output or "kimi-k2.6" in output


def test_a_user_error_is_one_line_without_openai(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    result, output = _run(PROBE, "report", "--ledger", str(missing))
    assert result == {"code": 2, "loaded": []}, output
    assert f"kimi-budget: error: no ledger at {missing}" in output
    assert "Traceback" not in output


def test_a_ledger_error_is_still_one_line(tmp_path: Path) -> None:
    # Not a kimi-budget ledger: the ledger raises LedgerError (an openai.OpenAIError), which the
    # command line turns into one line and exit status 2 like every user error.
    bogus = tmp_path / "bogus.db"
    bogus.write_text("this is not a database\n" * 100)
    result, output = _run(PROBE, "status", "--ledger", str(bogus))
    assert result["code"] == 2, output
    assert "kimi-budget: error:" in output and "Traceback" not in output


def test_import_kimi_budget_is_light_and_exceptions_stay_openai_errors() -> None:
    code = """
import json, sys
import kimi_budget
light = sorted({m.split(".")[0] for m in sys.modules} & set(@HEAVY@))
from kimi_budget import LedgerError, KimiBudgetError
import openai
from kimi_budget import *
print(json.dumps({
    "light": light,
    "ledger_error_is_openai_error": issubclass(LedgerError, openai.OpenAIError),
    "same_class": LedgerError is kimi_budget.LedgerError and KimiBudgetError in LedgerError.__mro__,
    "star": sorted(n for n in kimi_budget.__all__ if n in globals()),
}), file=sys.stderr)
""".replace("@HEAVY@", repr(HEAVY))
    result, output = _run(code)
    assert result["light"] == [], output
    assert result["ledger_error_is_openai_error"] is True
    assert result["same_class"] is True
    assert result["star"] == kb.__all__


def test_every_public_name_has_one_home() -> None:
    homes = kb._HOMES  # type: ignore[attr-defined]
    assert list(homes) == kb.__all__
    for name, home in homes.items():
        value = getattr(kb, name)
        assert value.__module__.startswith(f"kimi_budget{home}"), name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kb.Nope  # type: ignore[attr-defined]  # noqa: B018
    assert kb.__version__
