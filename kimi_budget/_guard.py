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
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import openai

from ._budget import Budget
from ._exceptions import ContextLengthExceededError, InvalidRequestError, LedgerError
from ._redact import redact
from ._retry import RetryPolicy, error_type, was_sent
from ._streams import body_was_read, new_sniffer, watch_body
from ._tokens import TokenEstimate, count_request_tokens
from ._usage import (
    BodySniffer,
    SseSniffer,
    Usage,
    describe_usage_problem,
    read_usage,
    usage_from_body,
)
from .ledger import LateSettlement, Ledger, Reservation, Settlement, new_call_id
from .ledger._backend import on_event_loop
from .pricing import ModelPrice, PriceTable, declares_web_search, requested_cache_ttl
from .pricing._bill import Extras, charge

__all__ = ["ACTIVE_CALL", "Call", "GuardSettings", "Prepared", "is_chat_completion", "prepare"]

# The call whose HTTP attempts are under way in this thread or task.
ACTIVE_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "kimi_budget_call", default=None
)

log = logging.getLogger("kimi_budget")

TokenCounter = Callable[[Mapping[str, Any]], int]
_DEFAULT_TIMEOUT = 600.0  # the SDK's own default read timeout


@dataclass
class GuardSettings:
    """Everything a guarded client (and its copies) shares."""

    ledger: Ledger
    budgets: tuple[Budget, ...]  # every budget in force, those below included
    tags: dict[str, str]
    prices: PriceTable
    token_counter: TokenCounter | None = None
    exact_tokens: str = "auto"  # "auto": ask Moonshot when too close to call; "always"; "never"
    reservation_margin: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Budgets from the environment or a configuration file: in force whatever budget= says,
    # in copies too (``with_options(budget=...)`` adds to them, never lifts them).
    configured_budgets: tuple[Budget, ...] = ()

    def now(self) -> datetime:
        return self.ledger.clock()


@dataclass
class Prepared:
    """A request that passed the pre-checks, ready to be reserved."""

    body: dict[str, Any]
    price: ModelPrice
    estimate: TokenEstimate
    max_tokens: int | None  # the smallest output limit the request set (the context check)
    choices: int
    # The largest limit set (``max_tokens`` and ``max_completion_tokens`` both given: either
    # may be the one the server honours), or None; ``limit_unreadable``: a limit was given in
    # a shape we cannot read (the server may still honour it).
    output_limit: int | None = None
    limit_unreadable: bool = False

    @property
    def max_output(self) -> int:
        """The most output tokens each choice can bill.

        Never less than the server can generate: an approximate prompt count may be too high,
        so it only narrows the room left in the context window when it is exact.
        """
        room = self.price.context_window - (self.estimate.tokens if self.estimate.exact else 0)
        room = max(room, 0)
        limit = self.output_limit if self.output_limit is not None else self.max_tokens
        if limit is not None and not self.limit_unreadable:
            return min(limit, room)
        if self.limit_unreadable:
            return room
        default = self.price.default_max_tokens
        if default is None:
            # A model priced by the user without its default output: the whole window.
            return room
        return min(default, room)

    def use_exact_count(self, tokens: int) -> None:
        """Moonshot's exact prompt count replaces the estimate, and the projection made from it."""
        self.estimate = TokenEstimate(tokens, True, "endpoint")
        self.__dict__.pop("projected_nanos", None)

    @property
    def output_from_default(self) -> bool:
        """The request set no output limit: its projection assumed the model's default."""
        return (
            self.max_tokens is None
            and self.output_limit is None
            and not self.limit_unreadable
            and self.price.default_max_tokens is not None
        )

    @cached_property  # read by the cap checks, the reservation and the settlement
    def projected_nanos(self) -> int:
        """Worst case: every prompt token a miss (written to the cache at the requested TTL's
        price), every choice at its full output, a ``$web_search`` fee per choice if the
        request declares the tool (``pricing.ModelPrice.projected_nanos``)."""
        return self.price.projected_nanos(
            self.estimate.tokens,
            self.max_output,
            self.choices,
            cache_ttl=requested_cache_ttl(self.body),
            web_search=declares_web_search(self.body),
        )


