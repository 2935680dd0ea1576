"""One retry layer that knows Moonshot's errors, and failures that never lose money or rows."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import openai
import openai._base_client
import pytest
import respx

import kimi_budget as kb
from kimi_budget import _retry
from tests.conftest import KEY, MOCK_BASE_URL
from tests.helpers import completion, error, stream_chunks

MESSAGES = [{"role": "user", "content": "hi"}]
RATE_LIMITED = (
    "Your account org-abc<ak-xyz> request reached organization max RPM: 200, "
    "please try again after 7 seconds"
)


class _Module:
    """A module with some names replaced (the rest are the module's own)."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the waits the SDK's retry loop would sleep, instead of sleeping them."""
    import time

    import anyio
    import openai._base_client as base

    taken: list[float] = []

    async def async_sleep(seconds: float) -> None:
        taken.append(seconds)

    monkeypatch.setattr(base, "time", _Module(time, sleep=taken.append))
    monkeypatch.setattr(base, "anyio", _Module(anyio, sleep=async_sleep))
    return taken


def rows(client: kb.OpenAI | kb.AsyncOpenAI) -> list[dict[str, Any]]:
    return list(reversed(client.ledger.calls(1000)))


def test_rate_limit_twice_then_success(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            error(429, "rate_limit_reached_error", RATE_LIMITED),
            error(429, "rate_limit_reached_error", RATE_LIMITED),
            httpx.Response(200, json=completion(prompt=19, completion_tokens=21, cached=10)),
        ]
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=50)
    assert route.call_count == 3
    assert [call.request.headers["x-stainless-retry-count"] for call in route.calls] == [
        "0",
        "1",
        "2",
    ]
    assert len(waits) == 2 and all(7 <= w <= 7.25 for w in waits)  # from the message
    [row] = rows(mocked_client)
    assert row["attempts"] == 3 and row["status"] == "ok"
    assert row["cost_nanos"] == 9 * 600 + 10 * 100 + 21 * 3000  # only the last one billed


@pytest.mark.parametrize("status", [429, 403])
def test_out_of_credit_is_never_retried(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float], status: int
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=error(
            status,
            "exceeded_current_quota_error",
            "You exceeded your current token quota: org-abc 0, please check your account balance",
        )
    )
    expected = openai.RateLimitError if status == 429 else openai.PermissionDeniedError
    with pytest.raises(expected) as info:
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert "out of credit or suspended" in str(info.value)
    assert "balance" in str(info.value)
    assert info.value.status_code == status
    assert route.call_count == 1 and waits == []
    [row] = rows(mocked_client)
    assert row["cost_nanos"] == 0 and row["status"] == "error" and row["attempts"] == 1
    assert mocked_client.ledger.spend() == 0


def test_server_errors_are_retried(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            error(500, "server_error", "boom"),
            httpx.Response(503, text="unavailable"),
            httpx.Response(200, json=completion()),
        ]
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 3
    assert len(waits) == 2 and all(0 < w <= 8 for w in waits)
    assert rows(mocked_client)[0]["attempts"] == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (400, "content_filter"),
        (401, "invalid_authentication_error"),
        (404, "resource_not_found_error"),
    ],
)
def test_client_errors_are_not_retried(
    mocked_client: kb.OpenAI,
    moonshot_mock: respx.Router,
    waits: list[float],
    status: int,
    kind: str,
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(return_value=error(status, kind, "no"))
    with pytest.raises(openai.APIStatusError):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 1 and waits == []


def test_max_retries_zero_means_one_request(
    moonshot_mock: respx.Router, ledger_path: Path, waits: list[float]
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=error(500, "server_error", "x")
    )
    client = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 1
    default = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
    with pytest.raises(openai.InternalServerError):
        default.with_options(max_retries=0).chat.completions.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=5
        )
    assert route.call_count == 2
    with pytest.raises(openai.InternalServerError):
        default.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 2 + 3  # openai's default of 2 retries, never multiplied
    assert [r["attempts"] for r in rows(default)] == [1, 1, 3]


def test_other_endpoints_use_the_same_retry_layer(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    route = moonshot_mock.get("/models").mock(
        side_effect=[httpx.Response(502), httpx.Response(200, json={"object": "list", "data": []})]
    )
    assert mocked_client.models.list().data == []
    assert route.call_count == 2 and len(waits) == 1


def test_retry_after_headers_are_honoured(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            error(429, "engine_overloaded_error", "overloaded", **{"retry-after-ms": "1500"}),
            error(429, "rate_limit_reached_error", "slow down", **{"retry-after": "3"}),
            httpx.Response(200, json=completion()),
        ]
    )
    response = mocked_client.chat.completions.with_raw_response.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=5
    )
    assert 1.5 <= waits[0] <= 1.75 and 3 <= waits[1] <= 3.25
    assert response.retries_taken == 2  # the SDK's own loop counted them
    assert rows(mocked_client)[0]["attempts"] == 3


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"retry-after": "3600"}, "slow down"),
        ({}, "request reached max RPM, please try again after 600 seconds"),
    ],
)
def test_a_wait_above_the_sdk_limit_fails_fast(
    mocked_client: kb.OpenAI,
    moonshot_mock: respx.Router,
    waits: list[float],
    headers: dict[str, str],
    message: str,
) -> None:
    # The SDK does not retry a Retry-After above 120 s; neither does a wait Moonshot asks for
    # in its message.
    route = moonshot_mock.post("/chat/completions").mock(
        return_value=error(429, "rate_limit_reached_error", message, **headers)
    )
    with pytest.raises(openai.RateLimitError):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 1 and waits == []
    [row] = rows(mocked_client)
    assert row["attempts"] == 1 and row["status"] == "error" and row["cost_nanos"] == 0


def test_connection_errors_are_retried_and_recorded(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    # A refused connection never sent the request: retrying it cannot bill twice.
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.ConnectError("refused"),
            httpx.ConnectError("refused"),
        ]
    )
    with pytest.raises(openai.APIConnectionError):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 3 and len(waits) == 2
    [row] = rows(mocked_client)
    assert row["status"] == "error" and row["attempts"] == 3 and row["cost_nanos"] == 0
    assert row["estimated"] == 0
    assert mocked_client.ledger.pending() == []


@pytest.mark.parametrize("failure", [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("gone")])
def test_a_sent_call_without_an_answer_is_charged_and_not_resent(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float], failure: Exception
) -> None:
    # Moonshot may bill a request whose answer never arrived; a second try could bill again
    # beyond the call's reservation, so the cap could not hold.
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[failure, httpx.Response(200, json=completion())]
    )
    with pytest.raises(openai.APIConnectionError):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 1 and waits == []
    [row] = rows(mocked_client)
    assert row["status"] == "error" and row["estimated"] == 1 and row["attempts"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]  # the whole call may have been billed
    assert mocked_client.ledger.pending() == []


@pytest.mark.parametrize("failure", [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("gone")])
def test_async_a_sent_call_without_an_answer_is_not_resent(
    moonshot_mock: respx.Router, ledger_path: Path, waits: list[float], failure: Exception
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[failure, httpx.Response(200, json=completion())]
    )
    expected = openai.APITimeoutError if isinstance(failure, httpx.ReadTimeout) else None

    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
        with pytest.raises(openai.APIConnectionError) as info:
            await client.chat.completions.create(
                model="kimi-k2.5", messages=MESSAGES, max_tokens=5
            )
        # The SDK's own class, as its loop would have raised after its last attempt.
        assert expected is None or isinstance(info.value, expected)
        return client

    client = asyncio.run(main())
    assert route.call_count == 1 and waits == []
    [row] = rows(client)
    assert row["attempts"] == 1 and row["estimated"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]


def test_other_endpoints_still_retry_timeouts(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    route = moonshot_mock.get("/models").mock(
        side_effect=[
            httpx.ReadTimeout("slow"),
            httpx.Response(200, json={"object": "list", "data": []}),
        ]
    )
    assert mocked_client.models.list().data == []
    assert route.call_count == 2 and len(waits) == 1


def test_stream_failing_midway_is_recorded_not_retried(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    def torn() -> Any:
        from tests.helpers import sse

        for chunk in stream_chunks(["a", "b", "c"], usage=None)[:3]:
            yield sse(chunk)
        raise httpx.ReadError("connection reset by peer")

    route = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(
            200, content=torn(), headers={"content-type": "text/event-stream"}
        )
    )
    stream = mocked_client.chat.completions.create(
        model="kimi-k2.5", messages=MESSAGES, max_tokens=50, stream=True
    )
    seen = 0
    with pytest.raises(Exception):  # noqa: B017 - the transport's own error reaches the caller
        for _ in stream:
            seen += 1
    assert seen == 3 and route.call_count == 1 and waits == []
    [row] = rows(mocked_client)
    assert row["status"] == "error" and row["estimated"] == 1
    assert "failed before its usage arrived" in row["note"]
    assert row["cost_nanos"] == row["projected_nanos"]
    assert mocked_client.ledger.pending() == []


def test_keyboard_interrupt_while_in_flight_settles(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    def interrupted(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt  # Ctrl-C while waiting for the server

    moonshot_mock.post("/chat/completions").mock(side_effect=interrupted)
    with pytest.raises(KeyboardInterrupt):
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    [row] = rows(mocked_client)
    assert row["status"] == "interrupted" and row["estimated"] == 1
    assert row["cost_nanos"] == row["projected_nanos"]  # the whole call may have been billed
    assert mocked_client.ledger.pending() == []


def test_asyncio_cancellation_settles(moonshot_mock: respx.Router, ledger_path: Path) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json=completion())

    moonshot_mock.post("/chat/completions").mock(side_effect=slow)

    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
        task = asyncio.create_task(
            client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return client

    client = asyncio.run(main())
    [row] = rows(client)
    assert row["status"] == "interrupted" and client.ledger.pending() == []
    assert row["estimated"] == 1 and row["cost_nanos"] == row["projected_nanos"]


def test_async_rate_limit_retry(
    moonshot_mock: respx.Router, ledger_path: Path, waits: list[float]
) -> None:
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            error(429, "rate_limit_reached_error", RATE_LIMITED),
            httpx.Response(200, json=completion()),
        ]
    )

    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
        await client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
        return client

    client = asyncio.run(main())
    assert route.call_count == 2 and 7 <= waits[0] <= 7.25
    assert rows(client)[0]["attempts"] == 2


def test_settling_is_idempotent(ledger_path: Path) -> None:
    from decimal import Decimal

    from kimi_budget.ledger import Reservation, Settlement

    ledger = kb.Ledger(ledger_path)
    budget = kb.Budget(daily="1")
    now = datetime.now(timezone.utc)
    res = Reservation(
        "c1", "kimi-k2.5", {}, now, now + timedelta(minutes=1), 5000, 10, 100, 600, 3000
    )
    ledger.reserve(res, [budget])
    assert ledger.status(budget)[0].reserved_usd == Decimal("0.000005")
    done = Settlement(res, "ok", 10, 0, 1, 9000, False, 1, now)
    assert ledger.settle(done) is True
    assert ledger.settle(done) is False
    assert ledger.spend() == kb.Ledger(ledger_path).spend() == Decimal("0.000009")
    [daily] = ledger.status(budget)
    assert daily.spent_usd == Decimal("0.000009") and daily.reserved_usd == 0


KILLED_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from datetime import datetime, timedelta, timezone
    import kimi_budget as kb
    from kimi_budget.ledger import Reservation
    ledger = kb.Ledger(sys.argv[1])
    now = datetime.now(timezone.utc)
    expires = now + timedelta(seconds=float(sys.argv[2]))
    res = Reservation("killed-call", "kimi-k2.5", {}, now, expires, 400_000, 100, 100, 600, 3000)
    ledger.reserve(res, [kb.Budget(daily="0.0005")])
    print("reserved", flush=True)
    time.sleep(60)
    """
)


