"""State and HTTP plumbing of the stand-in, shared by its endpoints."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import itertools
import json
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._encoding import ENCODINGS, Encoder, accepts
from ._faults import Fault
from ._models import (
    _USAGE_STYLES,
    DEFAULT_BALANCE,
    DEFAULT_REPLY,
    KNOWN_MODELS,
    ModelInfo,
)
from ._text import (
    _approximate_count,
    _Reply,
    _tokenizer_for,
)
from ._wire import (
    _REASONS,
    _SECRET_HEADERS,
    RecordedRequest,
    _ClientGone,
    _dumps,
    _Handler,
    _HTTPError,
    _Server,
)


class StandInCore:
    """Configuration, recorded traffic and the HTTP plumbing every endpoint uses."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        latency: tuple[float, float] = (0.0, 0.0),
        seed: int | None = None,
        reply: str | Callable[[dict[str, Any]], str] = DEFAULT_REPLY,
        reasoning: str | None = None,
        stream_chunks: int | None = None,
        chunk_delay: float = 0.0,
        usage_style: str = "moonshot",
        error_rate: float = 0.0,
        rate_limit_retry_after: int = 1,
        count_tokens: Callable[[dict[str, Any]], int] | None = None,
        balance: Mapping[str, float] | None = None,
        extra_models: Mapping[str, int | ModelInfo] | None = None,
        cached_tokens: int | None = None,
        prefix_cache: bool = True,
        on_request: Callable[[RecordedRequest], None] | None = None,
        max_recorded: int | None = None,
        call_tools: bool = False,
        cache_write_field: str | None = "prompt_tokens_details.cache_write_tokens",
        retired: Sequence[str] = (),
        auto_complete_batches: bool = True,
        content_encoding: str | None = None,
        fault_for: Callable[[RecordedRequest], Fault | None] | None = None,
    ) -> None:
        """
        Args:
            api_key: if set, any other key gets 401; otherwise any non-empty Bearer key works.
                Only a hash of it is kept.
            latency: (low, high) seconds of uniform random delay before each answer.
            seed: seeds latency, ``error_rate`` draws and response ids.
            reply: assistant text, or a function of the request body returning it.
            reasoning: if set, a thinking model's ``reasoning_content`` sent before the reply;
                its tokens are billed as completion tokens.
            stream_chunks: force this many content chunks per streamed choice (the reply is
                split or repeated); overrides ``max_tokens`` truncation in streams.
            chunk_delay: seconds between stream chunks (each chunk is then flushed alone).
            usage_style: ``"moonshot"`` (top-level ``cached_tokens``), ``"openai"``
                (``prompt_tokens_details.cached_tokens`` only) or ``"both"``.
            error_rate: probability that a chat request gets a retryable error (429
                rate_limit_reached_error, 500 or 503), drawn from the seeded generator.
            rate_limit_retry_after: the N in those 429s' "please try again after N seconds".
            count_tokens: prompt token counter, ``body -> int``.
            balance: the ``data`` of ``/v1/users/me/balance``; chat calls get 429
                exceeded_current_quota_error while ``available_balance <= 0``.
            extra_models: more accepted models, name -> context window (or ModelInfo).
            cached_tokens: report exactly this many cached tokens (capped at prompt_tokens)
                instead of simulating the prefix cache.
            prefix_cache: simulate automatic prefix caching.
            on_request: called with each RecordedRequest before it is answered, in the
                handler thread; it may block (e.g. while a test locks the ledger).
            max_recorded: keep only about this many of the latest ``requests`` and ``billed``
                entries (long stress runs); None keeps everything.
            call_tools: a request that declares tools (and does not end with a tool's result)
                gets a reply calling one: ``$web_search`` if declared, else the first function;
                ``finish_reason`` is ``"tool_calls"``.
            cache_write_field: where the usage reports prompt tokens written to the cache by a
                K3 request with ``prompt_cache_options`` (dotted path); None: not reported.
            retired: models that answer 404 ``resource_not_found_error``, as retired ones do.
            auto_complete_batches: a batch runs on its first retrieve after creation
                (otherwise only when ``complete_batch(id)`` is called).
            content_encoding: compress response bodies (``"gzip"``, ``"deflate"`` or ``"br"``)
                for requests whose ``Accept-Encoding`` lists it.
            fault_for: the fault of each chat request without a queued one, chosen from the
                request itself (its headers, say): concurrent clients each get their own.
        """
        if usage_style not in _USAGE_STYLES:
            raise ValueError(f"usage_style must be one of {_USAGE_STYLES}, not {usage_style!r}")
        low, high = latency
        if not 0 <= low <= high:
            raise ValueError("latency must be (low, high) with 0 <= low <= high")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if stream_chunks is not None and stream_chunks < 0:
            raise ValueError("stream_chunks must be >= 0")
        self.host = host
        self._requested_port = port
        self._key_digest = (
            hashlib.sha256(api_key.encode()).digest() if api_key is not None else None
        )
        self.latency = (float(low), float(high))
        self.reply = reply
        self.reasoning = reasoning
        self.stream_chunks = stream_chunks
        self.chunk_delay = chunk_delay
        self.usage_style = usage_style
        self.error_rate = error_rate
        self.rate_limit_retry_after = rate_limit_retry_after
        self.balance: dict[str, float] = dict(balance if balance is not None else DEFAULT_BALANCE)
        self.models: dict[str, ModelInfo] = dict(KNOWN_MODELS)
        for name, spec in (extra_models or {}).items():
            self.models[name] = spec if isinstance(spec, ModelInfo) else ModelInfo(int(spec))
        self.forced_cached_tokens = cached_tokens
        self.prefix_cache = prefix_cache
        self.on_request = on_request
        self.max_recorded = max_recorded
        self.call_tools = call_tools
        self.cache_write_field = cache_write_field
        self.retired: set[str] = set(retired)
        self.auto_complete_batches = auto_complete_batches
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_billed: list[dict[str, int]] = []
        """Usage of every batch request run: what Moonshot bills (at the batch price)."""
        if content_encoding is not None and content_encoding not in ENCODINGS:
            raise ValueError(f"content_encoding must be one of {ENCODINGS}")
        self.content_encoding = content_encoding
        self.fault_for = fault_for

        self.requests: list[RecordedRequest] = []
        self.billed: list[dict[str, int]] = []
        self.errors: list[BaseException] = []
        """Unexpected exceptions inside the server (bugs): tests can assert it stays empty."""

        self._count_tokens = count_tokens
        self._library_counter: Callable[[Mapping[str, Any], str], Any] | None = None
        self._library_counter_tried = False
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._id_prefix = f"{self._rng.getrandbits(64):016x}"
        self._ids = itertools.count(1)
        self._faults: deque[Fault] = deque()
        self._prompt_counts: OrderedDict[bytes, int] = OrderedDict()
        self._prefixes: OrderedDict[bytes, int | None] = OrderedDict()
        self._replies: OrderedDict[tuple[str, str | None], _Reply] = OrderedDict()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _count(self, body: dict[str, Any]) -> int:
        if self._count_tokens is not None:
            return int(self._count_tokens(body))
        if not self._library_counter_tried:
            try:
                # Imported by name: the module is optional for the stand-in and may be absent.
                tokens_module = importlib.import_module("kimi_budget._tokens")
                self._library_counter = tokens_module.count_request_tokens
            except Exception:
                self._library_counter = None
            self._library_counter_tried = True
        if self._library_counter is None:
            return _approximate_count(body)
        model = body.get("model")
        tokenizer = _tokenizer_for(model if isinstance(model, str) else "")
        return int(self._library_counter(body, tokenizer).tokens)

    def _count_cached(self, raw: bytes, body: dict[str, Any]) -> int:
        # Benchmarks resend the same body thousands of times; tokenizing it once is enough.
        key = hashlib.blake2b(raw, digest_size=16).digest()
        with self._lock:
            n = self._prompt_counts.get(key)
        if n is not None:
            return n
        n = self._count(body)
        with self._lock:
            self._prompt_counts[key] = n
            if len(self._prompt_counts) > 1024:
                self._prompt_counts.popitem(last=False)
        return n

    # -- HTTP plumbing -------------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        started = h.started or time.perf_counter()
        path = h.path.partition("?")[0]
        headers = h.headers
        recorded_headers = {
            k.lower(): v for k, v in headers.items() if k.lower() not in _SECRET_HEADERS
        }
        try:
            length = int(headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
            h.close_connection = True  # the body's end is unknown: this connection is done
        raw = h.rfile.read(length) if length > 0 else b""
        h.encoding = (
            self.content_encoding
            if self.content_encoding
            and accepts(headers.get("Accept-Encoding"), self.content_encoding)
            else None
        )
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        rec = RecordedRequest(
            h.command,
            path,
            body,
            recorded_headers,
            time.time(),
            client_port=int(h.client_address[1]),
        )
        with self._lock:
            self.requests.append(rec)
            keep = self.max_recorded
            # Trim in batches so appends stay O(1) amortized.
            if keep is not None and len(self.requests) > 2 * keep + 16:
                del self.requests[: len(self.requests) - keep]
                del self.billed[: max(0, len(self.billed) - keep)]
        try:
            try:
                if self.on_request is not None:
                    h.waited = True
                    self.on_request(rec)
                self._check_auth(headers.get("Authorization"))
                self._route(h, rec, path, raw, body, bad_json)
            except _HTTPError as err:
                self._send_error(h, rec, err)
        except _ClientGone:
            rec.dropped = True
            h.close_connection = True
        except Exception as exc:
            self.errors.append(exc)
            h.close_connection = True
            if rec.status == 0:
                bug = _HTTPError(500, "server_error", f"stand-in bug: {exc!r}")
                with contextlib.suppress(_ClientGone):
                    self._send_error(h, rec, bug)
        finally:
            if not rec.duration:
                rec.duration = time.perf_counter() - started

    def _check_auth(self, value: str | None) -> None:
        scheme, _, key = (value or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _HTTPError(401, "invalid_authentication_error", "Invalid Authentication")
        if self._key_digest is not None and not hmac.compare_digest(
            hashlib.sha256(key.encode()).digest(), self._key_digest
        ):
            raise _HTTPError(401, "invalid_authentication_error", "Invalid Authentication")

    def _route(
        self, h: _Handler, rec: RecordedRequest, path: str, raw: bytes, body: Any, bad_json: bool
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _require(method: str, expected: str) -> None:
        if method != expected:
            raise _HTTPError(405, "invalid_request_error", f"Method {method} not allowed")

    def _model_obj(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": 1700000000,
            "owned_by": "moonshot",
            "context_length": self.models[name].context_window,
        }

    @staticmethod
    def _not_found(model: str) -> _HTTPError:
        return _HTTPError(
            404, "resource_not_found_error", f"Not found the model {model} or Permission denied"
        )

    def _sleep_latency(self, h: _Handler) -> None:
        low, high = self.latency
        if high > 0:
            with self._lock:
                delay = self._rng.uniform(low, high)
            h.waited = True
            time.sleep(delay)

    def _next_id(self) -> str:
        return f"{self._id_prefix[:16]}{next(self._ids):08x}"

    def _head(
        self,
        h: _Handler,
        rec: RecordedRequest,
        status: int,
        content_type: str,
        extra: Mapping[str, str] | None,
        length: int | None,
    ) -> bytes:
        rec.status = status
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Msh-Request-Id: {self._next_id()}",
        ]
        if length is None:
            lines.append("Transfer-Encoding: chunked")
            lines.append("Cache-Control: no-cache")
        else:
            lines.append(f"Content-Length: {length}")
        if extra:
            lines.extend(f"{k}: {v}" for k, v in extra.items())
        if h.close_connection:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    @staticmethod
    def _write(h: _Handler, data: bytes) -> None:
        try:
            h.wfile.write(data)
        except OSError as exc:  # BrokenPipe, ConnectionReset, or our own stop()
            raise _ClientGone from exc

    def _send(
        self,
        h: _Handler,
        rec: RecordedRequest,
        status: int,
        payload: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if h.encoding is not None:
            payload = Encoder(h.encoding).whole(payload)
            headers = {**(headers or {}), "Content-Encoding": h.encoding}
        # One write per response: headers and body in the same TCP segment.
        data = self._head(h, rec, status, content_type, headers, len(payload)) + payload
        # Set before the write, so a client that got the response always sees it.
        rec.duration = time.perf_counter() - h.started
        self._write(h, data)

    def _send_json(self, h: _Handler, rec: RecordedRequest, status: int, obj: Any) -> None:
        self._send(h, rec, status, _dumps(obj))

    def _send_error(self, h: _Handler, rec: RecordedRequest, err: _HTTPError) -> None:
        if err.error_type is None:
            reason = _REASONS.get(err.status, "Error")
            page = (
                f"<html>\r\n<head><title>{err.status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{err.status} {reason}</h1></center>\r\n</body>\r\n</html>\r\n"
            )
            self._send(h, rec, err.status, page.encode(), "text/html", err.headers)
            return
        body: dict[str, Any] = {"error": {"type": err.error_type, "message": err.message}}
        if err.usage is not None:
            body["usage"] = err.usage  # an error that still billed what it generated
        self._send(h, rec, err.status, _dumps(body), headers=err.headers)
