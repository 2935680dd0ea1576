"""Reading billed usage out of Moonshot's responses, whatever shape they arrive in.

Moonshot puts ``cached_tokens`` at the top level of ``usage`` (newer models may use OpenAI's
``prompt_tokens_details.cached_tokens``), and in streams puts ``usage`` inside the final choice
rather than in a chunk of its own. Responses can also be malformed; nothing here raises on bad
input: it returns what it could read and says what was wrong in ``problems``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BodySniffer", "SseSniffer", "Usage", "read_usage", "usage_from_body"]

# No request can bill more tokens than this; a larger figure is a malformed response.
_MAX_SANE_TOKENS = 100_000_000
_MAX_JSON_BODY = 16 * 1024 * 1024


@dataclass(slots=True)
class Usage:
    """Token counts the server billed. ``problems`` lists anything that had to be repaired."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    problems: list[str] = field(default_factory=list)


def _as_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= _MAX_SANE_TOKENS else None
    if isinstance(value, float) and value.is_integer():
        return _as_count(int(value))
    return None


class _ModelView:
    """``.get()`` over a pydantic model's fields and extras, nested models included."""

    __slots__ = ("_model",)

    def __init__(self, model: Any) -> None:
        self._model = model

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self._model, name, default)
        return _ModelView(value) if hasattr(value, "model_extra") else value


def read_usage(raw: Any) -> Usage | None:
    """A ``usage`` object (dict or SDK model) as ``Usage``; None if it is absent or unusable.

    Prompt and completion counts must be whole numbers in a sane range. A missing or malformed
    ``cached_tokens`` counts as no cache hits (the dearer reading), and ``cached_tokens`` above
    ``prompt_tokens`` is clamped, both noted in ``problems``.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        # An SDK model: read the fields (and Moonshot's extras) directly. Serializing it would
        # cost more and make pydantic warn, quoting malformed values (perhaps an echoed key).
        if not hasattr(raw, "model_extra"):
            return None
        raw = _ModelView(raw)
    prompt = _as_count(raw.get("prompt_tokens"))
    completion = _as_count(raw.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    problems: list[str] = []
    cached_raw = raw.get("cached_tokens")
    if cached_raw is None:
        details = raw.get("prompt_tokens_details")
        if isinstance(details, Mapping | _ModelView):
            cached_raw = details.get("cached_tokens")
    cached = 0
    if cached_raw is not None:
        parsed = _as_count(cached_raw)
        if parsed is None:
            problems.append(f"cached_tokens {cached_raw!r} is not a token count; counted as 0")
        elif parsed > prompt:
            problems.append(f"cached_tokens {parsed} > prompt_tokens {prompt}; clamped")
            cached = prompt
        else:
            cached = parsed
    return Usage(prompt, cached, completion, problems)


def _describe_bad_usage(raw: Any) -> str:
    text = json.dumps(raw, default=str)[:200] if raw is not None else "missing"
    return f"usage {text} is malformed"


def usage_from_body(data: Any) -> tuple[Usage | None, str | None, str | None]:
    """(usage, response id, problem) from a parsed chat completion body."""
    if not isinstance(data, Mapping):
        return None, None, "the response body is not a JSON object"
    response_id = data.get("id") if isinstance(data.get("id"), str) else None
    raw = data.get("usage")
    usage = read_usage(raw)
    if usage is None:
        return None, response_id, _describe_bad_usage(raw)
    return usage, response_id, None


class BodySniffer:
    """Collects a JSON body that streams through us (``with_streaming_response``)."""

    def __init__(self, content_encoding: str | None) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._decoder = _decoder(content_encoding)
        self.undecodable = self._decoder is False

    def feed(self, data: bytes) -> None:
        if self.undecodable or self._size > _MAX_JSON_BODY:
            return
        if self._decoder:
            data = self._decoder.decompress(data)  # type: ignore[union-attr]
        self._size += len(data)
        self._parts.append(data)

    def result(self) -> tuple[Usage | None, str | None, str | None]:
        if self.undecodable:
            return None, None, "the response body is compressed in an encoding we cannot read"
        try:
            data = json.loads(b"".join(self._parts))
        except ValueError:
            return None, None, "the response body is not JSON"
        return usage_from_body(data)


class SseSniffer:
    """Watches a server-sent-event stream go by for usage, keeping O(1) memory.

    Only lines that mention ``"usage"`` are parsed; other ``data:`` lines are just counted, as a
    floor for the output of a stream that ends without usage (one chunk carries at least one
    token). Usage may sit in ``chunk.usage`` or in ``chunk.choices[*].usage``; the last one
    seen wins.
    """

    def __init__(self, content_encoding: str | None) -> None:
        self.usage: Usage | None = None
        self.response_id: str | None = None
        self.chunks = 0
        self.done = False
        self.problems: list[str] = []
        self._tail = b""
        self._decoder = _decoder(content_encoding)
        self.undecodable = self._decoder is False

    def feed(self, data: bytes) -> None:
        if self.undecodable:
            return
        if self._decoder:
            data = self._decoder.decompress(data)  # type: ignore[union-attr]
        if not data:
            return
        buffer = self._tail + data if self._tail else data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._tail = buffer
            return
        complete, self._tail = buffer[: cut + 1], buffer[cut + 1 :]
        self.chunks += complete.count(b"data:")
        if b"[DONE]" in complete:
            self.done = True
        self._scan(complete)

    def _scan(self, complete: bytes) -> None:
        """Parse the ``data:`` lines of ``complete`` (whole lines) that can matter: each one
        until a response id is known, then only those that mention ``"usage"``.

        The lines are found with ``bytes.find``, one pass over the buffer once the id is
        known: a network read can hold hundreds of chunks, and every pass over it counts.
        """
        pos, end = 0, len(complete)
        while pos < end:
            if self.response_id is None:
                line_end = complete.find(b"\n", pos)  # complete ends with a newline
            else:
                hit = complete.find(b'"usage"', pos)
                if hit < 0:
                    return
                pos = complete.rfind(b"\n", pos, hit) + 1 or pos
                line_end = complete.find(b"\n", hit)
            line = complete[pos:line_end]
            if line.startswith(b"data:"):
                self._parse_line(line[5:].strip())
            pos = line_end + 1

    def _parse_line(self, payload: bytes) -> None:
        if not payload or payload == b"[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.problems.append("a stream chunk was not valid JSON")
            return
        if not isinstance(chunk, Mapping):
            return
        if self.response_id is None and isinstance(chunk.get("id"), str):
            self.response_id = chunk["id"]
        candidates = [chunk.get("usage")]
        choices = chunk.get("choices")
        if isinstance(choices, list):
            candidates += [c.get("usage") for c in choices if isinstance(c, Mapping)]
        for raw in candidates:
            if raw is None:
                continue
            usage = read_usage(raw)
            if usage is None:
                self.problems.append(_describe_bad_usage(raw))
            else:
                self.usage = usage

    def finish(self) -> None:
        if self._tail.strip():
            self.feed(b"\n")


def _decoder(content_encoding: str | None) -> Any:
    """A zlib decompressor for the body's encoding; None for identity; False if unsupported."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return False
