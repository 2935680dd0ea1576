"""Secrets out of text: API keys never reach the ledger, logs, errors or reports."""

from __future__ import annotations

import re

__all__ = ["redact", "redact_url"]

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]{8,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys (the given ones, and anything shaped like one) from ``text``."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub(r"\1***", text)


_URL_PASSWORD_KEYS = ("password", "sslpassword")


def redact_url(url: str) -> str:
    """A database URL without its password(s): ``postgresql://ann:***@host/db``.

    The password in the user part and ``password=``/``sslpassword=`` query parameters are
    replaced; everything else (user, hosts, database, options) is kept for messages.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a database URL that could not be parsed>"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hosts}" if at else hosts
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key in _URL_PASSWORD_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k in _URL_PASSWORD_KEYS else v) for k, v in pairs], safe="*"
            )
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else netloc + parts.path
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
