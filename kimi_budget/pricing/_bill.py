"""One call's charge from what it billed: tokens, cache writes, ``$web_search`` fees.

:class:`Extras` collects, while a response is read, what Moonshot bills beyond the three token
counts; :func:`charge` turns a call's bills into the amounts the ledger records. Bills that could
not be read are charged their full projection (``worst``): the cap stays real.

Cache writes: a request asking for a cache TTL whose write costs more than a miss (1 hour on
the K3 family) and whose usage does not report the tokens written is charged as if every
uncached prompt token had been written (the worst case), with a note, and its raw usage is
kept (``usage_json``) so that the row can be re-priced once the field is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._responses import ToolCallTally, cache_write_tokens, web_search_calls

if TYPE_CHECKING:
    from . import CacheTTL, ModelPrice

__all__ = ["Charge", "Extras", "charge"]


@dataclass
class Extras:
    """What a response billed beyond its token counts, as far as it could be read."""

    web_search_calls: int = 0
    cache_write_tokens: int | None = None

    def read_usage(self, raw: Any) -> None:
        if raw is None:
            return
        written = cache_write_tokens(raw)
        if written is not None:
            self.cache_write_tokens = written

    def read_response(self, response: Any) -> None:
        """A chat completion: a parsed body (dict) or the SDK's object."""
        if response is None:
            return
        self.web_search_calls = web_search_calls(response)
        raw = (
            response.get("usage")
            if isinstance(response, dict)
            else getattr(response, "usage", None)
        )
        self.read_usage(raw)

    def read_stream(self, tally: ToolCallTally | None, raw_usage: Any) -> None:
        if tally is not None:
            self.web_search_calls = tally.web_search_calls
        self.read_usage(raw_usage)


@dataclass(frozen=True)
class Charge:
    cost_nanos: int
    fee_nanos: int
    cache_write_tokens: int | None
    note: str | None


def charge(
    price: ModelPrice,
    *,
    prompt: int,
    cached: int,
    completion: int,
    extras: Extras,
    cache_ttl: CacheTTL | None,
    worst: int = 0,
    worst_nanos: int = 0,
    worst_fee_nanos: int = 0,
) -> Charge:
    """The charge of ``prompt``/``cached``/``completion`` billed tokens (read from responses)
    plus ``worst`` bills that could not be read, each charged ``worst_nanos`` (the projection,
    of which ``worst_fee_nanos`` is fees)."""
    note = None
    written = extras.cache_write_tokens
    dearer = cache_ttl is not None and price.write_price(cache_ttl) > price.cache_miss
    if written is None and dearer:
        written = max(prompt - min(cached, prompt), 0)
        if written:
            note = (
                f"the usage did not report cache-write tokens; every uncached prompt token was "
                f"charged at the {cache_ttl} cache-write price (the worst case)"
            )
    fee = price.fee_nanos(extras.web_search_calls)
    cost = price.cost_nanos(
        prompt,
        cached,
        completion,
        cache_write_tokens=written or 0,
        cache_ttl=cache_ttl,
        web_search_calls=extras.web_search_calls,
    )
    return Charge(
        cost_nanos=cost + worst * worst_nanos,
        fee_nanos=fee + worst * worst_fee_nanos,
        cache_write_tokens=written,
        note=note,
    )
