"""Secrets out of text: API keys never reach the ledger, logs, errors or reports."""

from __future__ import annotations

import re

__all__ = ["redact"]

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]{8,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys (the given ones, and anything shaped like one) from ``text``."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub(r"\1***", text)
