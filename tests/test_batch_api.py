"""The Batch API, guarded: batches.create reserves the worst case of every request in its input
file at the batch price (refused before creation if that does not fit a cap); the finished
batch's output is priced line by line and recorded as one row, settled exactly once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import kimi_budget as kb
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

HI = [{"role": "user", "content": "Say hello."}]


def _lines(model: str = "kimi-k2.6", count: int = 3, max_tokens: int = 40) -> bytes:
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": HI, "max_tokens": max_tokens},
            }
        )
        for i in range(count)
    ).encode()


def _client(standin: MoonshotStandIn, ledger_path: Path, **kwargs: Any) -> kb.OpenAI:
    return kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger_path, **kwargs)


def _batch_cost(standin: MoonshotStandIn, model: str) -> int:
    price = PriceTable.load().get(model).at_batch_price()
    return sum(
        price.cost_nanos(u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"])
        for u in standin.batch_billed
    )


def test_a_batch_from_upload_to_settled(standin: MoonshotStandIn, ledger_path: Path) -> None:
    client = _client(standin, ledger_path)
    upload = client.files.create(file=("in.jsonl", _lines()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    [pending] = client.ledger.pending()
    price = PriceTable.load().get("kimi-k2.6").at_batch_price()
    prompt = standin.count_prompt_tokens({"model": "kimi-k2.6", "messages": HI})
    assert pending["projected_nanos"] == 3 * (prompt * price.cache_miss + 40 * price.output)
    assert pending["model"] == "kimi-k2.6"

    done = client.batches.retrieve(batch.id)  # the stand-in runs it on this first retrieve
    assert done.status == "completed"
    assert client.ledger.pending() == []
    [row] = client.ledger.calls(5)
    assert row["status"] == "ok" and row["request_id"] == batch.id
    assert row["cost_nanos"] == _batch_cost(standin, "kimi-k2.6") > 0
    standard = PriceTable.load().get("kimi-k2.6")
    full = sum(
        standard.cost_nanos(u["prompt_tokens"], 0, u["completion_tokens"])
        for u in standin.batch_billed
    )
    assert row["cost_nanos"] * 5 == full * 3  # exactly 60 % of the standard price
    assert row["completion_tokens"] == sum(u["completion_tokens"] for u in standin.batch_billed)
    assert json.loads(row["tags"]) == {"api": "batch"}
    assert "3 output lines" in row["note"]

    client.batches.retrieve(batch.id)  # settled exactly once
    assert len(client.ledger.calls(5)) == 1
    assert client.ledger.spend() == kb._money.to_usd(row["cost_nanos"])  # type: ignore[attr-defined]


def test_a_batch_that_does_not_fit_a_cap_is_refused_before_creation(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path, budget=kb.Budget(daily="0.0001"))
    upload = client.files.create(file=("in.jsonl", _lines(max_tokens=2000)), purpose="batch")
    with pytest.raises(kb.BudgetExceededError):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert standin.batches == {} and client.ledger.calls(5) == []


def test_a_batch_is_settled_by_another_process_through_its_metadata(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path)
    upload = client.files.create(file=("in.jsonl", _lines(count=2)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    [pending] = client.ledger.pending()
    assert standin.batches[batch.id]["metadata"] == {"kimi_budget_call_id": pending["call_id"]}
    from kimi_budget import _batch

    _batch._open_batches.clear()  # as if this process had ended
    other = _client(standin, ledger_path)
    assert other.batches.retrieve(batch.id).status == "completed"
    [row] = other.ledger.calls(5)
    assert row["call_id"] == pending["call_id"] and row["status"] == "ok"
    assert row["cost_nanos"] == _batch_cost(standin, "kimi-k2.6")


def test_a_batch_still_running_keeps_its_reservation(ledger_path: Path) -> None:
    with MoonshotStandIn(api_key=KEY, auto_complete_batches=False) as standin:
        client = _client(standin, ledger_path)
        upload = client.files.create(file=("in.jsonl", _lines(count=1)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert client.batches.retrieve(batch.id).status == "in_progress"
        assert len(client.ledger.pending()) == 1
        standin.complete_batch(batch.id)
        client.batches.retrieve(batch.id)
        assert client.ledger.pending() == []


def test_a_batch_input_line_that_is_not_a_chat_request_is_refused(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    client = _client(standin, ledger_path)
    upload = client.files.create(file=("in.jsonl", b'{"custom_id": "x"}\n'), purpose="batch")
    with pytest.raises(ValueError, match="not a chat completion request"):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert standin.batches == {}


def test_async_client_guards_and_settles_a_batch(
    standin: MoonshotStandIn, ledger_path: Path
) -> None:
    async def run() -> None:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger_path)
        upload = await client.files.create(file=("in.jsonl", _lines(count=2)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert len(client.ledger.pending()) == 1
        await client.batches.retrieve(batch.id)
        [row] = client.ledger.calls(5)
        assert row["status"] == "ok" and row["cost_nanos"] == _batch_cost(standin, "kimi-k2.6")

    asyncio.run(run())


def test_report_and_calls_show_batch_spend(standin: MoonshotStandIn, ledger_path: Path) -> None:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    client = _client(standin, ledger_path)
    upload = client.files.create(file=("in.jsonl", _lines()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.batches.retrieve(batch.id)
    report = CliRunner().invoke(cli, ["report", "--ledger", str(ledger_path), "--json"])
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert data["batches"] == 1
    assert data["batch_usd"] == str(kb._money.to_usd(_batch_cost(standin, "kimi-k2.6")))  # type: ignore[attr-defined]
    text = CliRunner().invoke(cli, ["report", "--ledger", str(ledger_path)]).output
    assert "1 Batch API batch" in text
    calls = CliRunner().invoke(cli, ["calls", "--ledger", str(ledger_path)]).output
    assert "api=batch" in calls
