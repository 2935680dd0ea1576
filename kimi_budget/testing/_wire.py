"""HTTP plumbing shared by every endpoint: the server, the handler, recorded requests."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from ._core import StandInCore
    from ._faults import Fault

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
    cache_write_tokens: int = 0
    """Prompt tokens written to the cache (a K3 request with ``prompt_cache_options``)."""

    @property
    def model(self) -> str | None:
        body = self.body
        return body.get("model") if isinstance(body, dict) else None

    @property
    def stream(self) -> bool:
        body = self.body
        return isinstance(body, dict) and bool(body.get("stream"))


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
        usage: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers
        self.usage = usage


class _ClientGone(Exception):
    pass


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client already closed its end (e.g. it timed out while we slept)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _frame(buf: bytearray, framed: int, encoder: Any = None, last: bool = False) -> bytes:
    """``buf`` as one HTTP chunk; its first ``framed`` bytes are already framing (headers).

    With an ``encoder`` (``_encoding.Encoder``) the body is compressed, and ``last`` ends the
    compressed stream."""
    body: bytes = bytes(buf[framed:])
    if encoder is not None:
        body = encoder.chunk(body) + (encoder.end() if last else b"")
    if not body:
        return bytes(buf[:framed])
    return bytes(buf[:framed]) + b"%x\r\n" % len(body) + body + b"\r\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Stress tests open hundreds of connections at once; the default backlog of 5 drops them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], standin: StandInCore) -> None:
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
    encoding: str | None = None  # the Content-Encoding of this request's response body
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
