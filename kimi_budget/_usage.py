"""Reading billed usage out of Moonshot's responses, whatever shape they arrive in.

Moonshot puts ``cached_tokens`` at the top level of ``usage`` (newer models may use OpenAI's
``prompt_tokens_details.cached_tokens``), and in streams puts ``usage`` inside the final choice
rather than in a chunk of its own. Responses can also be malformed; nothing here raises on bad
input. A usage object that is missing or malformed (a count that is not a whole number in range,
``cached_tokens`` above ``prompt_tokens``) is an unknown bill: it reads as ``None``, and
``describe_usage_problem`` says why, so that the call is charged its full reservation.

Bodies are read decoded: ``content_decoder`` builds the HTTP library's own decoder for the
response's ``Content-Encoding`` (gzip, deflate, and brotli or zstd when installed), so whatever
the caller can read, so can we.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BodySniffer",
    "SseSniffer",
    "Usage",
    "content_decoder",
    "describe_usage_problem",
    "read_usage",
    "usage_from_body",
]

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
    raw: Any = None  # the usage object as received (a dict, or the SDK's model)

    def raw_json(self) -> Any:
        """``raw`` as plain JSON values (None if there is none)."""
        raw = self.raw
        if raw is None or isinstance(raw, Mapping):
            return raw
        dump = getattr(raw, "model_dump", None)
        if dump is None:
            return None
        try:
            return dump(mode="json", exclude_unset=True, warnings=False)
        except Exception:
            return None


def _as_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= _MAX_SANE_TOKENS else None
    if isinstance(value, float) and value.is_integer():
        return _as_count(int(value))
    return None


def model_field(model: Any, name: str) -> Any:
    """A field of an SDK object (a pydantic model), or one of the server's extra fields that
    it keeps; None if it has neither.

    A pydantic v2 model is read through its ``__dict__`` and extras: asking ``getattr`` for a
    name it lacks raises and catches an AttributeError inside pydantic, which was the slowest
    part of reading a bill.
    """
    extra = getattr(model, "__pydantic_extra__", None)
    if isinstance(extra, dict):
        fields = getattr(model, "__dict__", None)
        if isinstance(fields, dict) and name in fields:
            return fields[name]
        if name in extra:
            return extra[name]
        if name not in type(model).__dict__ and not hasattr(type(model), name):
            return None
    value = getattr(model, name, None)
    if value is None:
        extra = getattr(model, "model_extra", None)
        if isinstance(extra, Mapping):
            value = extra.get(name)
    return value


class _ModelView:
    """``.get()`` over a pydantic model's fields and extras, nested models included."""

    __slots__ = ("_model",)

    def __init__(self, model: Any) -> None:
        self._model = model

    def get(self, name: str) -> Any:
        value = model_field(self._model, name)
        return _ModelView(value) if hasattr(value, "model_extra") else value


def read_usage(raw: Any) -> Usage | None:
    """A ``usage`` object (dict or SDK model) as ``Usage``; None if it is absent or malformed.

    Prompt and completion counts must be whole numbers in a sane range; ``cached_tokens`` (top
    level, or OpenAI's ``prompt_tokens_details``) may be absent (no cache hits) but, when
    given, must be a count no larger than ``prompt_tokens``. Anything else is an unknown bill.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        # An SDK model: read the fields (and Moonshot's extras) directly. Serializing it would
        # cost more and make pydantic warn, quoting malformed values (perhaps an echoed key).
        if not hasattr(raw, "model_extra"):
            return None
        raw = _ModelView(raw)
    original = raw._model if isinstance(raw, _ModelView) else raw
    prompt = _as_count(raw.get("prompt_tokens"))
    completion = _as_count(raw.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    cached_raw = raw.get("cached_tokens")
    if cached_raw is None:
        details = raw.get("prompt_tokens_details")
        if isinstance(details, Mapping | _ModelView):
            cached_raw = details.get("cached_tokens")
    cached = 0
    if cached_raw is not None:
        parsed = _as_count(cached_raw)
        if parsed is None or parsed > prompt:
            return None
        cached = parsed
    return Usage(prompt, cached, completion, raw=original)


def describe_usage_problem(raw: Any) -> str:
    """Why ``read_usage(raw)`` could not read a bill, in words for the ledger's note."""
    if raw is None:
        return "the response carried no usage"
    if isinstance(raw, Mapping):
        text = json.dumps(raw, default=str)[:200]
    elif hasattr(raw, "model_extra"):
        text = repr(raw)[:200]
    else:
        text = repr(raw)[:200]
    return f"the response's usage {text} is malformed"


def usage_from_body(data: Any) -> tuple[Usage | None, str | None, str | None]:
    """(usage, response id, problem) from a parsed chat completion body."""
    if not isinstance(data, Mapping):
        return None, None, "the response body is not a JSON object"
    response_id = data.get("id") if isinstance(data.get("id"), str) else None
    raw = data.get("usage")
    usage = read_usage(raw)
    if usage is None:
        return None, response_id, describe_usage_problem(raw)
    return usage, response_id, None


