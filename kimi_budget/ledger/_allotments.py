"""Allotments: budget a process reserves for several calls in one transaction (SQLite).

A guarded call's own reservation is a ledger transaction before the call is sent, and between
two HTTP round trips that transaction was half of what the guard added to a small call. A
process that makes calls back to back reserves instead, in the transaction of a call that found
no room, an *allotment*: room for up to ``CALLS`` more calls like that one, and never more than
an eighth of what its tightest cap has left. Its next calls take their share of it in memory.
Only a call whose budgets, tags and currency are those of the call before it reserves one (a
process that tags each call differently reserves each call alone, as before).

Why the cap still holds. An allotment is a reservation like any other: a row of
``reservations`` (model ``(allotment)``) whose amount is in every window total its tags touch,
so every process sees all of it reserved until it is given back. A call takes a share only if
the share fits in what is left, for the same budgets, tags and currency, inside the windows the
allotment was reserved in (it is valid until the first of them ends) and before it could
expire. Near a cap allotments shrink with the room left; a call that finds none reserves alone.

Why nothing is lost. Before a call is sent, its reservation is appended to the allotment's
journal, ``<ledger>.allotment-<id>.jsonl`` beside the ledger: one line, one ``os.write``, kept by
the kernel if the process dies. A settlement moves the call's share out of the allotment and
into its row. If the process dies, its allotment expires like any reservation, and whoever
expires it reads the journal: each call there that never settled is charged its full
reservation (one estimated row each), and the unused rest is given back. A journal that cannot
be read costs the whole rest, as one estimated row: uncertainty costs the budget, never the
wallet.

When an allotment is given back: after it ran out or its window ended, after ``IDLE`` seconds
unused, and whenever this process flushes (its own reads, a refusal, ``close()``, exit). Its
unused rest is released then; its row and journal go once none of its calls is in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .._budget import Budget
from ._backend import expired_settlement
from ._records import Reservation, Settlement, new_call_id
from ._windows import Scope

__all__ = [
    "CALLS",
    "MODEL",
    "Allotment",
    "Allotments",
    "is_allotment",
    "journal_path",
    "lost_journal_settlement",
    "read_journal",
    "size",
]

logger = logging.getLogger("kimi_budget")

# Room for this many calls like the one that reserved it: a transaction per this many calls.
CALLS = 32
# An allotment never takes more than 1/SHARE of the room its tightest cap has left, so that
# processes sharing a cap leave each other room, and allotments shrink as the cap nears.
SHARE = 8
# An allotment outlives the reservation of the call that made it by this much; calls take
# shares only while their own reservation would expire before it does.
SPAN = timedelta(seconds=2)
# Unused this long (seconds), an allotment is given back by the writer thread.
IDLE = 1.0
MODEL = "(allotment)"
_PREFIX = "allotment-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def is_allotment(call_id: str) -> bool:
    return call_id.startswith(_PREFIX)


def size(projected: int, room: int | None) -> int:
    """How much to allot beside a call projected at ``projected``, given the ``room`` its
    tightest cap has left after it (None: no window cap). 0: none (not even one more call)."""
    amount = CALLS * projected
    if room is not None:
        amount = min(amount, room // SHARE)
    return amount if amount >= projected > 0 else 0


def journal_path(ledger: Path, allotment_id: str) -> Path:
    return ledger.with_name(f"{ledger.name}.{allotment_id}.jsonl")


def read_journal(path: Path) -> list[list[Any]] | None:
    """The calls a journal lists (each as the row ``line()`` wrote), or None if it cannot be
    read whole (missing, unreadable, a line torn): then nothing in it can be trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("kimi-budget cannot read the allotment journal %s: %s", path, exc)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    calls: list[list[Any]] = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, list):
            logger.error("kimi-budget found a torn line in the allotment journal %s", path)
            return None
        calls.append(row)
    return calls


@dataclass(eq=False, slots=True)
class Allotment:
    """One allotment this process holds (its row is ``reservation``)."""

    reservation: Reservation
    # The budgets it was checked against, kept alive: their ids in its key stay theirs.
    budgets: tuple[Budget, ...]
    # The budget scopes its windows were chosen among (the ledger's cached list).
    scopes: Sequence[Scope]
    valid_until: datetime | None  # the end of the first window it was reserved in
    journal: Path
    fd: int
    rest: int  # not handed out yet
    in_flight: int = 0  # shares handed out whose settlements are not written yet
    open: bool = True  # still hands out shares
    used_at: float = 0.0  # time.monotonic() of the last share

    @property
    def id(self) -> str:
        return self.reservation.call_id


_Key = tuple[str, tuple[tuple[str, str], ...], tuple[int, ...]]


