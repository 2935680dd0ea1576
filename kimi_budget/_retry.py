"""One retry policy, on tenacity, that knows Moonshot's errors.

Moonshot answers 429 both for "slow down" (``rate_limit_reached_error``,
``engine_overloaded_error``) and for "your balance is empty" (``exceeded_current_quota_error``).
The SDK's own retry treats them alike; this policy retries only what can succeed, waits as long
as the server asks (``retry-after-ms``, ``Retry-After``, or "try again after N seconds" in the
message), and caps every wait. The SDK runs each attempt with ``max_retries=0``, so attempts
never multiply.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import openai
import tenacity

from ._redact import redact

__all__ = [
    "RetryPolicy",
    "error_type",
    "explain_quota_error",
    "is_retryable",
    "is_retryable_call",
    "was_sent",
]

log = logging.getLogger("kimi_budget")

RETRYABLE_TYPES = frozenset({"rate_limit_reached_error", "engine_overloaded_error"})
NEVER_RETRY_TYPES = frozenset(
    {"exceeded_current_quota_error", "content_filter", "access_terminated_error"}
)
# Besides 5xx: request timeout and conflict, which the SDK retries too.
RETRYABLE_STATUS = frozenset({408, 409})
_AFTER_SECONDS = re.compile(r"try again (?:after|in) (\d+(?:\.\d+)?) ?(?:s\b|sec|second)", re.I)


def error_type(exc: BaseException) -> str | None:
    """Moonshot's ``error.type`` of an API error, if it has one."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("type"), str):
            return str(inner["type"])
    value = getattr(exc, "type", None)
    return value if isinstance(value, str) else None


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt can succeed if tried again."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if not isinstance(exc, openai.APIStatusError):
        return False
    kind = error_type(exc)
    if kind in NEVER_RETRY_TYPES:
        return False
    should = exc.response.headers.get("x-should-retry")
    if should in ("true", "false"):
        return should == "true"
    if exc.status_code == 429:
        # A 429 with no type (not Moonshot, or a proxy) is taken as "slow down".
        return kind is None or kind in RETRYABLE_TYPES
    return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500


def was_sent(exc: BaseException) -> bool:
    """Whether a failed attempt may have reached the server (so it may have been billed).

    Takes the SDK's ``APIConnectionError`` or the transport's (httpx/httpx2) exception. A
    refused or unresolvable connection never sent the request; a timeout or a connection
    dropped while waiting for the answer may have.
    """
    if isinstance(exc, openai.APIConnectionError):
        exc = exc.__cause__ or exc  # the transport's own error, which the SDK wrapped
    elif isinstance(exc, openai.OpenAIError):
        return False
    return type(exc).__name__ not in ("ConnectError", "ConnectTimeout")


def is_retryable_call(exc: BaseException) -> bool:
    """``is_retryable`` for a guarded chat completion.

    A completion that may have been billed without an answer is not sent again: the second
    bill would not be covered by the call's reservation, so the cap could be overshot.
    """
    return is_retryable(exc) and not was_sent(exc)


def server_wait(exc: BaseException) -> float | None:
    """How long the server asked us to wait, in seconds, if it said."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        ms = headers.get("retry-after-ms")
        if ms:
            try:
                return _seconds(float(ms) / 1000)
            except ValueError:
                pass
        after = headers.get("retry-after")
        if after:
            try:
                return _seconds(float(after))
            except ValueError:
                try:
                    return max(parsedate_to_datetime(after).timestamp() - time.time(), 0.0)
                except (TypeError, ValueError):
                    pass
    match = _AFTER_SECONDS.search(str(getattr(exc, "message", "") or exc))
    return float(match.group(1)) if match else None


def _seconds(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(value)
    return max(value, 0.0)


def explain_quota_error(exc: BaseException, secrets: tuple[str, ...] = ()) -> BaseException:
    """Say plainly, in the SDK's own exception class, that the account is out of credit."""
    if (
        not isinstance(exc, openai.APIStatusError)
        or error_type(exc) != "exceeded_current_quota_error"
    ):
        return exc
    message = (
        f"Moonshot refused the call: the account is out of credit or suspended "
        f"(HTTP {exc.status_code} exceeded_current_quota_error: {exc.message}). Check the balance "
        f"with `kimi-budget balance` and top up; kimi-budget did not retry and recorded $0."
    )
    message = redact(message, secrets)
    try:
        clearer = type(exc)(message, response=exc.response, body=exc.body)
    except TypeError:
        return exc
    return clearer


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff that honours the server's requested waits, capped.

    ``max_retries`` comes from the client (``OpenAI(max_retries=...)`` or ``with_options``).
    """

    initial_wait: float = 0.5
    max_backoff: float = 8.0
    max_wait: float = 60.0
    jitter: float = 0.25

    def wait(self, attempt: int, exc: BaseException | None) -> float:
        asked = server_wait(exc) if exc is not None else None
        if asked is not None:
            # A little jitter after the stated time spreads a crowd of workers apart.
            return float(min(asked + random.uniform(0, self.jitter), self.max_wait))
        backoff = min(self.initial_wait * 2 ** (attempt - 1), self.max_backoff)
        return float(min(backoff * random.uniform(1 - self.jitter, 1.0), self.max_wait))

    def _kwargs(
        self, max_retries: int, before: Callable[[int], None] | None, guarded: bool
    ) -> dict[str, Any]:
        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return float(self.wait(state.attempt_number, exc))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            seconds = state.next_action.sleep if state.next_action else 0.0
            log.info(
                "kimi-budget: attempt %d failed (%s); retrying in %.2f s",
                state.attempt_number,
                _short(exc),
                seconds,
            )

        def before_attempt(state: tenacity.RetryCallState) -> None:
            if before is not None:
                before(state.attempt_number)

        return dict(
            stop=tenacity.stop_after_attempt(max(max_retries, 0) + 1),
            retry=tenacity.retry_if_exception(is_retryable_call if guarded else is_retryable),
            wait=wait,
            before=before_attempt,
            before_sleep=before_sleep,
            reraise=True,
        )

    def retrying(
        self, max_retries: int, before: Callable[[int], None] | None = None, *, guarded: bool
    ) -> tenacity.Retrying:
        """The attempts of one request; ``guarded`` for a chat completion with a reservation."""
        return tenacity.Retrying(sleep=_sleep, **self._kwargs(max_retries, before, guarded))

    def async_retrying(
        self, max_retries: int, before: Callable[[int], None] | None = None, *, guarded: bool
    ) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            sleep=_async_sleep, **self._kwargs(max_retries, before, guarded)
        )


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    status = getattr(exc, "status_code", None)
    kind = error_type(exc)
    return " ".join(str(part) for part in (type(exc).__name__, status, kind) if part)
