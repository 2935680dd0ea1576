"""Configuration without code changes: arguments > environment > file, and clear errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import kimi_budget as kb
from kimi_budget._config import (
    FileConfig,
    find_config_file,
    load_file_config,
    resolve_budgets,
    resolve_ledger_path,
    resolve_prices,
    resolve_settings,
    resolve_tz,
    user_config_file,
)
from kimi_budget.pricing import BUILTIN_SOURCE
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY, MOCK_BASE_URL

PRICE_FILE = (
    '[models."kimi-k3"]\ncache_hit = "0.20"\ncache_miss = "1.00"\noutput = "5.00"\n'
    "context_window = 1048576\n"
)


def write(path: Path | str, text: str) -> Path:
    path = Path.cwd() / path  # an absolute path stays as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def client(**kwargs: object) -> kb.OpenAI:
    return kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, **kwargs)


# -- which file ----------------------------------------------------------------------------------


def test_no_file_means_no_settings() -> None:
    assert find_config_file() is None
    assert load_file_config().data == {}


def test_file_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = write(user_config_file(), "tags = { from = 'user' }\n")
    assert user.is_relative_to(tmp_path / "home")  # the fixture's private HOME
    assert load_file_config().data["tags"] == {"from": "user"}

    # A pyproject.toml without our table is not a config file.
    write("pyproject.toml", "[project]\nname = 'x'\n")
    assert load_file_config().path == user
    write(
        "pyproject.toml", "[project]\nname = 'x'\n\n[tool.kimi-budget]\ntags = 'from=pyproject'\n"
    )
    assert load_file_config().path == Path.cwd() / "pyproject.toml"
    assert resolve_settings(ledger=tmp_path / "l.db").tags == {"from": "pyproject"}

    write("kimi-budget.toml", "tags = { from = 'cwd' }\n")
    assert load_file_config().data["tags"] == {"from": "cwd"}

    explicit = write(tmp_path / "elsewhere.toml", "tags = { from = 'explicit' }\n")
    monkeypatch.setenv("KIMI_BUDGET_CONFIG", str(explicit))
    assert load_file_config().data["tags"] == {"from": "explicit"}


def test_kimi_budget_config_may_name_a_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = write(
        tmp_path / "app" / "pyproject.toml", '[tool.kimi-budget]\nledger = "var/spend.db"\n'
    )
    monkeypatch.setenv("KIMI_BUDGET_CONFIG", str(project))
    path, source = resolve_ledger_path(None, load_file_config())
    # Relative paths in a file are relative to the file, not to the working directory.
    assert path == tmp_path / "app" / "var" / "spend.db"
    assert source == f"{project}: tool.kimi-budget.ledger"


# -- precedence: argument > environment > file ---------------------------------------------------


def test_ledger_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write("kimi-budget.toml", 'ledger = "from-file.db"\n')
    assert client().ledger.path == Path.cwd() / "from-file.db"
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", str(tmp_path / "from-env.db"))
    assert client().ledger.path == tmp_path / "from-env.db"
    assert client(ledger=tmp_path / "from-arg.db").ledger.path == tmp_path / "from-arg.db"


def test_default_ledger_is_in_the_user_data_directory() -> None:
    path, source = resolve_ledger_path(None, load_file_config())
    assert path.name == "ledger.db" and "kimi-budget" in str(path)
    assert source.startswith("default")


def test_tags_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write("kimi-budget.toml", 'tags = { project = "file", team = "a" }\n')
    ledger = tmp_path / "l.db"
    assert client(ledger=ledger).tags == {"project": "file", "team": "a"}
    monkeypatch.setenv("KIMI_BUDGET_TAGS", "project=env, env = prod")
    assert client(ledger=ledger).tags == {"env": "prod", "project": "env"}
    assert client(ledger=ledger, tags={"project": "arg"}).tags == {"project": "arg"}


def test_budget_caps_layer_env_over_file(monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        "kimi-budget.toml",
        '[budget]\ndaily = "5"\nmonthly = "100"\ntz = "Asia/Shanghai"\n\n'
        '[[budgets]]\nweekly = "1"\nscope = { team = "research" }\n',
    )
    main, research = resolve_budgets(None, load_file_config())
    assert main == kb.Budget(daily="5", monthly="100", tz="Asia/Shanghai")
    assert research == kb.Budget(weekly="1", scope={"team": "research"})

    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", "2.50")
    monkeypatch.setenv("KIMI_BUDGET_PER_CALL_USD", "0.05")
    monkeypatch.setenv("KIMI_BUDGET_TZ", "Europe/Paris")
    main, _ = resolve_budgets(None, load_file_config())
    # The environment replaces daily and tz, adds per_call, and leaves monthly as the file says.
    assert main.caps == {
        "per_call": Decimal("0.05"),
        "daily": Decimal("2.50"),
        "monthly": Decimal("100"),
    }
    assert main.tz_name == "Europe/Paris"
    assert resolve_tz(load_file_config()) == ("Europe/Paris", "KIMI_BUDGET_TZ")

    # budget= adds to the configured caps; it never lifts them (the strictest wins).
    only = kb.Budget(total="9")
    assert resolve_budgets(only, load_file_config()) == (only, main, research)
    assert resolve_budgets([], load_file_config()) == (main, research)


def test_environment_alone_configures_budgets() -> None:
    assert resolve_budgets(None, load_file_config()) == ()
    assert resolve_tz(load_file_config()) == ("UTC", "default")


def test_prices_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        "kimi-budget.toml",
        'prices_file = "prices/extra.toml"\n\n[prices."kimi-k2.5"]\noutput = "2.00"\n',
    )
    extra = write(Path.cwd() / "prices" / "extra.toml", PRICE_FILE)
    table = resolve_prices(None, None, load_file_config())
    assert table.get("kimi-k3").source == str(extra)
    # A partial override keeps the other built-in values, and names the config as its source.
    k25 = table.get("kimi-k2.5")
    assert (k25.output, k25.cache_miss, k25.source) == (2000, 600, str(config))
    assert table.get("moonshot-v1-8k").source == BUILTIN_SOURCE

    env_file = write(tmp_path / "env-prices.toml", PRICE_FILE.replace('"5.00"', '"6.00"'))
    monkeypatch.setenv("KIMI_BUDGET_PRICES", str(env_file))
    table = resolve_prices(None, None, load_file_config())
    assert (table.get("kimi-k3").output, table.get("kimi-k3").source) == (6000, str(env_file))

    table = resolve_prices({"kimi-k2.5": {"output": "1.00"}}, None, load_file_config())
    assert table.get("kimi-k2.5").output == 1000
    assert table.get("kimi-k2.5").source == "prices= argument"


def test_exact_tokens_and_margins_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(
        "kimi-budget.toml",
        'exact_tokens = "never"\nreservation_margin = 5\nbusy_timeout = 2.5\n',
    )
    settings = resolve_settings(ledger=tmp_path / "l.db")
    assert (settings.exact_tokens, settings.reservation_margin) == ("never", 5.0)
    assert resolve_settings().ledger.busy_timeout == 2.5
    monkeypatch.setenv("KIMI_BUDGET_EXACT_TOKENS", "always")
    assert resolve_settings(ledger=tmp_path / "l.db").exact_tokens == "always"
    settings = resolve_settings(ledger=tmp_path / "l.db", exact_tokens="auto", reservation_margin=0)
    assert (settings.exact_tokens, settings.reservation_margin) == ("auto", 0.0)


# -- malformed values name their source ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"KIMI_BUDGET_DAILY_USD": "five"}, "KIMI_BUDGET_DAILY_USD"),
        ({"KIMI_BUDGET_MONTHLY_USD": "-3"}, "KIMI_BUDGET_MONTHLY_USD"),
        ({"KIMI_BUDGET_PER_CALL_USD": "nan"}, "KIMI_BUDGET_PER_CALL_USD"),
        ({"KIMI_BUDGET_DAILY_USD": "1", "KIMI_BUDGET_TZ": "Mars/Olympus"}, "KIMI_BUDGET_TZ"),
        ({"KIMI_BUDGET_TAGS": "project"}, "KIMI_BUDGET_TAGS"),
        ({"KIMI_BUDGET_EXACT_TOKENS": "sometimes"}, "KIMI_BUDGET_EXACT_TOKENS"),
        ({"KIMI_BUDGET_PRICES": "/no/such/prices.toml"}, "KIMI_BUDGET_PRICES"),
        ({"KIMI_BUDGET_CONFIG": "/no/such/kimi-budget.toml"}, "KIMI_BUDGET_CONFIG"),
    ],
)
def test_malformed_environment_names_the_variable(
    env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=needle):
        client(ledger=tmp_path / "l.db")
    assert not (tmp_path / "l.db").exists()  # a bad setting is found before the ledger opens


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[budget]\ndaily = "five"\n', "budget.daily"),
        ('[budget]\ndayly = "5"\n', "budget.dayly"),
        ('[budget]\ndaily = "5"\ntz = "Nowhere/Land"\n', "budget.tz"),
        ('[budget]\ndaily = "5"\nscope = "team=a"\n', "budget.scope"),
        ('budget = "5"\n', "budget"),
        ('[[budgets]]\nweekly = "1"\nteam = "a"\n', "budgets[0].team"),
        ('[[budgets]]\nweekly = "x"\n', "budgets[0]"),
        ('budgets = "daily"\n', "budgets"),
        ("tags = { project = 3.5 }\n", "tags"),
        ('tags = "project"\n', "tags"),
        ('exact_tokens = "sometimes"\n', "exact_tokens"),
        ("reservation_margin = -1\n", "reservation_margin"),
        ('busy_timeout = "long"\n', "busy_timeout"),
        ("ledger = 5\n", "ledger"),
        ("prices_file = 5\n", "prices_file"),
        ('prices_file = "missing.toml"\n', "prices_file"),
        ('[prices."kimi-k2.5"]\noutput = 2.5\n', 'prices."kimi-k2.5".output'),
        ('[prices."mine"]\ncache_hit = "0.1"\n', 'prices."mine"'),
        ('prices = "cheap"\n', "prices"),
        ('colour = "blue"\n', "colour"),
        ("[budget\n", "not valid TOML"),
    ],
)
def test_malformed_file_values_name_the_file_and_key(text: str, key: str) -> None:
    config = write("kimi-budget.toml", text)
    with pytest.raises(ValueError) as info:
        client()
    message = str(info.value)
    assert str(config) in message and key in message, message
    default, _ = resolve_ledger_path(None, FileConfig())
    assert not default.exists()  # a bad setting is found before the ledger opens


def test_malformed_pyproject_table_names_the_table(tmp_path: Path) -> None:
    write("pyproject.toml", '[tool.kimi-budget.budget]\ndaily = "lots"\n')
    with pytest.raises(ValueError, match=r"pyproject\.toml: tool\.kimi-budget\.budget\.daily"):
        client(ledger=tmp_path / "l.db")


def test_malformed_user_config_names_its_path(tmp_path: Path) -> None:
    config = write(user_config_file(), "exact_tokens = 3\n")
    with pytest.raises(ValueError, match="exact_tokens") as info:
        client(ledger=tmp_path / "l.db")
    assert str(config) in str(info.value)


def test_a_broken_pyproject_that_is_not_ours_is_ignored(tmp_path: Path) -> None:
    write("pyproject.toml", "[project\nname = \n")
    assert client(ledger=tmp_path / "l.db").budgets == ()


# -- changing only the import line ---------------------------------------------------------------


def test_import_line_plus_environment_gives_a_guarded_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin: MoonshotStandIn
) -> None:
    ledger = tmp_path / "spend.db"
    monkeypatch.setenv("MOONSHOT_API_KEY", KEY)
    monkeypatch.setenv("MOONSHOT_BASE_URL", standin.base_url)
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", str(ledger))
    monkeypatch.setenv("KIMI_BUDGET_TAGS", "project=crawler")
    monkeypatch.setenv("KIMI_BUDGET_PER_CALL_USD", "0.001")

    from kimi_budget import OpenAI  # was: from openai import OpenAI

    guarded = OpenAI()
    messages: Any = [{"role": "user", "content": "hi"}]
    guarded.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=100)
    with pytest.raises(kb.BudgetExceededError, match=r"per-call cap of \$0\.001"):
        guarded.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=1000)
    assert len(standin.chat_requests) == 1  # the second call never left the process
    (row,) = kb.Ledger(ledger).calls(10)
    assert row["tags"] == '{"project":"crawler"}' and row["cost_nanos"] > 0
    guarded.close()


def test_file_alone_configures_a_client(tmp_path: Path, standin: MoonshotStandIn) -> None:
    write(
        "kimi-budget.toml",
        'ledger = "spend.db"\ntags = { app = "bot" }\n\n[budget]\ntotal = "0.0003"\n\n'
        '[prices."kimi-k2.5"]\noutput = "2.00"\n',
    )
    guarded = kb.OpenAI(api_key=KEY, base_url=standin.base_url)
    messages: Any = [{"role": "user", "content": "hi"}]
    guarded.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=50)
    (row,) = guarded.ledger.calls(5)
    assert guarded.ledger.path == Path.cwd() / "spend.db"
    assert row["price_output"] == 2000 and row["tags"] == '{"app":"bot"}'
    with pytest.raises(kb.BudgetExceededError, match="total cap"):
        guarded.chat.completions.create(model="kimi-k2.5", messages=messages, max_tokens=200)
    guarded.close()
