"""What a response bills beyond plain tokens, read from its body or its stream.

- ``$web_search`` calls: a choice that ends with ``finish_reason == "tool_calls"`` and calls the
  builtin ``$web_search`` costs a fee per such call; a user-defined tool carries no fee.
- Cache-write tokens (K3 family): the usage field is not documented by Moonshot. pydantic's
  genai-prices (its Moonshot usage extractor) reads ``usage.prompt_tokens_details
  .cache_write_tokens``; other clients also try ``cache_creation_tokens``. Every spelling seen is
  read here; when none is present the caller keeps the worst case and the raw usage is stored,
  so the row can be re-priced once the field is known.

Nothing here raises on malformed input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._usage import model_field
from ._requests import WEB_SEARCH_TOOL

__all__ = ["ToolCallTally", "cache_write_tokens", "web_search_calls"]

_MAX_TOKENS = 100_000_000
_WRITE_FIELDS = (
    ("prompt_tokens_details", "cache_write_tokens"),
    ("cache_write_tokens",),
    ("prompt_tokens_details", "cache_creation_tokens"),
    ("prompt_tokens_details", "cache_creation_input_tokens"),
    ("cache_creation_input_tokens",),
)


def _get(obj: Any, name: str) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):
        return obj.get(name)
    return model_field(obj, name)


def cache_write_tokens(usage: Any) -> int | None:
    """Prompt tokens the usage says were written to the cache; None if it does not say."""
    if usage is None:
        return None
    for path in _WRITE_FIELDS:
        value: Any = usage
        for name in path:
            value = _get(value, name)
            if value is None:
                break
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and 0 <= value <= _MAX_TOKENS:
            return value
    return None


def _choice_calls(choice: Any) -> int:
    if _get(choice, "finish_reason") != "tool_calls":
        return 0
    message = _get(choice, "message")
    calls = _get(message, "tool_calls") if message is not None else None
    if not isinstance(calls, list):
        return 0
    return sum(1 for call in calls if _get(_get(call, "function"), "name") == WEB_SEARCH_TOOL)


def web_search_calls(response: Any) -> int:
    """``$web_search`` calls of a chat completion (a parsed body or an SDK object) that the
    fee applies to: those of choices ending with ``finish_reason == "tool_calls"``."""
    choices = _get(response, "choices") if response is not None else None
    if not isinstance(choices, list):
        return 0
    return sum(_choice_calls(choice) for choice in choices)


class ToolCallTally:
    """Counts ``$web_search`` calls in a stream of chat completion chunks.

    ``feed`` takes whole lines of the event stream; only lines that mention tool calls are
    parsed (a stream without tool calls costs one substring search per read). A call counts once
    per (choice, tool-call index) and only if its choice finishes with ``"tool_calls"``.
    """

    __slots__ = ("_finished", "_named")

    def __init__(self) -> None:
        self._named: set[tuple[int, int]] = set()
        self._finished: set[int] = set()

    @property
    def web_search_calls(self) -> int:
        return sum(1 for choice, _ in self._named if choice in self._finished)

    def feed(self, lines: bytes) -> None:
        if b"tool_calls" not in lines:
            return
        for line in lines.split(b"\n"):
            if b"tool_calls" in line and line.startswith(b"data:"):
                self.feed_chunk(line[5:].strip())

    def feed_chunk(self, payload: bytes | str | Mapping[str, Any]) -> None:
        chunk: Any = payload
        if not isinstance(payload, Mapping):
            try:
                chunk = json.loads(payload)
            except ValueError:
                return
        choices = chunk.get("choices") if isinstance(chunk, Mapping) else None
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            if choice.get("finish_reason") == "tool_calls":
                self._finished.add(index)
            delta = choice.get("delta")
            calls = delta.get("tool_calls") if isinstance(delta, Mapping) else None
            if not isinstance(calls, list):
                continue
            for position, call in enumerate(calls):
                if not isinstance(call, Mapping):
                    continue
                function = call.get("function")
                if isinstance(function, Mapping) and function.get("name") == WEB_SEARCH_TOOL:
                    slot = call.get("index", position)
                    self._named.add((index, slot if isinstance(slot, int) else position))
