"""A loopback stand-in for Moonshot's Kimi API, for tests, demos and benchmarks.

:class:`MoonshotStandIn` is a real HTTP/1.1 server on 127.0.0.1 that speaks Moonshot's wire
protocol with its quirks (``cached_tokens`` at the top level of ``usage``, stream usage inside
the final choice, errors as ``{"error": {"type": ..., "message": ...}}``, 429 without
``Retry-After``), checks the context window, simulates automatic prefix caching, and can be
scripted to fail in every way the real service does. It uses the standard library only.

Example::

    import openai
    from kimi_budget.testing import Fault, MoonshotStandIn

    with MoonshotStandIn(api_key="sk-test") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        resp = client.chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}]
        )
        assert resp.usage is not None
        print(resp.usage.prompt_tokens, resp.usage.model_extra["cached_tokens"])

        server.fail_next(429, "rate_limit_reached_error")  # the next chat call gets a 429
        server.queue_fault(Fault.drop_stream(after_chunks=3))  # the one after: a torn stream
        assert server.billed[0]["completion_tokens"] == resp.usage.completion_tokens

From a shell, ``python -m kimi_budget.testing --port 8765`` serves in the foreground and
prints its base URL.

What the server reports is what Moonshot would bill: :attr:`MoonshotStandIn.billed` holds the
usage of every chat response delivered complete with usage, and
:attr:`MoonshotStandIn.would_bill` also counts responses whose usage never reached the client
(dropped or abandoned streams, responses stripped of usage), because Moonshot bills those too.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import hmac
import importlib
import itertools
import json
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Literal, cast

__all__ = [
    "DEFAULT_REPLY",
    "KNOWN_MODELS",
    "OMIT",
    "Fault",
    "FaultKind",
    "ModelInfo",
    "MoonshotStandIn",
    "RecordedRequest",
    "main",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the stand-in knows about a model."""

    context_window: int
    default_max_tokens: int = 1024


# Windows from moonshot-api.md (the pricing document). The documented larger default outputs of
# kimi-k2.6 and kimi-k3 matter for the context check of requests that omit max_tokens. Windows
# of the unpriced newer models are not documented anywhere: 256 K for k2.x, 1 M for k3.x.
KNOWN_MODELS: Final[Mapping[str, ModelInfo]] = {
    "kimi-k2.5": ModelInfo(262_144),
    "kimi-k2-0905-preview": ModelInfo(262_144),
    "kimi-k2-0711-preview": ModelInfo(131_072),
    "kimi-k2-turbo-preview": ModelInfo(262_144),
    "kimi-k2-thinking": ModelInfo(262_144),
    "kimi-k2-thinking-turbo": ModelInfo(262_144),
    "kimi-k2.6": ModelInfo(262_144, 32_768),
    "kimi-k2.7-code": ModelInfo(262_144, 32_768),
    "kimi-k3": ModelInfo(1_048_576, 131_072),
    "kimi-k3.1-pro": ModelInfo(1_048_576, 131_072),
    "moonshot-v1-8k": ModelInfo(8_192),
    "moonshot-v1-32k": ModelInfo(32_768),
    "moonshot-v1-128k": ModelInfo(131_072),
    "moonshot-v1-8k-vision-preview": ModelInfo(8_192),
    "moonshot-v1-32k-vision-preview": ModelInfo(32_768),
    "moonshot-v1-128k-vision-preview": ModelInfo(131_072),
}

DEFAULT_REPLY: Final = (
    "Hello! This is the kimi-budget stand-in for Moonshot's Kimi API. The reply is canned, "
    "and its tokens are counted with the Kimi K2 tokenizer, so usage is exact and repeatable."
)

DEFAULT_BALANCE: Final[Mapping[str, float]] = {
    "available_balance": 49.58894,
    "voucher_balance": 46.58893,
    "cash_balance": 3.00001,
}

# Moonshot's cache only serves prompts above this size (moonshot-api.md).
CACHE_MIN_PROMPT_TOKENS: Final = 256
CACHE_BLOCK_TOKENS: Final = 16

