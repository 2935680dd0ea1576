"""Configuration without code changes.

Each setting comes from the first place that has it:

1. the constructor argument (``OpenAI(budget=..., tags=..., ledger=...)``) or CLI option;
2. an environment variable (``KIMI_BUDGET_DAILY_USD``, ``KIMI_BUDGET_TAGS="k=v,k2=v2"``, ...);
3. a TOML file: ``KIMI_BUDGET_CONFIG``, else ``kimi-budget.toml`` in the working directory,
   else ``[tool.kimi-budget]`` in ``pyproject.toml`` there, else ``kimi-budget.toml`` in the
   user's config directory. Only the first file found is read; files are never merged.

Budget caps are layered one by one: ``KIMI_BUDGET_DAILY_USD`` replaces the file's
``[budget] daily`` and leaves its ``monthly`` in force. Caps from the environment and the file
stay in force when code passes ``budget=``: every budget applies, and the strictest cap wins.

A malformed value is a ``ValueError`` that names the variable or key it came from
(``KIMI_BUDGET_DAILY_USD: Budget daily must be a USD amount ...``,
``/srv/app/kimi-budget.toml: budget.tz: ...``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._budget import WINDOWS, Budget, canonical_tags

if TYPE_CHECKING:
    from .pricing import PriceTable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ENV_CAPS",
    "ENV_VARS",
    "FileConfig",
    "find_config_file",
    "load_file_config",
    "resolve_budgets",
    "resolve_ledger_path",
    "resolve_prices",
    "resolve_settings",
    "resolve_tz",
]

ENV_CAPS = {
    "per_call": "KIMI_BUDGET_PER_CALL_USD",
    "hourly": "KIMI_BUDGET_HOURLY_USD",
    "daily": "KIMI_BUDGET_DAILY_USD",
    "weekly": "KIMI_BUDGET_WEEKLY_USD",
    "monthly": "KIMI_BUDGET_MONTHLY_USD",
    "total": "KIMI_BUDGET_TOTAL_USD",
}
# Caps of the CNY platform (api.moonshot.cn), in yuan: a budget of their own, currency="CNY".
ENV_CAPS_CNY = {name: value.replace("_USD", "_CNY") for name, value in ENV_CAPS.items()}
ENV_VARS = (
    *ENV_CAPS.values(),
    *ENV_CAPS_CNY.values(),
    "KIMI_BUDGET_TZ",
    "KIMI_BUDGET_LEDGER",
    "KIMI_BUDGET_TAGS",
    "KIMI_BUDGET_PRICES",
    "KIMI_BUDGET_EXACT_TOKENS",
    "KIMI_BUDGET_CONFIG",
)
_CAP_NAMES = ("per_call", *WINDOWS)
_BUDGET_KEYS = {*_CAP_NAMES, "tz", "scope", "currency"}
EXACT_TOKENS = ("auto", "always", "never")
_FILE_KEYS = {
    "ledger",
    "tags",
    "prices_file",
    "exact_tokens",
    "reservation_margin",
    "busy_timeout",
    "budget",
    "budgets",
    "prices",
}
CONFIG_NAME = "kimi-budget.toml"
T = TypeVar("T")


@dataclass
class FileConfig:
    """What a configuration file says, with where it said it."""

    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)
    table: str | None = None  # "tool.kimi-budget" inside pyproject.toml

    def where(self, key: str) -> str:
        """``<file>: <key>`` for error messages (the key as written in the file)."""
        if self.path is None:
            return key
        prefix = f"{self.table}." if self.table else ""
        return f"{self.path}: {prefix}{key}"

    def relative_path(self, value: Any, key: str) -> Path:
        """A path from the file, relative to the file's own directory."""
        if not isinstance(value, str) or not value:
            raise ValueError(f"{self.where(key)} must be a path string, not {value!r}.")
        path = Path(value).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        return path


def user_config_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("kimi-budget", appauthor=False)) / CONFIG_NAME


