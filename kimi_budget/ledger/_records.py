"""What the ledger stores: a call's reservation, its settlement, and a cap's status.

These are the only types that cross between the client and a ledger backend; a settlement
carries its reservation so that a line of the fallback file stands alone.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal

from .._budget import format_utc, parse_utc

__all__ = [
    "CURRENCIES",
    "STATUSES",
    "LateSettlement",
    "Reservation",
    "Settlement",
    "WindowStatus",
    "new_call_id",
    "settlement_of",
]

logger = logging.getLogger("kimi_budget")

CURRENCIES = ("USD", "CNY")
# "pending" is a reservation in flight; every other status is a settled call.
STATUSES = ("pending", "ok", "error", "abandoned", "interrupted", "cancelled", "expired")


@dataclass(frozen=True, slots=True)
class Reservation:
    """What is known of a call before it is sent.

    Prices are nano-units (1e-9 of ``currency``) per token, as the call will be charged.
    ``projected_nanos`` is the worst case: what the call costs if it is billed in full.
    """

    call_id: str
    model: str
    tags: Mapping[str, str]
    created_at: datetime
    expires_at: datetime
    projected_nanos: int
    prompt_estimate: int
    price_cache_hit: int
    price_cache_miss: int
    price_output: int
    stream: bool = False
    currency: str = "USD"
    # The allotment this call's budget is a share of (see ``_allotments``), if any.
    allotment_id: str | None = None

    @property
    def held_by(self) -> str:
        """The ``reservations`` row that holds this call's budget: its own, or its allotment."""
        return self.allotment_id or self.call_id


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a call ended.

    ``cost_nanos`` is always the total charged, fees included; ``fee_nanos`` is the part of it
    that is not tokens (``$web_search`` calls, ...), shown apart in reports. When ``estimated``
    is true the bill was not read and ``note`` says why.
    """

    reservation: Reservation
    status: str
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    cost_nanos: int
    estimated: bool
    attempts: int
    finished_at: datetime
    request_id: str | None = None
    latency_ms: int | None = None
    error: str | None = None
    note: str | None = None
    fee_nanos: int = 0
    cache_write_tokens: int | None = None
    usage_json: str | None = None  # the raw usage object as received, secrets redacted

    def to_json(self) -> str:
        data = asdict(self)
        data["finished_at"] = format_utc(self.finished_at)
        res = data["reservation"]
        res["created_at"] = format_utc(self.reservation.created_at)
        res["expires_at"] = format_utc(self.reservation.expires_at)
        res["tags"] = dict(self.reservation.tags)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Settlement:
        """The settlement of one fallback line (lines of older versions lack the new fields)."""
        data = json.loads(line)
        res = data.pop("reservation")
        res["created_at"] = parse_utc(res["created_at"])
        res["expires_at"] = parse_utc(res["expires_at"])
        data["finished_at"] = parse_utc(data["finished_at"])
        return cls(reservation=Reservation(**res), **data)


@dataclass(frozen=True, slots=True)
class LateSettlement:
    """How a call ended, to be worked out where it is written: the guard hands the ledger
    this instead of a ``Settlement`` so that reading the bill (usage, cache writes, fees) and
    building the row happen on the background writer, off the caller's path. The reservation
    holds the call's worst case until then, as for any queued settlement."""

    reservation: Reservation
    build: Callable[[], Settlement]


def settlement_of(item: Settlement | LateSettlement) -> Settlement:
    """``item`` as a ``Settlement``. A late one whose bill cannot be worked out (a bug of
    ours, never the caller's) is charged its full reservation, flagged as estimated."""
    if isinstance(item, Settlement):
        return item
    try:
        return item.build()
    except Exception as exc:
        from ._backend import expired_settlement  # (it imports this module)

        res = item.reservation
        logger.error(
            "kimi-budget could not read the bill of call %s (%s: %s); it is charged its full "
            "reservation",
            res.call_id,
            type(exc).__name__,
            exc,
        )
        return replace(
            expired_settlement(res, 1, datetime.now(timezone.utc)),
            status="ok",
            prompt_tokens=None,
            note=f"kimi-budget could not read the bill ({type(exc).__name__}); charged the "
            "full reservation",
        )


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """One cap of a budget as it stands now (amounts in the budget's currency)."""

    window: str
    limit_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    start: datetime | None
    resets_at: datetime | None
    scope: dict[str, str] = field(default_factory=dict)
    tz: str = "UTC"

    @property
    def remaining_usd(self) -> Decimal:
        return max(self.limit_usd - self.spent_usd - self.reserved_usd, Decimal(0))


def new_call_id() -> str:
    """A new call id: a UUIDv7 as 32 hex digits, so ids sort by creation time.

    48 bits of Unix milliseconds, 12 bits of the sub-millisecond fraction (RFC 9562, method 3),
    and 62 random bits. Each new row then lands at the end of the ledger's unique index on
    ``call_id`` instead of on a random page of it; ids stay unique across processes and
    machines (``random`` is reseeded in a forked child).
    """
    ns = time.time_ns()
    ms, rest = divmod(ns, 1_000_000)
    fraction = rest * 4096 // 1_000_000
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | fraction << 64
        | 0b10 << 62
        | random.getrandbits(62)
    )
    return f"{value:032x}"