_RATE_LIMIT_MESSAGE: Final = (
    "Your account org-xxx<ak-xxx> request reached organization max RPM: 200, "
    "please try again after {seconds} seconds"
)
_DEFAULT_MESSAGES: Final[Mapping[str, str]] = {
    "rate_limit_reached_error": _RATE_LIMIT_MESSAGE.format(seconds=1),
    "exceeded_current_quota_error": (
        "You exceeded your current token quota: <org-xxx> 0, please check your account balance"
    ),
    "engine_overloaded_error": "The engine is currently overloaded, please try again later",
    "server_error": "Internal Server Error",
    "content_filter": "The request was rejected because it was considered high risk",
    "invalid_authentication_error": "Invalid Authentication",
    "incorrect_api_key_error": "Incorrect API key provided",
    "permission_denied_error": "Permission denied",
    "access_terminated_error": "Your account access has been terminated",
    "resource_not_found_error": "Not found the model {model} or Permission denied",
    "invalid_request_error": "Invalid request",
}
_REASONS: Final[Mapping[int, str]] = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
# Headers that carry credentials: never recorded.
_SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)
_USAGE_STYLES: Final = ("moonshot", "openai", "both")
# Sized so a 100_000-chunk benchmark stream costs a few hundred syscalls, not 100_000.
_STREAM_FLUSH_BYTES: Final = 32 * 1024


class _Omit:
    """Sentinel type: remove the field instead of setting it."""

    _instance: _Omit | None = None

    def __new__(cls) -> _Omit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "OMIT"


OMIT: Final = _Omit()
"""Pass as ``Fault.usage`` to send a response without any ``usage`` field."""

FaultKind = Literal[
    "ok", "delay", "http_error", "drop", "html", "garbage_chunk", "no_usage", "usage_override"
]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by the next chat completion request.

    ``delay``, ``cached_tokens`` and ``on_request`` combine with every kind:

    - ``ok`` / ``delay``: a normal answer (after ``delay`` seconds).
    - ``http_error``: ``status`` with Moonshot's JSON error body of ``error_type`` (an empty
      ``message`` takes Moonshot's usual one); ``error_type=None`` sends a gateway's HTML page
      instead. Only ``headers`` are added: real 429s carry no ``Retry-After``.
    - ``drop``: a stream sends ``drop_after_chunks`` data events (the role chunk counts) and the
      connection closes: no final usage, no ``[DONE]``. A non-stream request gets no response.
    - ``html``: status 200 with ``Content-Type: text/html`` (a captive portal or proxy page).
    - ``garbage_chunk``: a stream gets an invalid JSON event before data event ``garbage_at``
      (a non-stream request gets a truncated JSON body).
    - ``no_usage``: the stream ends with ``[DONE]`` but never reports usage; a non-stream
      response has no ``usage`` field.
    - ``usage_override``: the reported usage is replaced by ``usage`` (any JSON value; ``OMIT``
      removes it), in the non-stream body and in a stream's final chunks alike.
    """

    kind: FaultKind = "ok"
    status: int = 500
    error_type: str | None = "server_error"
    message: str = ""
    headers: Mapping[str, str] | None = None
    drop_after_chunks: int = 0
    garbage_at: int = 1
    usage: Any = OMIT
    delay: float = 0.0
    cached_tokens: int | None = None
    on_request: Callable[[RecordedRequest], None] | None = None

    @classmethod
    def error(
        cls,
        status: int,
        error_type: str | None,
        message: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        return cls(
            "http_error", status=status, error_type=error_type, message=message, headers=headers
        )

    @classmethod
    def drop_stream(cls, after_chunks: int) -> Fault:
        return cls("drop", drop_after_chunks=after_chunks)

    @classmethod
    def html_body(cls) -> Fault:
        return cls("html")

    @classmethod
    def garbage(cls, at: int = 1) -> Fault:
        return cls("garbage_chunk", garbage_at=at)

    @classmethod
    def without_usage(cls) -> Fault:
        return cls("no_usage")

    @classmethod
    def bad_usage(cls, usage: Any) -> Fault:
        return cls("usage_override", usage=usage)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls("delay", delay=seconds)

    @classmethod
    def cached(cls, tokens: int) -> Fault:
        return cls("ok", cached_tokens=tokens)


@dataclass(eq=False)
class RecordedRequest:
    """One HTTP request as the server saw it. Credentials are never recorded."""

    method: str
    path: str
    body: Any
    headers: dict[str, str]
    time: float
    status: int = 0
    """Status sent; 0 while the request is being handled or if no response was sent."""
    duration: float = 0.0
    """Server time: from the request line to the last write, sleeps included (0 until then)."""
    fault: Fault | None = None
    usage: dict[str, int] | None = None
    """Usage Moonshot would bill for this request, whether or not the client saw it."""
    reported_usage: Any = None
    """The ``usage`` value actually sent (None if none was)."""
    dropped: bool = False
    """The connection ended before the response was complete (fault or client gone)."""
    client_port: int = 0
    """The client's TCP port: requests sharing it came over one keep-alive connection."""

    @property
    def model(self) -> str | None:
        body = self.body
        return body.get("model") if isinstance(body, dict) else None

    @property
    def stream(self) -> bool:
        body = self.body
        return isinstance(body, dict) and bool(body.get("stream"))


