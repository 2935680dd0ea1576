"""The background settle writer: settlements leave the caller's path, applied in batches.

A guarded call costs its caller at most ONE synchronous ledger transaction, the reservation
(none when it takes a share of an allotment). How the call ended is handed to this writer
(``submit``): a ``Settlement``, or a ``LateSettlement`` whose bill the writer works out first.
It applies the queued settlements on its own thread, many per transaction, and keeps the
ledger tidy between batches (a WAL checkpoint for SQLite, so that no caller's commit ever pays
for one; allotments given back).

Why the cap still holds: a settlement only ever lowers what a reservation holds (the full
projected cost stays reserved until then), so a check made while settlements wait in the
queue can only be stricter than needed. A caller refused while some of its own settlements
are queued flushes them and checks again. If the process dies with settlements queued, their
reservations stay ``pending`` and expire at their full worst case (the rule on unknown bills).

Reads made by this process flush first (``flush``), as do ``close()`` and interpreter exit, so a
process always reads its own calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ._records import LateSettlement, Settlement, settlement_of

__all__ = ["SettleWriter"]

logger = logging.getLogger("kimi_budget")

# Settlements per transaction: large enough to amortize a commit, small enough that a batch
# holds the ledger's write lock for a few milliseconds at most.
MAX_BATCH = 256
# How long the writer lets settlements gather before it writes them (unless someone waits for
# them: a flush writes at once). Writing each one as it comes made the writer take the ledger's
# lock, and the interpreter's, just as the caller's next reservation wanted them; gathered, a
# sync loop's settlements cost one transaction per a few dozen calls. A settlement waiting here
# only keeps its full reservation a moment longer: checks are stricter, never looser.
LINGER = 0.05


class SettleWriter:
    """A queue of settlements and the daemon thread that applies them.

    ``apply(batch)`` writes a batch in one transaction and raises on failure; ``rescue(batch,
    exc)`` then keeps each settlement elsewhere (the fallback file). ``idle()`` runs on the
    writer thread between batches and when idle (checkpoints); it must not raise.
    """

    def __init__(
        self,
        apply: Callable[[Sequence[Settlement]], None],
        rescue: Callable[[Sequence[Settlement], BaseException], None],
        idle: Callable[[], None] | None = None,
        *,
        idle_every: float = 1.0,
        linger: float = LINGER,
    ) -> None:
        self._apply = apply
        self._rescue = rescue
        self._idle = idle
        self._idle_every = idle_every
        self._linger = linger
        # Re-entrant: a stream's finalizer run by the garbage collector inside ``submit`` (an
        # allocation there) submits too, on the same thread.
        self._cond = threading.Condition(threading.RLock())
        self._queue: list[Settlement | LateSettlement] = []
        self._submitted = 0  # settlements ever queued
        self._done = 0  # of those, settlements applied or rescued
        self._wanted = 0  # settlements someone waits for (a flush): written without lingering
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, settlement: Settlement | LateSettlement) -> None:
        """Queue a settlement; returns at once (a lock taken for microseconds, no I/O)."""
        with self._cond:
            if self._closed:
                closed = True
            else:
                closed = False
                self._queue.append(settlement)
                self._submitted += 1
                if self._thread is None:
                    self._start()
                elif len(self._queue) == 1 or len(self._queue) >= MAX_BATCH:
                    self._cond.notify_all()  # the first of a batch starts the linger
        if closed:
            # After close() (interpreter exit included): write it on the caller's thread.
            self._run([settlement])

    @property
    def submitted(self) -> int:
        """Settlements ever queued (an int read: no lock needed)."""
        return self._submitted

    @property
    def queued(self) -> int:
        """Settlements submitted and not yet written."""
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every settlement submitted so far is written. False on timeout."""
        if self._thread is threading.current_thread():
            return True  # the writer itself (an ``idle`` hook reading the ledger)
        with self._cond:
            target = self._submitted
            if self._done >= target:
                return True
            if self._thread is None or not self._thread.is_alive():
                # No writer (it died, or fork() left this copy without one): write here.
                batch, self._queue = self._queue, []
            else:
                self._wanted = max(self._wanted, target)
                self._cond.notify_all()
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._done < target:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
        self._run(batch)
        return True

    def close(self) -> None:
        """Flush, stop the thread; later submissions are written synchronously."""
        self.flush()
        with self._cond:
            self._closed = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def after_fork(self) -> None:
        """In a forked child: the parent's queue is the parent's to write; no thread here."""
        self._cond = threading.Condition(threading.RLock())
        self._queue = []
        self._submitted = self._done = self._wanted = 0
        self._thread = None

    # -- the writer thread -------------------------------------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="kimi-budget settle writer", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        last_idle = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    waited = self._cond.wait(self._idle_every)
                    if not waited:
                        break  # idle for a while: tidy up below
                if self._closed and not self._queue:
                    return
                if self._queue:
                    self._gather()
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
            if batch:
                self._run(batch)
            now = time.monotonic()
            if self._idle is not None and (not batch or now - last_idle >= self._idle_every):
                last_idle = now
                try:
                    self._idle()
                except Exception:  # pragma: no cover - a checkpoint is an optimization
                    logger.debug("kimi-budget: ledger upkeep failed", exc_info=True)

    def _gather(self) -> None:
        """Let settlements gather for up to ``linger`` seconds (the condition's lock held)."""
        until = time.monotonic() + self._linger
        while (
            not self._closed
            and len(self._queue) < MAX_BATCH
            and self._wanted <= self._done
            and (left := until - time.monotonic()) > 0
        ):
            self._cond.wait(left)

    def _run(self, queued: list[Settlement | LateSettlement]) -> None:
        if not queued:
            return
        # Late settlements are worked out here, before the transaction (no lock held).
        batch = [settlement_of(item) for item in queued]
        try:
            self._apply(batch)
        except BaseException as exc:  # every settlement must end somewhere
            try:
                self._rescue(batch, exc)
            except BaseException:  # pragma: no cover - rescue logs what it cannot keep
                logger.exception("kimi-budget could not keep %d settlements", len(batch))
        finally:
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()
