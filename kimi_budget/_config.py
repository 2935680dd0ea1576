"""Configuration without code changes.

Each setting comes from the first place that has it:

1. the constructor argument (``OpenAI(budget=..., tags=..., ledger=...)``);
2. an environment variable (``KIMI_BUDGET_DAILY_USD``, ``KIMI_BUDGET_TAGS="k=v,k2=v2"``, ...);
3. a TOML file: ``KIMI_BUDGET_CONFIG``, else ``kimi-budget.toml`` in the working directory,
   else ``[tool.kimi-budget]`` in ``pyproject.toml`` there, else ``kimi-budget.toml`` in the
   user's config directory.

A malformed value is a ``ValueError`` that names the variable or key it came from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._budget import WINDOWS, Budget, canonical_tags
from ._ledger import Ledger
from ._pricing import PriceTable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ENV_CAPS", "FileConfig", "find_config_file", "load_file_config", "resolve_settings"]

ENV_CAPS = {
    "per_call": "KIMI_BUDGET_PER_CALL_USD",
    "hourly": "KIMI_BUDGET_HOURLY_USD",
    "daily": "KIMI_BUDGET_DAILY_USD",
    "weekly": "KIMI_BUDGET_WEEKLY_USD",
    "monthly": "KIMI_BUDGET_MONTHLY_USD",
    "total": "KIMI_BUDGET_TOTAL_USD",
}
_CAP_NAMES = ("per_call", *WINDOWS)
EXACT_TOKENS = ("auto", "always", "never")
_FILE_KEYS = {
    "ledger", "tags", "prices_file", "exact_tokens", "reservation_margin", "busy_timeout",
    "budget", "budgets", "prices",
}


@dataclass
class FileConfig:
    """What a configuration file says, with where it said it."""

    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def where(self, key: str) -> str:
        return f"{self.path}: {key}" if self.path else key


def find_config_file(cwd: Path | None = None) -> tuple[Path, str | None] | None:
    """The configuration file in force and, for pyproject.toml, its table."""
    explicit = os.environ.get("KIMI_BUDGET_CONFIG")
    if explicit:
        return Path(explicit).expanduser(), None
    here = cwd or Path.cwd()
    if (here / "kimi-budget.toml").is_file():
        return here / "kimi-budget.toml", None
    pyproject = here / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        if "kimi-budget" in data.get("tool", {}):
            return pyproject, "tool.kimi-budget"
    import platformdirs

    user = Path(platformdirs.user_config_dir("kimi-budget", appauthor=False)) / "kimi-budget.toml"
    if user.is_file():
        return user, None
    return None


def load_file_config(cwd: Path | None = None) -> FileConfig:
    found = find_config_file(cwd)
    if found is None:
        return FileConfig()
    path, table = found
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ValueError(f"Cannot read the kimi-budget config {path}: {exc.strerror or exc}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"The kimi-budget config {path} is not valid TOML: {exc}.") from None
    if table:
        data = data["tool"]["kimi-budget"]
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(_FILE_KEYS))}."
        )
    return FileConfig(path, data)


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


def _named(where: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def resolve_budgets(budget: Any, file: FileConfig) -> tuple[Budget, ...]:
    """Budgets from the argument, else the environment layered over the file."""
    if budget is not None:
        if isinstance(budget, Budget):
            return (budget,)
        if isinstance(budget, Sequence) and all(isinstance(b, Budget) for b in budget):
            return tuple(budget)
        raise ValueError("budget must be a kimi_budget.Budget or a list of them.")
    section = file.data.get("budget", {})
    if not isinstance(section, Mapping):
        raise ValueError(f"{file.where('budget')} must be a table such as [budget] daily = \"5\".")
    caps: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in _CAP_NAMES:
        if name in section:
            caps[name], sources[name] = section[name], file.where(f"budget.{name}")
        env = _env(ENV_CAPS[name])
        if env is not None:
            caps[name], sources[name] = env, ENV_CAPS[name]
    tz = section.get("tz", "UTC")
    tz_source = file.where("budget.tz")
    if _env("KIMI_BUDGET_TZ"):
        tz, tz_source = os.environ["KIMI_BUDGET_TZ"], "KIMI_BUDGET_TZ"
    scope = section.get("scope") or {}
    budgets: list[Budget] = []
    if caps:
        for name, value in caps.items():
            _named(sources[name], lambda v=value, n=name: Budget(**{n: v}))
        _named(tz_source, lambda: Budget(tz=tz))
        budgets.append(_named(file.where("budget"), lambda: Budget(**caps, tz=tz, scope=scope)))
    extra = file.data.get("budgets", [])
    if not isinstance(extra, list):
        raise ValueError(f"{file.where('budgets')} must be an array of tables: [[budgets]].")
    for index, entry in enumerate(extra):
        where = file.where(f"budgets[{index}]")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table of caps.")
        budgets.append(_named(where, lambda e=entry: Budget(**dict(e))))
    return tuple(budgets)


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
) -> Any:
    """The guard settings of a new client, from arguments, environment and file."""
    from ._guard import GuardSettings

    file = load_file_config()
    data = file.data

    if tags is None:
        if _env("KIMI_BUDGET_TAGS"):
            tags = parse_tags(os.environ["KIMI_BUDGET_TAGS"], where="KIMI_BUDGET_TAGS")
        else:
            tags = data.get("tags", {})
    clean_tags = _named("tags", lambda: canonical_tags(tags or {}))

    if prices_file is None:
        prices_file = _env("KIMI_BUDGET_PRICES") or data.get("prices_file")
    file_prices = data.get("prices") or {}
    table = PriceTable.load(prices_file=prices_file, overrides={**file_prices, **(prices or {})})

    exact = exact_tokens or _env("KIMI_BUDGET_EXACT_TOKENS") or data.get("exact_tokens") or "auto"
    if exact not in EXACT_TOKENS:
        raise ValueError(f"exact_tokens must be one of {', '.join(EXACT_TOKENS)}, not {exact!r}.")

    margin = reservation_margin
    if margin is None:
        margin = data.get("reservation_margin", 60.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
        raise ValueError(f"reservation_margin must be a number of seconds >= 0, not {margin!r}.")

    if not isinstance(ledger, Ledger):
        path = ledger
        if path is None and not _env("KIMI_BUDGET_LEDGER") and data.get("ledger"):
            path = Path(str(data["ledger"])).expanduser()
            if not path.is_absolute() and file.path is not None:
                path = file.path.parent / path
        ledger = Ledger(path, busy_timeout=float(data.get("busy_timeout", 30.0)))

    return GuardSettings(
        ledger=ledger,
        budgets=resolve_budgets(budget, file),
        tags=clean_tags,
        prices=table,
        token_counter=token_counter,
        exact_tokens=exact,
        reservation_margin=float(margin),
    )