@dataclass(frozen=True)
class _Piece:
    key: bytes  # b"content" or b"reasoning_content"
    text: str
    json: bytes
    tokens: int


@dataclass(frozen=True)
class _Reply:
    """A reply text split at token boundaries, so streams and truncation stay exact."""

    pieces: tuple[_Piece, ...]
    cumulative: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def cut(self, limit: int) -> int:
        """Number of whole pieces that fit in ``limit`` tokens."""
        return bisect.bisect_right(self.cumulative, limit)


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers


class _ClientGone(Exception):
    pass


_tokenizer_lock = threading.Lock()
_kimi_tokenizer: Any = None
_kimi_tokenizer_loaded = False


def _load_kimi_tokenizer() -> Any:
    global _kimi_tokenizer, _kimi_tokenizer_loaded
    if not _kimi_tokenizer_loaded:
        with _tokenizer_lock:
            if not _kimi_tokenizer_loaded:
                try:
                    import splintr

                    _kimi_tokenizer = splintr.Tokenizer.from_pretrained("kimi_k2")
                except Exception:
                    _kimi_tokenizer = None
                _kimi_tokenizer_loaded = True
    return _kimi_tokenizer


_FALLBACK_PIECE = re.compile(r"\s*\S+|\s+")


def _split_text(text: str) -> list[tuple[str, int]]:
    """Split ``text`` into (piece, tokens) at Kimi K2 token boundaries.

    Pieces hold whole UTF-8 characters (a token may be half an emoji), so each is valid JSON.
    """
    if not text:
        return []
    tok = _load_kimi_tokenizer()
    if tok is not None:
        pieces: list[tuple[str, int]] = []
        buf = b""
        n = 0
        for token_id in tok.encode_ordinary(text):
            buf += tok.decode_token_bytes(token_id)
            n += 1
            try:
                piece = buf.decode("utf-8")
            except UnicodeDecodeError:
                continue
            pieces.append((piece, n))
            buf, n = b"", 0
        if n:
            pieces.append((buf.decode("utf-8", "replace"), n))
        if "".join(p for p, _ in pieces) == text:
            return pieces
    # No tokenizer (or one that does not round-trip): one token per word, still deterministic.
    return [(m.group(), 1) for m in _FALLBACK_PIECE.finditer(text)]


def _approximate_count(body: Mapping[str, Any]) -> int:
    n = len(json.dumps(body.get("messages"), ensure_ascii=False)) // 3 + 1
    tools = body.get("tools")
    if tools:
        n += len(json.dumps(tools, ensure_ascii=False)) // 3
    return n


