"""The stand-in server: lifecycle, scripting and routing."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ._batches import BatchEndpoints
from ._faults import Fault
from ._text import (
    _load_kimi_tokenizer,
)
from ._wire import (
    RecordedRequest,
    _Handler,
    _HTTPError,
    _Server,
)


class MoonshotStandIn(BatchEndpoints):
    """A loopback HTTP server that answers like Moonshot's Kimi API (see the module docstring).

    Chat completions, ``/v1/tokenizers/estimate-token-count``, ``/v1/users/me/balance`` and
    ``/v1/models`` are served. Prompt tokens come from ``count_tokens(body)``, by default
    ``kimi_budget._tokens.count_request_tokens`` (the same counter the library uses), so the
    estimate endpoint and chat ``prompt_tokens`` always agree. Completion tokens are the Kimi K2
    tokens of ``reply`` (and ``reasoning``) actually generated, times ``n``.
    """

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
            self.batch_billed.clear()

    def count_prompt_tokens(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens the server bills for ``body`` (what the estimate endpoint returns)."""
        return self._count(dict(body))

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
        elif path == "/v1/files" or path.startswith("/v1/files/"):
            self._sleep_latency(h)
            self._files_route(h, rec, path, raw, body)
        elif path == "/v1/batches" or path.startswith("/v1/batches/"):
            self._sleep_latency(h)
            self._batches_route(h, rec, path, body)
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
