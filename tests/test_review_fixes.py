"""Regression tests for problems found in review: each failed before its fix."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import respx

import kimi_budget as kb
from kimi_budget import _retry
from kimi_budget._client import _total_tokens
from kimi_budget._guard import Prepared
from kimi_budget._money import to_usd
from kimi_budget._tokens import TokenEstimate
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY, MOCK_BASE_URL
from tests.helpers import LogCapture, completion

MESSAGES = [{"role": "user", "content": "hi"}]
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def test_warning_comes_after_the_call_is_recorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    body = completion()
    del body["usage"]
    moonshot_mock.post("/chat/completions").mock(return_value=httpx.Response(200, json=body))
    # A missing bill is a runtime event: logged, never warned, so `python -W error` (or
    # pytest's filterwarnings) does not turn it into an exception out of create().
    with warnings.catch_warnings(), LogCapture() as logged:
        warnings.simplefilter("error")
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
        # The ledger's writer reads a returned call's bill, off the caller's path; a flush
        # waits for it (and so does any read of the ledger by this process).
        mocked_client.ledger.flush()
    [row] = mocked_client.ledger.calls(5)
    assert row["status"] == "ok" and row["estimated"] == 1
    assert any(row["call_id"] in message and "no usage" in message for message in logged)
    assert mocked_client.ledger.pending() == []


def test_unread_response_body_is_charged_its_worst_case(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    with (
        LogCapture() as logged,
        mocked_client.chat.completions.with_streaming_response.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=40
        ),
    ):
        pass  # the caller never reads the body, which was generated (and billed) whole
    assert any("closed before it was read" in message for message in logged)
    [row] = mocked_client.ledger.calls(5)
    assert row["status"] == "abandoned" and row["estimated"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]


def test_long_stream_keeps_its_reservation(ledger_path: Path) -> None:
    budget = kb.Budget(daily="1")
    with MoonshotStandIn(api_key=KEY, stream_chunks=30, chunk_delay=0.05) as server:
        client = kb.OpenAI(
            api_key=KEY,
            base_url=server.base_url,
            ledger=ledger_path,
            budget=budget,
            timeout=0.5,
            reservation_margin=0,
        )
        stream = client.chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=100, stream=True
        )
        other = kb.Ledger(ledger_path)
        for i, _ in enumerate(stream):
            if i == 25:  # ~1.25 s in: well past the first 0.5 s lease
                assert other.expire_stale() == 0
                assert other.status(budget)[0].reserved_usd > 0
    [row] = client.ledger.calls(5)
    assert row["status"] == "ok" and row["estimated"] == 0


def test_settle_inside_a_transaction_is_deferred_not_lost(ledger_path: Path) -> None:
    ledger = kb.Ledger(ledger_path)
    res = Reservation(
        "gc", "kimi-k2.5", {}, NOW, NOW + timedelta(minutes=5), 5000, 10, 100, 600, 3000
    )
    ledger.reserve(res, [kb.Budget(daily="1")])
    # What a stream's garbage-collection finalizer does if it runs mid-transaction.
    with ledger._write("test"):
        assert ledger.settle(Settlement(res, "abandoned", 10, 0, 2, 12_000, True, 1, NOW))
    [row] = ledger.calls(1)
    assert row["status"] == "abandoned" and row["cost_nanos"] == 12_000
    assert not ledger.fallback_path.exists()


def test_gc_collected_streams_settle_without_fallback(ledger_path: Path) -> None:
    # Finalizers that run inside one of our transactions are covered by the test above;
    # forcing collections at random points would also hit httpcore's own pool lock, which
    # deadlocks on its own when the SDK's abandoned stream is collected inside the pool.
    with MoonshotStandIn(api_key=KEY, stream_chunks=20) as server:
        client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger_path, max_retries=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(20):
                for _chunk in client.chat.completions.create(
                    model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
                ):
                    break  # abandoned without close()
            # A stream closed by the collector has its body closed from a short-lived thread,
            # which holds the response until it is done: a later collection frees what it held.
            for _ in range(5):
                gc.collect()
                if not client.ledger.pending():
                    break
                time.sleep(0.1)
    assert client.ledger.pending() == [] and not client.ledger.fallback_path.exists()
    assert len(client.ledger.calls(100)) == 20


_FORK_SCRIPT = """
import os, signal, sys, threading, warnings
import kimi_budget as kb