def test_sigkilled_process_reservation_expires(ledger_path: Path) -> None:
    from decimal import Decimal

    from kimi_budget.ledger import Reservation

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(ledger_path), "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "reserved"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(10)
        # Closed now: a pipe left to the garbage collector warns (ResourceWarning) inside
        # whichever test runs when it is collected, and tests here turn warnings into errors.
        assert child.stdout is not None
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    budget = kb.Budget(daily="0.0005")
    now = datetime.now(timezone.utc)
    ledger = kb.Ledger(ledger_path)
    [daily] = ledger.status(budget)
    assert daily.reserved_usd == Decimal("0.0004")  # still held: the expiry is 30 s away
    res = Reservation(
        "next", "kimi-k2.5", {}, now, now + timedelta(minutes=1), 200_000, 10, 100, 600, 3000
    )
    with pytest.raises(kb.BudgetExceededError) as info:
        ledger.reserve(res, [budget])
    assert info.value.reserved_usd == Decimal("0.0004")

    later = kb.Ledger(ledger_path, clock=lambda: now + timedelta(seconds=31))
    # Opening the ledger after the expiry settled the dead reservation.
    [expired] = [row for row in later.calls(10) if row["call_id"] == "killed-call"]
    assert expired["status"] == "expired"
    # The dead call may have been billed in full: its expiry charges the whole reservation
    # and frees no room (the rule on unknown bills).
    with pytest.raises(kb.BudgetExceededError) as info:
        later.reserve(res, [budget])
    assert info.value.spent_usd == Decimal("0.0004") and info.value.reserved_usd == 0
    expired = [row for row in later.calls(10) if row["call_id"] == "killed-call"]
    assert len(expired) == 1
    assert expired[0]["status"] == "expired" and expired[0]["estimated"] == 1
    assert expired[0]["cost_nanos"] == 400_000  # the full projection, not a guess
    [daily] = later.status(budget)
    assert daily.spent_usd == Decimal("0.0004") and daily.reserved_usd == 0
    assert later.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("failure", ["read-only", "locked"])
