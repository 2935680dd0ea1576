"""The life of one guarded chat completion, shared by the sync and async clients.

``prepare`` runs before anything is sent: it prices the model, counts the prompt, checks the
context window and projects the worst-case cost. ``Call`` then holds the ledger reservation
across the HTTP attempts and settles it exactly once, whichever way the call ends: a response,
an API error, a connection error, an interrupt, or a stream that completes, fails, is closed
early or is garbage-collected. A failure to write the ledger after a billed call never reaches
the caller: the settlement goes to the fallback file instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import openai

from ._budget import Budget
from ._exceptions import ContextLengthExceededError, LedgerError
from ._redact import redact
from ._retry import RetryPolicy, error_type, log, was_sent
from ._tokens import TokenEstimate, count_request_tokens
from ._usage import BodySniffer, SseSniffer, Usage, read_usage, usage_from_body
from .ledger import Ledger, Reservation, Settlement
from .pricing import ModelPrice, PriceTable

__all__ = ["ACTIVE_CALL", "Call", "GuardSettings", "Prepared", "is_chat_completion", "prepare"]

# The call whose HTTP attempts are under way in this thread or task.
ACTIVE_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "kimi_budget_call", default=None
)

TokenCounter = Callable[[Mapping[str, Any]], int]
_DEFAULT_TIMEOUT = 600.0  # the SDK's own default read timeout


@dataclass
class GuardSettings:
    """Everything a guarded client (and its copies) shares."""

    ledger: Ledger
    budgets: tuple[Budget, ...]
    tags: dict[str, str]
    prices: PriceTable
    token_counter: TokenCounter | None = None
    exact_tokens: str = "auto"  # "auto": ask Moonshot when too close to call; "always"; "never"
    reservation_margin: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def now(self) -> datetime:
        return self.ledger.clock()


@dataclass
class Prepared:
    """A request that passed the pre-checks, ready to be reserved."""

    body: dict[str, Any]
    price: ModelPrice
    estimate: TokenEstimate
    max_tokens: int | None  # the request's own limit, if it set one
    choices: int

    @property
    def max_output(self) -> int:
        """The most output tokens each choice can bill."""
        if self.max_tokens is not None:
            return self.max_tokens
        # Without max_tokens the server stops at its default or at the end of the window.
        room = max(self.price.context_window - self.estimate.tokens, 0)
        default = self.price.default_max_tokens
        # A model priced by the user without its default output: the whole window.
        return room if default is None else min(default, room)

    @property
    def projected_nanos(self) -> int:
        return (
            self.estimate.tokens * self.price.cache_miss
            + self.max_output * self.choices * self.price.output
        )


def is_chat_completion(options: Any) -> bool:
    url = str(getattr(options, "url", ""))
    return options.method.lower() == "post" and url.rstrip("/").endswith("chat/completions")


def request_body(options: Any) -> dict[str, Any]:
    """The JSON body the SDK will send: ``json_data`` plus ``extra_body``."""
    body: dict[str, Any] = {}
    if isinstance(options.json_data, Mapping):
        body.update(options.json_data)
    extra = getattr(options, "extra_json", None)
    if isinstance(extra, Mapping):
        body.update(extra)
    return body


def prepare(
    settings: GuardSettings,
    body: dict[str, Any],
    exact_count: Callable[[dict[str, Any]], int] | None,
) -> Prepared:
    """Price, count and bound a request before anything is sent.

    ``exact_count`` asks Moonshot's free estimate endpoint; it is used when the user asked for
    it, or when only an approximate count says the request does not fit.
    """
    model = body.get("model")
    price = settings.prices.get(model if isinstance(model, str) else repr(model))
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    explicit = _positive_int(limit)
    choices = _positive_int(body.get("n")) or 1
    estimate = _count(settings, body, price, exact_count)
    if explicit is not None and estimate.tokens + explicit > price.context_window:
        if not estimate.exact and exact_count is not None and settings.exact_tokens != "never":
            try:
                estimate = TokenEstimate(exact_count(body), True, "endpoint")
            except (openai.APIError, ExactCountUnavailable) as exc:
                # Never refuse on an approximation alone: the server judges it, for free.
                log_count_failure(exc)
                return Prepared(body, price, estimate, explicit, choices)
        if estimate.tokens + explicit > price.context_window:
            raise ContextLengthExceededError(
                model=price.model,
                prompt_tokens=estimate.tokens,
                max_tokens=explicit,
                context_window=price.context_window,
                exact=estimate.exact,
            )
    return Prepared(body, price, estimate, explicit, choices)


class ExactCountUnavailable(Exception):
    """Moonshot's exact count was needed but could not be had (already logged)."""


