"""Uncertainty costs the budget, never the wallet: the cap holds when the bill is unknown.

Every test here runs a loop of one kind of failure (a stream closed after one chunk, a read
timeout after sending, a response without usage, ...) against the loopback stand-in, under a
small daily cap, until kimi-budget refuses. Then it compares what the stand-in would bill
(``would_bill``: it knows what it generated, whether or not the client saw the usage) with the
cap. A guard that charged "the prompt plus the chunks seen" lets such a loop run on while the
server bills every call in full; these tests fail on it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import kimi_budget as kb
from kimi_budget.testing import Fault, MoonshotStandIn
from tests.conftest import KEY
from tests.python_processes import PythonProcess

MODEL = "kimi-k2.5"
MAX_TOKENS = 200
CAP = Decimal("0.005")  # room for about eight calls of MAX_TOKENS at their worst case
# A reply long enough that every call generates (and is billed) MAX_TOKENS in full.
LONG_REPLY = "The quick brown fox jumps over the lazy dog. " * 60
LOOPS = 40  # well past the cap: a guard that undercounts lets all of them through
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, reply=LONG_REPLY) as standin:
        yield standin


def billed_nanos(server: MoonshotStandIn, ledger: kb.Ledger) -> int:
    """What the stand-in would bill for every chat request it received, at our prices."""
    from kimi_budget.pricing import PriceTable

    prices = PriceTable.load()
    total = 0
    for request in server.chat_requests:
        if request.usage is None or request.model is None:
            continue
        price = prices.get(request.model)
        total += price.cost_nanos(
            request.usage["prompt_tokens"],
            request.usage["cached_tokens"],
            request.usage["completion_tokens"],
        )
    return total


def cap_nanos() -> int:
    return int(CAP * 10**9)


def guarded(server: MoonshotStandIn, ledger: Path, **kwargs: Any) -> kb.OpenAI:
    return kb.OpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger,
        budget=kb.Budget(daily=CAP),
        max_retries=0,
        **kwargs,
    )


def run_until_refused(action: Callable[[int], None]) -> int:
    """Run ``action`` until the budget refuses; the number of calls it let through."""
    for number in range(LOOPS):
        try:
            action(number)
        except kb.BudgetExceededError:
            return number
    return LOOPS


def wait_for_the_server(server: MoonshotStandIn) -> None:
    """Until every chat request has been answered (or found its client gone): a request the
    client gave up on is still billed when the server finishes it."""
    for _ in range(1000):
        if all(r.status or r.dropped or r.usage is not None for r in server.chat_requests):
            return
        time.sleep(0.01)


def assert_cap_held(
    server: MoonshotStandIn, client: Any, let_through: int, *, billed_some: bool = True
) -> None:
    wait_for_the_server(server)
    billed = billed_nanos(server, client.ledger)
    assert let_through < LOOPS, "the budget never refused"
    if billed_some:
        assert billed > 0, "the failure never reached the server: the test would prove nothing"
    assert billed <= cap_nanos(), f"the server billed {billed} nanos over a cap of {cap_nanos()}"
    # The ledger never counts less than the server billed.
    assert client.ledger.spend() >= Decimal(billed) / 10**9
    assert client.ledger.pending() == []


def create(client: kb.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **kwargs
    )


def only_row(client: kb.OpenAI) -> dict[str, Any]:
    [row] = client.ledger.calls(5)
    return dict(row)


# -- 1. abandoned, dropped and never-read streams ---------------------------------------------


def test_stream_closed_after_one_chunk(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)

    def abandon(_: int) -> None:
        stream = create(client, stream=True)
        next(iter(stream))
        stream.close()

    assert_cap_held(server, client, run_until_refused(abandon))
    row = client.ledger.calls(1)[0]
    assert row["status"] == "abandoned" and row["estimated"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]
    assert "closed before its usage arrived" in row["note"]
    assert "full reservation" in row["note"]


def test_stream_dropped_mid_read(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)

    def drop(_: int) -> None:
        stream = create(client, stream=True)
        next(iter(stream))
        del stream  # never closed: the garbage collector finishes it
        gc.collect()

    assert_cap_held(server, client, run_until_refused(drop))
    row = client.ledger.calls(1)[0]
    assert row["estimated"] == 1 and row["cost_nanos"] == row["projected_nanos"]


def test_stream_never_iterated(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)

    def unread(_: int) -> None:
        create(client, stream=True).close()

    assert_cap_held(server, client, run_until_refused(unread))


def test_unread_streaming_response_body(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)

    def unread(_: int) -> None:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
        ):
            pass

    assert_cap_held(server, client, run_until_refused(unread))
    row = client.ledger.calls(1)[0]
    assert row["status"] == "abandoned" and row["cost_nanos"] == row["projected_nanos"]


def test_a_stream_read_to_its_usage_is_charged_exactly(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    client = guarded(server, ledger_path)
    for _ in create(client, stream=True):
        pass
    row = only_row(client)
    assert row["estimated"] == 0 and row["status"] == "ok" and row["note"] is None
    assert row["cost_nanos"] == billed_nanos(server, client.ledger) > 0


# -- 2. sent but unanswered ------------------------------------------------------------------


def test_read_timeout_after_sending(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path, timeout=0.3)

    def time_out(_: int) -> None:
        server.queue_fault(Fault.slow(1.5))  # the server answers, billed, after we gave up
        with pytest.raises(openai.APITimeoutError):
            create(client)

    assert_cap_held(server, client, run_until_refused(time_out))
    row = client.ledger.calls(1)[0]
    assert row["status"] == "error" and row["estimated"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]
    assert "no answer came back" in row["note"]


def test_asyncio_cancellation_in_flight(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = kb.AsyncOpenAI(
        api_key=KEY,
        base_url=server.base_url,
        ledger=ledger_path,
        budget=kb.Budget(daily=CAP),
        max_retries=0,
    )

    async def cancel_one() -> None:
        server.queue_fault(Fault.slow(1.0))
        sent = len(server.chat_requests)
        task = asyncio.ensure_future(
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        )
        while len(server.chat_requests) == sent and not task.done():
            await asyncio.sleep(0.01)  # until the request is on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main() -> int:
        for number in range(LOOPS):
            try:
                await cancel_one()
            except kb.BudgetExceededError:
                return number
        return LOOPS

    let_through = asyncio.run(main())
    assert_cap_held(server, client, let_through)
    row = client.ledger.calls(1)[0]
    assert row["status"] == "interrupted" and row["cost_nanos"] == row["projected_nanos"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM")
def test_keyboard_interrupt_in_flight(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:

        def ctrl_c(_: int) -> None:
            server.queue_fault(Fault.slow(1.0))
            # The alarm must land in the call, not in a finalizer of another test's garbage
            # (an SDK client's __del__ run by a collection): Python swallows an exception
            # raised there, and the call would simply complete.
            gc.collect()
            gc.disable()
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            try:
                with pytest.raises(KeyboardInterrupt):
                    create(client)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                gc.enable()

        assert_cap_held(server, client, run_until_refused(ctrl_c))
    finally:
        signal.signal(signal.SIGALRM, previous)
    row = client.ledger.calls(1)[0]
    assert row["status"] == "interrupted" and row["cost_nanos"] == row["projected_nanos"]


# -- 4. missing or malformed usage -----------------------------------------------------------

BAD_USAGE = {
    "missing": Fault.without_usage(),
    "null": Fault.bad_usage(None),
    "negative": Fault.bad_usage({"prompt_tokens": -5, "completion_tokens": 3}),
    "cached>prompt": Fault.bad_usage(
        {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 50}
    ),
    "not-a-count": Fault.bad_usage({"prompt_tokens": "many", "completion_tokens": 3}),
    "not-json": Fault.garbage(1),
    "html": Fault.html_body(),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", list(BAD_USAGE))
def test_missing_or_malformed_usage(
    server: MoonshotStandIn, ledger_path: Path, name: str, stream: bool
) -> None:
    client = guarded(server, ledger_path)

    def bad(_: int) -> None:
        server.queue_fault(BAD_USAGE[name])
        try:
            result = create(client, stream=stream)
            if stream:
                for _ in result:
                    pass
        except (openai.APIError, json.JSONDecodeError):
            pass  # a body the SDK cannot parse raises; it was billed all the same

    let_through = run_until_refused(bad)
    row = client.ledger.calls(1)[0]
    # A proxy's HTML page may not have been billed at all: charged in full all the same.
    assert_cap_held(server, client, let_through, billed_some=name != "html")
    assert row["estimated"] == 1 and row["cost_nanos"] >= row["projected_nanos"]
    assert "full reservation" in row["note"]


def test_cached_above_prompt_is_not_clamped(server: MoonshotStandIn, ledger_path: Path) -> None:
    client = guarded(server, ledger_path)
    server.queue_fault(
        Fault.bad_usage({"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 50})
    )
    create(client)
    row = only_row(client)
    assert row["estimated"] == 1 and row["cost_nanos"] == row["projected_nanos"]
    assert "malformed" in row["note"] and "cached_tokens" in row["note"]


# -- 7. usage carried by error responses and retried attempts --------------------------------


def test_usage_in_a_retried_error_is_summed_into_the_call(
    server: MoonshotStandIn, ledger_path: Path
) -> None:
    billed = {"prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51}
    server.queue_fault(Fault.error(500, "server_error", "generation failed", usage=billed))
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path, max_retries=2)
    client._kb.retry = kb._retry.RetryPolicy(initial_wait=0.01, max_backoff=0.02)
    response = create(client)
    row = only_row(client)
    assert row["attempts"] == 2 and row["estimated"] == 0
    assert response.usage is not None
    assert row["prompt_tokens"] == 11 + response.usage.prompt_tokens
    assert row["completion_tokens"] == 40 + response.usage.completion_tokens


# -- any sequence of failures, one process and several ---------------------------------------

FAILURES = (
    "abandon",
    "drop",
    "unread",
    "no-usage",
    "bad-usage",
    "timeout",
    "ok",
)


def fail_once(client: kb.OpenAI, server: MoonshotStandIn, kind: str) -> None:
    if kind == "abandon":
        stream = create(client, stream=True)
        next(iter(stream))
        stream.close()
    elif kind == "drop":
        stream = create(client, stream=True)
        next(iter(stream))
        del stream
        gc.collect()
    elif kind == "unread":
        create(client, stream=True).close()
    elif kind == "no-usage":
        server.queue_fault(Fault.without_usage())
        create(client)
    elif kind == "bad-usage":
        server.queue_fault(Fault.bad_usage({"prompt_tokens": -1, "completion_tokens": 2}))
        for _ in create(client, stream=True):
            pass
    elif kind == "timeout":
        server.queue_fault(Fault.slow(1.0))
        with pytest.raises(openai.APITimeoutError):
            create(client, timeout=0.2)
    else:
        create(client)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_sequence_of_failures(server: MoonshotStandIn, ledger_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    client = guarded(server, ledger_path)
    sequence = [rng.choice(FAILURES) for _ in range(LOOPS)]
    let_through = run_until_refused(lambda number: fail_once(client, server, sequence[number]))
    assert_cap_held(server, client, let_through)


WORKER = textwrap.dedent(
    """
    import gc, sys
    import kimi_budget as kb

    base_url, ledger, key, seed = sys.argv[1:5]
    client = kb.OpenAI(api_key=key, base_url=base_url, ledger=ledger,
                       budget=kb.Budget(daily="{cap}"), max_retries=0)
    messages = [{{"role": "user", "content": "Tell me a long story."}}]
    kinds = ["abandon", "drop", "unread", "ok"]
    for number in range(40):
        kind = kinds[(number + int(seed)) % len(kinds)]
        try:
            stream = client.chat.completions.create(
                model="{model}", messages=messages, max_tokens={max_tokens},
                stream=kind != "ok")
            if kind == "abandon":
                next(iter(stream)); stream.close()
            elif kind == "drop":
                next(iter(stream)); del stream; gc.collect()
            elif kind == "unread":
                stream.close()
        except kb.BudgetExceededError:
            break
    """
).format(cap=CAP, model=MODEL, max_tokens=MAX_TOKENS)


def test_several_processes_share_the_cap(server: MoonshotStandIn, ledger_path: Path) -> None:
    kb.Ledger(ledger_path).close()
    workers = [
        PythonProcess(WORKER, server.base_url, str(ledger_path), KEY, str(seed))
        for seed in range(3)
    ]
    for worker in workers:
        run = worker.communicate(timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    ledger = kb.Ledger(ledger_path)
    billed = billed_nanos(server, ledger)
    assert len(server.chat_requests) < 3 * 40, "the budget never refused"
    assert 0 < billed <= cap_nanos()
    assert ledger.spend() >= Decimal(billed) / 10**9
    assert ledger.pending() == []
    ledger.close()


def test_an_error_body_usage_unit(moonshot_mock: Any, mocked_client: kb.OpenAI) -> None:
    """An error answer that reports usage is billed that usage (respx, no retries)."""
    body = {
        "error": {"type": "server_error", "message": "boom"},
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
    moonshot_mock.post("/chat/completions").mock(return_value=httpx.Response(400, json=body))
    with pytest.raises(openai.BadRequestError):
        mocked_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    row = only_row(mocked_client)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, 4)
    assert row["cost_nanos"] == 9 * row["price_cache_miss"] + 4 * row["price_output"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_the_usage_as_received_is_kept(
    server: MoonshotStandIn, ledger_path: Path, stream: bool
) -> None:
    client = guarded(server, ledger_path)
    result = create(client, stream=stream)
    if stream:
        for _ in result:
            pass
    row = only_row(client)
    reported = server.chat_requests[-1].reported_usage
    assert reported is not None and json.loads(row["usage_json"]) == reported


def test_every_attempts_usage_is_kept(server: MoonshotStandIn, ledger_path: Path) -> None:
    failed = {"prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51}
    server.queue_fault(Fault.error(500, "server_error", "generation failed", usage=failed))
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path, max_retries=2)
    client._kb.retry = kb._retry.RetryPolicy(initial_wait=0.01, max_backoff=0.02)
    create(client)
    first, second = json.loads(only_row(client)["usage_json"])
    assert first == failed and second == server.chat_requests[-1].reported_usage


def test_a_stream_that_never_reaches_the_caller(
    server: MoonshotStandIn, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK fails after the streamed answer arrived, before the caller has it: billed."""
    client = guarded(server, ledger_path)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the SDK could not build the stream")

    monkeypatch.setattr(client, "_process_response", broken)
    with pytest.raises(RuntimeError):
        create(client, stream=True)
    wait_for_the_server(server)
    row = only_row(client)
    assert row["estimated"] == 1 and row["cost_nanos"] == row["projected_nanos"]
    assert billed_nanos(server, client.ledger) <= row["cost_nanos"]
