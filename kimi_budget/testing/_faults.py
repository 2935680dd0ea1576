"""Scripted misbehaviour: :class:`Fault` and the error messages Moonshot sends."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from ._wire import RecordedRequest

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
      instead. Only ``headers`` are added: real 429s carry no ``Retry-After``. With ``usage``,
      the error body reports it and it is billed (a generation that failed after it ran).
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
        usage: Mapping[str, int] | None = None,
    ) -> Fault:
        return cls(
            "http_error",
            status=status,
            error_type=error_type,
            message=message,
            headers=headers,
            usage=OMIT if usage is None else dict(usage),
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
