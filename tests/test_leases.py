"""A reservation's lease never frees budget while the call may still be billed.

A call's reservation carries an expiry (its read timeout plus ``reservation_margin``) so that
a dead process cannot hold budget forever. A call that is alive but slow (``timeout=None``, a
stream the caller pauses) can outlive it: another process then expires it, charging the full
reservation, and the call's real bill replaces that charge when it finally arrives.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

import kimi_budget as kb
from kimi_budget._budget import parse_utc
from kimi_budget.ledger import Reservation
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY

UTC = timezone.utc
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
CAP = Decimal("0.01")


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, stream_chunks=20) as standin:
        yield standin


def lease_seconds(row: dict[str, Any]) -> float:
    return (parse_utc(row["expires_at"]) - parse_utc(row["created_at"])).total_seconds()


@pytest.mark.parametrize(
    "timeout", [None, httpx.Timeout(None), httpx.Timeout(5.0, read=None)], ids=str
)
def test_no_read_timeout_gets_the_sdks_default_lease(
    server: MoonshotStandIn, ledger_path: Path, timeout: Any
) -> None:
    client = kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        timeout=timeout,
        reservation_margin=60,
    )
    stream = client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
    )
    [row] = client.ledger.pending()
    # No bound to wait on: the SDK's own default read timeout (600 s) plus the margin. The
    # lease is renewed while chunks flow; past it, expiry charges the whole reservation.
    assert lease_seconds(row) == pytest.approx(660, abs=1)
    stream.close()


def probe(ledger: kb.Ledger, nanos: int, name: str) -> Reservation:
    now = ledger.clock()
    return Reservation(
        call_id=name,
        model="kimi-k2.5",
        tags={},
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        projected_nanos=nanos,
        prompt_estimate=0,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )


def test_a_stream_paused_past_its_lease_keeps_its_room_and_settles_late(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    budget = kb.Budget(total=CAP)
    client = kb.OpenAI(
        api_key=KEY, base_url=server.base_url, ledger=kb.Ledger(ledger_path), budget=budget
    )
    stream = client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
    )
    [pending] = client.ledger.pending()
    projected = pending["projected_nanos"]

    # Another process, an hour later by its clock: the paused call's lease is over.
    later = kb.Ledger(ledger_path, clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    later.expire_stale()  # (opening it may already have)
    [row] = later.calls(1)
    assert row["status"] == "expired" and row["estimated"] == 1
    assert row["cost_nanos"] == projected  # the worst case, not the prompt alone
    # The room stays taken: exactly what is left can be reserved, not a nano more.
    left = int(CAP * 10**9) - projected
    with pytest.raises(kb.BudgetExceededError):
        later.reserve(probe(later, left + 1, "too-much"), [budget])

    # The caller comes back and reads the stream: its real bill replaces the estimate.
    chunks = list(stream)
    assert chunks
    [row] = [r for r in later.calls(5) if r["call_id"] == pending["call_id"]]
    billed = server.chat_requests[-1].usage
    assert billed is not None
    assert row["status"] == "ok" and row["estimated"] == 0
    assert row["completion_tokens"] == billed["completion_tokens"]
    assert row["cost_nanos"] < projected
    assert later.spend() * 10**9 == row["cost_nanos"]
    later.reserve(probe(later, int(CAP * 10**9) - row["cost_nanos"], "fits-now"), [budget])
    later.close()


PAUSER = textwrap.dedent(
    """
    import sys
    import kimi_budget as kb

    base_url, ledger = sys.argv[1:3]
    client = kb.OpenAI(api_key="{key}", base_url=base_url, ledger=ledger,
                       budget=kb.Budget(total="{cap}"), timeout=0.5, reservation_margin=0)
    stream = client.chat.completions.create(
        model="kimi-k2.5", messages=[{{"role": "user", "content": "hi"}}], max_tokens=50,
        stream=True)
    it = iter(stream)
    next(it)
    print("PAUSED", flush=True)
    sys.stdin.readline()  # paused far past its half-second lease, until the parent says go
    for _ in it:
        pass
    print("DONE", flush=True)
    """
).format(key=KEY, cap=CAP)


def test_two_processes_one_pausing_past_its_lease(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    kb.Ledger(ledger_path).close()
    pauser = subprocess.Popen(
        [sys.executable, "-c", PAUSER, server.base_url, str(ledger_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert pauser.stdout is not None and pauser.stdin is not None
    assert pauser.stdout.readline().strip() == "PAUSED"
    budget = kb.Budget(total=CAP)
    # This process's clock runs a minute ahead: the pauser's lease has run out here.
    other = kb.Ledger(ledger_path, clock=lambda: datetime.now(UTC) + timedelta(minutes=1))
    [row] = other.calls(1)
    projected = row["projected_nanos"]
    with pytest.raises(kb.BudgetExceededError):
        other.reserve(probe(other, int(CAP * 10**9) - projected + 1, "over"), [budget])
    [row] = other.calls(5)
    assert row["status"] == "expired" and row["cost_nanos"] == projected
    pauser.stdin.write("go\n")
    pauser.stdin.flush()
    out, err = pauser.communicate(timeout=60)
    assert pauser.returncode == 0 and "DONE" in out, err[-2000:]
    [row] = [r for r in other.calls(5) if r["call_id"] == row["call_id"]]
    billed = server.chat_requests[-1].usage
    assert billed is not None
    assert row["status"] == "ok" and row["estimated"] == 0
    assert row["completion_tokens"] == billed["completion_tokens"]
    assert other.spend() * 10**9 == row["cost_nanos"] <= projected
    other.close()


def _watch_renewals(ledger: kb.Ledger, hold: threading.Event | None = None) -> list[dict[str, Any]]:
    """Record each lease renewal (``Ledger.extend``): its thread, and whether ``hold`` (when
    given) was set while the renewal waited for it."""
    renewals: list[dict[str, Any]] = []
    extend = ledger.extend

    def watched(call_id: str, expires_at: datetime) -> None:
        seen: dict[str, Any] = {"thread": threading.get_ident()}
        renewals.append(seen)
        if hold is not None:
            seen["started"] = True
            seen["released"] = hold.wait(5)  # set by a task on the event loop
            hold.set()  # a blocked loop fails the test once, not at every renewal
        extend(call_id, expires_at)

    ledger.extend = watched  # type: ignore[method-assign]
    return renewals


def _one_second_lease(cls: Any, server: MoonshotStandIn, ledger_path: Path) -> Any:
    """A client whose leases last one second (read timeout 1 s, no margin): renewed every
    half second while a stream flows."""
    return cls(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        timeout=1.0,
        reservation_margin=0,
    )


def test_a_flowing_stream_renews_its_lease(ledger_path: Path) -> None:
    # A one-second lease (read timeout 1 s, no margin) is renewed every half second; twenty
    # chunks 50 ms apart take at least a second to arrive.
    with MoonshotStandIn(api_key=KEY, stream_chunks=20, chunk_delay=0.05) as server:
        client = _one_second_lease(kb.OpenAI, server, ledger_path)
        renewals = _watch_renewals(client.ledger)
        stream = client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
        )
        [first] = client.ledger.pending()
        for _chunk in stream:
            if renewals:
                [renewed] = client.ledger.pending()
                assert parse_utc(renewed["expires_at"]) > parse_utc(first["expires_at"])
                break
        stream.close()
    assert renewals and all(r["thread"] == threading.get_ident() for r in renewals)


def test_an_async_stream_renews_its_lease_off_the_event_loop(ledger_path: Path) -> None:
    hold = threading.Event()

    async def main() -> tuple[list[dict[str, Any]], int]:
        with MoonshotStandIn(api_key=KEY, stream_chunks=20, chunk_delay=0.05) as server:
            client = _one_second_lease(kb.AsyncOpenAI, server, ledger_path)
            renewals = _watch_renewals(client.ledger, hold)

            async def ticker() -> None:
                # Runs only if the loop is free while a renewal waits.
                while not any(r.get("started") for r in renewals):
                    await asyncio.sleep(0.01)
                hold.set()

            tick = asyncio.ensure_future(ticker())
            stream = await client.chat.completions.create(
                model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
            )
            async for _chunk in stream:
                pass
            await tick
            await client.close()
            return renewals, threading.get_ident()

    renewals, loop_thread = asyncio.run(main())
    assert renewals
    assert all(r["thread"] != loop_thread for r in renewals)
    # The loop kept running while the first renewal waited on it.
    assert renewals[0]["released"] is True