class Allotments:
    """The allotments of one ``SQLiteLedger`` object, in memory.

    ``line(reservation)`` is a call's journal line (the ledger owns the format).
    """

    def __init__(self, ledger: Path, line: Callable[[Reservation], bytes]) -> None:
        self._ledger = ledger
        self._line = line
        self._lock = threading.Lock()
        self._open: dict[_Key, Allotment] = {}
        self._held: dict[str, Allotment] = {}  # every allotment not given back, by id
        self._last: _Key | None = None  # the key of the last call that reserved alone

    @property
    def held(self) -> bool:
        """Whether any allotment is held (not given back yet)."""
        return bool(self._held)

    @staticmethod
    def _key(reservation: Reservation, budgets: Sequence[Budget]) -> _Key:
        return (
            reservation.currency,
            tuple(reservation.tags.items()),
            tuple(map(id, budgets)),
        )

    def wanted(self, reservation: Reservation, budgets: Sequence[Budget]) -> bool:
        """Whether a call that found no share should reserve an allotment beside it: only
        when the call before it had the same budgets, tags and currency. Calls whose tags
        differ each time (a request id as a tag) never share one, and reserve alone."""
        key = self._key(reservation, budgets)
        repeated, self._last = key == self._last, key
        return repeated

    def take(
        self, reservation: Reservation, budgets: Sequence[Budget], scopes: Sequence[Scope]
    ) -> Reservation | None:
        """The reservation as a share of an open allotment, journaled; None if none fits.

        ``scopes``: the ledger's budget scopes as last read. A scope registered since the
        allotment was made (by another process) may have a window that ends sooner.
        """
        if not self._open:
            return None
        key = self._key(reservation, budgets)
        with self._lock:
            allotment = self._open.get(key)
            if allotment is None:
                return None
            held = allotment.reservation
            if not (
                held.created_at <= reservation.created_at
                and (
                    allotment.valid_until is None or reservation.created_at < allotment.valid_until
                )
                and reservation.expires_at <= held.expires_at
                and reservation.projected_nanos <= allotment.rest
                and allotment.scopes is scopes
            ):
                self._close(allotment)  # spent, or outside its windows: a new one is made
                return None
            share = replace(reservation, allotment_id=allotment.id)
            line = self._line(share)
            why: OSError | None = None
            try:
                written = os.write(allotment.fd, line)
            except OSError as exc:
                written, why = -1, exc
            if written != len(line):
                # Not journaled whole: this call reserves alone, and so do the next ones.
                logger.info(
                    "kimi-budget stopped using allotment %s: its journal %s could not be "
                    "written (%s)",
                    allotment.id,
                    allotment.journal,
                    why or "a short write",
                )
                self._close(allotment)
                if written > 0:
                    with contextlib.suppress(OSError):
                        os.write(allotment.fd, b"\n")  # ends the torn line: the journal is void
                return None
            allotment.rest -= reservation.projected_nanos
            allotment.in_flight += 1
            allotment.used_at = time.monotonic()
            return share

    def start(
        self,
        reservation: Reservation,
        budgets: Sequence[Budget],
        scopes: Sequence[Scope],
        amount: int,
        valid_until: datetime | None,
    ) -> Allotment | None:
        """A new allotment beside ``reservation`` (its journal created; its row is the
        caller's to insert, then ``add`` it after the commit or ``discard`` it)."""
        allotment_id = _PREFIX + new_call_id()
        path = journal_path(self._ledger, allotment_id)
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600
            )
        except OSError as exc:
            logger.info("kimi-budget reserves calls one by one: cannot create %s (%s)", path, exc)
            return None
        row = Reservation(
            call_id=allotment_id,
            model=MODEL,
            tags=reservation.tags,
            created_at=reservation.created_at,
            expires_at=reservation.expires_at + SPAN,
            projected_nanos=amount,
            prompt_estimate=0,
            price_cache_hit=0,
            price_cache_miss=0,
            price_output=0,
            currency=reservation.currency,
        )
        return Allotment(row, tuple(budgets), scopes, valid_until, path, fd, rest=amount)

    def add(self, allotment: Allotment, budgets: Sequence[Budget]) -> None:
        """Hand out shares of ``allotment`` (its row is committed)."""
        with self._lock:
            allotment.used_at = time.monotonic()
            key = self._key(allotment.reservation, budgets)
            old = self._open.get(key)
            if old is not None:
                self._close(old)
            self._open[key] = allotment
            self._held[allotment.id] = allotment

    def discard(self, allotment: Allotment) -> None:
        """Forget an allotment whose row was never committed."""
        os.close(allotment.fd)
        with contextlib.suppress(OSError):
            os.unlink(allotment.journal)

    def settled(self, allotment_ids: Sequence[str | None]) -> None:
        """Shares whose settlements are now written (or kept in the fallback file)."""
        if not self._held:
            return
        with self._lock:
            for allotment_id in allotment_ids:
                if allotment_id is not None and (found := self._held.get(allotment_id)):
                    found.in_flight -= 1

    def to_give_back(self, *, idle: float | None = IDLE) -> list[Allotment]:
        """Allotments that are closed, or unused for ``idle`` seconds (None: all of them),
        with room to release or no share in flight; they hand out nothing more."""
        if not self._held:
            return []
        now = time.monotonic()
        with self._lock:
            done = [
                a
                for a in self._held.values()
                if (not a.open or idle is None or now - a.used_at >= idle)
                and (a.rest > 0 or a.in_flight <= 0)
            ]
            for allotment in done:
                self._close(allotment)
            return done

    def given_back(self, allotment: Allotment) -> None:
        """``allotment``'s row is gone (committed): drop its journal."""
        with self._lock:
            self._held.pop(allotment.id, None)
        with contextlib.suppress(OSError):
            os.close(allotment.fd)
        with contextlib.suppress(OSError):
            os.unlink(allotment.journal)

    def after_fork(self) -> None:
        """In a forked child: the parent's allotments are the parent's."""
        for allotment in self._held.values():
            with contextlib.suppress(OSError):
                os.close(allotment.fd)
        self._lock = threading.Lock()
        self._open = {}
        self._held = {}

    def _close(self, allotment: Allotment) -> None:
        allotment.open = False
        for key, found in list(self._open.items()):
            if found is allotment:
                del self._open[key]


def lost_journal_settlement(allotment: Reservation, now: datetime) -> Settlement:
    """An expired allotment whose journal cannot be read: nobody knows which calls it had in
    flight, so all that it still holds is charged, flagged as estimated (as any reservation
    that outlived its expiry is, by ``expired_settlement``)."""
    return replace(
        expired_settlement(allotment, 0, now),
        prompt_tokens=None,
        note=(
            "the process holding this allotment ended without giving it back, and its journal "
            "of calls is lost: all it still held is charged as spent"
        ),
    )
