"""An abandoned stream freed by the garbage collector is billed and never deadlocks the caller.

The SDK's ``Stream`` is a reference cycle (it holds its own generator), so a stream the caller
drops without closing is freed by the garbage collector, at whatever allocation triggers a
collection. That can be inside httpx's connection pool, under the pool's lock, while the next
request is being sent; closing the dropped body takes that lock again. A thread waiting for a
lock it holds itself waits forever: this hung a test run until CI's limit.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import kimi_budget as kb
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

MESSAGES = [{"role": "user", "content": "hello"}]


class _CollectingPoolLock:
    """The connection pool's lock, with a garbage collection each time it is taken (one can
    start at any allocation), and a record of a holder taking it again (the deadlock)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.owner: int | None = None
        self.taken_again_by_its_holder = 0
        self.collections = 0

    def __enter__(self) -> _CollectingPoolLock:
        if self.owner == threading.get_ident():
            self.taken_again_by_its_holder += 1
            # Raising here (instead of waiting forever) lets the run end and say so.
            raise RuntimeError("the pool lock was taken again by the thread holding it")
        self.inner.__enter__()
        self.owner = threading.get_ident()
        self.collections += 1
        gc.collect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self.inner.__exit__(*exc)


def test_a_stream_collected_inside_the_connection_pool_is_billed_without_deadlock(
    ledger_path: Path,
) -> None:
    with MoonshotStandIn(api_key=KEY, stream_chunks=20) as server:
        client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path, max_retries=0)
        pool = client._client._transport._pool
        lock = pool._optional_thread_lock = _CollectingPoolLock(pool._optional_thread_lock)
        gc.collect()
        gc.disable()  # from here on, collections happen inside the pool lock only
        try:
            for _ in range(3):
                for _chunk in client.chat.completions.create(
                    model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
                ):
                    break  # dropped without close(): a cycle the collector frees later
            # The next request takes the pool lock; the collection inside frees the streams.
            client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=50)
        finally:
            gc.enable()
        client.close()
        assert lock.collections > 0
        assert lock.taken_again_by_its_holder == 0
        assert len(server.chat_requests) == 4
    rows = client.ledger.calls(10)
    assert len(rows) == 4
    dropped = [row for row in rows if row["status"] == "abandoned"]
    # Each dropped stream: its bill unknown, so charged its full reservation.
    assert len(dropped) == 3
    assert all(row["estimated"] and row["cost_nanos"] == row["projected_nanos"] for row in dropped)
