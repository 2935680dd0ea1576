"""The fallback file: settlements the ledger could not take, kept until a writer merges them.

A billed call must be recorded even when the ledger cannot be written (disk full, locked past
the busy timeout, server down): its settlement is appended, as one JSON line, to
``<ledger>.fallback.jsonl`` beside the ledger (or the local file a server ledger names), and
merged into the ledger later. Merging is idempotent (settlement is by ``call_id``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ._records import Settlement

__all__ = ["FallbackFile"]


class FallbackFile:
    """One ledger's fallback file."""

    def __init__(self, path: Path, ledger_location: str) -> None:
        self.path = path
        self.ledger_location = ledger_location

    def append(self, settlement: Settlement, reason: BaseException) -> None:
        """Keep a settlement the ledger could not take; it is merged on the next open."""
        line = settlement.to_json() + "\n"
        try:
            # O_NOFOLLOW: a symlink planted at the fallback path must not make us append to
            # whatever file it points at.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(self.path, flags, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as exc:
            # The call was billed and the caller must still get its answer: say what was lost.
            warnings.warn(
                f"kimi-budget could not record call {settlement.reservation.call_id} in "
                f"{self.ledger_location} ({reason}) nor in {self.path} "
                f"({exc.strerror or exc}); record it by hand: {line.strip()}",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        warnings.warn(
            f"kimi-budget could not record call {settlement.reservation.call_id} in "
            f"{self.ledger_location} ({reason}); its usage was saved to {self.path} and will "
            f"be merged the next time the ledger opens.",
            RuntimeWarning,
            stacklevel=4,
        )

    def merge(self, apply: Callable[[Sequence[Settlement]], int]) -> int:
        """Hand the file's settlements to ``apply`` (one transaction); how many it took."""
        if not self.path.exists():
            return 0
        # Rename first, so that lines appended while merging go to a new file.
        merging = self.path.with_name(
            f"{self.path.name}.merging-{os.getpid()}-{threading.get_ident()}"
        )
        try:
            os.replace(self.path, merging)
        except FileNotFoundError:
            return 0
        try:
            settlements = []
            for line in merging.read_text("utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    settlements.append(Settlement.from_json(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash mid-write; the rest still count
            merged = apply(settlements)
        except BaseException:
            # Whatever failed (LedgerError, an interrupt): put the lines back for the next open
            # rather than lose them.
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(merging.read_text("utf-8"))
            merging.unlink()
            raise
        merging.unlink()
        return merged
