"""The kimi-budget command, through click's runner and as the installed console script."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result

import kimi_budget as kb
from kimi_budget._budget import window_bounds
from kimi_budget._money import to_usd
from kimi_budget._tokens import count_request_tokens
from kimi_budget.cli import cli
from kimi_budget.cli._report import build_report
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

UTC = timezone.utc
PRICES = PriceTable.load()
SHANGHAI = ZoneInfo("Asia/Shanghai")


# -- a ledger with known rows --------------------------------------------------------------------


def record(
    ledger: kb.Ledger,
    when: datetime,
    *,
    model: str = "kimi-k2.5",
    prompt: int | None = 1000,
    cached: int = 0,
    completion: int = 100,
    tags: dict[str, str] | None = None,
    status: str = "ok",
    estimated: bool = False,
    settle: bool = True,
) -> dict[str, Any]:
    """Reserve and settle one call through the ledger's own API; returns what was written."""
    price = PRICES.get(model)
    projected = (prompt or 0) * price.cache_miss + 1000 * price.output
    reservation = Reservation(
        call_id=uuid.uuid4().hex,
        model=model,
        tags=dict(tags or {}),
        created_at=when,
        expires_at=when + timedelta(hours=1),
        projected_nanos=projected,
        prompt_estimate=prompt or 0,
        price_cache_hit=price.cache_hit,
        price_cache_miss=price.cache_miss,
        price_output=price.output,
    )
    ledger.reserve(reservation)
    cost = 0
    if settle:
        if prompt is not None:
            cost = price.cost_nanos(prompt, cached, completion)
        ledger.settle(
            Settlement(
                reservation=reservation,
                status=status,
                prompt_tokens=prompt,
                cached_tokens=cached if prompt is not None else None,
                completion_tokens=completion if prompt is not None else None,
                cost_nanos=cost,
                estimated=estimated,
                attempts=1,
                finished_at=when + timedelta(seconds=2),
            )
        )
    saved = cached * (price.cache_miss - price.cache_hit) if prompt is not None else 0
    return {
        "when": when,
        "model": model,
        "tags": dict(tags or {}),
        "cost": cost,
        "saved": saved,
        "cached": cached if prompt is not None else 0,
        "prompt": prompt or 0,
        "completion": completion if prompt is not None else 0,
        "settled": settle,
        "projected": projected,
    }


def at(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc, arg-type]


