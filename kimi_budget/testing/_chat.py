"""Chat completions: validation, prefix caching, usage, complete bodies and streams."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

from ._core import StandInCore
from ._encoding import Encoder
from ._faults import _DEFAULT_MESSAGES, _RATE_LIMIT_MESSAGE, OMIT, Fault
from ._models import (
    _STREAM_FLUSH_BYTES,
    CACHE_BLOCK_TOKENS,
    CACHE_MIN_PROMPT_TOKENS,
    ModelInfo,
)
from ._text import (
    _Piece,
    _Reply,
    _split_text,
)
from ._wire import (
    RecordedRequest,
    _ClientGone,
    _dumps,
    _frame,
    _Handler,
    _HTTPError,
    _peer_closed,
)

WEB_SEARCH: Final = "$web_search"


class ChatEndpoint(StandInCore):
    """``POST /v1/chat/completions``."""

    def _validate(self, body: Any, bad_json: bool) -> tuple[str, ModelInfo, list[Any]]:
        if bad_json or not isinstance(body, dict):
            raise _HTTPError(
                400, "invalid_request_error", "Invalid request: body is not a JSON object"
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _HTTPError(400, "invalid_request_error", "Invalid request: model is required")
        info = self.models.get(model)
        if info is None or model in self.retired:
            raise self._not_found(model)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise _HTTPError(
                400,
                "invalid_request_error",
                "Invalid request: messages must be a non-empty list of messages",
            )
        return model, info, messages

    def _take_fault(self, rec: RecordedRequest | None = None) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
        if rec is not None and self.fault_for is not None:
            chosen = self.fault_for(rec)
            if chosen is not None:
                return chosen
        with self._lock:
            if self.error_rate and self._rng.random() < self.error_rate:
                status = self._rng.choice((429, 500, 503))
            else:
                return None
        if status == 429:
            msg = _RATE_LIMIT_MESSAGE.format(seconds=self.rate_limit_retry_after)
            return Fault.error(429, "rate_limit_reached_error", msg)
        if status == 500:
            return Fault.error(500, "server_error", _DEFAULT_MESSAGES["server_error"])
        return Fault.error(503, "server_error", "Service Unavailable")

    def _chat(
        self, h: _Handler, rec: RecordedRequest, raw: bytes, body: Any, bad_json: bool
    ) -> None:
        fault = self._take_fault(rec)
        rec.fault = fault
        if fault is not None:
            if fault.on_request is not None:
                h.waited = True
                fault.on_request(rec)
            if fault.delay > 0:
                h.waited = True
                time.sleep(fault.delay)
        self._sleep_latency(h)
        model_hint = body.get("model") if isinstance(body, dict) else None
        if fault is not None and fault.kind == "http_error":
            message = fault.message or _DEFAULT_MESSAGES.get(fault.error_type or "", "")
            message = message.replace("{model}", str(model_hint))
            usage = None if fault.usage is OMIT else fault.usage
            if usage is not None:
                billed = {"cached_tokens": 0, **usage}
                rec.usage = billed
                with self._lock:
                    self.billed.append(billed)
            raise _HTTPError(fault.status, fault.error_type, message, fault.headers, usage)
        if fault is not None and fault.kind == "html":
            page = (
                b"<!DOCTYPE html><html><head><title>Moonshot</title></head><body>"
                b"<p>Service temporarily unavailable.</p></body></html>"
            )
            self._send(h, rec, 200, page, "text/html; charset=utf-8")
            return
        if self.balance.get("available_balance", 1.0) <= 0:
            raise _HTTPError(
                429,
                "exceeded_current_quota_error",
                _DEFAULT_MESSAGES["exceeded_current_quota_error"],
            )
        model, info, messages = self._validate(body, bad_json)
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 5:
            raise _HTTPError(
                400, "invalid_request_error", "Invalid request: n should be between 1 and 5"
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_completion_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _HTTPError(
                400,
                "invalid_request_error",
                "Invalid request: max_tokens must be a positive integer",
            )
        limit = max_tokens if max_tokens is not None else info.default_max_tokens
        prompt = self._count_cached(raw, body)
        if prompt > info.context_window:
            raise _HTTPError(400, "invalid_request_error", "Input token length too long")
        if prompt + limit > info.context_window:
            raise _HTTPError(
                400,
                "invalid_request_error",
                f"Invalid request: Your request exceeded model token limit: {info.context_window}",
            )
        cached = self._cached_tokens(body, messages, prompt, fault)
        if body.get("prompt_cache_options") and model.startswith("kimi-k3"):
            rec.cache_write_tokens = prompt - cached  # the uncached prefix is written
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        tool = self._tool_to_call(body, messages)
        if tool is not None:
            self._call_tool(h, rec, model, tool, n, prompt, cached, include_usage, fault)
            return
        reply = self._reply_for(body)
        if body.get("stream"):
            self._stream(h, rec, model, reply, n, limit, prompt, cached, include_usage, fault)
        else:
            self._complete(h, rec, model, reply, n, limit, prompt, cached, fault)

    def _tool_to_call(self, body: dict[str, Any], messages: list[Any]) -> str | None:
        """With ``call_tools``: the tool a reply calls (``$web_search`` first, else the first
        declared function), unless the conversation ends with a tool's result."""
        tools = body.get("tools")
        if not self.call_tools or not isinstance(tools, list) or not tools:
            return None
        if messages[-1].get("role") == "tool":
            return None
        names = [
            t["function"]["name"]
            for t in tools
            if isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
        ]
        if not names:
            return None
        return WEB_SEARCH if WEB_SEARCH in names else names[0]

    def _call_tool(
        self,
        h: _Handler,
        rec: RecordedRequest,
        model: str,
        tool: str,
        n: int,
        prompt: int,
        cached: int,
        include_usage: bool,
        fault: Fault | None,
    ) -> None:
        """A reply that ends with ``finish_reason == "tool_calls"``: each choice calls ``tool``
        once (Moonshot bills a ``$web_search`` fee per such call)."""
        arguments = json.dumps({"query": "kimi-budget stand-in"}) if tool == WEB_SEARCH else "{}"
        completion = sum(tokens for _, tokens in _split_text(arguments)) * n
        billed, reported = self._usage(
            prompt, completion, cached, stream=bool(rec.stream), written=rec.cache_write_tokens
        )
        usage: Any = reported
        if fault is not None and fault.kind == "usage_override":
            usage = fault.usage
        elif fault is not None and fault.kind == "no_usage":
            usage = OMIT
        rec.usage = billed
        kind = "builtin_function" if tool.startswith("$") else "function"
        calls = [
            {
                "index": 0,
                "id": f"{tool.lstrip('$')}:{self._next_id()}",
                "type": kind,
                "function": {"name": tool, "arguments": arguments},
            }
            for _ in range(n)
        ]
        chat_id = f"chatcmpl-{self._next_id()}"
        if not rec.stream:
            resp: dict[str, Any] = {
                "id": chat_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "", "tool_calls": [calls[i]]},
                        "finish_reason": "tool_calls",
                    }
                    for i in range(n)
                ],
            }
            if usage is not OMIT:
                resp["usage"] = usage
                rec.reported_usage = usage
                with self._lock:
                    self.billed.append(billed)
            self._send(h, rec, 200, _dumps(resp))
            return
        base = {"id": chat_id, "object": "chat.completion.chunk", "created": int(time.time())}
        base["model"] = model
        events: list[dict[str, Any]] = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        ]
        for i in range(n):
            delta = {"tool_calls": [calls[i]]}
            events.append({**base, "choices": [{"index": i, "delta": delta}]})
        for i in range(n):
            final: dict[str, Any] = {"index": i, "delta": {}, "finish_reason": "tool_calls"}
            if i == n - 1 and usage is not OMIT:
                final["usage"] = usage
            events.append({**base, "choices": [final]})
        if include_usage and usage is not OMIT:
            events.append({**base, "choices": [], "usage": usage})
        data = b"".join(b"data: " + _dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        if usage is not OMIT:
            rec.reported_usage = usage
            with self._lock:
                self.billed.append(billed)
        self._send(h, rec, 200, data, "text/event-stream")

    def _reply_for(self, body: dict[str, Any]) -> _Reply:
        text = self.reply(body) if callable(self.reply) else self.reply
        key = (text, self.reasoning)
        with self._lock:
            cached = self._replies.get(key)
        if cached is not None:
            return cached
        pieces: list[_Piece] = []
        for field_name, part in ((b"reasoning_content", self.reasoning), (b"content", text)):
            for piece, tokens in _split_text(part or ""):
                pieces.append(_Piece(field_name, piece, _dumps(piece), tokens))
        reply = _Reply(tuple(pieces), tuple(itertools.accumulate(p.tokens for p in pieces)))
        with self._lock:
            self._replies[key] = reply
            if len(self._replies) > 128:
                self._replies.popitem(last=False)
        return reply

    def _cached_tokens(
        self, body: dict[str, Any], messages: list[Any], prompt: int, fault: Fault | None
    ) -> int:
        forced = fault.cached_tokens if fault is not None else None
        if forced is None:
            forced = self.forced_cached_tokens
        if forced is not None:
            return max(0, min(forced, prompt))
        if not self.prefix_cache:
            return 0
        # A chain of hashes names every message prefix in one pass over the messages.
        seed = _dumps([body.get("model"), body.get("tools")])
        digest = hashlib.blake2b(seed, digest_size=16).digest()
        chain: list[bytes] = []
        for message in messages:
            digest = hashlib.blake2b(
                digest + json.dumps(message, sort_keys=True).encode(), digest_size=16
            ).digest()
            chain.append(digest)
        hit: int | None = None
        hit_tokens: int | None = None
        with self._lock:
            for i in range(len(chain) - 1, -1, -1):
                if chain[i] in self._prefixes:
                    hit, hit_tokens = i + 1, self._prefixes[chain[i]]
                    self._prefixes.move_to_end(chain[i])
                    break
            for i, d in enumerate(chain):
                if d not in self._prefixes:
                    self._prefixes[d] = prompt if i == len(chain) - 1 else None
            self._prefixes[chain[-1]] = prompt
            while len(self._prefixes) > 8192:
                self._prefixes.popitem(last=False)
        if hit is None or prompt <= CACHE_MIN_PROMPT_TOKENS:
            return 0
        if hit_tokens is None:
            hit_tokens = self._count({**body, "messages": messages[:hit]})
            with self._lock:
                if chain[hit - 1] in self._prefixes:
                    self._prefixes[chain[hit - 1]] = hit_tokens
        return min(prompt, hit_tokens // CACHE_BLOCK_TOKENS * CACHE_BLOCK_TOKENS)

    def _usage(
        self, prompt: int, completion: int, cached: int, *, stream: bool, written: int = 0
    ) -> tuple[dict[str, int], dict[str, Any]]:
        """(what Moonshot bills, what the response reports) in the configured style.

        ``written``: prompt tokens written to the cache (a K3 request with
        ``prompt_cache_options``), reported where ``cache_write_field`` says (None: not at all,
        as when the field is unknown).
        """
        billed = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
        }
        if written:
            billed["cache_write_tokens"] = written
        reported: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        # The captured Moonshot stream chunk has no cached_tokens; non-stream bodies always do.
        if self.usage_style in ("moonshot", "both") and (cached or not stream):
            reported["cached_tokens"] = cached
        if self.usage_style in ("openai", "both"):
            reported["prompt_tokens_details"] = {"cached_tokens": cached}
        if written and self.cache_write_field is not None:
            where, _, name = self.cache_write_field.rpartition(".")
            target = reported.setdefault(where, {"cached_tokens": cached}) if where else reported
            target[name] = written
        return billed, reported

    def _complete(
        self,
        h: _Handler,
        rec: RecordedRequest,
        model: str,
        reply: _Reply,
        n: int,
        limit: int,
        prompt: int,
        cached: int,
        fault: Fault | None,
    ) -> None:
        cut = reply.cut(limit)
        pieces = reply.pieces[:cut]
        finish = "length" if cut < len(reply.pieces) else "stop"
        completion = (reply.cumulative[cut - 1] if cut else 0) * n
        billed, reported = self._usage(
            prompt, completion, cached, stream=False, written=rec.cache_write_tokens
        )
        rec.usage = billed
        if h.waited and _peer_closed(h.connection):
            raise _ClientGone  # a client that timed out must not show up in billed
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(p.text for p in pieces if p.key == b"content"),
        }
        if self.reasoning is not None:
            message["reasoning_content"] = "".join(
                p.text for p in pieces if p.key == b"reasoning_content"
            )
        kind = fault.kind if fault is not None else "ok"
        if kind == "drop":
            rec.dropped = True
            h.close_connection = True
            return
        resp: dict[str, Any] = {
            "id": f"chatcmpl-{self._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": i, "message": message, "finish_reason": finish} for i in range(n)
            ],
        }
        usage: Any = reported
        if kind == "no_usage":
            usage = OMIT
        elif kind == "usage_override":
            assert fault is not None
            usage = fault.usage
        if usage is not OMIT:
            resp["usage"] = usage
            rec.reported_usage = usage
        payload = _dumps(resp)
        if kind == "garbage_chunk":
            payload = payload[: max(1, len(payload) // 2)]
        elif usage is not OMIT:
            # Record before sending: once the client has the response, it must be in billed.
            with self._lock:
                self.billed.append(billed)
        try:
            self._send(h, rec, 200, payload)
        except _ClientGone:
            self._unbill(billed)
            raise

    def _unbill(self, billed: dict[str, int]) -> None:
        with self._lock:
            for i, entry in enumerate(self.billed):
                if entry is billed:
                    del self.billed[i]
                    break

    def _stream(
        self,
        h: _Handler,
        rec: RecordedRequest,
        model: str,
        reply: _Reply,
        n: int,
        limit: int,
        prompt: int,
        cached: int,
        include_usage: bool,
        fault: Fault | None,
    ) -> None:
        kind = fault.kind if fault is not None else "ok"
        drop_after = fault.drop_after_chunks if fault is not None and kind == "drop" else -1
        garbage_at = fault.garbage_at if fault is not None and kind == "garbage_chunk" else -1
        chat_id = f"chatcmpl-{self._next_id()}"
        head = (
            f'data: {{"id":"{chat_id}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(model)},'
            f'"system_fingerprint":"fpv0_standin","choices":['
        ).encode()
        generated = 0  # completion tokens sent so far: what a torn stream still costs

        def content_events() -> Iterator[tuple[bytes, int]]:
            yield (
                head + b'{"index":0,"delta":{"role":"assistant","content":""},'
                b'"finish_reason":null}]}\n\n',
                0,
            )
            for index in range(n):
                prefix = head + b'{"index":%d,"delta":{"' % index
                for piece in self._stream_pieces(reply, limit):
                    yield (
                        prefix + piece.key + b'":' + piece.json + b'},"finish_reason":null}]}\n\n',
                        piece.tokens,
                    )

        truncated = self.stream_chunks is None and reply.cut(limit) < len(reply.pieces)
        finish = "length" if truncated else "stop"
        try:
            if h.waited and _peer_closed(h.connection):
                raise _ClientGone
            # The head rides with the first chunk: one segment until time-to-first-token.
            encoder = Encoder(h.encoding) if h.encoding is not None else None
            extra = {"Content-Encoding": h.encoding} if h.encoding is not None else None
            buf = bytearray(self._head(h, rec, 200, "text/event-stream", extra, None))
            framed = len(buf)  # bytes at the start of buf that are already HTTP framing
            flush_each = self.chunk_delay > 0
            for sent, (event, tokens) in enumerate(content_events(), start=1):
                if sent - 1 == drop_after:
                    break
                if sent - 1 == garbage_at:
                    buf += b'data: {"id": "' + chat_id.encode() + b'", "choices": [{\n\n'
                buf += event
                generated += tokens
                # The first chunk goes out at once so time-to-first-token is realistic.
                if flush_each or sent == 1 or len(buf) >= _STREAM_FLUSH_BYTES:
                    self._write(h, _frame(buf, framed, encoder))
                    buf.clear()
                    framed = 0
                    if flush_each:
                        time.sleep(self.chunk_delay)
            if kind == "drop":
                if buf:
                    self._write(h, _frame(buf, framed, encoder))
                rec.usage, _ = self._usage(
                    prompt, generated, cached, stream=True, written=rec.cache_write_tokens
                )
                rec.dropped = True
                h.close_connection = True  # FIN without the chunk terminator: a torn body
                return
            billed, reported = self._usage(
                prompt, generated, cached, stream=True, written=rec.cache_write_tokens
            )
            rec.usage = billed
            usage: Any = reported
            if kind == "no_usage":
                usage = OMIT
            elif kind == "usage_override":
                assert fault is not None
                usage = fault.usage
            for index in range(n):
                final: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": finish}
                if index == n - 1 and usage is not OMIT:
                    final["usage"] = usage  # Moonshot's quirk: usage inside the choice
                buf += head + _dumps(final) + b"]}\n\n"
            if include_usage and usage is not OMIT:
                buf += (
                    f'data: {{"id":"{chat_id}","object":"chat.completion.chunk",'
                    f'"created":{int(time.time())},"model":{json.dumps(model)},'
                    f'"system_fingerprint":"fpv0_standin","choices":[],"usage":'
                ).encode()
                buf += _dumps(usage) + b"}\n\n"
            buf += b"data: [DONE]\n\n"
            if usage is not OMIT:
                rec.reported_usage = usage
                with self._lock:
                    self.billed.append(billed)
            data = _frame(buf, framed, encoder, last=True) + b"0\r\n\r\n"
            rec.duration = time.perf_counter() - h.started
            try:
                self._write(h, data)
            except _ClientGone:
                self._unbill(billed)
                raise
        except _ClientGone:
            # The caller hung up mid-stream; Moonshot bills what it generated until then.
            if rec.usage is None:
                rec.usage, _ = self._usage(
                    prompt, generated, cached, stream=True, written=rec.cache_write_tokens
                )
            raise

    def _stream_pieces(self, reply: _Reply, limit: int) -> Iterator[_Piece]:
        pieces = reply.pieces
        reasoning = [p for p in pieces if p.key == b"reasoning_content"]
        content: Sequence[_Piece] = pieces[len(reasoning) :]
        forced = self.stream_chunks
        if forced is None:
            yield from pieces[: reply.cut(limit)]
            return
        yield from reasoning
        if not content:
            empty = _Piece(b"content", "", b'""', 0)
            for _ in range(forced):
                yield empty
            return
        if forced >= len(content):
            for i in range(forced):
                yield content[i % len(content)]
            return
        # Fewer chunks than pieces: group neighbours so the whole reply still goes out.
        bounds = [len(content) * j // forced for j in range(forced + 1)]
        for j in range(forced):
            group = content[bounds[j] : bounds[j + 1]]
            text = "".join(p.text for p in group)
            yield _Piece(b"content", text, _dumps(text), sum(p.tokens for p in group))