def is_chat_completion(options: Any) -> bool:
    """Whether ``options`` sends a chat completion (any URL form: relative, absolute, with a
    query string or a trailing slash)."""
    if str(getattr(options, "method", "")).lower() != "post":
        return False
    path = urlsplit(str(getattr(options, "url", ""))).path.rstrip("/")
    return path == "chat/completions" or path.endswith("/chat/completions")


def request_body(options: Any) -> dict[str, Any]:
    """The JSON body the SDK will send: ``json_data`` plus ``extra_body``."""
    body: dict[str, Any] = {}
    if isinstance(options.json_data, Mapping):
        body.update(options.json_data)
    extra = getattr(options, "extra_json", None)
    if isinstance(extra, Mapping):
        body.update(extra)
    return body


# The ledger stores nano-units in a signed 64-bit integer.
_MAX_NANOS = 2**63 - 1


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
    explicit, largest, unreadable = _output_limits(body)
    choices = _positive_int(body.get("n")) or 1
    estimate = _count(settings, body, price, exact_count)

    def prepared() -> Prepared:
        result = Prepared(body, price, estimate, explicit, choices, largest, unreadable)
        _check_representable(result)
        return result

    if explicit is not None and estimate.tokens + explicit > price.context_window:
        if not estimate.exact and exact_count is not None and settings.exact_tokens != "never":
            try:
                estimate = TokenEstimate(exact_count(body), True, "endpoint")
            except (openai.APIError, ExactCountUnavailable) as exc:
                # Never refuse on an approximation alone: the server judges it, for free.
                log_count_failure(exc)
                return prepared()
        if estimate.tokens + explicit > price.context_window:
            raise ContextLengthExceededError(
                model=price.model,
                prompt_tokens=estimate.tokens,
                max_tokens=explicit,
                context_window=price.context_window,
                exact=estimate.exact,
            )
    return prepared()


def _output_limits(body: Mapping[str, Any]) -> tuple[int | None, int | None, bool]:
    """(smallest limit, largest limit, a limit was unreadable) of ``max_tokens`` and
    ``max_completion_tokens``."""
    readings: list[int] = []
    unreadable = False
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        count = _positive_int(value)
        if count is None:
            unreadable = True
        else:
            readings.append(count)
    if not readings:
        return None, None, unreadable
    return min(readings), max(readings), unreadable


