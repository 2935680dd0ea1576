"""Replies split at Kimi K2 token boundaries, so streams and truncation stay exact."""

from __future__ import annotations

import bisect
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