def _tokenizer_for(model: str) -> str:
    if model.startswith("kimi-k3"):
        return "kimi_k3"
    if model.startswith("moonshot-v1"):
        return "approximate"
    return "kimi_k2"


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client already closed its end (e.g. it timed out while we slept)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _frame(buf: bytearray, framed: int) -> bytes:
    """``buf`` as one HTTP chunk; its first ``framed`` bytes are already framing (headers)."""
    body = buf[framed:]
    if not body:
        return bytes(buf)
    return bytes(buf[:framed]) + b"%x\r\n" % len(body) + bytes(body) + b"\r\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Stress tests open hundreds of connections at once; the default backlog of 5 drops them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], standin: MoonshotStandIn) -> None:
        self.standin = standin
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on machines without a resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops its connection (a killed worker, an abandoned stream) is normal
        # here; socketserver would print a traceback for each one.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "kimi-budget-standin"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        srv = cast(_Server, self.server)
        with srv.connections_lock:
            srv.connections.add(self.connection)

    def finish(self) -> None:
        srv = cast(_Server, self.server)
        with srv.connections_lock:
            srv.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    started = 0.0
    waited = False  # set once the request slept or ran a hook: the client may have gone

    def parse_request(self) -> bool:
        # Clock starts once the request line is in: earlier is idle keep-alive time.
        self.started = time.perf_counter()
        self.waited = False
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        # Silent: tests and benchmarks read self.requests instead of stderr noise.
        return

    def _dispatch(self) -> None:
        cast(_Server, self.server).standin._handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class MoonshotStandIn:
    """A loopback HTTP server that answers like Moonshot's Kimi API (see the module docstring).

    Chat completions, ``/v1/tokenizers/estimate-token-count``, ``/v1/users/me/balance`` and
    ``/v1/models`` are served. Prompt tokens come from ``count_tokens(body)``, by default
    ``kimi_budget._tokens.count_request_tokens`` (the same counter the library uses), so the
    estimate endpoint and chat ``prompt_tokens`` always agree. Completion tokens are the Kimi K2
    tokens of ``reply`` (and ``reasoning``) actually generated, times ``n``.
    """

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

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> MoonshotStandIn:
        if self._server is not None:
            return self
        _load_kimi_tokenizer()  # pay the ~30 ms load before the first timed request
        if not callable(self.reply):
            self._reply_for({})
        server = _Server((self.host, self._requested_port), self)
        self._server = server
        # stop() waits up to one poll interval: short keeps per-test teardown cheap.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"moonshot-standin:{server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Idle keep-alive connections would keep their handler threads blocked in recv().
        with server.connections_lock:
            conns = list(server.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MoonshotStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<MoonshotStandIn {where}>"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MoonshotStandIn is not started")
        return self._server.server_port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (no ``/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The ``base_url`` for openai clients: ``http://HOST:PORT/v1``."""
        return f"{self.url}/v1"

    # -- scripting and inspection ------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        error_type: str | None,
        message: str = "",
        *,
        times: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue ``times`` HTTP errors for the next chat requests (after any queued faults)."""
        fault = Fault.error(status, error_type, message, headers=headers)
        with self._lock:
            self._faults.extend([fault] * times)

    def queue_fault(self, fault: Fault) -> None:
        """Queue a fault; chat completion requests consume one each, in order.

        Only requests that pass authentication consume faults; a fault is consumed before the
        body is validated, so an error fault applies even to a request that would get a 400.
        """
        with self._lock:
            self._faults.append(fault)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def would_bill(self) -> list[dict[str, int]]:
        """Usage of every chat request that generated tokens, seen by the client or not."""
        with self._lock:
            return [dict(r.usage) for r in self.requests if r.usage is not None]

    def reset(self) -> None:
        """Forget requests, bills, queued faults and the prefix cache; keep the configuration."""
        with self._lock:
            self.requests.clear()
            self.billed.clear()
            self.errors.clear()
            self._faults.clear()
            self._prefixes.clear()

    def count_prompt_tokens(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens the server bills for ``body`` (what the estimate endpoint returns)."""
        return self._count(dict(body))

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
        method = h.command
        if path == "/v1/chat/completions":
            self._require(method, "POST")
            self._chat(h, rec, raw, body, bad_json)
        elif path == "/v1/tokenizers/estimate-token-count":
            self._require(method, "POST")
            self._sleep_latency(h)
            self._validate(body, bad_json)
            n = self._count_cached(raw, body)
            self._send_json(
                h,
                rec,
                200,
                {"code": 0, "data": {"total_tokens": n}, "scode": "0x0", "status": True},
            )
        elif path == "/v1/users/me/balance":
            self._require(method, "GET")
            self._sleep_latency(h)
            self._send_json(
                h, rec, 200, {"code": 0, "data": dict(self.balance), "scode": "0x0", "status": True}
            )
        elif path == "/v1/models":
            self._require(method, "GET")
            self._sleep_latency(h)
            self._send_json(
                h, rec, 200, {"object": "list", "data": [self._model_obj(m) for m in self.models]}
            )
        elif path.startswith("/v1/models/"):
            self._require(method, "GET")
            self._sleep_latency(h)
            name = path[len("/v1/models/") :]
            if name not in self.models:
                raise self._not_found(name)
            self._send_json(h, rec, 200, self._model_obj(name))
        else:
            raise _HTTPError(404, "resource_not_found_error", f"Not found: {path}")

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
        body = {"error": {"type": err.error_type, "message": err.message}}
        self._send(h, rec, err.status, _dumps(body), headers=err.headers)

    # -- chat completions ------------------------------------------------------------------------

    def _validate(self, body: Any, bad_json: bool) -> tuple[str, ModelInfo, list[Any]]:
        if bad_json or not isinstance(body, dict):
            raise _HTTPError(
                400, "invalid_request_error", "Invalid request: body is not a JSON object"
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _HTTPError(400, "invalid_request_error", "Invalid request: model is required")
        info = self.models.get(model)
        if info is None:
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

    def _take_fault(self) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
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
        fault = self._take_fault()
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
            raise _HTTPError(fault.status, fault.error_type, message, fault.headers)
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
        reply = self._reply_for(body)
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            self._stream(h, rec, model, reply, n, limit, prompt, cached, include_usage, fault)
        else:
            self._complete(h, rec, model, reply, n, limit, prompt, cached, fault)

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
        self, prompt: int, completion: int, cached: int, *, stream: bool
    ) -> tuple[dict[str, int], dict[str, Any]]:
        """(what Moonshot bills, what the response reports) in the configured style."""
        billed = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
        }
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
        billed, reported = self._usage(prompt, completion, cached, stream=False)
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
            buf = bytearray(self._head(h, rec, 200, "text/event-stream", None, None))
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
                    self._write(h, _frame(buf, framed))
                    buf.clear()
                    framed = 0
                    if flush_each:
                        time.sleep(self.chunk_delay)
            if kind == "drop":
                if buf:
                    self._write(h, _frame(buf, framed))
                rec.usage, _ = self._usage(prompt, generated, cached, stream=True)
                rec.dropped = True
                h.close_connection = True  # FIN without the chunk terminator: a torn body
                return
            billed, reported = self._usage(prompt, generated, cached, stream=True)
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
            data = _frame(buf, framed) + b"0\r\n\r\n"
            rec.duration = time.perf_counter() - h.started
            try:
                self._write(h, data)
            except _ClientGone:
                self._unbill(billed)
                raise
        except _ClientGone:
            # The caller hung up mid-stream; Moonshot bills what it generated until then.
            if rec.usage is None:
                rec.usage, _ = self._usage(prompt, generated, cached, stream=True)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kimi_budget.testing``: serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m kimi_budget.testing",
        description="Run a loopback stand-in for Moonshot's Kimi API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--latency",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(0.0, 0.0),
        help="random delay per request, seconds",
    )
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--stream-chunks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    args = parser.parse_args(argv)
    server = MoonshotStandIn(
        host=args.host,
        port=args.port,
        latency=tuple(args.latency),
        error_rate=args.error_rate,
        stream_chunks=args.stream_chunks,
        seed=args.seed,
        reply=args.reply,
    ).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
