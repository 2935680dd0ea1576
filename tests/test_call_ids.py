"""Call ids are UUIDv7 (RFC 9562): unique, and sorted by when the call was made.

Time-ordered ids land at the end of the ledger's unique index on ``call_id``, not on a random
page of it. Ids of forked processes stay distinct (``random`` is reseeded in the child).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from typing import Any

import pytest

from kimi_budget.ledger import new_call_id


def test_ids_are_uuid7_hex() -> None:
    value = new_call_id()
    assert len(value) == 32 and int(value, 16) >= 0
    parsed = uuid.UUID(value)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    # The first 48 bits are the Unix time in milliseconds.
    assert abs(int(value[:12], 16) - time.time_ns() // 1_000_000) < 60_000


def test_ids_sort_by_creation_time() -> None:
    ids = []
    for _ in range(200):
        ids.append(new_call_id())
        time.sleep(0.0003)  # apart by more than the 1/4096 ms the id resolves
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def _ids(queue: Any) -> None:
    queue.put([new_call_id() for _ in range(2000)])


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_processes_make_distinct_ids() -> None:
    new_call_id()  # the parent's generator is in use before the fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_ids, args=(queue,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    found = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    everything = [i for ids in found for i in ids] + [new_call_id() for _ in range(2000)]
    assert len(set(everything)) == len(everything)