def _check_representable(prepared: Prepared) -> None:
    if prepared.projected_nanos > _MAX_NANOS:
        raise InvalidRequestError(
            f"Refused before sending: n={prepared.choices} choices of up to "
            f"{prepared.max_output} output tokens each is more than kimi-budget can reserve or "
            f"record for {prepared.price.model}. Lower n (Moonshot accepts 1 to 5) or max_tokens."
        )


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
    prepared.use_exact_count(exact)
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
    """A count the server would read as a positive whole number (``5``, ``5.0``, ``"5"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and value > 0:
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
    """One chat completion between its reservation and its settlement.

    The rule on unknown bills: a call that was sent and whose bill cannot be read (a stream
    closed, dropped or never read before its usage; a timeout, cancellation or interrupt after
    sending; a response without usage, or with usage that does not add up) is charged its full
    reservation, flagged ``estimated`` with the reason in ``note``. The ledger replaces that
    charge only with a real bill. Every attempt's reported usage (error bodies included) is
    summed into the call.
    """

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
            call_id=new_call_id(),
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
            currency=price.currency,
        )
        self.extras = Extras()  # fees and cache writes read from the response
        self.attempts = 0
        self.request_id: str | None = None
        self.streaming = False  # a 2xx body is still flowing to the caller
        self.body_response: Any = None
        self.in_flight = False
        self.unanswered = 0  # attempts sent that got no answer (timeouts, dropped connections)
        self._last_unanswered = False
        # Bills of attempts that did not deliver the result (error bodies with usage).
        self._reported: list[Usage] = []
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
            self._renew_lease(expires)

    def on_response(self, response: Any, streamed: bool) -> None:
        """Note one HTTP attempt's response, and watch its body for the bill.

        An error body's usage is read at once (the SDK's retry loop may close it unread). A
        2xx body already read (not streamed, or read by an event hook of the caller's
        ``http_client``) is kept for ``succeeded``; one still to be read gets a tee.
        """
        self.in_flight = False
        self._last_unanswered = False
        self.attempts += 1
        headers = response.headers
        self.request_id = (
            headers.get("msh-request-id") or headers.get("x-request-id") or self.request_id
        )
        if response.status_code >= 400:
            self._note_error_body(response)
            return
        if not streamed or body_was_read(response):
            self.body_response = response
            if streamed:
                # A streamed body someone read before us: its bill is already known.
                self.streaming = True
                self.stream_ended(_read_body_sniffer(response), "complete")
            return
        self.streaming = True
        watch_body(response, self, new_sniffer(response))

    def _note_error_body(self, response: Any) -> None:
        if not body_was_read(response):
            try:
                response.read()
            except Exception:  # an async body (read by the async client first), or torn
                return
        try:
            data = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            return
        usage = _usage_in_error_body(data)
        if usage is not None:
            self._reported.append(usage)

    def on_transport_error(self, exc: BaseException) -> None:
        self.in_flight = False
        self.attempts += 1
        if was_sent(exc):
            self.unanswered += 1
            self._last_unanswered = True

    def keep_alive(self) -> None:
        """A stream still flowing renews its reservation before it can expire under it."""
        if time.monotonic() < self._renew_at:
            return
        lease = self.timeout + self.settings.reservation_margin
        self._renew_at = time.monotonic() + lease / 2
        self._renew_lease(self.settings.now() + timedelta(seconds=lease))

    def _renew_lease(self, expires: datetime) -> None:
        """Move the reservation's expiry to ``expires``.

        On an event loop the write happens in a short-lived thread: a ledger another process
        is writing (or a server ledger's round trip) must not stall every task of the loop,
        and a renewal has half a lease to land. If it fails, the reservation still holds
        until its current expiry, then is charged its worst case (the rule on unknown bills).
        """

        def renew() -> None:
            with contextlib.suppress(LedgerError):
                # A share of an allotment renews the allotment that holds its budget.
                self.settings.ledger.extend(self.reservation.held_by, expires)

        if on_event_loop():
            threading.Thread(target=renew, name="kimi-budget lease", daemon=True).start()
        else:
            renew()

    # -- endings -----------------------------------------------------------------------

    def succeeded(self, result: Any) -> None:
        """The SDK returned; settle unless the body is still streaming to the caller.

        The bill is read, and the settlement built, by the ledger's background writer (a
        ``LateSettlement``): off the caller's path. The call is over; nothing changes it now.
        """
        if self.streaming or not self._claim():
            return
        finished_at, latency_ms = self.settings.now(), self._latency_ms()

        def build() -> Settlement:
            usage, problem = self._bill_of(result)
            return self._settlement(
                "ok",
                usage,
                unknown=None if usage is not None else problem or "no usage in the response",
                finished_at=finished_at,
                latency_ms=latency_ms,
            )

        self.settings.ledger.settle_later(LateSettlement(self.reservation, build))

    def _bill_of(self, result: Any) -> tuple[Usage | None, str | None]:
        """The usage of a returned result (or of its body), and why it is unknown if it is."""
        usage_raw = getattr(result, "usage", None)
        self.extras.read_response(result)
        usage = read_usage(usage_raw) if usage_raw is not None else None
        response_id = getattr(result, "id", None) if usage is not None else None
        problem = None if usage is not None else describe_usage_problem(usage_raw)
        if usage is None and self.body_response is not None:
            usage, response_id, problem = _usage_of_body(self.body_response, self.extras)
        self.request_id = self.request_id or (response_id if isinstance(response_id, str) else None)
        return usage, problem

    def failed(self, exc: BaseException) -> None:
        """The call raised before a body reached the caller."""
        if self.body_response is not None:
            # A 2xx body arrived (so it was billed) but the SDK could not hand it over.
            usage, response_id, problem = _usage_of_body(self.body_response, self.extras)
            self.request_id = self.request_id or response_id
            self._finish("error", usage, problem, error=_describe(exc))
        elif self.streaming:
            # A 2xx body started (it is billed) but never reached the caller to be read.
            self._settle(
                "error",
                unknown="the response arrived but was never handed to the caller",
                error=_describe(exc),
            )
        elif isinstance(exc, openai.APIStatusError):
            reason = f"HTTP {exc.status_code} {error_type(exc) or ''}: {exc.message}"
            self._settle("error", error=reason)
        elif self._last_unanswered:
            # Sent, and no answer: the server may have generated (and billed) all of it.
            self._settle(
                "error",
                unknown="the request was sent but no answer came back",
                error=_describe(exc),
            )
        elif isinstance(exc, openai.OpenAIError):  # never sent (connection refused, ...)
            self._settle("error", error=_describe(exc))
        elif self.in_flight:
            # Interrupted (Ctrl-C, task cancelled) while a request was on the wire.
            self.in_flight = False
            self._settle(
                "interrupted",
                unknown=f"interrupted ({type(exc).__name__}) after the request was sent",
                error=_describe(exc),
            )
        else:
            status = "cancelled" if self.attempts == 0 else "error"
            self._settle(status, error=_describe(exc))

    def stream_ended(
        self, sniffer: SseSniffer | BodySniffer, how: str, exc: BaseException | None = None
    ) -> None:
        """A streamed body finished (``complete``), was closed early, failed, or was collected."""
        if isinstance(sniffer, BodySniffer):
            if how != "complete":
                self._settle(
                    "abandoned",
                    unknown="the response body was closed before it was read",
                )
                return
            usage, response_id, problem = sniffer.result()
            self.extras.read_response(sniffer.data)
            self.request_id = self.request_id or response_id
            self._finish("ok", usage, problem)
            return
        sniffer.finish()
        self.extras.read_stream(sniffer.tools, sniffer.raw_usage)
        if how == "closed" and sniffer.done:
            how = "complete"  # the SDK closes the response as soon as it reads [DONE]
        self.request_id = self.request_id or sniffer.response_id
        problems = "; ".join(sniffer.problems) or None
        if sniffer.usage is not None and not sniffer.bad_usage:
            self._finish("ok", sniffer.usage, None)
            return
        if sniffer.usage is not None or sniffer.bad_usage:
            status, reason = ("ok" if how == "complete" else "abandoned"), problems
        elif how == "complete":
            status, reason = "ok", "the stream ended without usage"
        elif how == "failed":
            detail = _describe(exc) if exc else "unknown"
            status, reason = "error", f"the stream failed before its usage arrived ({detail})"
        elif how == "collected":
            status, reason = "abandoned", "the stream was dropped before its usage arrived"
        else:
            status, reason = "abandoned", "the stream was closed before its usage arrived"
        if sniffer.undecodable:
            reason = f"{reason}; its body could not be decoded"
        elif problems and problems != reason:
            reason = f"{reason}; {problems}"
        self._settle(
            status, unknown=reason or "unknown", error=reason if status == "error" else None
        )

    def _finish(
        self, status: str, usage: Usage | None, problem: str | None, *, error: str | None = None
    ) -> None:
        if usage is None:
            self._settle(status, unknown=problem or "no usage in the response", error=error)
        else:
            self._settle(status, usage, error=error)

    def _settle(
        self,
        status: str,
        usage: Usage | None = None,
        *,
        unknown: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record the call: ``usage`` of the last attempt if known; ``unknown`` says why the
        last attempt's bill is not known (it is then charged the full reservation)."""
        if not self._claim():
            return
        settlement = self._settlement(
            status,
            usage,
            unknown=unknown,
            error=error,
            finished_at=self.settings.now(),
            latency_ms=self._latency_ms(),
        )
        # Applied by the ledger's background writer (or kept in its fallback file): off the
        # caller's path; the reservation holds the call's worst case until then.
        self.settings.ledger.settle_later(settlement)

    def _claim(self) -> bool:
        """True once: the first ending of a call is the one recorded."""
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            return True

    def _latency_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def _settlement(
        self,
        status: str,
        usage: Usage | None,
        *,
        unknown: str | None = None,
        error: str | None = None,
        finished_at: datetime,
        latency_ms: int,
    ) -> Settlement:
        """The call's settlement (see ``_settle``); an estimated bill is logged."""
        bills = list(self._reported)
        if usage is not None:
            bills.append(usage)
        reasons: list[str] = []
        # Attempts sent without an answer before the last one: each may have been billed.
        earlier = self.unanswered - (1 if self._last_unanswered and unknown else 0)
        if earlier > 0:
            reasons.append(f"{earlier} earlier attempt(s) sent without an answer")
        if unknown:
            reasons.append(unknown)
        read = list(bills)
        worst = Usage(self.prepared.estimate.tokens, 0, self._worst_output())
        bills += [worst] * (earlier + (1 if unknown else 0))
        price = self.prepared.price
        prompt = sum(b.prompt_tokens for b in bills)
        cached = sum(b.cached_tokens for b in bills)
        completion = sum(b.completion_tokens for b in bills)
        # Bills not read are charged their full projection (cache writes and fees included).
        body = self.prepared.body
        bill = charge(
            price,
            prompt=sum(b.prompt_tokens for b in read),
            cached=sum(b.cached_tokens for b in read),
            completion=sum(b.completion_tokens for b in read),
            extras=self.extras,
            cache_ttl=requested_cache_ttl(body),
            worst=len(bills) - len(read),
            worst_nanos=self.prepared.projected_nanos,
            worst_fee_nanos=price.fee_nanos(self.prepared.choices)
            if declares_web_search(body)
            else 0,
        )
        estimated = bool(reasons)
        note = None
        if estimated:
            note = "; ".join(reasons) + "; charged the full reservation"
        if bill.note:
            note = f"{note}; {bill.note}" if note else bill.note
        settlement = Settlement(
            reservation=self.reservation,
            status=status,
            prompt_tokens=prompt if bills else None,
            cached_tokens=cached if bills else None,
            completion_tokens=completion if bills else None,
            cost_nanos=bill.cost_nanos if bills else 0,
            fee_nanos=bill.fee_nanos if bills else 0,
            cache_write_tokens=bill.cache_write_tokens,
            estimated=estimated,
            attempts=self.attempts,
            finished_at=finished_at,
            request_id=self.request_id,
            latency_ms=latency_ms,
            error=redact(error, self.secrets)[:1000] if error else None,
            note=redact(note, self.secrets)[:1000] if note else None,
            usage_json=self._usage_json(bills),
        )
        if settlement.note:
            # A runtime event, not a programming error: logged (never warned), and kept in the
            # row's ``estimated`` flag and ``note``. The note is redacted.
            log.warning(
                "kimi-budget: %s call %s: %s",
                self.reservation.model,
                self.reservation.call_id,
                settlement.note,
            )
        return settlement

    def _usage_json(self, bills: list[Usage]) -> str | None:
        """The usage objects the server reported, as received (redacted): one object, or a
        list when several attempts reported one. Estimated bills have none."""
        raws = [raw for raw in (b.raw_json() for b in bills) if raw is not None]
        if not raws:
            return None
        text = json.dumps(raws[0] if len(raws) == 1 else raws, separators=(",", ":"), default=str)
        return redact(text, self.secrets)[:4000]

    def _worst_output(self) -> int:
        return self.prepared.max_output * self.prepared.choices


def _read_body_sniffer(response: Any) -> SseSniffer | BodySniffer:
    """A sniffer fed with a body already read (and decoded) by the HTTP library."""
    sniffer: SseSniffer | BodySniffer = (
        SseSniffer()
        if "event-stream" in response.headers.get("content-type", "")
        else BodySniffer()
    )
    try:
        sniffer.feed(response.content)
    except Exception:
        sniffer.undecodable = True
    return sniffer


def _usage_of_body(
    response: Any, extras: Extras | None = None
) -> tuple[Usage | None, str | None, str | None]:
    try:
        data = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None, None, "the response body is not JSON"
    if extras is not None:
        extras.read_response(data)
    return usage_from_body(data)


def _usage_in_error_body(body: Any) -> Usage | None:
    if not isinstance(body, dict):
        return None
    raw = body.get("usage")
    if raw is None and isinstance(body.get("error"), dict):
        raw = body["error"].get("usage")
    return read_usage(raw)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
