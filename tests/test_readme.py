"""What the README tells a newcomer is true: its commands exist, CI runs its test command.

(That the two opening commands work on a fresh machine is what CI itself does: ``.ci/run`` runs
the test command from a fresh clone, and ``test_cli`` runs the demo as an installed script.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_budget.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _opening_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_the_two_opening_commands_use_a_virtual_environment_in_the_checkout() -> None:
    demo, tests = _opening_commands()
    for command in (demo, tests):
        # Debian's system pip refuses to install: each command makes (or reuses) .venv first.
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
        assert " pip install" not in command.replace(".venv/bin/pip install", "")
    assert demo.endswith(".venv/bin/kimi-budget demo")
    assert ".venv/bin/python -m pytest" in tests


def test_ci_runs_the_readme_test_command_exactly() -> None:
    _, tests = _opening_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()


def test_the_readme_says_how_long_the_tests_take() -> None:
    assert re.search(r"the test suite.{0,400}?\b\d+ (seconds|s|minutes?)\b", README, re.S)


def _documented_commands() -> list[tuple[str, set[str]]]:
    """Every ``kimi-budget COMMAND --option ...`` the README shows as code, with its options."""
    code = re.findall(r"`([^`\n]+)`", README)  # inline code
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        code += block.splitlines()
    found: dict[str, set[str]] = {}
    for text in code:
        for match in re.finditer(r"(?:^|[\s/(])kimi-budget ([a-z]+)(?=\s|$)([^|&;)]*)", text):
            options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", match[2]))
            found.setdefault(match[1], set()).update(options)
    return sorted(found.items())


@pytest.mark.parametrize(("command", "options"), _documented_commands())
def test_every_command_and_option_the_readme_shows_exists(command: str, options: set[str]) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, f"kimi-budget {command}: {result.output}"
    for option in options:
        assert option in result.output, f"kimi-budget {command} --help does not list {option}"


def test_commands_said_to_take_ledger_list_it_in_their_help() -> None:
    said = re.search(r"The commands that\s+read a ledger \(([^)]*)\) take `--ledger PATH`", README)
    assert said, "the README no longer says which commands take --ledger"
    commands = re.findall(r"`([a-z]+)`", said[1])
    assert commands
    for command in commands:
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--ledger" in help_text, command


def test_every_example_is_listed_with_the_command_that_runs_it() -> None:
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name[0] != "_")
    assert examples
    for name in examples:
        assert f"`.venv/bin/python examples/{name}`" in README, name


def test_the_stand_in_is_documented_with_its_command_and_options() -> None:
    import subprocess
    import sys

    assert "python -m kimi_budget.testing --port" in README
    assert "MOONSHOT_BASE_URL=http://127.0.0.1:" in README
    section = README[README.index("## Trying your own code offline") :]
    section = section[: section.index("\n## ")]
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", section))
    assert shown >= {"--port", "--latency", "--error-rate", "--stream-chunks"}
    usage = subprocess.run(
        [sys.executable, "-m", "kimi_budget.testing", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for option in shown:
        assert option in usage, option
    from kimi_budget.testing import MoonshotStandIn

    for method in re.findall(r"server\.(\w+)", section):
        assert hasattr(MoonshotStandIn, method), method


def test_no_sentence_points_at_something_the_reader_cannot_see() -> None:
    phrases = ("the issue", "issue's", "our targets", "as discussed", "the brief", "ready to paste")
    for phrase in phrases:
        assert phrase not in README.lower(), phrase


def test_the_demo_suggests_commands_that_work_without_activating(tmp_path: Path) -> None:
    """Run as ``.venv/bin/kimi-budget demo`` (not on PATH), it suggests that same path."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).parent / "kimi-budget"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(script), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    hint = done.stdout.strip().splitlines()[-1]
    typed = os.path.relpath(script, tmp_path)
    shown = script if typed.startswith("..") else typed
    assert hint.strip() == f"{shown} demo --ledger demo.db && {shown} report --ledger demo.db"