def log_count_failure(exc: BaseException) -> None:
    if not isinstance(exc, ExactCountUnavailable):
        # The class and status only: an SDK message may quote the server, key and all.
        status = getattr(exc, "status_code", "")
        log.warning(
            "kimi-budget: could not confirm the token count with Moonshot (%s %s); "
            "going by the local estimate",
            type(exc).__name__,
            status,
        )


def recount_exactly(
    prepared: Prepared, exact_count: Callable[[dict[str, Any]], int] | None, settings: GuardSettings
) -> bool:
    """Replace an approximate count with Moonshot's exact one; True if it changed anything."""
    if prepared.estimate.exact or exact_count is None or settings.exact_tokens == "never":
        return False
    try:
        exact = exact_count(prepared.body)
    except (openai.APIError, ExactCountUnavailable) as exc:
        log_count_failure(exc)
        return False
    prepared.estimate = TokenEstimate(exact, True, "endpoint")
    return True


def _count(
    settings: GuardSettings,
    body: dict[str, Any],
    price: ModelPrice,
    exact_count: Callable[[dict[str, Any]], int] | None,
) -> TokenEstimate:
    if settings.token_counter is not None:
        return TokenEstimate(int(settings.token_counter(body)), True, "custom")
    if settings.exact_tokens == "always" and exact_count is not None:
        return TokenEstimate(exact_count(body), True, "endpoint")
    try:
        return count_request_tokens(body, price.tokenizer)
    except ImportError:
        # No local vocabulary (splintr missing): count conservatively; exact=False makes a
        # refusal wait for Moonshot's own count.
        return count_request_tokens(body, "approximate")


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def read_timeout(timeout: Any) -> float:
    """The seconds one attempt may wait for the server, from a float or an httpx Timeout."""
    if timeout is None:
        return _DEFAULT_TIMEOUT
    if isinstance(timeout, int | float):
        return float(timeout)
    value = getattr(timeout, "read", None)
    return float(value) if isinstance(value, int | float) else _DEFAULT_TIMEOUT


