"""Moonshot response bodies for respx-mocked tests, shaped like the real ones."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx


def completion(
    *,
    prompt: int = 19,
    completion_tokens: int = 21,
    cached: int | None = 10,
    style: str = "moonshot",
    model: str = "kimi-k2.5",
    content: str = "Hello!",
    response_id: str = "chatcmpl-6911668985355ab7ab43bc2b",
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if cached is not None:
        if style in ("moonshot", "both"):
            usage["cached_tokens"] = cached
        if style in ("openai", "both"):
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": 1762748041,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def sse(*events: dict[str, Any] | str) -> bytes:
    lines = []
    for event in events:
        payload = event if isinstance(event, str) else json.dumps(event)
        lines.append(f"data: {payload}\n\n")
    return "".join(lines).encode()


def stream_chunks(
    words: list[str],
    *,
    usage: dict[str, Any] | None = None,
    usage_in_choice: bool = True,
    model: str = "kimi-k2-0905-preview",
) -> list[dict[str, Any]]:
    """Moonshot's stream: content chunks, then a final choice carrying usage (its quirk)."""
    base = {
        "id": "chatcmpl-6911668985355ab7ab43bc2b",
        "object": "chat.completion.chunk",
        "created": 1762748041,
        "model": model,
        "system_fingerprint": "fpv0_41b1161c",
    }
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        for word in words
    ]
    final_choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": "stop"}
    if usage is not None and usage_in_choice:
        final_choice["usage"] = usage
    chunks.append({**base, "choices": [final_choice]})
    if usage is not None and not usage_in_choice:
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def sse_response(
    chunks: list[dict[str, Any]], *, done: bool = True, piecewise: bool = False
) -> httpx.Response:
    events: list[dict[str, Any] | str] = [*chunks, *(["[DONE]"] if done else [])]
    headers = {"content-type": "text/event-stream"}
    if piecewise:
        # One network read per event, as a real server sends them.
        return httpx.Response(200, content=iter([sse(e) for e in events]), headers=headers)
    return httpx.Response(200, content=sse(*events), headers=headers)


def error(status: int, error_type: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"type": error_type, "message": message}}, headers=headers
    )


def sent_body(route: Any, index: int = -1) -> dict[str, Any]:
    return json.loads(route.calls[index].request.content)  # type: ignore[no-any-return]


class LogCapture(logging.Handler):
    """Messages logged by kimi-budget (logger ``kimi_budget``) at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logging.getLogger("kimi_budget").addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("kimi_budget").removeHandler(self)
