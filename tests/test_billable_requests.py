"""Every billable request is guarded, however the caller sends it.

A chat completion reaches Moonshot through ``chat.completions.create`` and its raw and
streaming variants, but also through the client's own ``post()`` with any URL form (relative,
absolute, with a query string or a trailing slash). Each must be checked against the cap before
it is sent, and recorded after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion

import kimi_budget as kb
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

BODY = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY) as standin:
        yield standin


def paths(server: MoonshotStandIn, *, slash: bool = True) -> list[str]:
    return [
        "/chat/completions",
        "chat/completions",
        *(["/chat/completions/"] if slash else []),  # the stand-in itself has no such route
        "/chat/completions?source=batch-job",
        f"{server.base_url}/chat/completions",
        f"{server.base_url}/chat/completions?x=1&y=2",
    ]


def send(client: kb.OpenAI, path: str, how: str) -> Any:
    if how == "post":
        return client.post(path, body=BODY, cast_to=ChatCompletion)
    if how == "raw":
        # What with_raw_response does: the SDK's raw-response header on the same post().
        raw = client.post(
            path,
            body=BODY,
            cast_to=ChatCompletion,
            options={"headers": {"X-Stainless-Raw-Response": "true"}},
        )
        return raw.parse()
    return client.post(path, body=BODY, cast_to=httpx.Response)


@pytest.mark.parametrize("how", ["post", "raw", "http-response"])
def test_post_with_any_url_form_is_refused_over_the_cap(
    server: MoonshotStandIn, ledger_path: Path, how: str
) -> None:
    client = kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        budget=kb.Budget(per_call="0.000001"),
    )
    for path in paths(server):
        with pytest.raises(kb.BudgetExceededError):
            send(client, path, how)
    assert server.chat_requests == []  # nothing reached the server: nothing was billed


@pytest.mark.parametrize("how", ["post", "raw", "http-response"])
def test_post_with_any_url_form_is_recorded(
    server: MoonshotStandIn, ledger_path: Path, how: str
) -> None:
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path)
    for path in paths(server, slash=False):
        send(client, path, how)
    rows = client.ledger.calls(20)
    assert len(rows) == len(paths(server, slash=False)) == len(server.chat_requests)
    for row, request in zip(rows, reversed(server.chat_requests), strict=True):
        assert request.usage is not None
        assert row["estimated"] == 0, row
        assert row["prompt_tokens"] == request.usage["prompt_tokens"]
        assert row["completion_tokens"] == request.usage["completion_tokens"]
    assert client.ledger.pending() == []


def test_raw_and_streaming_variants_of_create(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        budget=kb.Budget(per_call="0.000001"),
    )
    completions = client.chat.completions
    for call in (
        lambda: completions.with_raw_response.create(**BODY),
        lambda: completions.with_streaming_response.create(**BODY).__enter__(),
        lambda: completions.create(**BODY, stream=True),
        lambda: client.with_options(max_retries=0).chat.completions.create(**BODY),
    ):
        with pytest.raises(kb.BudgetExceededError):
            call()
    assert server.chat_requests == []


def test_other_endpoints_are_not_reserved(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        budget=kb.Budget(per_call="0.000001"),
    )
    client.models.list()
    client.post("/tokenizers/estimate-token-count", body=BODY, cast_to=httpx.Response)
    assert client.ledger.calls(5) == []