class Call:
    """One chat completion between its reservation and its settlement."""

    def __init__(
        self,
        settings: GuardSettings,
        prepared: Prepared,
        *,
        tags: Mapping[str, str],
        stream: bool,
        timeout: float,
        secrets: tuple[str, ...],
    ) -> None:
        self.settings = settings
        self.prepared = prepared
        self.secrets = secrets
        self.timeout = timeout
        self.started = time.perf_counter()
        now = settings.now()
        price = prepared.price
        self.reservation = Reservation(
            call_id=uuid.uuid4().hex,
            model=price.model,
            tags=dict(tags),
            created_at=now,
            expires_at=now + timedelta(seconds=timeout + settings.reservation_margin),
            projected_nanos=prepared.projected_nanos,
            prompt_estimate=prepared.estimate.tokens,
            price_cache_hit=price.cache_hit,
            price_cache_miss=price.cache_miss,
            price_output=price.output,
            stream=stream,
        )
        self.attempts = 0
        self.request_id: str | None = None
        self.streaming = False  # a 2xx body is still flowing to the caller
        self.body_response: Any = None
        self.in_flight = False
        self.unanswered = 0  # attempts sent that got no answer (timeouts, dropped connections)
        self._renew_at = time.monotonic() + (timeout + settings.reservation_margin) / 2
        self._settled = False
        self._lock = threading.Lock()

    # -- attempts ----------------------------------------------------------------------

    def before_attempt(self, number: int) -> None:
        if number > 1:
            # A retrying call is alive: keep its reservation from expiring under it.
            expires = self.settings.now() + timedelta(
                seconds=self.timeout + self.settings.reservation_margin
            )
            # If this fails the reservation still holds until its first expiry.
            with contextlib.suppress(LedgerError):
                self.settings.ledger.extend(self.reservation.call_id, expires)

    def on_response(self, response: Any, streamed: bool) -> SseSniffer | BodySniffer | None:
        """Note one HTTP attempt's response; returns a sniffer for a streamed 2xx body."""
        self.in_flight = False
        self.attempts += 1
        headers = response.headers
        self.request_id = (
            headers.get("msh-request-id") or headers.get("x-request-id") or self.request_id
        )
        if response.status_code >= 400:
            return None
        if not streamed:
            self.body_response = response
            return None
        self.streaming = True
        encoding = headers.get("content-encoding")
        if "event-stream" in headers.get("content-type", ""):
            return SseSniffer(encoding)
        return BodySniffer(encoding)

    def on_transport_error(self, exc: BaseException) -> None:
        self.in_flight = False
        self.attempts += 1
        if was_sent(exc):
            self.unanswered += 1

    def keep_alive(self) -> None:
        """A stream still flowing renews its reservation before it can expire under it."""
        if time.monotonic() < self._renew_at:
            return
        lease = self.timeout + self.settings.reservation_margin
        self._renew_at = time.monotonic() + lease / 2
        with contextlib.suppress(LedgerError):
            self.settings.ledger.extend(
                self.reservation.call_id, self.settings.now() + timedelta(seconds=lease)
            )

    # -- endings -----------------------------------------------------------------------

    def succeeded(self, result: Any) -> None:
        """The SDK returned; settle now unless the body is still streaming to the caller."""
        if self.streaming:
            return
        usage_raw = getattr(result, "usage", None)
        usage = read_usage(usage_raw) if usage_raw is not None else None
        response_id = getattr(result, "id", None) if usage is not None else None
        problem = None
        if usage is None and self.body_response is not None:
            usage, response_id, problem = _usage_of_body(self.body_response)
        self._finish_with_usage(usage, response_id, problem, status="ok")

    def failed(self, exc: BaseException) -> None:
        """The call raised before a body reached the caller."""
        if self.body_response is not None:
            # A 2xx body arrived (so it was billed) but the SDK could not hand it over.
            usage, response_id, problem = _usage_of_body(self.body_response)
            self.request_id = self.request_id or response_id
            self._finish_with_usage(usage, response_id, problem or _describe(exc), status="error")
        elif isinstance(exc, openai.APIStatusError):
            reason = f"HTTP {exc.status_code} {error_type(exc) or ''}: {exc.message}"
            usage = _usage_in_error(exc)
            self._settle("error", usage, estimated=False, error=reason)
        elif self.unanswered:
            # A request that timed out or lost its connection after it was sent may have been
            # billed: charge the prompt's estimate, flagged, rather than $0.
            self._estimate("error", output_tokens=0, error=_describe(exc))
        elif isinstance(exc, openai.OpenAIError):  # never sent (connection refused, ...)
            self._settle("error", None, estimated=False, error=_describe(exc))
        elif self.in_flight:
            # Interrupted (Ctrl-C, task cancelled) while a request was on the wire: the
            # server may bill the prompt, so charge its estimate.
            self._estimate("interrupted", output_tokens=0, error=_describe(exc))
        else:
            status = "cancelled" if self.attempts == 0 else "error"
            self._settle(status, None, estimated=False, error=_describe(exc))

    def stream_ended(
        self, sniffer: SseSniffer | BodySniffer, how: str, exc: BaseException | None = None
    ) -> None:
        """A streamed body finished (``complete``), was closed early, failed, or was collected."""
        if isinstance(sniffer, BodySniffer):
            usage, response_id, problem = (
                sniffer.result() if how == "complete" else (None, None, None)
            )
            if how != "complete":
                # A whole response was generated (and billed) before its headers arrived:
                # charge the worst case, flagged, since its usage was never read.
                self._estimate(
                    "abandoned",
                    output_tokens=self.prepared.max_output * self.prepared.choices,
                    note="the response body was not read; cost estimated at the worst case",
                    warn=True,
                )
                return
            self._finish_with_usage(usage, response_id, problem, status="ok")
            return
        sniffer.finish()
        if how == "closed" and sniffer.done:
            how = "complete"  # the SDK closes the response as soon as it reads [DONE]
        problem = "; ".join(sniffer.problems) or None
        if sniffer.usage is not None:
            self._finish_with_usage(sniffer.usage, sniffer.response_id, problem, status="ok")
            return
        if how == "complete":
            status, note = "ok", "the stream ended without usage"
        elif how == "failed":
            status, note = (
                "error",
                f"the stream failed midway ({_describe(exc) if exc else 'unknown'})",
            )
        else:
            status, note = "abandoned", "the stream was closed before its usage arrived"
        if sniffer.undecodable:
            note += "; its encoding could not be read"
        self.request_id = self.request_id or sniffer.response_id
        self._estimate(
            status,
            output_tokens=sniffer.chunks,
            note=f"{note}; cost estimated from the prompt and {sniffer.chunks} chunks seen"
            + (f"; {problem}" if problem else ""),
            error=note if status == "error" else None,
            warn=how == "complete" or problem is not None,
        )

    def _finish_with_usage(
        self,
        usage: Usage | None,
        response_id: str | None,
        problem: str | None,
        *,
        status: str,
    ) -> None:
        self.request_id = self.request_id or response_id
        if usage is None:
            self._estimate(
                status,
                output_tokens=0,
                note=f"{problem or 'no usage in the response'}; cost estimated from the request",
                warn=True,
            )
            return
        note = "; ".join(usage.problems) or None
        self._settle(status, usage, estimated=False, note=note, warn=bool(note))

    def _estimate(
        self,
        status: str,
        *,
        output_tokens: int,
        note: str | None = None,
        error: str | None = None,
        warn: bool = False,
    ) -> None:
        usage = Usage(self.prepared.estimate.tokens, 0, output_tokens)
        self._settle(status, usage, estimated=True, note=note, error=error, warn=warn)

    def _settle(
        self,
        status: str,
        usage: Usage | None,
        *,
        estimated: bool,
        note: str | None = None,
        error: str | None = None,
        warn: bool = False,
    ) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        price = self.prepared.price
        cost = 0
        if usage is not None:
            cost = price.cost_nanos(
                usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens
            )
        settlement = Settlement(
            reservation=self.reservation,
            status=status,
            prompt_tokens=usage.prompt_tokens if usage else None,
            cached_tokens=usage.cached_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            cost_nanos=cost,
            estimated=estimated,
            attempts=self.attempts,
            finished_at=self.settings.now(),
            request_id=self.request_id,
            latency_ms=int((time.perf_counter() - self.started) * 1000),
            error=redact(error, self.secrets)[:1000] if error else None,
            note=redact(note, self.secrets)[:1000] if note else None,
        )
        try:
            self.settings.ledger.settle(settlement)
        except LedgerError as exc:
            self.settings.ledger.write_fallback(settlement, exc)
        # Warn only once the call is recorded: under -W error the warning is an exception.
        if warn and settlement.note:
            import warnings

            # The redacted note: a response that echoes the API key must not carry it out here.
            warnings.warn(
                f"kimi-budget: {self.reservation.model} call {self.reservation.call_id}: "
                f"{settlement.note}.",
                RuntimeWarning,
                stacklevel=4,
            )


def _usage_of_body(response: Any) -> tuple[Usage | None, str | None, str | None]:
    try:
        data = json.loads(response.content)
    except ValueError:
        return None, None, "the response body is not JSON"
    return usage_from_body(data)


def _usage_in_error(exc: openai.APIStatusError) -> Usage | None:
    body = exc.body if isinstance(exc.body, dict) else None
    if body is None:
        return None
    raw = body.get("usage")
    if raw is None and isinstance(body.get("error"), dict):
        raw = body["error"].get("usage")
    return read_usage(raw)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
