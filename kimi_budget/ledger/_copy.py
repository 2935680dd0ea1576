"""Copy a ledger's calls into another ledger, of either backend (``kimi-budget ledger copy``).

Idempotent, keyed on ``call_id``: a call already in the destination is left as it is (unless
the destination only holds its reservation or its expiry estimate, which the source's real
outcome then settles, exactly as a late settlement would), so running a copy twice doubles
nothing. Rows go through the destination's own settle and reserve paths, in batches, so its
window totals stay exact; settled calls keep their outcome, costs and flags, reservations in
flight stay reservations (they expire in the destination if nobody settles them). An allotment
(room a running process reserved for its next calls, see ``_allotments``) is not a call and is
not copied; its calls are, once they have settled (run the copy again after the workers stop).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._budget import parse_utc
from ._allotments import is_allotment
from ._backend import Ledger
from ._records import Reservation, Settlement

__all__ = ["CopyResult", "copy_ledger", "ledger_rows"]

BATCH = 1000


@dataclass
class CopyResult:
    """What a copy did: calls read from the source, written to the destination, skipped."""

    read: int = 0
    copied: int = 0
    already_there: int = 0
    pending: int = 0  # reservations in flight copied as reservations

    def to_json(self) -> dict[str, int]:
        return {
            "read": self.read,
            "copied": self.copied,
            "already_there": self.already_there,
            "pending": self.pending,
        }


def ledger_rows(ledger: Ledger) -> Iterator[dict[str, Any]]:
    """Every call of ``ledger`` in insertion order, as SQLite shapes a row of ``calls``."""
    every = getattr(ledger, "all_calls", None)
    if every is not None:
        yield from every()
        return
    conn: sqlite3.Connection = ledger.conn  # type: ignore[attr-defined]
    last = 0
    while True:
        cursor = conn.execute(
            "SELECT * FROM calls WHERE id > ? ORDER BY id LIMIT ?", (last, BATCH * 5)
        )
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        if not rows:
            return
        yield from rows
        last = rows[-1]["id"]


def _reservation(row: Mapping[str, Any]) -> Reservation:
    created = parse_utc(row["created_at"])
    expires: datetime = parse_utc(row["expires_at"]) if row.get("expires_at") else created
    tags = row["tags"]
    return Reservation(
        call_id=row["call_id"],
        model=row["model"],
        tags=json.loads(tags) if isinstance(tags, str) else dict(tags),
        created_at=created,
        expires_at=expires,
        projected_nanos=int(row["projected_nanos"]),
        prompt_estimate=int(row["prompt_estimate"]),
        price_cache_hit=int(row["price_cache_hit"]),
        price_cache_miss=int(row["price_cache_miss"]),
        price_output=int(row["price_output"]),
        stream=bool(row["stream"]),
        currency=row.get("currency") or "USD",
    )


def _settlement(row: Mapping[str, Any]) -> Settlement:
    finished = row.get("finished_at")
    return Settlement(
        reservation=_reservation(row),
        status=row["status"],
        prompt_tokens=row["prompt_tokens"],
        cached_tokens=row["cached_tokens"],
        completion_tokens=row["completion_tokens"],
        cost_nanos=int(row["cost_nanos"]),
        estimated=bool(row["estimated"]),
        attempts=int(row["attempts"]),
        finished_at=parse_utc(finished) if finished else parse_utc(row["created_at"]),
        request_id=row.get("request_id"),
        latency_ms=row.get("latency_ms"),
        error=row.get("error"),
        note=row.get("note"),
        fee_nanos=int(row.get("fee_nanos") or 0),
        cache_write_tokens=row.get("cache_write_tokens"),
        usage_json=row.get("usage_json"),
    )


def count_calls(ledger: Ledger) -> int | None:
    """How many calls ``ledger`` holds (for a progress bar), or None if it cannot say cheaply."""
    counter = getattr(ledger, "count_calls", None)
    if counter is not None:
        return int(counter())
    conn = getattr(ledger, "conn", None)
    if not isinstance(conn, sqlite3.Connection):
        return None
    return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])


def copy_ledger(
    source: Ledger, destination: Ledger, *, step: Callable[[int], None] | None = None
) -> CopyResult:
    """Copy every call of ``source`` into ``destination`` (see the module doc).

    ``step(1)`` is called for each call read, for a progress bar.
    """
    result = CopyResult()
    batch: list[Settlement] = []

    def flush() -> None:
        if batch:
            written = destination._settle_all(batch)  # type: ignore[attr-defined]
            result.copied += written
            result.already_there += len(batch) - written
            batch.clear()

    for row in ledger_rows(source):
        if row["status"] == "pending" and is_allotment(row["call_id"]):
            continue  # its journal stays with the source; its calls are copied once settled
        result.read += 1
        if step is not None:
            step(1)
        if row["status"] == "pending":
            flush()
            reservation = _reservation(row)
            if _has_call(destination, reservation.call_id):
                result.already_there += 1
            else:
                destination.reserve(reservation, ())
                result.copied += 1
                result.pending += 1
            continue
        batch.append(_settlement(row))
        if len(batch) >= BATCH:
            flush()
    flush()
    return result


def _has_call(ledger: Ledger, call_id: str) -> bool:
    finder = getattr(ledger, "has_call", None)
    if finder is not None:
        return bool(finder(call_id))
    conn: sqlite3.Connection = ledger.conn  # type: ignore[attr-defined]
    return conn.execute("SELECT 1 FROM calls WHERE call_id = ?", (call_id,)).fetchone() is not None