class BodySniffer:
    """Collects a JSON body that streams through us (``with_streaming_response``)."""

    def __init__(self, decoder: Any = None) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._decoder = decoder
        self.undecodable = False

    def feed(self, data: bytes) -> None:
        if self.undecodable or self._size > _MAX_JSON_BODY:
            return
        if self._decoder is not None:
            data = self._decoder.decode(data)
        self._size += len(data)
        self._parts.append(data)

    def finish(self) -> None:
        if self._decoder is not None and not self.undecodable:
            decoder, self._decoder = self._decoder, None
            try:
                self.feed(decoder.flush())
            except Exception:
                self.undecodable = True

    def result(self) -> tuple[Usage | None, str | None, str | None]:
        self.finish()
        if self.undecodable:
            return None, None, "the response body could not be decoded"
        try:
            data = json.loads(b"".join(self._parts))
        except ValueError:
            return None, None, "the response body is not JSON"
        self.data = data
        return usage_from_body(data)

    data: Any = None  # the parsed body, once ``result`` has read it


class SseSniffer:
    """Watches a server-sent-event stream go by for usage, keeping O(1) memory.

    Only lines that mention ``"usage"`` are parsed; other ``data:`` lines are just counted, as a
    floor for the output of a stream that ends without usage (one chunk carries at least one
    token). Usage may sit in ``chunk.usage`` or in ``chunk.choices[*].usage``; the last one
    seen wins.
    """

    def __init__(self, decoder: Any = None) -> None:
        from .pricing._responses import ToolCallTally

        self.usage: Usage | None = None
        self.raw_usage: Any = None  # the last readable usage object, as received
        self.tools = ToolCallTally()
        self.response_id: str | None = None
        self.chunks = 0
        self.done = False
        self.problems: list[str] = []
        self._tail = b""
        self._decoder = decoder
        self.undecodable = False

    def feed(self, data: bytes) -> None:
        if self.undecodable:
            return
        if self._decoder is not None:
            data = self._decoder.decode(data)
        if not data:
            return
        buffer = self._tail + data if self._tail else data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._tail = buffer
            return
        complete, self._tail = buffer[: cut + 1], buffer[cut + 1 :]
        self.chunks += complete.count(b"data:")
        self.tools.feed(complete)  # $web_search calls (billed per call): one find() if none
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
                self.problems.append(describe_usage_problem(raw))
                self.bad_usage = True
            else:
                self.usage = usage
                self.raw_usage = raw

    bad_usage = False  # a usage object was seen and could not be read: the bill is unknown

    def finish(self) -> None:
        if self._decoder is not None and not self.undecodable:
            decoder, self._decoder = self._decoder, None
            with contextlib.suppress(Exception):
                self.feed(decoder.flush())
        if self._tail.strip():
            self.feed(b"\n")


def content_decoder(response: Any) -> Any:
    """A fresh decoder for ``response``'s body, from the response's own HTTP library.

    It is the decoder that library would use for the caller (``decode(bytes)``, ``flush()``),
    so brotli and zstd are read whenever the caller can read them. None for an identity body.
    """
    encoding = response.headers.get("content-encoding")
    if not encoding or encoding.strip().lower() in ("", "identity"):
        return None
    try:
        # The library's private factory, on a blank response of the same class and encoding.
        blank = type(response)(200, headers={"content-encoding": encoding})
        return _Joined(blank._get_content_decoder())
    except Exception:
        try:
            return _ZlibDecoder(encoding)
        except ValueError:
            return _Undecodable()


class _Joined:
    """A library decoder whose ``decode``/``flush`` return bytes (httpx) or iterate them
    (httpx2), as bytes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def decode(self, data: bytes) -> bytes:
        return _bytes(self._inner.decode(data))

    def flush(self) -> bytes:
        return _bytes(self._inner.flush())


def _bytes(result: Any) -> bytes:
    return result if isinstance(result, bytes) else b"".join(result)


class _ZlibDecoder:
    """gzip and deflate, for a response class without the usual decoder factory."""

    def __init__(self, encoding: str) -> None:
        name = encoding.strip().lower()
        if name in ("gzip", "x-gzip"):
            self._inner: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name == "deflate":
            self._inner = zlib.decompressobj()
        else:
            raise ValueError(f"cannot decode Content-Encoding {encoding!r}")

    def decode(self, data: bytes) -> bytes:
        return bytes(self._inner.decompress(data))

    def flush(self) -> bytes:
        return bytes(self._inner.flush())


class _Undecodable:
    def decode(self, data: bytes) -> bytes:
        raise ValueError("undecodable body")

    def flush(self) -> bytes:
        return b""
