"""The fallback file: settlements the ledger could not take, kept until a writer merges them.

A billed call must be recorded even when the ledger cannot be written (disk full, locked past
the busy timeout, server down): its settlement is appended to ``<ledger>.fallback.jsonl``
beside the ledger, and the next write to the ledger, by any process, merges it.

The file's rules:

- **Whole lines or nothing.** Each settlement is one JSON line, appended with a single
  ``os.write`` on an ``O_APPEND`` descriptor, so concurrent writers never interleave. A write
  that comes up short (disk full) is an error, logged with the settlement's full text so that
  it can be recorded by hand; it is never reported as saved. A torn line found while merging is
  logged as an error and kept in ``<fallback>.rejected``, never silently dropped.
- **A merge loses nothing.** The merger takes an exclusive ``flock`` on ``<fallback>.lock``,
  renames the file to ``<fallback>.merging`` (lines appended meanwhile start a new file), and
  applies every settlement in ONE ledger transaction; ``.merging`` is removed only after that
  transaction committed. A merge cut short (crash, SIGKILL, Ctrl-C) leaves ``.merging`` in
  place, and the next writer applies it again: settlement is idempotent by ``call_id``, so a
  line applied twice counts once.
- **No symlinks.** Every path (the file, ``.merging``, ``.lock``, ``.rejected``) is opened with
  ``O_NOFOLLOW``; a symlink planted at one of them is refused and logged, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ._records import Settlement

__all__ = ["FallbackFile"]

logger = logging.getLogger("kimi_budget")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RECORD_START = b'{"reservation":'


class FallbackFile:
    """One ledger's fallback file (``path``), and the merge of it."""

    def __init__(self, path: Path, ledger_location: str) -> None:
        self.path = path
        self.ledger_location = ledger_location
        self.merging_path = path.with_name(path.name + ".merging")
        self.lock_path = path.with_name(path.name + ".lock")
        self.rejected_path = path.with_name(path.name + ".rejected")

    # -- writing -----------------------------------------------------------------------------

    def append(self, settlement: Settlement, reason: BaseException) -> bool:
        """Keep a settlement the ledger could not take. True when it was saved whole."""
        line = (settlement.to_json() + "\n").encode("utf-8")
        call_id = settlement.reservation.call_id
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o600)
            try:
                _check_regular(fd, self.path)
                written = os.write(fd, line)
                if written != len(line):
                    # A short write (disk full): end the torn fragment so that it cannot glue
                    # itself to the next writer's line, and say the call was NOT saved.
                    with contextlib.suppress(OSError):
                        os.write(fd, b"\n")
                    raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
            finally:
                os.close(fd)
        except OSError as exc:
            # The call was billed and the caller must still get its answer: say what was lost.
            logger.error(
                "kimi-budget could not record call %s in %s (%s) nor in %s (%s); record it by "
                "hand: %s",
                call_id,
                self.ledger_location,
                reason,
                self.path,
                _why(exc),
                line.decode("utf-8").strip(),
            )
            return False
        logger.warning(
            "kimi-budget could not record call %s in %s (%s); its usage was saved to %s and "
            "will be merged by the next write to the ledger.",
            call_id,
            self.ledger_location,
            reason,
            self.path,
        )
        return True

    # -- merging -----------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether there is anything to merge (two ``lstat`` calls, no file opened)."""
        return os.path.lexists(self.path) or os.path.lexists(self.merging_path)

    @contextlib.contextmanager
    def merging(self) -> Iterator[list[Settlement] | None]:
        """The settlements to merge, under the merge lock; None when another process merges.

        The caller applies them all in one transaction inside the ``with`` block; leaving the
        block normally (committed) removes them, leaving it by an exception keeps them for
        the next writer.
        """
        lock = self._lock()
        if lock is None:
            yield None
            return
        try:
            settlements = self._take()
            yield settlements
            # Committed: these lines are in the ledger now.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.merging_path)
        finally:
            os.close(lock)  # releases the flock

    def merge(self, apply: Callable[[Sequence[Settlement]], int]) -> int:
        """Merge with ``apply`` (one transaction that returns how many it recorded)."""
        merged = 0
        for _ in range(2):  # a leftover .merging first, then the current file
            if not self.pending():
                break
            with self.merging() as settlements:
                if settlements is None:
                    break  # another process is merging right now
                merged += apply(settlements)
        return merged

    def _lock(self) -> int | None:
        import fcntl

        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as exc:
            logger.error("kimi-budget cannot merge %s: %s", self.path, _why(exc))
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _take(self) -> list[Settlement]:
        """Move the file aside (unless a merge cut short left one) and read its lines."""
        if not os.path.lexists(self.merging_path):
            try:
                if not stat.S_ISREG(os.lstat(self.path).st_mode):
                    logger.error(
                        "kimi-budget will not merge %s: it is not a regular file (a symlink?). "
                        "Remove it.",
                        self.path,
                    )
                    return []
                os.replace(self.path, self.merging_path)
            except FileNotFoundError:
                return []
        try:
            fd = os.open(self.merging_path, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error(
                "kimi-budget will not merge %s: %s. Remove it.", self.merging_path, _why(exc)
            )
            return []
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        settlements: list[Settlement] = []
        rejected: list[bytes] = []
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            parsed = _parse(raw)
            if parsed is None:
                rejected.append(raw)
                continue
            settlements.extend(parsed[0])
            if parsed[1]:
                rejected.append(parsed[1])
        if rejected:
            self._reject(rejected)
        return settlements

    def _reject(self, lines: list[bytes]) -> None:
        for raw in lines:
            logger.error(
                "kimi-budget found a torn line in %s (a write cut short); it is not in the "
                "ledger. Kept in %s: %s",
                self.path,
                self.rejected_path,
                raw.decode("utf-8", "replace"),
            )
        try:
            fd = os.open(
                self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o600
            )
            try:
                os.write(fd, b"".join(raw + b"\n" for raw in lines))
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("kimi-budget could not write %s: %s", self.rejected_path, _why(exc))


def _parse(raw: bytes) -> tuple[list[Settlement], bytes] | None:
    """The settlements in one line, and the torn bytes before them (None: nothing whole).

    A torn fragment whose writer could not end it with a newline is followed, on the same
    line, by the next writer's whole record: that record still counts.
    """
    try:
        return [Settlement.from_json(raw.decode("utf-8"))], b""
    except (ValueError, KeyError, TypeError):
        pass
    start = raw.find(_RECORD_START, 1)
    while start != -1:
        try:
            return [Settlement.from_json(raw[start:].decode("utf-8"))], raw[:start]
        except (ValueError, KeyError, TypeError):
            start = raw.find(_RECORD_START, start + 1)
    return None


def _check_regular(fd: int, path: Path) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, f"{path} is not a regular file")


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which kimi-budget never follows"
    return exc.strerror or str(exc)
