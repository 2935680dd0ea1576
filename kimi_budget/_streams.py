"""Byte streams that watch a response body go by, on its way to the caller, untouched.

The SDK reads a streamed body through ``response.stream``. Putting a tee there, rather than
wrapping ``Stream`` objects, sees every path the caller can take: ``stream=True``,
``with_raw_response``, ``with_streaming_response``, ``.parse()``, ``chat.completions.stream()``,
or reading bytes directly. The tee settles the call when the body ends, fails, is closed, or
is garbage-collected, whichever comes first (``Call`` makes settling idempotent).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ._guard import Call
from ._usage import BodySniffer, SseSniffer

__all__ = ["tee_async", "tee_sync"]

Sniffer = SseSniffer | BodySniffer


def _httpx() -> Any:
    # openai >= 3 sends through httpx2, earlier releases through httpx.
    import openai._base_client as base

    return getattr(base, "httpx2", None) or getattr(base, "httpx")  # noqa: B009


_classes: dict[str, type] = {}


def _feed(sniffer: Sniffer, data: bytes) -> None:
    try:
        sniffer.feed(data)
    except Exception:
        sniffer.undecodable = True


def _finalizer(call: Call, sniffer: Sniffer) -> None:
    call.stream_ended(sniffer, "collected")


def tee_sync(inner: Any, sniffer: Sniffer, call: Call) -> Any:
    cls = _classes.get("sync")
    if cls is None:
        cls = _classes["sync"] = _make_sync(_httpx().SyncByteStream)
    return cls(inner, sniffer, call)


def tee_async(inner: Any, sniffer: Sniffer, call: Call) -> Any:
    cls = _classes.get("async")
    if cls is None:
        cls = _classes["async"] = _make_async(_httpx().AsyncByteStream)
    return cls(inner, sniffer, call)


def _make_sync(base: type) -> type:
    class TeeByteStream(base):  # type: ignore[misc, valid-type]
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

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._end("closed")

        def _end(self, how: str, exc: BaseException | None = None) -> None:
            self._finalizer.detach()
            self._call.stream_ended(self._sniffer, how, exc)

    return TeeByteStream


def _make_async(base: type) -> type:
    class AsyncTeeByteStream(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, sniffer: Sniffer, call: Call) -> None:
            self._inner = inner
            self._sniffer = sniffer
            self._call = call
            self._finalizer = weakref.finalize(self, _finalizer, call, sniffer)

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

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._end("closed")

        def _end(self, how: str, exc: BaseException | None = None) -> None:
            self._finalizer.detach()
            self._call.stream_ended(self._sniffer, how, exc)

    return AsyncTeeByteStream
