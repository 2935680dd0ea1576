"""The retry policy the SDK's own retry loop consults: it knows Moonshot's errors.

The SDK's request loop (``SyncAPIClient.request`` / ``AsyncAPIClient.request``) does the
looping, and with it what a loop of our own would lose: it validates ``max_retries``, rebuilds
each attempt (numbered in ``x-stainless-retry-count``), rewinds a request body or refuses to
replay one it cannot rewind, counts ``retries_taken`` into the response, and sleeps with the
running async library (asyncio or trio). Our clients override its decision points, and this
module decides:

- ``_should_retry(response)``: whether a 4xx/5xx answer can succeed if tried again. Moonshot
  answers 429 both for "slow down" (``rate_limit_reached_error``, ``engine_overloaded_error``)
  and for "your balance is empty" (``exceeded_current_quota_error``, also as 403); the SDK
  treats them alike, this policy never retries an empty balance. Where Moonshot's rules say
  nothing, the SDK's own verdict stands (``x-should-retry``, 408/409/429/5xx, and no retry
  when ``Retry-After`` asks for more than its limit of 120 s).
- ``_calculate_retry_timeout(remaining_retries, options, response_headers)``: how long to
  wait: what Moonshot's message asks ("try again after N seconds", which the SDK does not
  read; more than 120 s is not retried, as the SDK does for ``Retry-After``), else the SDK's
  own wait (``retry-after-ms``/``Retry-After``, else jittered exponential backoff).
- A chat completion that may have been billed without an answer (a read timeout, a connection
  lost after sending) is never sent again: ``_send_request`` raises the SDK's own
  ``APITimeoutError``/``APIConnectionError`` there, which the SDK's loop passes through
  unretried (see ``stop_resending``).

Both decisions are tenacity strategies (``RetryPolicy.retry`` and ``RetryPolicy.wait``, which
any of tenacity's can replace), evaluated on a ``RetryCallState`` made for the failed attempt.
Nothing of tenacity is imported or built until an attempt has failed.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import openai

from ._redact import redact

if TYPE_CHECKING:
    import tenacity
    from tenacity.retry import retry_base
    from tenacity.wait import wait_base

__all__ = [
    "RetryPolicy",
    "error_type",
    "explain_quota_error",
    "is_retryable",
    "message_wait",
    "server_wait",
    "stop_resending",
    "was_sent",
]

log = logging.getLogger("kimi_budget")

RETRYABLE_TYPES = frozenset({"rate_limit_reached_error", "engine_overloaded_error"})
NEVER_RETRY_TYPES = frozenset(
    {"exceeded_current_quota_error", "content_filter", "access_terminated_error"}
)
# Besides 5xx: request timeout and conflict, which the SDK retries too.
RETRYABLE_STATUS = frozenset({408, 409})
# The SDK's MAX_RETRY_AFTER_DELAY (openai 2.x and 3.x): a longer requested wait is not retried.
MAX_SERVER_WAIT = 120.0
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
    """Whether a failed attempt can succeed if tried again (whatever the server asks to wait)."""
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


def stop_resending(exc: Exception, request: Any) -> openai.OpenAIError:
    """The SDK's own error for a transport failure, raised so that its loop does not retry.

    The SDK's loop passes any ``OpenAIError`` from ``_send_request`` through unretried; it
    would have wrapped the transport's error in exactly this class after its last attempt.
    """
    if isinstance(exc, openai.OpenAIError):
        return exc
    if any(cls.__name__ == "TimeoutException" for cls in type(exc).__mro__):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(request=request)


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
                except (TypeError, ValueError, OverflowError):
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
    """Whether and how long to wait before the SDK's loop tries a failed attempt again.

    How many times is the SDK's ``max_retries`` (``OpenAI(max_retries=...)``,
    ``with_options(max_retries=...)`` or per request). The default decision is Moonshot's
    rules first, then the SDK's own (``x-should-retry``, 408/409/429/5xx, no retry when the
    server asks for more than ``max_wait``). The default wait is what Moonshot's message asks
    ("try again after N seconds", plus up to ``jitter`` seconds so that a crowd of workers
    spreads out), else the SDK's own: ``Retry-After``, else ``initial_wait * 2^n`` seconds up
    to ``max_backoff``, jittered (the SDK's own computation while these are its numbers).
    ``retry_strategy`` and ``wait_strategy`` replace the defaults with any tenacity strategies;
    they see the SDK's status error for a 4xx/5xx, an ``APIConnectionError`` otherwise.
    """

    initial_wait: float = 0.5  # the SDK's INITIAL_RETRY_DELAY
    max_backoff: float = 8.0  # the SDK's MAX_RETRY_DELAY
    max_wait: float = MAX_SERVER_WAIT
    jitter: float = 0.25
    retry_strategy: retry_base | None = field(default=None, compare=False)
    wait_strategy: wait_base | None = field(default=None, compare=False)

    def should_retry(
        self, failure: BaseException, attempt: int = 1, sdk: Callable[[], bool] | None = None
    ) -> bool:
        """Whether to try again after attempt number ``attempt`` failed with ``failure``.

        ``sdk`` is the SDK's own verdict, asked only when Moonshot's rules have none.
        """
        strategy = self.retry_strategy or _moonshot_retry(self, sdk)
        return bool(strategy(_failed_attempt(failure, attempt)))

    def wait(
        self,
        attempt: int,
        failure: BaseException | None,
        sdk: Callable[[], float] | None = None,
    ) -> float:
        """Seconds to wait after attempt number ``attempt`` failed (with ``failure``, if known).

        ``sdk`` is the SDK's own wait, used when Moonshot's message asks for none.
        """
        strategy = self.wait_strategy or _moonshot_wait(self, sdk)
        value = float(strategy(_failed_attempt(failure, attempt)))
        return value if math.isfinite(value) and value > 0 else 0.0

    def verdict(self, failure: BaseException) -> bool | None:
        """Moonshot's rules: False for what waiting cannot fix, None when they do not say."""
        if not isinstance(failure, openai.APIStatusError):
            return None
        kind = error_type(failure)
        if kind in NEVER_RETRY_TYPES:
            return False  # an empty balance, a filtered prompt, a terminated account
        if failure.status_code == 429 and kind is not None and kind not in RETRYABLE_TYPES:
            return False  # a 429 that is not "slow down"
        asked = message_wait(failure)
        if asked is not None and asked > self.max_wait:
            return False  # fail fast, as the SDK does for a Retry-After over its limit
        return None

    def asked(self, failure: BaseException | None) -> float | None:
        """The wait Moonshot's message asks for (with jitter), if it asks and headers do not."""
        asked = message_wait(failure) if failure is not None else None
        if asked is None or asked > self.max_wait:
            return None
        return float(asked + random.uniform(0, self.jitter))

    def backoff(self, attempt: int) -> float:
        """Jittered exponential backoff after attempt number ``attempt``."""
        backoff = min(self.initial_wait * 2.0 ** (attempt - 1), self.max_backoff)
        return float(backoff * random.uniform(1 - self.jitter, 1.0))

    @property
    def sdk_backoff(self) -> bool:
        """Whether the backoff is the SDK's own (its numbers), so its computation is used."""
        return (self.initial_wait, self.max_backoff, self.jitter) == (0.5, 8.0, 0.25)


def message_wait(failure: BaseException) -> float | None:
    """The wait in Moonshot's message, when the response has no ``Retry-After`` header."""
    headers = getattr(getattr(failure, "response", None), "headers", None)
    if headers is not None and (headers.get("retry-after-ms") or headers.get("retry-after")):
        return None  # the SDK reads those itself
    match = _AFTER_SECONDS.search(str(getattr(failure, "message", "") or failure))
    return float(match.group(1)) if match else None


def _moonshot_retry(policy: RetryPolicy, sdk: Callable[[], bool] | None) -> retry_base:
    import tenacity

    def moonshot_allows(exc: BaseException) -> bool:
        return policy.verdict(exc) is not False

    def sdk_allows(exc: BaseException) -> bool:
        return sdk() if sdk is not None else is_retryable(exc)

    return tenacity.retry_if_exception(moonshot_allows) & tenacity.retry_if_exception(sdk_allows)


def _moonshot_wait(policy: RetryPolicy, sdk: Callable[[], float] | None) -> wait_base:
    from tenacity.wait import wait_base

    class MessageOrSdk(wait_base):
        """What Moonshot's message asks, else the SDK's own wait."""

        def __call__(self, state: tenacity.RetryCallState) -> float:
            failure = state.outcome.exception() if state.outcome is not None else None
            asked = policy.asked(failure)
            if asked is not None:
                return asked
            if sdk is not None and policy.sdk_backoff:
                return float(sdk())
            header = server_wait(failure) if failure is not None else None
            if header is not None and 0 < header <= policy.max_wait:
                return header
            return policy.backoff(state.attempt_number)

    return MessageOrSdk()


def _failed_attempt(failure: BaseException | None, attempt: int) -> tenacity.RetryCallState:
    """A tenacity call state for attempt number ``attempt``, which failed with ``failure``."""
    import tenacity

    state = tenacity.RetryCallState(
        retry_object=None,  # type: ignore[arg-type]  # the SDK's loop, not a Retrying
        fn=None,
        args=(),
        kwargs={},
    )
    state.attempt_number = max(attempt, 1)
    if failure is None:
        failure = openai.APIConnectionError(request=None)  # type: ignore[arg-type]
    state.set_exception((type(failure), failure, failure.__traceback__))
    return state


# The status error _should_retry judged last in this thread or task, keyed by its response's
# headers: _calculate_retry_timeout, which the SDK calls next with those headers only, reads
# the wait from its body ("try again after N seconds").
_JUDGED: contextvars.ContextVar[tuple[Any, BaseException] | None] = contextvars.ContextVar(
    "kimi_budget_judged", default=None
)


def judge(
    policy: RetryPolicy, error: BaseException, headers: Any, attempt: int, sdk: Callable[[], bool]
) -> bool:
    """``_should_retry``: whether to retry the status error ``error``; remembers it."""
    _JUDGED.set((headers, error))
    retry = policy.should_retry(error, attempt, sdk)
    if not retry:
        log.debug("kimi-budget: not retrying %s", _short(error))
    return retry


def wait_after(policy: RetryPolicy, headers: Any, attempt: int, sdk: Callable[[], float]) -> float:
    """``_calculate_retry_timeout``: the seconds to wait after attempt number ``attempt``."""
    judged = _JUDGED.get()
    failure = judged[1] if judged is not None and judged[0] is headers else None
    _JUDGED.set(None)
    seconds = policy.wait(attempt, failure, sdk)
    log.info(
        "kimi-budget: attempt %d failed (%s); retrying in %.2f s",
        attempt,
        _short(failure) if failure is not None else "no answer",
        seconds,
    )
    return seconds


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    status = getattr(exc, "status_code", None)
    kind = error_type(exc)
    return " ".join(str(part) for part in (type(exc).__name__, status, kind) if part)