def test_unwritable_ledger_after_a_billed_call_keeps_the_response(
    moonshot_mock: respx.Router, ledger_path: Path, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    ledger = kb.Ledger(ledger_path, busy_timeout=0.2)
    client = kb.OpenAI(
        api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger, budget=kb.Budget(daily="1")
    )
    blocker = sqlite3.connect(ledger_path, isolation_level=None)

    def answer(request: httpx.Request) -> httpx.Response:
        # The ledger becomes unwritable while the request is on the wire.
        if failure == "read-only":
            ledger.conn.execute("PRAGMA query_only = 1")
        else:
            blocker.execute("BEGIN EXCLUSIVE")
        return httpx.Response(200, json=completion(prompt=19, completion_tokens=21, cached=10))

    moonshot_mock.post("/chat/completions").mock(side_effect=answer)
    response = client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=50)
    ledger.flush()  # the settle writer has tried (and failed) by now
    assert "fallback" in caplog.text  # logged (a runtime event), not warned
    assert response.choices[0].message.content == "Hello!"
    assert ledger.fallback_path.exists()
    assert oct(ledger.fallback_path.stat().st_mode & 0o777) == "0o600"
    assert KEY not in ledger.fallback_path.read_text()
    # The ledger becomes writable again.
    if failure == "locked":
        blocker.execute("ROLLBACK")
    else:
        ledger.conn.execute("PRAGMA query_only = 0")
    blocker.close()

    reopened = kb.Ledger(ledger_path)  # merges the fallback file
    assert not ledger.fallback_path.exists()
    calls = reopened.calls(10)
    assert len(calls) == 1 and calls[0]["status"] == "ok" and calls[0]["cost_nanos"] == 69400
    assert reopened.pending() == []
    [daily] = reopened.status(kb.Budget(daily="1"))
    assert daily.spent_usd == reopened.spend() and daily.reserved_usd == 0
    kb.Ledger(ledger_path)  # a second open merges nothing twice
    assert len(reopened.calls(10)) == 1 and reopened.spend() == daily.spent_usd