def find_config_file(cwd: Path | None = None) -> tuple[Path, str | None] | None:
    """The configuration file in force and, for pyproject.toml, its table."""
    explicit = _env("KIMI_BUDGET_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        return path, ("tool.kimi-budget" if path.name == "pyproject.toml" else None)
    here = cwd or Path.cwd()
    if (here / CONFIG_NAME).is_file():
        return here / CONFIG_NAME, None
    pyproject = here / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}  # not ours to judge: a broken pyproject.toml is someone else's problem
        tool = data.get("tool")
        if isinstance(tool, dict) and "kimi-budget" in tool:
            return pyproject, "tool.kimi-budget"
    user = user_config_file()
    if user.is_file():
        return user, None
    return None


def load_file_config(cwd: Path | None = None) -> FileConfig:
    found = find_config_file(cwd)
    if found is None:
        return FileConfig()
    path, table = found
    via = " (named by KIMI_BUDGET_CONFIG)" if _env("KIMI_BUDGET_CONFIG") else ""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ValueError(
            f"Cannot read the kimi-budget config {path}{via}: {exc.strerror or exc}."
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"The kimi-budget config {path}{via} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"The kimi-budget config {path}{via} is not valid TOML: {exc}.") from None
    if table:
        section = data.get("tool", {}).get("kimi-budget", {})
        if not isinstance(section, dict):
            raise ValueError(f"{path}: [tool.kimi-budget] must be a table.")
        data = section
    config = FileConfig(path, data, table)
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ValueError(
            f"{config.where(unknown[0])}: unknown key; expected one of "
            f"{', '.join(sorted(_FILE_KEYS))}."
        )
    return config


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def parse_tags(text: str, *, where: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` as a dict; a malformed pair names where it came from."""
    tags: dict[str, str] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}: {pair.strip()!r} is not key=value (e.g. project=crawler).")
        tags[key.strip()] = value.strip()
    return tags


def _named(where: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


# -- the individual settings -------------------------------------------------------------------


def resolve_tags(tags: Mapping[str, Any] | None, file: FileConfig) -> dict[str, str]:
    """Default tags: the argument, else ``KIMI_BUDGET_TAGS``, else the file's ``tags``."""
    if tags is not None:
        return _named("tags", lambda: canonical_tags(tags))
    env = _env("KIMI_BUDGET_TAGS")
    if env is not None:
        return parse_tags(env, where="KIMI_BUDGET_TAGS")
    value = file.data.get("tags", {})
    where = file.where("tags")
    if isinstance(value, str):  # the same "k=v,k2=v2" form as the environment variable
        value = parse_tags(value, where=where)
    return _named(where, lambda: canonical_tags(value))


def resolve_tz(file: FileConfig) -> tuple[str, str]:
    """The time zone reports and the main budget use, and where it came from."""
    env = _env("KIMI_BUDGET_TZ")
    if env is not None:
        tz, source = env, "KIMI_BUDGET_TZ"
    else:
        section = file.data.get("budget", {})
        if isinstance(section, Mapping) and "tz" in section:
            tz, source = section["tz"], file.where("budget.tz")
        else:
            tz, source = "UTC", "default"
    _named(source, lambda: Budget(tz=tz))
    return tz, source


def resolve_budgets(budget: Any, file: FileConfig) -> tuple[Budget, ...]:
    """Every budget in force: the argument's, and those of the environment and the file.

    Caps configured outside the code stay in force when code passes ``budget=``: all of them
    apply, and the strictest wins (a ``budget=`` can only add caps, never lift one).
    """
    return merge_budgets(budget_argument(budget), configured_budgets(file))


def budget_argument(budget: Any) -> tuple[Budget, ...]:
    """``budget=`` (a Budget, a list of them, or None) as a tuple."""
    if budget is None:
        return ()
    if isinstance(budget, Budget):
        return (budget,)
    if isinstance(budget, Sequence) and all(isinstance(b, Budget) for b in budget):
        return tuple(budget)
    raise ValueError("budget must be a kimi_budget.Budget or a list of them.")


def merge_budgets(given: tuple[Budget, ...], configured: tuple[Budget, ...]) -> tuple[Budget, ...]:
    return given + tuple(b for b in configured if b not in given)


def configured_budgets(file: FileConfig) -> tuple[Budget, ...]:
    """Budgets from the environment layered over the configuration file."""
    section = file.data.get("budget", {})
    if not isinstance(section, Mapping):
        raise ValueError(f'{file.where("budget")} must be a table such as [budget] daily = "5".')
    unknown = sorted(set(section) - _BUDGET_KEYS)
    if unknown:
        raise ValueError(
            f"{file.where('budget.' + unknown[0])}: unknown key; expected one of "
            f"{', '.join(sorted(_BUDGET_KEYS))}."
        )
    caps: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in _CAP_NAMES:
        if name in section:
            caps[name], sources[name] = section[name], file.where(f"budget.{name}")
        env = _env(ENV_CAPS[name])
        if env is not None:
            caps[name], sources[name] = env, ENV_CAPS[name]
    budgets: list[Budget] = []
    if caps:
        for name, value in caps.items():
            _named(sources[name], _budget_factory({name: value}))
        tz, _ = resolve_tz(file)
        scope = section.get("scope") or {}
        _named(file.where("budget.scope"), lambda: Budget(scope=scope))
        currency = section.get("currency", "USD")
        _named(file.where("budget.currency"), lambda: Budget(currency=currency))
        budgets.append(Budget(**caps, tz=tz, scope=scope, currency=currency))
    cny = {name: _env(var) for name, var in ENV_CAPS_CNY.items()}
    cny = {name: value for name, value in cny.items() if value is not None}
    if cny:
        for name, value in cny.items():
            _named(ENV_CAPS_CNY[name], _budget_factory({name: value, "currency": "CNY"}))
        tz, _ = resolve_tz(file)
        scope = section.get("scope") or {}
        budgets.append(Budget(**cny, tz=tz, scope=scope, currency="CNY"))
    extra = file.data.get("budgets", [])
    if not isinstance(extra, list):
        raise ValueError(f"{file.where('budgets')} must be an array of tables: [[budgets]].")
    for index, entry in enumerate(extra):
        where = file.where(f"budgets[{index}]")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table of caps.")
        unknown = sorted(set(entry) - _BUDGET_KEYS)
        if unknown:
            raise ValueError(
                f"{where}.{unknown[0]}: unknown key; expected one of "
                f"{', '.join(sorted(_BUDGET_KEYS))}."
            )
        budgets.append(_named(where, _budget_factory(dict(entry))))
    return tuple(budgets)


def _budget_factory(kwargs: dict[str, Any]) -> Callable[[], Budget]:
    return lambda: Budget(**kwargs)


def resolve_ledger_path(ledger: Any, file: FileConfig) -> tuple[Path | str, str]:
    """The ledger (argument > ``KIMI_BUDGET_LEDGER`` > file ``ledger`` > user data dir).

    A file path, or a ``postgresql://`` URL passed through untouched (never made a path).
    """
    from .ledger import default_ledger_path, is_server_url

    if ledger is not None:
        return (ledger if is_server_url(ledger) else Path(ledger).expanduser()), "argument"
    env = _env("KIMI_BUDGET_LEDGER")
    if env is not None:
        return (env if is_server_url(env) else Path(env).expanduser()), "KIMI_BUDGET_LEDGER"
    if "ledger" in file.data:
        value = file.data["ledger"]
        if is_server_url(value):
            return value, file.where("ledger")
        return file.relative_path(value, "ledger"), file.where("ledger")
    return default_ledger_path(), "default (user data directory)"


def resolve_prices(
    prices: Mapping[str, Mapping[str, Any]] | None,
    prices_file: str | os.PathLike[str] | None,
    file: FileConfig,
    currency: str = "USD",
) -> PriceTable:
    """Built-in prices of ``currency``, then the price file, then the config's ``[prices]``,
    then ``prices=``."""
    from ._exceptions import PriceTableError
    from .pricing import PriceTable, _parse_entry

    source = "prices_file argument"
    if prices_file is None:
        if _env("KIMI_BUDGET_PRICES"):
            prices_file, source = os.environ["KIMI_BUDGET_PRICES"], "KIMI_BUDGET_PRICES"
        elif "prices_file" in file.data:
            prices_file = file.relative_path(file.data["prices_file"], "prices_file")
            source = file.where("prices_file")
    try:
        path = None if prices_file is None else Path(prices_file)
        table = dict(PriceTable.load(prices_file=path, currency=currency).models)
    except PriceTableError as exc:
        if prices_file is None:
            raise
        raise PriceTableError(f"{source}: {exc}") from None

    file_prices = file.data.get("prices") or {}
    if not isinstance(file_prices, Mapping):
        raise PriceTableError(f'{file.where("prices")} must be tables: [prices."model-name"].')
    for name, entry in file_prices.items():
        table[name] = _parse_entry(
            name,
            entry,
            base=table.get(name),
            source=str(file.path),
            locate=lambda model, key: file.where(f'prices."{model}"' + (f".{key}" if key else "")),
            currency=currency,
        )
    for name, entry in (prices or {}).items():
        table[name] = _parse_entry(
            name,
            entry,
            base=table.get(name),
            source="prices= argument",
            locate=None,
            currency=currency,
        )
    return PriceTable(table, currency)


def resolve_exact_tokens(exact_tokens: str | None, file: FileConfig) -> str:
    if exact_tokens is not None:
        value, where = exact_tokens, "exact_tokens"
    elif _env("KIMI_BUDGET_EXACT_TOKENS"):
        value, where = os.environ["KIMI_BUDGET_EXACT_TOKENS"], "KIMI_BUDGET_EXACT_TOKENS"
    else:
        value, where = file.data.get("exact_tokens", "auto"), file.where("exact_tokens")
    if value not in EXACT_TOKENS:
        raise ValueError(f"{where} must be one of {', '.join(EXACT_TOKENS)}, not {value!r}.")
    return str(value)


def _seconds(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{where} must be a number of seconds >= 0, not {value!r}.")
    return float(value)


def resolve_settings(
    *,
    ledger: Any = None,
    budget: Any = None,
    tags: Mapping[str, Any] | None = None,
    prices: Mapping[str, Mapping[str, Any]] | None = None,
    prices_file: str | os.PathLike[str] | None = None,
    token_counter: Callable[[Mapping[str, Any]], int] | None = None,
    exact_tokens: str | None = None,
    reservation_margin: float | None = None,
    currency: str | None = None,
    base_url: object = None,
) -> Any:
    """The guard settings of a new client, from arguments, environment and file.

    ``currency`` (default: "CNY" for a ``base_url`` on api.moonshot.cn, else "USD") picks the
    price table; a budget counts and caps only calls of its own currency.
    """
    from ._guard import GuardSettings
    from .ledger import Ledger
    from .pricing import check_currency, currency_for_base_url

    file = load_file_config()
    clean_tags = resolve_tags(tags, file)
    money = check_currency(currency) if currency is not None else currency_for_base_url(base_url)
    table = resolve_prices(prices, prices_file, file, currency=money)
    exact = resolve_exact_tokens(exact_tokens, file)
    if reservation_margin is not None:
        margin = _seconds(reservation_margin, "reservation_margin", 60.0)
    else:
        margin = _seconds(
            file.data.get("reservation_margin"), file.where("reservation_margin"), 60.0
        )
    configured = configured_budgets(file)
    budgets = merge_budgets(budget_argument(budget), configured)
    if budgets and all(getattr(b, "currency", "USD") != money for b in budgets):
        raise ValueError(
            f"This client is billed in {money} (api.moonshot.{'cn' if money == 'CNY' else 'ai'}), "
            f"but every budget given is in another currency, so none would cap it. Add a "
            f"{money} budget: Budget(currency={money!r}, daily=...) or KIMI_BUDGET_DAILY_{money}."
        )
    if not isinstance(ledger, Ledger):
        path, _ = resolve_ledger_path(ledger, file)
        busy = _seconds(file.data.get("busy_timeout"), file.where("busy_timeout"), 30.0)
        ledger = Ledger(path, busy_timeout=busy)

    return GuardSettings(
        ledger=ledger,
        budgets=budgets,
        configured_budgets=configured,
        tags=clean_tags,
        prices=table,
        token_counter=token_counter,
        exact_tokens=exact,
        reservation_margin=margin,
    )
