"""The loopback Moonshot stand-in, exercised through the real openai client over real HTTP."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kimi_budget.testing import (
    DEFAULT_REPLY,
    OMIT,
    Fault,
    MoonshotStandIn,
    RecordedRequest,
)

KEY = "sk-standin-secret-0123456789"
MODEL = "kimi-k2.5"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
# Long enough to pass the 256-token threshold of prefix caching under any counter.
LONG_SYSTEM: ChatCompletionMessageParam = {
    "role": "system",
    "content": "You are a careful assistant. " * 300,
}


@functools.cache
def kimi_tokens(text: str) -> int:
    import splintr

    return len(splintr.Tokenizer.from_pretrained("kimi_k2").encode_ordinary(text))


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, seed=1) as s:
        yield s
        assert s.errors == []


@pytest.fixture
def client(server: MoonshotStandIn) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=5)


def raw_request(
    server: MoonshotStandIn,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp, data


def choice_usage(chunk: Any) -> Any:
    return getattr(chunk.choices[0], "usage", None) if chunk.choices else None


# -- usage and caching ---------------------------------------------------------------------------


def test_non_stream_usage_is_moonshot_shaped(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    assert raw.headers.get("msh-request-id")
    body = raw.http_response.json()
    assert set(body["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
    }
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.content == DEFAULT_REPLY
    assert resp.choices[0].finish_reason == "stop"
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens == server.count_prompt_tokens({"model": MODEL, "messages": HI})
    assert usage.completion_tokens == kimi_tokens(DEFAULT_REPLY)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra is not None and usage.model_extra["cached_tokens"] == 0
    assert usage.prompt_tokens_details is None
    assert server.billed == [
        {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cached_tokens": 0,
        }
    ]


@pytest.mark.parametrize("style", ["openai", "both"])
def test_usage_styles(style: str) -> None:
    with MoonshotStandIn(usage_style=style, cached_tokens=5) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        body = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
        usage = body.http_response.json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 5}
        assert ("cached_tokens" in usage) == (style == "both")


def test_prefix_cache_hits_on_a_seen_prefix(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    first: list[ChatCompletionMessageParam] = [
        LONG_SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
    ]
    r1 = client.chat.completions.create(model=MODEL, messages=first)
    assert r1.usage is not None and r1.usage.model_extra is not None
    assert r1.usage.model_extra["cached_tokens"] == 0
    second: list[ChatCompletionMessageParam] = [
        *first,
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "x3?"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=second)
    assert r2.usage is not None and r2.usage.model_extra is not None
    cached = r2.usage.model_extra["cached_tokens"]
    prefix_tokens = server.count_prompt_tokens({"model": MODEL, "messages": first})
    assert cached == prefix_tokens // 16 * 16
    assert 0 < cached <= r2.usage.prompt_tokens
    # Same prefix, other model: a separate cache.
    r3 = client.chat.completions.create(model="kimi-k2-0905-preview", messages=second)
    assert r3.usage is not None and r3.usage.model_extra is not None
    assert r3.usage.model_extra["cached_tokens"] == 0
    assert server.billed[1]["cached_tokens"] == cached


def test_short_prompts_are_never_cached(client: openai.OpenAI) -> None:
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL, messages=HI)
        assert r.usage is not None and r.usage.model_extra is not None
        assert r.usage.model_extra["cached_tokens"] == 0


def test_forced_cached_tokens_are_capped_at_prompt(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    server.queue_fault(Fault.cached(7))
    server.queue_fault(Fault.cached(10**9))
    r1 = client.chat.completions.create(model=MODEL, messages=HI)
    r2 = client.chat.completions.create(model=MODEL, messages=HI)
    assert r1.usage is not None and r1.usage.model_extra is not None
    assert r2.usage is not None and r2.usage.model_extra is not None
    assert r1.usage.model_extra["cached_tokens"] == 7
    assert r2.usage.model_extra["cached_tokens"] == r2.usage.prompt_tokens


def test_n_choices_bill_every_choice(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, n=3)
    assert len(r.choices) == 3
    assert r.usage is not None
    assert r.usage.completion_tokens == 3 * kimi_tokens(DEFAULT_REPLY)


def test_max_tokens_truncates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 5
    assert DEFAULT_REPLY.startswith(r.choices[0].message.content or "-")
    s = client.chat.completions.create(
        model=MODEL, messages=HI, max_completion_tokens=5, stream=True
    )
    chunks = list(s)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert choice_usage(chunks[-1])["completion_tokens"] == r.usage.completion_tokens


def test_reasoning_is_billed_as_output() -> None:
    with MoonshotStandIn(reasoning="Let me think. The user greets me.", reply="Hi!") as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        r = c.chat.completions.create(model="kimi-k2-thinking", messages=HI)
        message = r.choices[0].message
        assert message.model_extra is not None
        assert message.model_extra["reasoning_content"] == "Let me think. The user greets me."
        assert message.content == "Hi!"
        expected = kimi_tokens("Let me think. The user greets me.") + kimi_tokens("Hi!")
        assert r.usage is not None and r.usage.completion_tokens == expected
        chunks = list(c.chat.completions.create(model="kimi-k2-thinking", messages=HI, stream=True))
        thought = "".join(
            (ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            for ch in chunks
            if ch.choices
        )
        assert thought == "Let me think. The user greets me."
        assert choice_usage(chunks[-1])["completion_tokens"] == expected


# -- streams ----------------------------------------------------------------------------------


def test_stream_usage_sits_in_the_final_choice(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == DEFAULT_REPLY
    final = chunks[-1]
    assert final.choices[0].finish_reason == "stop"
    usage = choice_usage(final)
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == kimi_tokens(DEFAULT_REPLY)
    assert usage["prompt_tokens"] == server.count_prompt_tokens({"model": MODEL, "messages": HI})
    assert all(choice_usage(ch) is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1
    assert server.billed[0]["completion_tokens"] == usage["completion_tokens"]


def test_stream_include_usage_adds_openai_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    last, before = chunks[-1], chunks[-2]
    assert last.choices == []
    assert last.usage is not None
    assert choice_usage(before)["total_tokens"] == last.usage.total_tokens


def test_stream_chunks_forced_many_and_few() -> None:
    with MoonshotStandIn(stream_chunks=200) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        chunks = list(c.chat.completions.create(model=MODEL, messages=HI, stream=True))
        content = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(content) == 200
        assert s.billed[0]["completion_tokens"] == choice_usage(chunks[-1])["completion_tokens"]
    with MoonshotStandIn(stream_chunks=3) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        chunks = list(c.chat.completions.create(model=MODEL, messages=HI, stream=True))
        texts = [
            ch.choices[0].delta.content or ""
            for ch in chunks
            if ch.choices and ch.choices[0].delta.content
        ]
        assert len(texts) == 3 and "".join(texts) == DEFAULT_REPLY
        assert choice_usage(chunks[-1])["completion_tokens"] == kimi_tokens(DEFAULT_REPLY)


def test_stream_of_100k_chunks() -> None:
    with MoonshotStandIn(stream_chunks=100_000) as s:
        status, resp, data = raw_request(
            s, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}
        )
        assert status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        events = [e for e in data.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        # role chunk + content chunks + final chunk + [DONE]
        assert len(events) == 100_003
        assert s.billed[0]["completion_tokens"] >= 100_000


# -- errors ---------------------------------------------------------------------------------


def test_context_window_is_input_plus_output(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    prompt = server.count_prompt_tokens({"model": "moonshot-v1-8k", "messages": HI})
    ok = client.chat.completions.create(
        model="moonshot-v1-8k", messages=HI, max_tokens=8192 - prompt
    )
    assert ok.usage is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="moonshot-v1-8k", messages=HI, max_tokens=8192 - prompt + 1
        )
    assert info.value.status_code == 400
    assert info.value.body == {
        "type": "invalid_request_error",
        "message": "Invalid request: Your request exceeded model token limit: 8192",
    }


def test_context_check_uses_default_max_tokens() -> None:
    def count(body: dict[str, Any]) -> int:
        return 7500 if len(json.dumps(body)) < 1000 else 9000

    with MoonshotStandIn(count_tokens=count) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="exceeded model token limit: 8192"):
            c.chat.completions.create(model="moonshot-v1-8k", messages=HI)  # 7500 + 1024
        c.chat.completions.create(model="moonshot-v1-8k", messages=HI, max_tokens=600)
        s.reset()
        with pytest.raises(openai.BadRequestError, match="Input token length too long"):
            c.chat.completions.create(
                model="moonshot-v1-8k", messages=[{"role": "user", "content": "x" * 40_000}]
            )
        s2 = MoonshotStandIn(count_tokens=lambda body: 9000)
        assert s2.count_prompt_tokens({}) == 9000


def test_unknown_model_is_404_and_extra_models_are_accepted(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.body == {
        "type": "resource_not_found_error",
        "message": "Not found the model gpt-4o or Permission denied",
    }
    with MoonshotStandIn(extra_models={"kimi-k9": 1000}) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        c.chat.completions.create(model="kimi-k9", messages=HI, max_tokens=10)
        with pytest.raises(openai.BadRequestError, match="limit: 1000"):
            c.chat.completions.create(model="kimi-k9", messages=HI)


def test_auth(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    status, _, data = raw_request(server, "GET", "/v1/users/me/balance", key=None)
    assert status == 401
    assert json.loads(data)["error"]["type"] == "invalid_authentication_error"
    wrong = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=HI)
    client.chat.completions.create(model=MODEL, messages=HI)
    assert [r.status for r in server.requests] == [401, 401, 200]
    # The key is never recorded, neither in headers nor anywhere else reachable.
    for rec in server.requests:
        assert "authorization" not in rec.headers
    assert KEY not in repr(server.requests) and "sk-wrong" not in repr(server.requests)
    assert KEY not in repr(vars(server))


def test_any_key_works_without_api_key() -> None:
    with MoonshotStandIn() as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="anything", max_retries=0)
        assert c.chat.completions.create(model=MODEL, messages=HI).usage is not None


def test_balance_endpoint_and_empty_account(client: openai.OpenAI, server: MoonshotStandIn) -> None:
    status, _, data = raw_request(server, "GET", "/v1/users/me/balance")
    assert status == 200
    assert json.loads(data) == {
        "code": 0,
        "data": {
            "available_balance": 49.58894,
            "voucher_balance": 46.58893,
            "cash_balance": 3.00001,
        },
        "scode": "0x0",
        "status": True,
    }
    server.balance = {"available_balance": 0.0, "voucher_balance": 0.0, "cash_balance": 0.0}
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.body["type"] == "exceeded_current_quota_error"  # type: ignore[index]


def test_estimate_endpoint_matches_chat_prompt_tokens(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        LONG_SYSTEM,
        {"role": "user", "content": "Zähle die Tokens 🙂"},
    ]
    status, _, data = raw_request(
        server,
        "POST",
        "/v1/tokenizers/estimate-token-count",
        {"model": MODEL, "messages": messages},
    )
    assert status == 200
    body = json.loads(data)
    assert body["code"] == 0 and body["scode"] == "0x0" and body["status"] is True
    r = client.chat.completions.create(model=MODEL, messages=messages)
    assert r.usage is not None
    assert body["data"] == {"total_tokens": r.usage.prompt_tokens}
    status, _, _ = raw_request(
        server,
        "POST",
        "/v1/tokenizers/estimate-token-count",
        {"model": "nope", "messages": messages},
    )
    assert status == 404


def test_models_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"kimi-k2.5", "kimi-k3", "moonshot-v1-8k"} <= ids
    assert client.models.retrieve("kimi-k3").model_extra == {"context_length": 1_048_576}


def test_bad_request_bodies(server: MoonshotStandIn) -> None:
    status, _, data = raw_request(server, "POST", "/v1/chat/completions", {"model": MODEL})
    assert status == 400
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    status, _, _ = raw_request(server, "GET", "/v1/nowhere")
    assert status == 404


# -- faults ---------------------------------------------------------------------------------


def test_fail_next_rate_limit_has_no_retry_after(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    server.fail_next(429, "rate_limit_reached_error", times=2)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=HI)
        err = info.value
        assert err.body == {
            "type": "rate_limit_reached_error",
            "message": "Your account org-xxx<ak-xxx> request reached organization max RPM: "
            "200, please try again after 1 seconds",
        }
        assert "retry-after" not in err.response.headers
        assert err.response.headers.get("msh-request-id")
    assert client.chat.completions.create(model=MODEL, messages=HI).usage is not None
    assert server.billed and len(server.billed) == 1


@pytest.mark.parametrize(
    ("status", "error_type", "exc"),
    [
        (429, "exceeded_current_quota_error", openai.RateLimitError),
        (403, "exceeded_current_quota_error", openai.PermissionDeniedError),
        (429, "engine_overloaded_error", openai.RateLimitError),
        (500, "server_error", openai.InternalServerError),
        (400, "content_filter", openai.BadRequestError),
        (401, "incorrect_api_key_error", openai.AuthenticationError),
        (404, "resource_not_found_error", openai.NotFoundError),
    ],
)
def test_fail_next_kinds(
    server: MoonshotStandIn,
    client: openai.OpenAI,
    status: int,
    error_type: str,
    exc: type[openai.APIStatusError],
) -> None:
    server.fail_next(status, error_type, headers={"Retry-After": "3"})
    with pytest.raises(exc) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == error_type and body["message"]
    assert "{model}" not in body["message"]
    assert info.value.response.headers["retry-after"] == "3"
    assert server.billed == []


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_without_type_send_html(
    server: MoonshotStandIn, client: openai.OpenAI, status: int
) -> None:
    server.fail_next(status, None)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == status
    assert info.value.response.headers["content-type"] == "text/html"


def test_drop_stream_after_k_chunks(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    server.queue_fault(Fault.drop_stream(3))
    got: list[Any] = []
    # openai 3.x wraps a torn stream in APIConnectionError; 2.x lets httpx's error through.
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
        for chunk in client.chat.completions.create(model=MODEL, messages=HI, stream=True):
            got.append(chunk)
    assert len(got) == 3
    assert all(choice_usage(ch) is None for ch in got)
    rec = server.chat_requests[0]
    assert rec.dropped and rec.status == 200
    assert server.billed == []
    # Moonshot still bills the two content chunks it generated.
    assert rec.usage is not None and rec.usage["completion_tokens"] > 0
    assert server.would_bill == [rec.usage]
    # The next request works (on a fresh connection).
    assert client.chat.completions.create(model=MODEL, messages=HI).usage is not None


def test_drop_non_stream_sends_nothing(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    server.queue_fault(Fault.drop_stream(0))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert server.chat_requests[0].status == 0 and server.chat_requests[0].dropped


def test_html_200(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    server.queue_fault(Fault.html_body())
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/html")
    assert raw.http_response.text.startswith("<!DOCTYPE html>")
    assert server.billed == [] and server.would_bill == []


def test_garbage_chunk(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    server.queue_fault(Fault.garbage(at=2))
    got: list[Any] = []
    with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's SSE parser
        for chunk in client.chat.completions.create(model=MODEL, messages=HI, stream=True):
            got.append(chunk)
    assert len(got) == 2
    server.queue_fault(Fault(kind="garbage_chunk"))
    with pytest.raises(ValueError):
        client.chat.completions.create(model=MODEL, messages=HI)


def test_stream_without_usage(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    server.queue_fault(Fault.without_usage())
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(choice_usage(ch) is None and ch.usage is None for ch in chunks)
    assert server.billed == []
    assert len(server.would_bill) == 1
    server.queue_fault(Fault.without_usage())
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    assert "usage" not in raw.http_response.json()


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {"prompt_tokens": -1, "completion_tokens": 5, "total_tokens": 4},
        {"prompt_tokens": "12", "completion_tokens": "x"},
        {"prompt_tokens": 10**18, "completion_tokens": 10**18, "total_tokens": 2 * 10**18},
        {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11, "cached_tokens": 99},
        {},
        OMIT,
    ],
)
def test_usage_override(server: MoonshotStandIn, client: openai.OpenAI, usage: Any) -> None:
    server.queue_fault(Fault.bad_usage(usage))
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    body = raw.http_response.json()
    if usage is OMIT:
        assert "usage" not in body
    else:
        assert body["usage"] == usage
    server.queue_fault(Fault.bad_usage(usage))
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    if usage is not OMIT:
        assert getattr(chunks[-1].choices[0], "usage", "absent") == usage
    # billed keeps what Moonshot really charges, whatever the response claimed.
    assert all(b["completion_tokens"] == kimi_tokens(DEFAULT_REPLY) for b in server.billed)


def test_delay_fault_times_out_and_is_not_billed(
    server: MoonshotStandIn, client: openai.OpenAI
) -> None:
    server.queue_fault(Fault.slow(0.5))
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.1).chat.completions.create(model=MODEL, messages=HI)
    deadline = time.monotonic() + 30  # a bound on the wait, not a timing check
    while server.chat_requests[0].duration == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    rec = server.chat_requests[0]
    assert rec.dropped and rec.duration >= 0.5
    assert server.billed == [] and len(server.would_bill) == 1


def test_on_request_hooks(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    seen: list[tuple[str, str, int]] = []

    def hook(rec: RecordedRequest) -> None:
        seen.append(("global", rec.path, len(server.billed)))

    def one(rec: RecordedRequest) -> None:
        seen.append(("fault", rec.model or "", rec.status))

    server.on_request = hook
    server.queue_fault(Fault(on_request=one))
    client.chat.completions.create(model=MODEL, messages=HI)
    client.models.list()
    assert seen == [
        ("global", "/v1/chat/completions", 0),
        ("fault", MODEL, 0),
        ("global", "/v1/models", 1),
    ]


def test_error_rate_mixes_retryable_errors() -> None:
    with MoonshotStandIn(error_rate=1.0, seed=3, rate_limit_retry_after=0) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        statuses = set()
        for _ in range(30):
            with pytest.raises(openai.APIStatusError) as info:
                c.chat.completions.create(model=MODEL, messages=HI)
            statuses.add(info.value.status_code)
            if info.value.status_code == 429:
                assert "try again after 0 seconds" in info.value.message
        assert statuses == {429, 500, 503}
        c.models.list()  # only chat completions fail


def test_abandoned_stream_bills_what_was_generated() -> None:
    with MoonshotStandIn(stream_chunks=500, chunk_delay=0.002) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        stream = c.chat.completions.create(model=MODEL, messages=HI, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 30  # a bound on the wait, not a timing check
        while not s.chat_requests[0].dropped and time.monotonic() < deadline:
            time.sleep(0.01)
        rec = s.chat_requests[0]
        assert rec.dropped
        assert rec.usage is not None and rec.usage["completion_tokens"] > 0
        assert s.billed == []
        assert s.errors == []


# -- transport ----------------------------------------------------------------------------


def test_keep_alive(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    for _ in range(5):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert len({r.client_port for r in server.requests}) == 1
    assert all(r.headers.get("connection") != "close" for r in server.requests)


def test_keep_alive_across_streams(server: MoonshotStandIn) -> None:
    # The sync openai 3.57 Stream closes its response at [DONE] without reading the chunked
    # terminator, so it never reuses a streamed connection; the async one drains and does.
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as c:
            await c.chat.completions.create(model=MODEL, messages=HI)
            async for _ in await c.chat.completions.create(model=MODEL, messages=HI, stream=True):
                pass
            await c.chat.completions.create(model=MODEL, messages=HI)

    asyncio.run(run())
    # openai 2.x (httpx) may open a second connection after a stream; the server keeps both.
    assert len({r.client_port for r in server.requests}) <= 2
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for stream in (True, False, True):
        body = json.dumps({"model": MODEL, "messages": HI, "stream": stream})
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    conn.close()
    assert len({r.client_port for r in server.requests[3:]}) == 1


def test_latency_range_is_respected() -> None:
    with MoonshotStandIn(latency=(0.03, 0.06), seed=7) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        for _ in range(5):
            c.chat.completions.create(model=MODEL, messages=HI)
        durations = [r.duration for r in s.requests]
        # The stand-in's own record of each delay, checked from below only: a loaded machine
        # may add to it at will (the client's view of the time belongs to benchmarks/).
        assert all(d >= 0.03 for d in durations)
        assert len(set(durations)) > 1


def test_server_time_is_recorded(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    # How small it is depends on the machine's load: a figure for benchmarks/, not a test.
    for _ in range(20):
        client.chat.completions.create(model=MODEL, messages=HI)
    durations = [r.duration for r in server.requests]
    assert len(durations) == 20 and all(d > 0 for d in durations)


def test_concurrent_clients(server: MoonshotStandIn, client: openai.OpenAI) -> None:
    def call(i: int) -> int:
        if i % 2:
            r = client.chat.completions.create(model=MODEL, messages=HI)
            assert r.usage is not None
            return r.usage.total_tokens
        chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
        return int(choice_usage(chunks[-1])["total_tokens"])

    with ThreadPoolExecutor(16) as pool:
        totals = list(pool.map(call, range(160)))
    assert len(set(totals)) == 1
    assert len(server.billed) == len(server.requests) == 160


def test_async_client(server: MoonshotStandIn) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as c:
            r = await c.chat.completions.create(model=MODEL, messages=HI)
            stream = await c.chat.completions.create(model=MODEL, messages=HI, stream=True)
            chunks = [ch async for ch in stream]
            return r, chunks

    r, chunks = asyncio.run(run())
    assert r.usage.completion_tokens == choice_usage(chunks[-1])["completion_tokens"]
    assert len(server.billed) == 2


def test_reset_and_restart() -> None:
    s = MoonshotStandIn()
    with pytest.raises(RuntimeError):
        _ = s.base_url
    with s:
        c = openai.OpenAI(base_url=s.base_url, api_key="k", max_retries=0)
        s.queue_fault(Fault.slow(0))
        s.queue_fault(Fault.slow(0))
        c.chat.completions.create(model=MODEL, messages=HI)
        s.reset()
        assert s.requests == [] and s.billed == [] and s.pending_faults == 0
    s.stop()  # idempotent


def test_cli_prints_base_url() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimi_budget.testing", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        c = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
        assert c.chat.completions.create(model=MODEL, messages=HI).usage is not None
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()  # not left to the garbage collector (a ResourceWarning)
