"""What a chat request asks for that Moonshot bills beyond plain tokens.

- ``prompt_cache_options`` (K3 family): the prefix written to the cache with a 5-minute TTL
  (the default, billed at the cache-miss price) or a 1-hour TTL (twice the miss price). The
  option's exact shape is not documented where we looked; any value we cannot read as 5 minutes
  is taken as the dearer 1 hour.
- ``tools`` declaring Moonshot's builtin ``$web_search``: each response that ends calling it
  costs a fee per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["WEB_SEARCH_TOOL", "CacheTTL", "declares_web_search", "requested_cache_ttl"]

CacheTTL = Literal["5m", "1h"]
WEB_SEARCH_TOOL = "$web_search"

_FIVE_MINUTES = frozenset({"5m", "5min", "5mins", "5minutes", "300", "300s", "short", "default"})
_TTL_KEYS = ("ttl", "cache_ttl", "duration", "type", "mode")


def requested_cache_ttl(body: Mapping[str, Any]) -> CacheTTL | None:
    """The cache TTL a request asks for: None (no ``prompt_cache_options``), "5m" or "1h"."""
    options = body.get("prompt_cache_options")
    if options is None or options is False:
        return None
    values: list[Any] = []
    if isinstance(options, Mapping):
        values = [options[key] for key in _TTL_KEYS if key in options]
    else:
        values = [options]
    if not values:
        return "1h"  # an option we cannot read: the dearer TTL
    for value in values:
        text = str(value).strip().lower().replace(" ", "").replace("_", "")
        if text not in _FIVE_MINUTES and not (isinstance(value, int | float) and value <= 300):
            return "1h"
    return "5m"


def declares_web_search(body: Mapping[str, Any]) -> bool:
    """Whether ``tools`` declares Moonshot's builtin ``$web_search`` (any tool type)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return False
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function")
        if isinstance(function, Mapping) and function.get("name") == WEB_SEARCH_TOOL:
            return True
    return False
