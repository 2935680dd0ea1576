"""A postgresql:// URL is a ledger wherever a ledger path goes: the ``ledger=`` argument,
``KIMI_BUDGET_LEDGER``, the configuration file and ``--ledger``; it is never made a path, and
its password is never shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget._config import load_file_config, resolve_ledger_path
from kimi_budget.cli import cli
from kimi_budget.ledger._postgres import PostgresLedger
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

URL = "postgresql://ann:s3cret-pw@db.example:5432/kb"


def test_a_url_argument_passes_through_untouched() -> None:
    assert resolve_ledger_path(URL, load_file_config()) == (URL, "argument")


def test_a_url_in_the_environment_passes_through_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", URL)
    assert resolve_ledger_path(None, load_file_config()) == (URL, "KIMI_BUDGET_LEDGER")


def test_a_url_in_the_config_file_is_not_made_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "conf" / "kimi-budget.toml"
    config.parent.mkdir()
    config.write_text(f'ledger = "{URL}"\n', "utf-8")
    monkeypatch.setenv("KIMI_BUDGET_CONFIG", str(config))
    target, source = resolve_ledger_path(None, load_file_config())
    assert target == URL and "kimi-budget.toml" in source
    relative = tmp_path / "conf" / "other.toml"
    relative.write_text('ledger = "spend.db"\n', "utf-8")
    monkeypatch.setenv("KIMI_BUDGET_CONFIG", str(relative))
    assert resolve_ledger_path(None, load_file_config())[0] == tmp_path / "conf" / "spend.db"


def test_cli_shows_a_url_without_its_password() -> None:
    result = CliRunner().invoke(cli, ["path", "--ledger", URL])
    assert result.exit_code == 0
    assert result.output.strip() == "postgresql://ann:***@db.example:5432/kb"
    as_json = CliRunner().invoke(cli, ["path", "--ledger", URL, "--json"])
    assert json.loads(as_json.output)["ledger"] == "postgresql://ann:***@db.example:5432/kb"
    assert "s3cret" not in as_json.output


def test_a_client_given_a_url_records_on_the_server(
    postgres_url: str, standin: MoonshotStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", postgres_url)
    with kb.OpenAI(api_key=KEY, base_url=standin.base_url) as client:
        assert isinstance(client.ledger, PostgresLedger)
        client.chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert client.ledger.spend() > 0
    assert not list(Path.cwd().glob("postgres*"))  # no folder named after the URL


def test_cli_commands_read_a_server_ledger_given_with_ledger(postgres_url: str) -> None:
    kb.Ledger(postgres_url).close()
    runner = CliRunner()
    status = runner.invoke(cli, ["status", "--ledger", postgres_url, "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["ledger"] == postgres_url
    calls = runner.invoke(cli, ["calls", "--ledger", postgres_url, "--json"])
    assert calls.exit_code == 0 and json.loads(calls.output) == []
    report = runner.invoke(cli, ["report", "--ledger", postgres_url, "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["total_calls"] == 0
