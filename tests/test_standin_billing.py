"""The stand-in bills like Moonshot beyond plain tokens: tool calls, cache writes, batches."""

from __future__ import annotations

import json

import openai
import pytest

from kimi_budget.testing import MoonshotStandIn

KEY = "sk-standin-billing"
WEB_SEARCH = {"type": "builtin_function", "function": {"name": "$web_search"}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server() -> MoonshotStandIn:
    with MoonshotStandIn(api_key=KEY, call_tools=True) as s:
        yield s


def _client(server: MoonshotStandIn) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def test_a_request_declaring_web_search_gets_a_web_search_call_per_choice(
    server: MoonshotStandIn,
) -> None:
    resp = _client(server).chat.completions.create(
        model="kimi-k2.6",
        messages=HI,
        tools=[WEB_SEARCH],
        n=2,
        max_tokens=50,  # type: ignore[list-item]
    )
    assert [c.finish_reason for c in resp.choices] == ["tool_calls", "tool_calls"]
    names = [c.message.tool_calls[0].function.name for c in resp.choices]  # type: ignore[index,union-attr]
    assert names == ["$web_search", "$web_search"]
    assert resp.usage is not None and server.billed[-1]["completion_tokens"] == (
        resp.usage.completion_tokens
    )


def test_a_conversation_ending_with_the_tool_result_gets_a_plain_answer(
    server: MoonshotStandIn,
) -> None:
    messages = [
        *HI,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "builtin_function",
                    "function": {"name": "$web_search", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "results"},
    ]
    resp = _client(server).chat.completions.create(
        model="kimi-k2.6",
        messages=messages,
        tools=[WEB_SEARCH],
        max_tokens=50,  # type: ignore[arg-type,list-item]
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_a_k3_request_with_prompt_cache_options_reports_its_cache_writes(
    server: MoonshotStandIn,
) -> None:
    resp = _client(server).chat.completions.create(
        model="kimi-k3",
        messages=HI,
        max_tokens=20,
        extra_body={"prompt_cache_options": {"ttl": "1h"}},
    )
    assert resp.usage is not None
    details = resp.usage.model_dump()["prompt_tokens_details"]
    assert details["cache_write_tokens"] == resp.usage.prompt_tokens - details["cached_tokens"]
    assert server.billed[-1]["cache_write_tokens"] == details["cache_write_tokens"]


def test_retired_models_answer_404() -> None:
    with MoonshotStandIn(api_key=KEY, retired=["kimi-k2.5"]) as s:
        with pytest.raises(openai.NotFoundError):
            _client(s).chat.completions.create(model="kimi-k2.5", messages=HI)  # type: ignore[arg-type]
        assert s.billed == []


def test_a_batch_runs_from_upload_to_output_file(server: MoonshotStandIn) -> None:
    client = _client(server)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "kimi-k2.6", "messages": HI, "max_tokens": 10 + i},
        }
        for i in range(3)
    ]
    lines.append(
        {
            "custom_id": "k3",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "kimi-k3", "messages": HI, "max_tokens": 5},
        }
    )
    upload = client.files.create(
        file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"k": "v"},
    )
    assert batch.status == "in_progress" and batch.metadata == {"k": "v"}
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id and done.error_file_id
    assert done.request_counts is not None and (
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (3, 1)
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    usages = [line["response"]["body"]["usage"] for line in out]
    assert [u["completion_tokens"] for u in usages] == [
        b["completion_tokens"] for b in server.batch_billed
    ]
    errors = client.files.content(done.error_file_id).text
    assert "not available in batch" in errors
    assert client.batches.retrieve(batch.id).status == "completed"  # runs once
    assert len(server.batch_billed) == 3
