"""The bill is read from the decoded body, whatever the encoding and whichever client reads it.

The stand-in compresses its answers (``content_encoding=``) when the client accepts it: httpx
asks for ``br`` as soon as ``brotli`` is installed. The caller's own ``http_client`` may read the
body in a response event hook before the SDK sees it, or be a legacy ``httpx.Client`` that
openai 3.x still accepts. In every case the call must be recorded exactly once, with the usage
the server billed, and nothing may stay pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai._base_client as openai_base
import pytest

import kimi_budget as kb
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

MESSAGES = [{"role": "user", "content": "hi"}]
# The HTTP library the installed openai sends through (httpx2 for 3.x, httpx for 2.x).
native: Any = getattr(openai_base, "httpx2", None) or httpx
ENCODINGS = ["gzip", "deflate", "br"]


@pytest.fixture(params=ENCODINGS)
def server(request: pytest.FixtureRequest) -> Iterator[MoonshotStandIn]:
    if request.param == "br":
        pytest.importorskip("brotli")
    with MoonshotStandIn(api_key=KEY, content_encoding=request.param, stream_chunks=8) as s:
        yield s


def assert_exact(client: Any, server: MoonshotStandIn, calls: int = 1) -> None:
    rows = client.ledger.calls(calls + 5)
    assert len(rows) == calls
    assert client.ledger.pending() == []
    billed = [r.usage for r in server.chat_requests]
    for row, usage in zip(rows, reversed(billed), strict=True):
        assert row["estimated"] == 0 and row["note"] is None, row
        assert usage is not None
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )


def test_compressed_answers_are_read(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path)
    plain = client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=20)
    assert plain.choices[0].message.content  # the caller reads it as usual
    chunks = list(
        client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
        )
    )
    assert len(chunks) > 8
    with client.chat.completions.with_streaming_response.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=20
    ) as response:
        response.parse()
    encoding = server.chat_requests[-1].headers.get("accept-encoding", "")
    assert server.content_encoding in encoding  # it really was compressed
    assert_exact(client, server, calls=3)


def test_compressed_answers_are_read_async(server: MoonshotStandIn, ledger_path: Path) -> None:
    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path)
        await client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=20)
        stream = await client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
        )
        async for _ in stream:
            pass
        return client

    assert_exact(asyncio.run(main()), server, calls=2)


@pytest.fixture
def plain_server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, stream_chunks=8) as s:
        yield s


def test_a_response_hook_that_reads_the_body(
    plain_server: MoonshotStandIn, ledger_path: Path
) -> None:
    seen: list[int] = []

    def read_it(response: Any) -> None:
        response.read()  # e.g. logging middleware: the body is consumed before the SDK
        seen.append(len(response.content))

    http_client = native.Client(event_hooks={"response": [read_it]})
    client = kb.OpenAI(
        api_key=KEY, base_url=plain_server.base_url, ledger=ledger_path, http_client=http_client
    )
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
        )
    )
    assert chunks and len(seen) == 2
    assert_exact(client, plain_server, calls=2)


def test_a_legacy_httpx_client(plain_server: MoonshotStandIn, ledger_path: Path) -> None:
    # openai 3.x sends through httpx2 but still accepts an httpx.Client.
    client = kb.OpenAI(
        api_key=KEY,
        base_url=plain_server.base_url,
        ledger=ledger_path,
        http_client=httpx.Client(),
    )
    client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=20)
    stream = client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
    )
    assert list(stream)
    assert_exact(client, plain_server, calls=2)


def test_a_legacy_httpx_async_client(plain_server: MoonshotStandIn, ledger_path: Path) -> None:
    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(
            api_key=KEY,
            base_url=plain_server.base_url,
            ledger=ledger_path,
            http_client=httpx.AsyncClient(),
        )
        stream = await client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
        )
        async for _ in stream:
            pass
        return client

    assert_exact(asyncio.run(main()), plain_server)


def test_an_abandoned_compressed_stream_is_charged_in_full(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path)
    stream = client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=20, stream=True
    )
    next(iter(stream))
    stream.close()
    [row] = client.ledger.calls(2)
    assert row["estimated"] == 1 and row["cost_nanos"] == row["projected_nanos"]