@pytest.fixture
def populated(ledger_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    rows = []
    with kb.Ledger(ledger_path) as ledger:
        rows.append(
            record(
                ledger,
                at(2026, 10, 30, 12),
                cached=600,
                completion=200,
                tags={"project": "crawler"},
            )
        )
        # 20:30 UTC on Nov 1 is Nov 2 in Shanghai: the bucket depends on the time zone.
        rows.append(
            record(
                ledger,
                at(2026, 11, 1, 20, 30),
                prompt=2000,
                completion=500,
                tags={"project": "chat"},
            )
        )
        rows.append(
            record(
                ledger,
                at(2026, 11, 2, 9),
                model="moonshot-v1-8k",
                prompt=500,
                completion=50,
                tags={"project": "crawler"},
            )
        )
        rows.append(
            record(
                ledger,
                at(2026, 11, 15, 23, 59, 59),
                model="kimi-k2-turbo-preview",
                prompt=3000,
                cached=2048,
                completion=1000,
            )
        )
        rows.append(
            record(
                ledger, at(2026, 11, 16), prompt=None, status="error", tags={"project": "crawler"}
            )
        )
        rows.append(
            record(
                ledger,
                at(2026, 11, 16, 3),
                prompt=800,
                completion=7,
                status="abandoned",
                estimated=True,
                tags={"env": "prod", "project": "chat"},
            )
        )
        rows.append(
            record(ledger, datetime.now(UTC), prompt=400, settle=False, tags={"project": "crawler"})
        )
    return ledger_path, rows


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def assert_user_error(result: Result, *needles: str) -> None:
    """Exit status 2, nothing on stdout, exactly one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kimi-budget: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def expected_nanos(rows: list[dict[str, Any]], keep: Any = lambda r: True) -> int:
    return sum(r["cost"] for r in rows if r["settled"] and keep(r))


# -- report --------------------------------------------------------------------------------------


FILTERS = [
    ([], {}, lambda r: True),
    (["--model", "kimi-k2.5"], {"model": "kimi-k2.5"}, lambda r: r["model"] == "kimi-k2.5"),
    (
        ["--tag", "project=crawler"],
        {"tags": {"project": "crawler"}},
        lambda r: r["tags"].get("project") == "crawler",
    ),
    (
        ["--tag", "project=chat", "--tag", "env=prod"],
        {"tags": {"project": "chat", "env": "prod"}},
        lambda r: r["tags"] == {"env": "prod", "project": "chat"},
    ),
    (
        ["--since", "2026-11-01", "--until", "2026-11-16"],
        {"since": datetime(2026, 11, 1, tzinfo=UTC), "until": datetime(2026, 11, 16, tzinfo=UTC)},
        lambda r: (
            datetime(2026, 11, 1, tzinfo=UTC) <= r["when"] < datetime(2026, 11, 16, tzinfo=UTC)
        ),
    ),
    (
        ["--since", "2026-11-02", "--tz", "Asia/Shanghai"],
        {"since": datetime(2026, 11, 2, tzinfo=SHANGHAI)},
        lambda r: r["when"] >= datetime(2026, 11, 2, tzinfo=SHANGHAI),
    ),
]


@pytest.mark.parametrize("by", ["model", "day", "week", "month", "tag:project", "total"])
@pytest.mark.parametrize(("args", "spend_kwargs", "keep"), FILTERS)
def test_report_json_total_equals_ledger_spend(
    populated: tuple[Path, list[dict[str, Any]]],
    by: str,
    args: list[str],
    spend_kwargs: dict[str, Any],
    keep: Any,
) -> None:
    path, rows = populated
    result = invoke("report", "--ledger", str(path), "--json", "--by", by, *args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    with kb.Ledger(path) as ledger:
        spent = ledger.spend(**spend_kwargs)
    assert Decimal(data["total_usd"]) == spent
    assert Decimal(data["total_usd"]) == to_usd(expected_nanos(rows, keep))
    # The rows add up to the total, to the nano-dollar.
    assert sum(Decimal(row["spend_usd"]) for row in data["rows"]) == spent
    assert data["total_calls"] == sum(1 for r in rows if r["settled"] and keep(r))


def test_report_counts_tokens_and_cache_savings_from_each_rows_prices(
    populated: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = populated
    data = json.loads(invoke("report", "--ledger", str(path), "--json", "--by", "model").stdout)
    by_model = {row["key"]: row for row in data["rows"]}
    for model in {r["model"] for r in rows if r["settled"]}:
        mine = [r for r in rows if r["settled"] and r["model"] == model]
        row = by_model[model]
        assert row["calls"] == len(mine)
        assert row["input_cache_hit_tokens"] == sum(r["cached"] for r in mine)
        assert row["input_cache_miss_tokens"] == sum(r["prompt"] - r["cached"] for r in mine)
        assert row["output_tokens"] == sum(r["completion"] for r in mine)
        assert Decimal(row["cache_savings_usd"]) == to_usd(sum(r["saved"] for r in mine))
    # kimi-k2-turbo-preview: 2048 cached tokens x ($1.15 - $0.15) per million = $0.002048.
    assert by_model["kimi-k2-turbo-preview"]["cache_savings_usd"] == "0.002048"
    assert by_model["kimi-k2.5"]["estimated_calls"] == 1
    # Rows are sorted by spend, largest first.
    spends = [Decimal(row["spend_usd"]) for row in data["rows"]]
    assert spends == sorted(spends, reverse=True)


def test_report_never_counts_reservations_in_flight(
    populated: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = populated
    pending = next(r for r in rows if not r["settled"])
    data = json.loads(invoke("report", "--ledger", str(path), "--json").stdout)
    assert data["pending_calls"] == 1
    assert Decimal(data["pending_reserved_usd"]) == to_usd(pending["projected"])
    assert data["total_calls"] == len(rows) - 1
    text = invoke("report", "--ledger", str(path)).stdout
    assert "1 call in flight" in text and "not counted" in text


def test_report_day_buckets_follow_the_time_zone(
    populated: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = populated

    def days(tz: str) -> dict[str, Decimal]:
        data = json.loads(
            invoke("report", "--ledger", str(path), "--json", "--by", "day", "--tz", tz).stdout
        )
        return {row["key"]: Decimal(row["spend_usd"]) for row in data["rows"]}

    utc, shanghai = days("UTC"), days("Asia/Shanghai")
    nov1 = rows[1]  # 2026-11-01T20:30Z = 2026-11-02T04:30 in Shanghai
    assert utc["2026-11-01"] == to_usd(nov1["cost"])
    assert "2026-11-01" not in shanghai
    assert shanghai["2026-11-02"] == to_usd(nov1["cost"] + rows[2]["cost"])
    # 23:59:59Z on Nov 15 is Nov 16 in Shanghai.
    assert utc["2026-11-15"] == to_usd(rows[3]["cost"])
    assert shanghai["2026-11-16"] == to_usd(rows[3]["cost"] + rows[5]["cost"])
    assert sum(utc.values()) == sum(shanghai.values())
    # Days without calls are left out; keys are in order.
    assert list(utc) == sorted(utc) and all(v > 0 for v in utc.values())


def test_report_weeks_start_on_monday_and_months_are_calendar_months(
    populated: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = populated
    weeks = json.loads(invoke("report", "--ledger", str(path), "--json", "--by", "week").stdout)
    keys = [row["key"] for row in weeks["rows"]]
    assert all(datetime.fromisoformat(k).weekday() == 0 for k in keys)
    # Fri Oct 30 and Sun Nov 1 share a week; Mon Nov 2, Sun Nov 15 and Mon Nov 16 do not.
    assert keys == ["2026-10-26", "2026-11-02", "2026-11-09", "2026-11-16"]
    spend = [Decimal(row["spend_usd"]) for row in weeks["rows"]]
    assert spend[0] == to_usd(rows[0]["cost"] + rows[1]["cost"])
    assert spend[3] == to_usd(rows[4]["cost"] + rows[5]["cost"])
    months = json.loads(invoke("report", "--ledger", str(path), "--json", "--by", "month").stdout)
    got = {row["key"]: Decimal(row["spend_usd"]) for row in months["rows"]}
    assert got == {
        "2026-10": to_usd(rows[0]["cost"]),
        "2026-11": to_usd(sum(r["cost"] for r in rows[1:] if r["settled"])),
    }
    assert keys != [] and weeks["total_usd"] == months["total_usd"]


def test_report_by_tag_groups_untagged_calls_apart(
    populated: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, rows = populated
    data = json.loads(
        invoke("report", "--ledger", str(path), "--json", "--by", "tag:project").stdout
    )
    got = {row["key"]: Decimal(row["spend_usd"]) for row in data["rows"]}
    for project in ("crawler", "chat"):
        assert got[project] == to_usd(
            expected_nanos(rows, lambda r, p=project: r["tags"].get("project") == p)
        )
    assert got["(none)"] == to_usd(rows[3]["cost"])


def test_report_table_and_csv(populated: tuple[Path, list[dict[str, Any]]]) -> None:
    path, rows = populated
    result = invoke("report", "--ledger", str(path), "--by", "model")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in ("calls", "input hit", "input miss", "output", "spend", "cache saved"):
        assert column in header
    total_line = next(line for line in lines if line.startswith("TOTAL"))
    assert f"${to_usd(expected_nanos(rows))}" in total_line
    assert "1 call with an estimated cost" in result.stdout

    result = invoke("report", "--ledger", str(path), "--by", "day", "--csv")
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["key"] for row in parsed] == [
        "2026-10-30",
        "2026-11-01",
        "2026-11-02",
        "2026-11-15",
        "2026-11-16",
    ]
    assert sum(Decimal(row["spend_usd"]) for row in parsed) == to_usd(expected_nanos(rows))


def test_report_of_an_empty_selection(populated: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = populated
    result = invoke("report", "--ledger", str(path), "--model", "kimi-k2-thinking")
    assert result.exit_code == 0 and "No settled calls match." in result.stdout
    data = json.loads(invoke("report", "--ledger", str(path), "--model", "x", "--json").stdout)
    assert data["total_usd"] == "0" and data["rows"] == []


def test_time_buckets_are_summed_through_the_created_at_index(ledger_path: Path) -> None:
    """The million-row speed comes from index ranges, not from sorting every row."""
    with kb.Ledger(ledger_path) as ledger:
        record(ledger, datetime(2026, 11, 1, tzinfo=UTC), tags={"project": "x"})
        statements: list[str] = []
        ledger.conn.set_trace_callback(statements.append)
        report = build_report(
            ledger, by="day", tz="Asia/Shanghai", tags={"project": "x"}, source="rows"
        )
        ledger.conn.set_trace_callback(None)
        (bucket_sql,) = [sql for sql in statements if "json_each" in sql]
        plan = [row[3] for row in ledger.conn.execute("EXPLAIN QUERY PLAN " + bucket_sql)]
    assert [row.key for row in report.rows] == ["2026-11-01"]
    assert any("SEARCH calls USING INDEX calls_created_at" in step for step in plan), plan
    assert not any(step.startswith("SCAN calls") for step in plan), plan


# -- user errors ---------------------------------------------------------------------------------


def test_missing_ledger_is_one_line_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ledger.db"
    for command in ("report", "status", "calls"):
        assert_user_error(invoke(command, "--ledger", str(missing)), str(missing), "no ledger")
    assert not missing.exists() and not missing.parent.exists()


def test_missing_default_ledger_names_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", str(tmp_path / "env.db"))
    assert_user_error(invoke("report"), "KIMI_BUDGET_LEDGER", "env.db")
    assert not (tmp_path / "env.db").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["report", "--since", "last tuesday"], ["--since", "last tuesday"]),
        (["report", "--until", "2026-13-01"], ["--until"]),
        (["report", "--since", "2026-11-02", "--until", "2026-11-01"], ["--until"]),
        (["report", "--by", "hour"], ["--by"]),
        (["report", "--tz", "Mars/Olympus"], ["--tz", "Mars/Olympus"]),
        (["report", "--tag", "novalue"], ["--tag"]),
        (["report", "--json", "--csv"], ["--json and --csv"]),
        (["calls", "-n", "0"], ["-n"]),
        (["report", "--bogus"], ["--bogus", "kimi-budget report --help"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_user_errors_are_one_line_exit_2(
    populated: tuple[Path, list[dict[str, Any]]], args: list[str], needles: list[str]
) -> None:
    path, _ = populated
    command, *rest = args
    assert_user_error(invoke(command, *rest, *(["--ledger", str(path)] if rest else [])), *needles)


def test_not_a_ledger_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("this is not a database, it is a shopping list\n" * 10)
    assert_user_error(invoke("report", "--ledger", str(junk)), str(junk))
    assert_user_error(invoke("calls", "--ledger", str(tmp_path)), str(tmp_path))


def test_malformed_configuration_is_one_line(
    populated: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = populated
    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", "five dollars")
    assert_user_error(invoke("status", "--ledger", str(path)), "KIMI_BUDGET_DAILY_USD")
    monkeypatch.delenv("KIMI_BUDGET_DAILY_USD")
    Path("kimi-budget.toml").write_text('[budget]\nmonthly = "10"\ntz = "Nowhere/Land"\n')
    assert_user_error(invoke("status", "--ledger", str(path)), "kimi-budget.toml", "budget.tz")
    assert_user_error(invoke("report", "--ledger", str(path)), "budget.tz")
    Path("kimi-budget.toml").write_text('[prices."my-model"]\ncache_hit = 0.1\n')
    assert_user_error(invoke("prices"), "kimi-budget.toml", "my-model")


# -- status --------------------------------------------------------------------------------------


def test_status_shows_every_cap_and_the_reservations_in_flight(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIMI_BUDGET_DAILY_USD", "0.01")
    monkeypatch.setenv("KIMI_BUDGET_MONTHLY_USD", "2")
    monkeypatch.setenv("KIMI_BUDGET_PER_CALL_USD", "0.05")
    monkeypatch.setenv("KIMI_BUDGET_TZ", "Asia/Shanghai")
    now = datetime.now(UTC)
    with kb.Ledger(ledger_path) as ledger:
        done = [record(ledger, now - timedelta(minutes=m), completion=400) for m in (1, 2)]
        flying = record(ledger, now, prompt=300, settle=False, tags={"job": "nightly"})

    result = invoke("status", "--ledger", str(ledger_path), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    (budget,) = data["budgets"]
    assert budget["tz"] == "Asia/Shanghai"
    caps = {cap["window"]: cap for cap in budget["caps"]}
    assert set(caps) == {"per_call", "daily", "monthly"}
    for window, limit in (("daily", Decimal("0.01")), ("monthly", Decimal(2))):
        start, end = window_bounds(window, now, SHANGHAI)
        spent = to_usd(sum(r["cost"] for r in done if start <= r["when"] < end))
        cap = caps[window]
        assert Decimal(cap["spent_usd"]) == spent
        assert Decimal(cap["reserved_usd"]) == to_usd(flying["projected"])
        assert Decimal(cap["remaining_usd"]) == max(limit - spent - to_usd(flying["projected"]), 0)
        assert cap["resets_at"] == end.astimezone(SHANGHAI).isoformat()
        assert cap["resets_at"].endswith("+08:00")
    (pending,) = data["pending"]
    assert pending["tags"] == {"job": "nightly"}
    assert Decimal(pending["reserved_usd"]) == to_usd(flying["projected"])

    text = invoke("status", "--ledger", str(ledger_path)).stdout
    daily = next(line for line in text.splitlines() if line.startswith("daily"))
    assert "$0.01" in daily and "[#" in daily and "%" in daily and "CST" in daily
    assert "In flight: 1 reservation(s)" in text and "nightly" in text


def test_status_reads_budgets_from_the_config_file(ledger_path: Path) -> None:
    Path("kimi-budget.toml").write_text(
        '[budget]\nweekly = "3"\n\n[[budgets]]\ntotal = "1"\nscope = { team = "research" }\n'
    )
    kb.Ledger(ledger_path).close()
    data = json.loads(invoke("status", "--ledger", str(ledger_path), "--json").stdout)
    assert [(b["scope"], [c["window"] for c in b["caps"]]) for b in data["budgets"]] == [
        ({}, ["weekly"]),
        ({"team": "research"}, ["total"]),
    ]
    assert data["budgets"][1]["caps"][0]["resets_at"] is None
    text = invoke("status", "--ledger", str(ledger_path)).stdout
    assert "calls tagged team=research" in text and "never" in text


def test_status_without_budgets_says_how_to_set_one(ledger_path: Path) -> None:
    kb.Ledger(ledger_path).close()
    result = invoke("status", "--ledger", str(ledger_path))
    assert result.exit_code == 0
    assert "No budget configured" in result.stdout and "KIMI_BUDGET_DAILY_USD" in result.stdout
    assert "In flight: none" in result.stdout


# -- estimate ------------------------------------------------------------------------------------


def test_estimate_a_request_file(tmp_path: Path) -> None:
    body = {
        "model": "kimi-k2.5",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Mongolia?"},
        ],
        "max_tokens": 300,
    }
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body))
    result = invoke("estimate", str(request), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    counted = count_request_tokens(body, "kimi_k2")
    price = PRICES.get("kimi-k2.5")
    assert data["prompt_tokens"] == counted.tokens and data["exact"] is counted.exact
    assert data["max_output_tokens"] == 300 and data["fits"] is True
    assert Decimal(data["projected_usd"]) == to_usd(
        counted.tokens * price.cache_miss + 300 * price.output
    )
    text = invoke("estimate", str(request)).stdout
    assert f"{counted.tokens} tokens" in text and "yes:" in text and "worst case" in text


def test_estimate_plain_text_from_stdin_with_a_window_overflow() -> None:
    result = invoke(
        "estimate",
        "--model",
        "moonshot-v1-8k",
        "--max-tokens",
        "9000",
        "--json",
        input="Summarise the history of the Silk Road.",
    )
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["exact"] is False
    assert data["context_window"] == 8192 and data["max_output_tokens"] == 9000
    text = invoke(
        "estimate",
        "--model",
        "moonshot-v1-8k",
        "--max-tokens",
        "9000",
        input="Summarise the history of the Silk Road.",
    ).stdout
    assert "NO:" in text and "exceeds 8,192" in text


def test_estimate_without_max_tokens_uses_the_default_output_limit() -> None:
    data = json.loads(invoke("estimate", "--model", "kimi-k2.5", "--json", input="hi").stdout)
    assert data["max_output_tokens"] == 1024 and data["max_tokens_explicit"] is False


@pytest.mark.parametrize(
    ("args", "stdin", "needles"),
    [
        (["--model", "kimi-k9"], "hi", ["kimi-k9", "kimi-k2.5"]),
        ([], "hi", ["--model"]),
        (["--model", "kimi-k2.5"], '{"messages": [', ["not valid", "--text"]),
        (["--model", "kimi-k2.5"], '{"prompt": "hi"}', ['"messages"']),
        (["--model", "kimi-k2.5"], "   ", ["empty"]),
        (["--model", "kimi-k2.5", "/no/such/request.json"], None, ["/no/such/request.json"]),
    ],
)
def test_estimate_user_errors(args: list[str], stdin: str | None, needles: list[str]) -> None:
    assert_user_error(invoke("estimate", *args, input=stdin), *needles)


def test_estimate_text_flag_counts_json_looking_text() -> None:
    result = invoke("estimate", "--model", "kimi-k2.5", "--text", "--json", input='{"messages": [')
    assert result.exit_code == 0 and json.loads(result.stdout)["prompt_tokens"] > 0


# -- prices, balance, calls, path ----------------------------------------------------------------


def test_prices_name_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    price_file = tmp_path / "prices.toml"
    price_file.write_text(
        '[models."kimi-k3"]\ncache_hit = "0.20"\ncache_miss = "1.00"\noutput = "5.00"\n'
        "context_window = 1048576\n"
    )
    monkeypatch.setenv("KIMI_BUDGET_PRICES", str(price_file))
    data = {e["model"]: e for e in json.loads(invoke("prices", "--json").stdout)}
    assert data["kimi-k3"]["source"] == str(price_file)
    assert data["kimi-k3"]["cache_miss"] == "1.00" and data["kimi-k3"]["tokenizer"] == "kimi_k3"
    assert data["kimi-k2.5"]["output"] == "3.00" and "built-in" in data["kimi-k2.5"]["source"]
    text = invoke("prices").stdout
    assert "built in" in text and str(price_file) in text
    rows = list(csv.DictReader(io.StringIO(invoke("prices", "--csv").stdout)))
    assert {row["model"] for row in rows} == set(data)


def test_balance_without_a_key_says_how_to_set_one() -> None:
    assert_user_error(invoke("balance"), "MOONSHOT_API_KEY")


def test_balance_from_the_api_never_shows_the_key(
    standin: MoonshotStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONSHOT_API_KEY", KEY)
    result = invoke("balance", "--base-url", standin.base_url, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "available": "49.58894",
        "voucher": "46.58893",
        "cash": "3.00001",
        "currency": "USD",
    }
    assert "49.58894 USD" in invoke("balance", "--base-url", standin.base_url).stdout
    monkeypatch.setenv("MOONSHOT_API_KEY", KEY + "-wrong")
    result = invoke("balance", "--base-url", standin.base_url)
    assert result.exit_code == 1 and "401" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and KEY not in result.stderr + result.stdout


def test_calls_lists_the_latest_first(populated: tuple[Path, list[dict[str, Any]]]) -> None:
    path, rows = populated
    result = invoke("calls", "--ledger", str(path), "-n", "3")
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert "pending" in lines[0] and "reserved" in lines[0]
    assert "abandoned" in lines[1] and "(estimated)" in lines[1] and "env=prod" in lines[1]
    assert "error" in lines[2]
    data = json.loads(invoke("calls", "--ledger", str(path), "--json", "-n", "100").stdout)
    assert len(data) == len(rows)
    assert sum(Decimal(c["cost_usd"]) for c in data) == to_usd(expected_nanos(rows))
    assert data[-1]["tags"] == {"project": "crawler"} and data[-1]["cached_tokens"] == 600
    only = json.loads(
        invoke("calls", "--ledger", str(path), "--json", "--model", "moonshot-v1-8k").stdout
    )
    assert [c["model"] for c in only] == ["moonshot-v1-8k"]
    assert list(csv.DictReader(io.StringIO(invoke("calls", "--ledger", str(path), "--csv").stdout)))


def test_path_follows_the_configuration_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("kimi-budget.toml").write_text('ledger = "data/spend.db"\n')
    expected = Path.cwd() / "data" / "spend.db"
    assert invoke("path").stdout.strip() == str(expected)
    data = json.loads(invoke("path", "--json").stdout)
    assert data["exists"] is False and data["source"].endswith("kimi-budget.toml: ledger")
    monkeypatch.setenv("KIMI_BUDGET_LEDGER", str(tmp_path / "env.db"))
    assert invoke("path").stdout.strip() == str(tmp_path / "env.db")
    assert invoke("path", "--ledger", "x.db").stdout.strip() == "x.db"
    assert not expected.exists() and not (tmp_path / "env.db").exists()


# -- demo ----------------------------------------------------------------------------------------


def test_demo_makes_real_calls_and_a_refused_one(tmp_path: Path) -> None:
    ledger_path = tmp_path / "demo.db"
    result = invoke("demo", "--ledger", str(ledger_path), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    steps = data["steps"]
    assert [s.get("status") for s in steps[:4]] == ["ok"] * 4
    assert steps[3]["cached_tokens"] > 0 and steps[2]["cached_tokens"] == 0
    assert steps[4]["refused"] is True and steps[4]["requests_sent"] == 0
    assert steps[4]["error"].startswith("Refused before sending") and steps[4]["window"] == "daily"
    with kb.Ledger(ledger_path) as ledger:
        assert len(ledger.calls(100)) == 4
        assert Decimal(data["report"]["total_usd"]) == ledger.spend() > 0
    assert Decimal(data["report"]["total_cache_savings_usd"]) > 0

    text = invoke("demo", "--ledger", str(ledger_path)).stdout
    assert "refused before sending" in text and "TOTAL" in text
    with kb.Ledger(ledger_path) as ledger:
        assert len(ledger.calls(100)) == 8  # a second run adds to the same ledger


# -- the installed console script ----------------------------------------------------------------


def script() -> Path:
    bin_dir = Path(sys.executable).parent
    for name in ("kimi-budget", "kimi-budget.exe"):
        if (bin_dir / name).exists():
            return bin_dir / name
    raise AssertionError(f"kimi-budget is not installed next to {sys.executable}: pip install -e .")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script()), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_console_script_demo_offline_without_a_key(tmp_path: Path) -> None:
    not_used = tmp_path / "configured.db"
    result = run(
        "demo",
        env={
            # Neither the user's key, base URL nor ledger may be touched by the demo.
            "MOONSHOT_API_KEY": KEY,
            "MOONSHOT_BASE_URL": "http://127.0.0.1:9/v1",
            "KIMI_BUDGET_LEDGER": str(not_used),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "refused before sending" in result.stdout and "BudgetExceededError" in result.stdout
    total = next(line for line in result.stdout.splitlines() if line.startswith("TOTAL"))
    assert "$0 " not in total and "$0.0" in total
    assert KEY not in result.stdout + result.stderr
    assert not not_used.exists()


def test_console_script_report_and_errors(populated: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = populated
    result = run("report", "--ledger", str(path), "--json", "--tag", "project=crawler")
    assert result.returncode == 0, result.stderr
    with kb.Ledger(path) as ledger:
        assert Decimal(json.loads(result.stdout)["total_usd"]) == ledger.spend(
            tags={"project": "crawler"}
        )
    result = run("report", "--ledger", str(path), "--since", "someday")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--since" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    target = tmp_path / "m.db"
    result = subprocess.run(
        [sys.executable, "-m", "kimi_budget", "path", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KIMI_BUDGET_LEDGER": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ledger"] == str(target) and not target.exists()
