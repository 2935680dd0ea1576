"""Compressed response bodies (``Content-Encoding``), as a CDN in front of Moonshot sends them.

``MoonshotStandIn(content_encoding="br")`` compresses every response body whose request
accepts that encoding. Streams are compressed incrementally and flushed at every write, so the
client can decode each event as it arrives. ``gzip`` and ``deflate`` use the standard library;
``br`` needs the ``brotli`` package (as the HTTP client does to advertise it).
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any

__all__ = ["ENCODINGS", "Encoder", "accepts"]

ENCODINGS = ("gzip", "deflate", "br")


def accepts(accept_encoding: str | None, encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header lists ``encoding``."""
    offered = {part.split(";")[0].strip().lower() for part in (accept_encoding or "").split(",")}
    return encoding in offered


class Encoder:
    """One response body's compressor: ``chunk()`` for each write, ``end()`` at the end."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._brotli: Any = None
        if encoding == "br":
            brotli = importlib.import_module("brotli")  # untyped; optional
            self._brotli = brotli.Compressor()
        elif encoding == "gzip":
            self._zlib = zlib.compressobj(wbits=31)
        elif encoding == "deflate":
            self._zlib = zlib.compressobj()
        else:
            raise ValueError(f"content_encoding must be one of {ENCODINGS}, not {encoding!r}")

    def chunk(self, data: bytes) -> bytes:
        if self._brotli is not None:
            return bytes(self._brotli.process(data) + self._brotli.flush())
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        if self._brotli is not None:
            return bytes(self._brotli.finish())
        return self._zlib.flush(zlib.Z_FINISH)

    def whole(self, data: bytes) -> bytes:
        return self.chunk(data) + self.end()
