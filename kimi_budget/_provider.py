"""Which API key goes to which URL: a key is only ever sent to the provider it belongs to.

Two pairs of environment variables may be set on one machine, and they must never mix:

- ``MOONSHOT_API_KEY`` goes to a URL the user chose for Moonshot: ``base_url=``,
  ``MOONSHOT_BASE_URL``, or Moonshot's international API by default. It is never sent to
  ``OPENAI_BASE_URL``, which usually names another provider (or a proxy to one).
- ``OPENAI_API_KEY`` is used only together with an explicit base URL (``base_url=`` or
  ``OPENAI_BASE_URL``). It is never sent to api.moonshot.ai by default: it is most likely an
  OpenAI key.

A key passed as ``api_key=`` is the caller's own choice and goes where the caller's
``base_url=`` (or, without one, the environment) says, as with ``openai.OpenAI``.
"""

from __future__ import annotations

import os
from typing import Any

import openai

__all__ = ["DEFAULT_BASE_URL", "resolve_provider"]

DEFAULT_BASE_URL = "https://api.moonshot.ai/v1"

NO_KEY = (
    "No API key: pass api_key= or set MOONSHOT_API_KEY "
    "(OPENAI_API_KEY is used only together with base_url= or OPENAI_BASE_URL)."
)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def resolve_provider(api_key: Any, base_url: Any) -> tuple[Any, Any]:
    """The ``(api_key, base_url)`` a new client uses, from its arguments and the environment.

    Raises ``openai.OpenAIError`` (what ``openai.OpenAI`` raises without a key) when no key
    may be used, saying which variable to set.
    """
    moonshot_key, moonshot_url = _env("MOONSHOT_API_KEY"), _env("MOONSHOT_BASE_URL")
    openai_key, openai_url = _env("OPENAI_API_KEY"), _env("OPENAI_BASE_URL")
    if base_url is not None:
        # An explicit URL: the caller chose where the call goes; either key may follow it.
        key = api_key if api_key is not None else moonshot_key or openai_key
        return _require(key), base_url
    if api_key is not None:
        if moonshot_key is not None and api_key == moonshot_key:
            # MOONSHOT_API_KEY read by the caller and passed on is still a Moonshot key.
            return api_key, moonshot_url or DEFAULT_BASE_URL
        return api_key, moonshot_url or openai_url or DEFAULT_BASE_URL
    if moonshot_key:
        return moonshot_key, moonshot_url or DEFAULT_BASE_URL
    if openai_key and openai_url:
        return openai_key, openai_url
    if openai_key:
        raise openai.OpenAIError(
            "OPENAI_API_KEY is set but MOONSHOT_API_KEY is not: kimi-budget does not send an "
            "OpenAI key to Moonshot by default. Set MOONSHOT_API_KEY, or pass base_url= (or set "
            "OPENAI_BASE_URL) to say where OPENAI_API_KEY belongs."
        )
    raise openai.OpenAIError(NO_KEY)


def _require(key: Any) -> Any:
    if key is None:
        raise openai.OpenAIError(NO_KEY)
    return key