def test_unwritable_ledger_before_a_call_sends_nothing(
    moonshot_mock: respx.Router, ledger_path: Path
) -> None:
    import sqlite3

    route = moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    client = kb.OpenAI(
        api_key=KEY, base_url=MOCK_BASE_URL, ledger=kb.Ledger(ledger_path, busy_timeout=0.1)
    )
    blocker = sqlite3.connect(ledger_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(kb.LedgerError, match="locked"):
            client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    finally:
        blocker.execute("ROLLBACK")
    assert route.call_count == 0


def test_no_warning_and_no_fallback_on_the_happy_path(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router
) -> None:
    moonshot_mock.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert not mocked_client.ledger.fallback_path.exists()


def test_wait_is_parsed_from_moonshot_message() -> None:
    exc = openai.RateLimitError(
        RATE_LIMITED,
        response=httpx.Response(429, request=httpx.Request("POST", MOCK_BASE_URL)),
        body={"error": {"type": "rate_limit_reached_error", "message": RATE_LIMITED}},
    )
    assert _retry.server_wait(exc) == 7.0
    assert _retry.is_retryable(exc)
    assert _retry.error_type(exc) == "rate_limit_reached_error"


# -- the SDK's own loop does the looping ----------------------------------------------------

NEEDS_BODY_REPLAY = pytest.mark.skipif(
    not hasattr(openai._base_client, "_RequestBodyReplay"),
    reason="openai < 3 does not rewind request bodies",
)


@NEEDS_BODY_REPLAY
def test_a_seekable_upload_is_rewound_for_the_retry(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    import io

    route = moonshot_mock.post("/files").mock(
        side_effect=[
            httpx.Response(500),
            httpx.Response(
                200,
                json={
                    "id": "file-1",
                    "object": "file",
                    "bytes": 4,
                    "created_at": 0,
                    "filename": "a.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                },
            ),
        ]
    )
    mocked_client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n\n")), purpose="batch")
    assert route.call_count == 2 and len(waits) == 1
    first, second = (call.request.content for call in route.calls)
    assert b"{}\n\n" in first and b"{}\n\n" in second


@NEEDS_BODY_REPLAY
def test_a_one_shot_body_is_not_replayed(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    route = moonshot_mock.post("/uploads/raw").mock(
        side_effect=[httpx.Response(500), httpx.Response(200, json={})]
    )
    with pytest.raises(openai.InternalServerError):
        mocked_client.post(
            "/uploads/raw",
            cast_to=object,
            content=(part for part in [b"once"]),  # type: ignore[arg-type]
        )
    assert route.call_count == 1 and waits == []


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan"), float("inf")])
def test_a_per_request_max_retries_is_validated_by_the_sdk(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, bad: float
) -> None:
    if not hasattr(openai._base_client.BaseClient, "_validate_max_retries"):
        pytest.skip("openai < 3 does not validate max_retries")
    route = moonshot_mock.post("/chat/completions").mock(return_value=error(500, "x", "y"))
    with pytest.raises((TypeError, ValueError), match="max_retries"):
        mocked_client.post(
            "/chat/completions",
            body={"model": "kimi-k2.5", "messages": MESSAGES, "max_tokens": 5},
            cast_to=object,
            options={"max_retries": bad},  # type: ignore[typeddict-item]
        )
    assert route.call_count == 0
    [row] = rows(mocked_client)  # reserved, never sent: settled at $0
    assert row["attempts"] == 0 and row["cost_nanos"] == 0 and mocked_client.ledger.pending() == []


def test_async_retries_run_under_trio(moonshot_mock: respx.Router, ledger_path: Path) -> None:
    trio = pytest.importorskip("trio")
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            error(429, "engine_overloaded_error", "busy", **{"retry-after-ms": "1"}),
            httpx.Response(200, json=completion()),
        ]
    )

    async def main() -> kb.AsyncOpenAI:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
        client._kb = replace(client._kb, retry=_retry.RetryPolicy(jitter=0))
        response = await client.chat.completions.with_raw_response.create(
            model="kimi-k2.5", messages=MESSAGES, max_tokens=5
        )
        assert response.retries_taken == 1
        return client

    client = trio.run(main)
    assert route.call_count == 2 and rows(client)[0]["attempts"] == 2


def test_no_tenacity_until_an_attempt_fails(
    mocked_client: kb.OpenAI,
    moonshot_mock: respx.Router,
    waits: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []
    original = _retry._failed_attempt

    def counted(failure: BaseException | None, attempt: int) -> Any:
        made.append(attempt)
        return original(failure, attempt)

    monkeypatch.setattr(_retry, "_failed_attempt", counted)
    moonshot_mock.post("/chat/completions").mock(
        side_effect=[
            httpx.Response(200, json=completion()),
            error(503, "engine_overloaded_error", "busy"),
            httpx.Response(200, json=completion()),
        ]
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert made == []
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert made == [1, 1]  # one state for the decision, one for the wait
    assert [row["attempts"] for row in rows(mocked_client)] == [1, 2]


def test_tenacity_strategies_can_replace_the_policy(
    mocked_client: kb.OpenAI, moonshot_mock: respx.Router, waits: list[float]
) -> None:
    import tenacity

    mocked_client._kb = replace(
        mocked_client._kb,
        retry=_retry.RetryPolicy(
            retry_strategy=tenacity.retry_if_exception_type(openai.InternalServerError),
            wait_strategy=tenacity.wait_fixed(0.25),
        ),
    )
    route = moonshot_mock.post("/chat/completions").mock(
        side_effect=[error(500, "server_error", "x"), httpx.Response(200, json=completion())]
    )
    mocked_client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=5)
    assert route.call_count == 2 and waits == [0.25]