ledger = kb.Ledger(sys.argv[1])
held, release = threading.Event(), threading.Event()

def busy():
    with ledger._lock:  # a settle running in another thread at fork time
        held.set()
        release.wait(10)

worker = threading.Thread(target=busy)
worker.start()
held.wait(5)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
    pid = os.fork()
if pid == 0:  # the child
    signal.alarm(20)  # a deadlock ends here, as a signal the parent reports
    try:
        ledger.spend()
        os._exit(0)
    finally:
        os._exit(1)
release.set()
worker.join()
_, status = os.waitpid(pid, 0)
print(status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_does_not_deadlock(ledger_path: Path) -> None:
    # In a process of its own: the threads other tests leave in this worker (writers inside
    # SQLite's global mutexes, servers) would make the fork test SQLite's internals, not ours.
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, str(ledger_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status = int(done.stdout.strip())
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, done.stderr)


def test_whole_dollars_are_plain_text() -> None:
    assert str(to_usd(10_000_000_000)) == "10"
    error = kb.BudgetExceededError(
        window="daily",
        limit_usd=Decimal(20),
        spent_usd=to_usd(10**10),
        reserved_usd=Decimal(0),
        projected_usd=to_usd(2 * 10**10),
        model="kimi-k2.5",
    )
    assert "E+" not in str(error) and "$20" in str(error)
    tiny = kb.BudgetExceededError(
        window="per_call",
        limit_usd=to_usd(100),
        spent_usd=Decimal(0),
        reserved_usd=Decimal(0),
        projected_usd=to_usd(200),
        model="kimi-k2.5",
    )
    assert "E-" not in str(tiny) and "$0.0000002" in str(tiny)


def test_output_limit_follows_an_exact_recount() -> None:
    price = PriceTable.load().get("moonshot-v1-8k")
    prepared = Prepared({}, price, TokenEstimate(7800, False, "approximate"), None, 1)
    # An approximate count may be too high: it must not shrink the projected output.
    assert prepared.max_output == 1024
    prepared.estimate = TokenEstimate(7800, True, "endpoint")
    assert prepared.max_output == 8192 - 7800  # an exact count leaves this much room
    prepared.estimate = TokenEstimate(7000, True, "endpoint")
    assert prepared.max_output == 1024  # the default again, now that the prompt is smaller


def test_unusable_retry_after_is_ignored() -> None:
    request = httpx.Request("POST", MOCK_BASE_URL)
    for value in ("nan", "inf", "-inf"):
        exc = openai.RateLimitError(
            "slow down",
            response=httpx.Response(429, headers={"retry-after": value}, request=request),
            body=None,
        )
        assert _retry.server_wait(exc) is None
        assert 0 < _retry.RetryPolicy().wait(1, exc) <= 8


def test_retryable_statuses_match_the_sdk() -> None:
    request = httpx.Request("POST", MOCK_BASE_URL)
    for status in (408, 409, 500, 502, 503, 504, 520):
        exc = openai.APIStatusError(
            "x", response=httpx.Response(status, request=request), body=None
        )
        assert _retry.is_retryable(exc), status
    for status in (400, 401, 403, 404, 422):
        exc = openai.APIStatusError(
            "x", response=httpx.Response(status, request=request), body=None
        )
        assert not _retry.is_retryable(exc), status


def test_token_count_endpoint_answering_html_is_an_api_error() -> None:
    with pytest.raises(openai.APIError, match="without a token count"):
        _total_tokens(b"<html>gateway</html>")


def test_openai_base_url_is_honoured(monkeypatch: pytest.MonkeyPatch, ledger_path: Path) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "https://proxy.example/v1")
    client = kb.OpenAI(api_key=KEY, ledger=ledger_path)
    assert str(client.base_url).startswith("https://proxy.example/v1")
    monkeypatch.setenv("MOONSHOT_BASE_URL", "https://api.moonshot.ai/v1")
    assert str(kb.OpenAI(api_key=KEY, ledger=ledger_path).base_url).startswith(
        "https://api.moonshot.ai"
    )
