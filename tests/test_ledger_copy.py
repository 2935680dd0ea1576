"""``kimi-budget ledger copy``: a ledger's history moves between SQLite and PostgreSQL, exactly,
and a second copy doubles nothing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import kimi_budget as kb
from kimi_budget.cli import cli
from kimi_budget.ledger import Ledger, Reservation, Settlement

UTC = timezone.utc
BUDGET = kb.Budget(daily=100, monthly=1000, total=5000)
TEAM = kb.Budget(daily=50, scope={"team": "a"})


def _history(ledger: Ledger) -> None:
    """Settled calls of every kind, an expired estimate and a reservation still in flight."""
    now = datetime.now(UTC)
    for i in range(12):
        created = now - timedelta(hours=0 if i == 11 else i * 7)
        res = Reservation(
            call_id=f"call-{i}",
            model="kimi-k2.5" if i % 3 else "moonshot-v1-8k",
            tags={"team": "a" if i % 2 else "b", "n": str(i)},
            created_at=created,
            expires_at=created + timedelta(minutes=5),
            projected_nanos=900_000 + i,
            prompt_estimate=100 + i,
            price_cache_hit=100,
            price_cache_miss=600,
            price_output=3000,
            stream=bool(i % 2),
        )
        ledger.reserve(res, [BUDGET, TEAM])
        if i == 11:
            continue  # in flight
        ledger.settle(
            Settlement(
                reservation=res,
                status=("ok", "error", "abandoned", "interrupted")[i % 4],
                prompt_tokens=100 + i,
                cached_tokens=i,
                completion_tokens=20,
                cost_nanos=120_000 + i * 1000,
                estimated=i % 4 == 2,
                attempts=1 + i % 2,
                finished_at=created + timedelta(seconds=2),
                request_id=f"req-{i}",
                latency_ms=200 + i,
                error="HTTP 500" if i % 4 == 1 else None,
                note="the stream was closed before its usage arrived" if i % 4 == 2 else None,
                fee_nanos=5000 if i == 3 else 0,
                cache_write_tokens=7 if i == 4 else None,
                usage_json='{"prompt_tokens": 1}' if i == 5 else None,
            )
        )


def _rows(ledger: Ledger) -> list[dict[str, Any]]:
    rows = ledger.calls(limit=1000)
    for row in rows:
        del row["id"]
    return sorted(rows, key=lambda r: r["call_id"])


def _caps(ledger: Ledger) -> list[tuple[str, Decimal, Decimal]]:
    return [
        (s.window, s.spent_usd, s.reserved_usd)
        for budget in (BUDGET, TEAM)
        for s in ledger.status(budget)
    ]


def copy(src: str, dst: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["ledger", "copy", src, dst, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_sqlite_to_postgresql_and_back_keeps_every_call_and_total(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
        expected, caps = _rows(old), _caps(old)
    first = copy(str(source), postgres_url)
    assert (first["read"], first["copied"], first["already_there"], first["pending"]) == (
        12,
        12,
        0,
        1,
    )
    with Ledger(postgres_url) as server:
        assert _rows(server) == expected
        assert _caps(server) == caps
    back = tmp_path / "back.db"
    copy(postgres_url, str(back))
    with Ledger(back) as returned:
        assert _rows(returned) == expected
        assert _caps(returned) == caps


def test_copying_twice_doubles_nothing(tmp_path: Path, postgres_url: str) -> None:
    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
        spent = old.spend()
    copy(str(source), postgres_url)
    again = copy(str(source), postgres_url)
    assert (again["copied"], again["already_there"]) == (0, 12)
    with Ledger(postgres_url) as server:
        assert server.spend() == spent
        assert len(server.calls(limit=1000)) == 12
        assert len(server.pending()) == 1


def test_only_new_calls_are_copied_on_a_later_run(tmp_path: Path, postgres_url: str) -> None:
    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
    copy(str(source), postgres_url)
    with Ledger(source) as old:
        pending = old.pending()[0]
        res = Reservation(
            call_id=pending["call_id"],
            model=pending["model"],
            tags=json.loads(pending["tags"]),
            created_at=datetime.fromisoformat(pending["created_at"].replace("Z", "+00:00")),
            expires_at=datetime.fromisoformat(pending["expires_at"].replace("Z", "+00:00")),
            projected_nanos=pending["projected_nanos"],
            prompt_estimate=0,
            price_cache_hit=100,
            price_cache_miss=600,
            price_output=3000,
        )
        old.settle(
            Settlement(
                reservation=res,
                status="ok",
                prompt_tokens=10,
                cached_tokens=0,
                completion_tokens=5,
                cost_nanos=21_000,
                estimated=False,
                attempts=1,
                finished_at=datetime.now(UTC),
            )
        )
        expected, caps = _rows(old), _caps(old)
    later = copy(str(source), postgres_url)
    assert (later["copied"], later["already_there"]) == (1, 11)  # the call that ended since
    with Ledger(postgres_url) as server:
        assert _rows(server) == expected
        assert _caps(server) == caps


def test_a_missing_source_is_one_line_and_nothing_is_created(
    tmp_path: Path, postgres_url: str
) -> None:
    result = CliRunner().invoke(cli, ["ledger", "copy", str(tmp_path / "nope.db"), postgres_url])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no ledger at" in result.output


def test_the_destination_password_is_never_printed(tmp_path: Path, postgres_url: str) -> None:
    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
    with_password = postgres_url.replace("://kb@", "://kb:t0p-s3cret@")
    result = CliRunner().invoke(cli, ["ledger", "copy", str(source), with_password])
    assert result.exit_code == 0, result.output
    assert "t0p-s3cret" not in result.output and "kb:***@" in result.output
    assert "Copied 12 of 12 calls" in result.output


def test_copying_a_ledger_onto_itself_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "old.db"
    Ledger(source).close()
    result = CliRunner().invoke(cli, ["ledger", "copy", str(source), str(source)])
    assert result.exit_code == 2 and "same ledger" in result.output


@pytest.mark.parametrize("by", ["model", "day", "week", "month", "tag:team", "total"])
def test_reports_on_the_server_match_the_sqlite_original(
    tmp_path: Path, postgres_url: str, by: str
) -> None:
    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
    copy(str(source), postgres_url)
    runner = CliRunner()
    shown = []
    for target in (str(source), postgres_url):
        result = runner.invoke(
            cli, ["report", "--by", by, "--tz", "Asia/Shanghai", "--ledger", target, "--json"]
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["ledger"] in (str(source), postgres_url)
        del data["ledger"]
        shown.append(data)
    assert shown[0] == shown[1]
    assert shown[0]["total_calls"] == 11


def test_the_html_page_of_a_server_ledger_shows_what_the_sqlite_original_shows(
    tmp_path: Path, postgres_url: str
) -> None:
    import re

    source = tmp_path / "old.db"
    with Ledger(source) as old:
        _history(old)
    copy(str(source), postgres_url)
    pages = []
    for name, target in (("sqlite", str(source)), ("server", postgres_url)):
        page = tmp_path / f"{name}.html"
        result = CliRunner().invoke(cli, ["report", "--html", str(page), "--ledger", target])
        assert result.exit_code == 0, result.output
        text = page.read_text("utf-8")
        # The costliest calls (their tags) and the amounts, in the page's order.
        pages.append((re.findall(r"n=\d+", text), re.findall(r"\$[0-9.]+", text)))
    assert pages[0] == pages[1]
    assert len(pages[0][0]) >= 5


def test_a_running_process_s_allotment_is_not_copied_but_its_calls_are(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "old.db"
    now = datetime.now(UTC)
    running = Ledger(source, clock=lambda: now)
    shares = []
    for i in range(3):  # alone, with an allotment beside it, then a share of it
        res = Reservation(f"live-{i}", "kimi-k2.5", {}, now, now + timedelta(minutes=5), 900_000,
                          100, 100, 600, 3000)  # fmt: skip
        shares.append(running.reserve_call(res, [BUDGET]))
    assert shares[2].allotment_id is not None
    running._allotments.after_fork()  # type: ignore[union-attr]  # as if another process held it
    first = copy(str(source), postgres_url)
    assert (first["read"], first["pending"]) == (2, 2)  # the share is in its allotment's row
    with Ledger(postgres_url) as server:
        assert {r["model"] for r in server.pending()} == {"kimi-k2.5"}
    for res in shares:
        running.settle(
            Settlement(res, "ok", 100, 0, 20, 120_000, False, 1, now, request_id=res.call_id)
        )
    copy(str(source), postgres_url)  # after the workers stopped: their calls, settled
    with Ledger(postgres_url) as server:
        assert server.pending() == [] and len(server.calls(limit=100)) == 3
        assert server.spend() == Decimal("0.00036")
    running.close()
