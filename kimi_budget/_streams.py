"""Byte streams that watch a response body go by, on its way to the caller, untouched.

The SDK reads a streamed body through ``response.stream``. Putting a tee there, rather than
wrapping ``Stream`` objects, sees every path the caller can take: ``stream=True``,
``with_raw_response``, ``with_streaming_response``, ``.parse()``, ``chat.completions.stream()``,
or reading bytes directly. The tee settles the call when the body ends, fails, is closed, or
is garbage-collected, whichever comes first (``Call`` makes settling idempotent).

The tee sees the body as sent (compressed, if it was); the sniffers decode it with the
response's own HTTP library's decoder (``_usage.content_decoder``), so brotli and zstd bodies are
read exactly when the caller can read them. The tee is built on the byte-stream classes of the
library the response comes from: openai 3.x sends through ``httpx2``, but it also accepts a
legacy ``httpx.Client`` as ``http_client``, whose responses only take ``httpx`` streams. Each
tee is both a sync and an async stream, as ``httpx.ByteStream`` is.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ._usage import BodySniffer, SseSniffer, content_decoder

if TYPE_CHECKING:
    from ._guard import Call

__all__ = ["body_was_read", "new_sniffer", "watch_body"]

Sniffer = SseSniffer | BodySniffer

_classes: dict[str, type] = {}


def body_was_read(response: Any) -> bool:
    """Whether the HTTP library already holds the whole (decoded) body of ``response``.

    True for a body sent with ``stream=False``, and for one an event hook of the caller's own
    ``http_client`` read before the SDK (and we) saw the response.
    """
    return hasattr(response, "_content")


def new_sniffer(response: Any) -> Sniffer:
    """The sniffer for a streamed 2xx body: server-sent events or one JSON document."""
    decoder = content_decoder(response)
    if "event-stream" in response.headers.get("content-type", ""):
        return SseSniffer(decoder)
    return BodySniffer(decoder)


def watch_body(response: Any, call: Call, sniffer: Sniffer) -> None:
    """Put a tee on ``response``'s unread body that feeds ``sniffer`` and settles ``call``."""
    response.stream = _tee_class(response)(response.stream, sniffer, call)


def _feed(sniffer: Sniffer, data: bytes) -> None:
    try:
        sniffer.feed(data)
    except Exception:
        sniffer.undecodable = True


def _finalizer(call: Call, sniffer: Sniffer) -> None:
    call.stream_ended(sniffer, "collected")


# The thread running a garbage collection now, if one is (CPython runs one at a time).
_collecting_thread: int | None = None


def _note_collection(phase: str, info: dict[str, int]) -> None:
    global _collecting_thread
    _collecting_thread = threading.get_ident() if phase == "start" else None


gc.callbacks.append(_note_collection)


def _closed_by_the_collector() -> bool:
    return _collecting_thread == threading.get_ident()


def _tee_class(response: Any) -> type:
    """The tee for the HTTP library ``response`` comes from (httpx2, or httpx)."""
    for cls in type(response).__mro__:
        package = sys.modules.get(cls.__module__.partition(".")[0])
        sync = getattr(package, "SyncByteStream", None)
        asynchronous = getattr(package, "AsyncByteStream", None)
        if sync is not None and asynchronous is not None and package is not None:
            tee = _classes.get(package.__name__)
            if tee is None:
                tee = _classes[package.__name__] = _make_tee(sync, asynchronous)
            return tee
    raise TypeError(f"cannot watch the body of a {type(response).__name__}")  # pragma: no cover


def _make_tee(sync_base: type, async_base: type) -> type:
    class TeeByteStream(sync_base, async_base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, sniffer: Sniffer, call: Call) -> None:
            self._inner = inner
            self._sniffer = sniffer
            self._call = call
            self._finalizer = weakref.finalize(self, _finalizer, call, sniffer)

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self._inner:
                    _feed(self._sniffer, chunk)
                    self._call.keep_alive()
                    yield chunk
            except GeneratorExit:
                self._end("closed")
                raise
            except BaseException as exc:
                self._end("failed", exc)
                raise
            self._end("complete")

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._inner:
                    _feed(self._sniffer, chunk)
                    self._call.keep_alive()
                    yield chunk
            except GeneratorExit:
                self._end("closed")
                raise
            except BaseException as exc:
                self._end("failed", exc)
                raise
            self._end("complete")

        def close(self) -> None:
            try:
                if _closed_by_the_collector():
                    # An abandoned SDK stream is a reference cycle, freed by the garbage
                    # collector at whatever allocation triggers it: possibly inside httpx's
                    # connection pool, under the pool lock that closing the body takes again
                    # (a deadlock of the thread with itself). The body is closed from a thread
                    # of its own, which takes that lock once the pool has released it.
                    threading.Thread(
                        target=self._inner.close, name="kimi-budget body close", daemon=True
                    ).start()
                else:
                    self._inner.close()
            finally:
                self._end("closed")

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._end("closed")

        def _end(self, how: str, exc: BaseException | None = None) -> None:
            self._finalizer.detach()
            self._call.stream_ended(self._sniffer, how, exc)

    return TeeByteStream
