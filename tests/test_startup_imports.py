"""The command line's read-only commands start without importing openai or pydantic.

``import openai`` is most of a fresh process's start-up; ``--help``, ``report``, ``status`` and
``calls`` never use it. Each case runs in a fresh interpreter and lists what got imported (no
timings here: those are in ``benchmarks/``). Library users still get exceptions that are
``openai.OpenAIError`` subclasses, however they reach them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kimi_budget as kb

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
