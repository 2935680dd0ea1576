"""``OpenAI`` and ``AsyncOpenAI``: the SDK's clients, guarded.

Modelled on the SDK's own ``AzureOpenAI``: a subclass that takes every argument the parent
takes, keeps its extra state through ``copy()``/``with_options()``, and hooks these methods:

- ``request()``, the single choke point of every endpoint: chat completions are pre-checked,
  reserved and settled around the SDK's own ``request()``, whose loop makes the HTTP attempts.
- ``_send_request()``, one HTTP attempt: counts attempts, keeps the reservation alive, puts a
  usage-watching tee on a streamed body (see ``_streams``), and stops the SDK's loop from
  sending again a chat completion that may have been billed without an answer.
- ``_should_retry()`` and ``_calculate_retry_timeout()``, the decision points of the SDK's
  retry loop: our policy (``_retry``) answers them for every endpoint.

Nothing the caller receives is changed: no ``stream_options`` are added, results are the
SDK's own objects, and errors from Moonshot are the SDK's own exception classes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import openai
from openai import NotGiven, not_given
from openai._constants import DEFAULT_MAX_RETRIES

from . import _batch
from ._balance import Balance, parse_balance
from ._batch import batch_action
from ._budget import Budget, canonical_tags
from ._config import (
    _seconds,
    budget_argument,
    load_file_config,
    merge_budgets,
    resolve_exact_tokens,
    resolve_prices,
    resolve_settings,
)
from ._exceptions import BudgetExceededError
from ._guard import (
    ACTIVE_CALL,
    Call,
    ExactCountUnavailable,
    GuardSettings,
    Prepared,
    is_chat_completion,
    log_count_failure,
    prepare,
    read_timeout,
    recount_exactly,
    request_body,
)
from ._provider import resolve_provider
from ._retry import explain_quota_error, judge, stop_resending, wait_after, was_sent
from ._streams import body_was_read
from .ledger import Ledger, Reservation
from .pricing import check_currency

if TYPE_CHECKING:
    import httpx2
    from openai import DataResidency, Timeout
    from openai._provider import _Provider
    from openai.auth import WorkloadIdentity, X509WorkloadIdentity
    from typing_extensions import Self

__all__ = ["AsyncOpenAI", "OpenAI"]

_GUARD_ARGS = (
    "currency",
    "ledger",
    "budget",
    "tags",
    "prices",
    "prices_file",
    "token_counter",
    "exact_tokens",
    "reservation_margin",
)


class _Guarded:
    """What the sync and async clients share (no I/O here)."""

    _kb: GuardSettings
    api_key: Any
    base_url: Any
    max_retries: int

    @property
    def ledger(self) -> Ledger:
        """The ledger this client records to."""
        return self._kb.ledger

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self._kb.budgets

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._kb.tags)

    def _kb_secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if isinstance(self.api_key, str) else ()

    def __init__(self, *, api_key: Any = None, base_url: Any = None, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in _GUARD_ARGS if name in kwargs}
        guard = _COPYING.get()  # set by copy(): the copied client's settings
        api_key, base_url = _credentials(api_key, base_url, kwargs)
        super().__init__(  # type: ignore[call-arg]  # the SDK client, next in the MRO
            api_key=api_key, base_url=base_url, **kwargs
        )
        # api.moonshot.cn bills in CNY: its table, caps and rows are in CNY (``currency=``
        # overrides, e.g. for a proxy in front of it).
        self._kb = guard if guard is not None else resolve_settings(**given, base_url=self.base_url)

    # -- the SDK's retry loop asks our policy (see _retry) -------------------------------

    def _should_retry(self, response: Any) -> bool:
        sdk = super()._should_retry  # type: ignore[misc]
        try:
            error = self._make_status_error_from_response(response)  # type: ignore[attr-defined]
        except RuntimeError:  # a response built without its request: the SDK's verdict
            return bool(sdk(response))
        try:
            attempt = int(response.request.headers.get("x-stainless-retry-count", "0")) + 1
        except (ValueError, RuntimeError):
            attempt = 1
        return judge(self._kb.retry, error, response.headers, attempt, lambda: sdk(response))

    def _calculate_retry_timeout(
        self, remaining_retries: int, options: Any, response_headers: Any = None
    ) -> float:
        attempt = options.get_max_retries(self.max_retries) - remaining_retries + 1
        sdk = super()._calculate_retry_timeout  # type: ignore[misc]
        return wait_after(
            self._kb.retry,
            response_headers,
            attempt,
            lambda: sdk(remaining_retries, options, response_headers),
        )

    def _kb_failed(self, call: Call, exc: BaseException) -> BaseException:
        """Settle a call that raised; the exception the caller should see."""
        call.failed(exc)
        return explain_quota_error(exc, self._kb_secrets())

    def _kb_copy(self, parent_copy: Callable[..., Any], given: dict[str, Any]) -> Any:
        """``copy()``'s work: the SDK's copy of the given arguments, our settings carried along.

        The SDK's copy builds ``self.__class__(...)`` from its own arguments; the settings reach
        that constructor through ``_COPYING``, so no private argument shows in its signature.
        """
        overrides = {name: given.pop(name) for name in _GUARD_ARGS if name in given}
        token = _COPYING.set(self._kb_copy_settings(overrides))
        try:
            return parent_copy(**given)
        finally:
            _COPYING.reset(token)

    def _kb_copy_settings(self, overrides: Mapping[str, Any]) -> GuardSettings:
        """The settings of a copy: these, with the given ones replaced (``tags`` merged)."""
        settings = self._kb
        if "ledger" in overrides:
            ledger = overrides["ledger"]
            settings = replace(
                settings, ledger=ledger if isinstance(ledger, Ledger) else Ledger(ledger)
            )
        if "budget" in overrides:
            given = budget_argument(overrides["budget"])
            # Caps from the environment or a configuration file stay in force in the copy.
            budgets = merge_budgets(given, settings.configured_budgets)
            settings = replace(settings, budgets=budgets)
        if "tags" in overrides:
            settings = replace(
                settings, tags={**settings.tags, **canonical_tags(overrides["tags"] or {})}
            )
        if {"prices", "prices_file", "currency"} & set(overrides):
            currency = overrides.get("currency") or settings.prices.currency
            table = resolve_prices(
                overrides.get("prices"),
                overrides.get("prices_file"),
                load_file_config(),
                currency=check_currency(currency),
            )
            settings = replace(settings, prices=table)
        if "token_counter" in overrides:
            settings = replace(settings, token_counter=overrides["token_counter"])
        if "exact_tokens" in overrides:
            exact = resolve_exact_tokens(overrides["exact_tokens"], load_file_config())
            settings = replace(settings, exact_tokens=exact)
        if "reservation_margin" in overrides:
            margin = _seconds(overrides["reservation_margin"], "reservation_margin", 60.0)
            settings = replace(settings, reservation_margin=margin)
        return settings

    def _kb_call(self, prepared: Prepared, options: Any, stream: bool) -> Call:
        timeout = (
            options.timeout
            if isinstance(options.timeout, int | float) or hasattr(options.timeout, "read")
            else getattr(self, "timeout", None)
        )
        return Call(
            self._kb,
            prepared,
            tags=self._kb.tags,
            stream=stream,
            timeout=read_timeout(timeout),
            secrets=self._kb_secrets(),
        )


def _credentials(api_key: Any, base_url: Any, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """The ``api_key`` and ``base_url`` to hand the SDK's constructor.

    An API key is resolved by our provider rules (``_provider``). A client that authenticates
    otherwise (``provider=``, ``workload_identity=``, ``admin_api_key=`` or
    ``_enforce_credentials=False``) is not refused for lacking one: the SDK judges it, as
    ``openai.OpenAI`` does, and never picks up ``OPENAI_API_KEY`` for Moonshot's URL by itself.
    """
    if kwargs.get("provider") is not None:
        return api_key, base_url  # the provider object configures the key and the URL
    try:
        return resolve_provider(api_key, base_url)
    except openai.OpenAIError:
        other_auth = (
            kwargs.get("workload_identity") is not None
            or kwargs.get("admin_api_key") is not None
            or kwargs.get("_enforce_credentials") is False
        )
        if api_key is not None or not other_auth:
            raise
    _, base_url = resolve_provider("", base_url)
    # Workload identity takes no key at all; otherwise an empty key stops the SDK from reading
    # OPENAI_API_KEY (which our rules just refused for this URL).
    return (None if kwargs.get("workload_identity") is not None else ""), base_url


# The settings a copy() hands to the client it builds (see _Guarded._kb_copy).
_COPYING: contextvars.ContextVar[GuardSettings | None] = contextvars.ContextVar(
    "kimi_budget_copying", default=None
)


@functools.cache
def _defaults(method: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(method).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _given(arguments: Mapping[str, Any], method: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments of a ``method`` call that differ from their defaults.

    Only those are passed on, so the SDK's defaults stay its own and an argument that one SDK
    major lacks (``data_residency`` before 3.x) is refused by that SDK only when it is used.
    """
    return {
        name: arguments[name]
        for name, default in _defaults(method).items()
        if arguments[name] is not default
    }


def _explained(exc: BudgetExceededError, prepared: Prepared) -> BudgetExceededError:
    """A refusal of a request that set no output limit says the default was projected."""
    if prepared.output_from_default:
        return exc.with_default_output(prepared.max_output)
    return exc


class OpenAI(_Guarded, openai.OpenAI):
    """``openai.OpenAI`` for Moonshot's Kimi API, with a hard cap on spend.

    Takes every argument ``openai.OpenAI`` takes, plus ``ledger``, ``budget``, ``tags``,
    ``prices``, ``prices_file``, ``token_counter``, ``exact_tokens`` and
    ``reservation_margin``. ``api_key`` defaults to ``MOONSHOT_API_KEY``, ``base_url`` to
    ``MOONSHOT_BASE_URL`` or Moonshot's international API; a key never crosses providers
    (see ``_provider``).
    """

    def __init__(
        self,
        *,
        api_key: str | Callable[[], str] | None = None,
        admin_api_key: str | None = None,
        workload_identity: WorkloadIdentity | X509WorkloadIdentity | None = None,
        organization: str | None = None,
        project: str | None = None,
        webhook_secret: str | None = None,
        provider: _Provider | None = None,
        base_url: str | httpx2.URL | NotGiven | None = not_given,
        data_residency: DataResidency | None = None,
        websocket_base_url: str | httpx2.URL | None = None,
        timeout: float | Timeout | NotGiven | None = not_given,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        http_client: httpx2.Client | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        budget: Budget | Iterable[Budget] | None = None,
        tags: Mapping[str, str] | None = None,
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        token_counter: Callable[[Mapping[str, Any]], int] | None = None,
        exact_tokens: str | None = None,
        reservation_margin: float | None = None,
        currency: str | None = None,
        _strict_response_validation: bool = False,
        _enforce_credentials: bool = True,
    ) -> None:
        """A guarded ``openai.OpenAI``: every argument of the SDK's, plus the guard's.

        An argument left at its default is not passed on, so the SDK's defaults stay its own
        (and ``data_residency``, new in openai 3.x, is refused by 2.x only when used).
        """
        super().__init__(**_given(locals(), OpenAI.__init__))

    def request(  # type: ignore[override]
        self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None
    ) -> Any:
        if not is_chat_completion(options):
            if (action := batch_action(options)) is not None:
                parent = super().request
                return self._kb_batch(
                    action,
                    lambda opts: parent(cast_to, opts, stream=stream, stream_cls=stream_cls),
                    options,
                )
            return super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        call = self._kb_begin(options, stream)
        token = ACTIVE_CALL.set(call)
        try:
            result = super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            clearer = self._kb_failed(call, exc)
            if clearer is exc:
                raise
            raise clearer from None
        finally:
            ACTIVE_CALL.reset(token)
        call.succeeded(result)
        return result

    def _kb_begin(self, options: Any, stream: bool) -> Call:
        body = request_body(options)
        prepared = prepare(self._kb, body, self._kb_exact_count)
        call = self._kb_call(prepared, options, bool(body.get("stream")) or stream)
        try:
            ledger = self._kb.ledger
            try:
                call.reservation = ledger.reserve_call(call.reservation, self._kb.budgets)
            except BudgetExceededError:
                if not recount_exactly(prepared, self._kb_exact_count, self._kb):
                    raise
                call = self._kb_call(prepared, options, bool(body.get("stream")) or stream)
                call.reservation = ledger.reserve_call(call.reservation, self._kb.budgets)
        except BudgetExceededError as exc:
            raise _explained(exc, prepared) from None
        return call

    def _kb_batch(self, action: tuple[str, str | None], send: Any, options: Any) -> Any:
        """``batches.create``: reserve every request's worst case first (see ``_batch``);
        ``batches.retrieve``: settle a finished batch from its output file."""
        if action[0] == "create":
            body = _batch.create_body(options)
            content = self.files.content(str(body.get("input_file_id"))).text
            reservation = _batch.reservation_for(
                self._kb, _batch.plan_batch(self._kb, content), body.get("completion_window")
            )
            self._kb.ledger.reserve(reservation, self._kb.budgets)
            options = _batch.with_call_id(options, reservation.call_id)
            try:
                result = send(options)
            except BaseException as exc:
                _batch.release(self._kb, reservation, exc)
                raise
            _batch.remember(str(_batch.parsed(result).id), reservation)
            return result
        result = send(options)
        _batch.settle_batch(
            self._kb, _batch.parsed(result), lambda file_id: self.files.content(file_id).text
        )
        return result

    def _kb_exact_count(self, body: Mapping[str, Any]) -> int:
        """Moonshot's free, exact prompt count (``POST /tokenizers/estimate-token-count``)."""
        response = self.post(
            "/tokenizers/estimate-token-count",
            body=_count_request(body),
            cast_to=_http_response_type(),
        )
        return _total_tokens(response.content)

    def _send_request(self, request: Any, *, stream: bool, **kwargs: Any) -> Any:
        call = ACTIVE_CALL.get()
        if call is not None:
            call.before_attempt(call.attempts + 1)
            call.in_flight = True
        try:
            response = super()._send_request(request, stream=stream, **kwargs)
        except Exception as exc:
            if call is None:
                raise
            call.on_transport_error(exc)
            if was_sent(exc):
                raise stop_resending(exc, request) from exc
            raise
        if response.status_code >= 400 and not body_was_read(response):
            response.read()  # _should_retry reads Moonshot's error type; it may carry usage
        if call is not None:
            call.on_response(response, stream)  # watches the body for the bill
        return response

    def balance(self) -> Balance:
        """The account's balance (``GET /users/me/balance``): available, voucher and cash."""
        response = self.get("/users/me/balance", cast_to=_http_response_type())
        return parse_balance(response.content, str(self.base_url))

    def copy(
        self,
        *,
        api_key: str | Callable[[], str] | None = None,
        admin_api_key: str | None = None,
        workload_identity: WorkloadIdentity | X509WorkloadIdentity | None = None,
        provider: _Provider | NotGiven | None = not_given,
        organization: str | None = None,
        project: str | None = None,
        webhook_secret: str | None = None,
        websocket_base_url: str | httpx2.URL | None = None,
        base_url: str | httpx2.URL | NotGiven | None = not_given,
        data_residency: DataResidency | None = None,
        timeout: float | Timeout | NotGiven | None = not_given,
        http_client: httpx2.Client | None = None,
        max_retries: int | NotGiven = not_given,
        default_headers: Mapping[str, str] | None = None,
        set_default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        set_default_query: Mapping[str, object] | None = None,
        ledger: Ledger | str | os.PathLike[str] | NotGiven = not_given,
        budget: Budget | Iterable[Budget] | NotGiven | None = not_given,
        tags: Mapping[str, str] | None = None,
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        token_counter: Callable[[Mapping[str, Any]], int] | None = None,
        exact_tokens: str | None = None,
        reservation_margin: float | None = None,
        currency: str | None = None,
        _enforce_credentials: bool | None = None,
        _extra_kwargs: Mapping[str, Any] = {},  # the SDK's own signature
    ) -> Self:
        """A new client with the same options, some overridden: the SDK's ``copy()``.

        Keeps the ledger, budgets, tags and prices; ``ledger=`` and ``budget=`` replace them
        (``budget=None``: no caps), ``tags=`` are merged into the current tags, so
        ``client.with_options(tags={"job": "nightly"})`` tags one batch of calls, and the
        constructor's other arguments (``prices=``, ``exact_tokens=``, ...) replace theirs.
        ``data_residency=`` exists from openai 3.x on, as in the SDK.
        """
        given = _given(locals(), OpenAI.copy)
        return cast("Self", self._kb_copy(super().copy, given))

    # The SDK binds with_options = copy in its own class body; rebind it to ours (as AzureOpenAI).
    with_options = copy


class AsyncOpenAI(_Guarded, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` for Moonshot's Kimi API, with a hard cap on spend.

    Takes the same extra arguments as :class:`OpenAI`. SQLite ledger writes are short local
    transactions and run inline (a budget shared with other processes waits at most
    ``busy_timeout`` for the file lock); a PostgreSQL ledger's reservation is awaited in a
    worker thread and its settlements are written by its writer thread, so the event loop
    never waits for a network round trip.
    """

    def __init__(
        self,
        *,
        api_key: str | Callable[[], Awaitable[str]] | None = None,
        admin_api_key: str | None = None,
        workload_identity: WorkloadIdentity | X509WorkloadIdentity | None = None,
        organization: str | None = None,
        project: str | None = None,
        webhook_secret: str | None = None,
        provider: _Provider | None = None,
        base_url: str | httpx2.URL | NotGiven | None = not_given,
        data_residency: DataResidency | None = None,
        websocket_base_url: str | httpx2.URL | None = None,
        timeout: float | Timeout | NotGiven | None = not_given,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        http_client: httpx2.AsyncClient | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        budget: Budget | Iterable[Budget] | None = None,
        tags: Mapping[str, str] | None = None,
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        token_counter: Callable[[Mapping[str, Any]], int] | None = None,
        exact_tokens: str | None = None,
        reservation_margin: float | None = None,
        currency: str | None = None,
        _strict_response_validation: bool = False,
        _enforce_credentials: bool = True,
    ) -> None:
        """A guarded ``openai.AsyncOpenAI``: every argument of the SDK's, plus the guard's.

        An argument left at its default is not passed on, so the SDK's defaults stay its own
        (and ``data_residency``, new in openai 3.x, is refused by 2.x only when used).
        """
        super().__init__(**_given(locals(), AsyncOpenAI.__init__))

    async def request(  # type: ignore[override]
        self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None
    ) -> Any:
        if not is_chat_completion(options):
            if (action := batch_action(options)) is not None:
                parent = super().request
                return await self._kb_batch(
                    action,
                    lambda opts: parent(cast_to, opts, stream=stream, stream_cls=stream_cls),
                    options,
                )
            return await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        call = await self._kb_begin(options, stream)
        token = ACTIVE_CALL.set(call)
        try:
            result = await super().request(cast_to, options, stream=stream, stream_cls=stream_cls)
        except BaseException as exc:
            clearer = self._kb_failed(call, exc)
            if clearer is exc:
                raise
            raise clearer from None
        finally:
            ACTIVE_CALL.reset(token)
        call.succeeded(result)
        return result

    async def _kb_begin(self, options: Any, stream: bool) -> Call:
        body = request_body(options)
        counts: dict[str, int] = {}
        # The exact count needs an await, which prepare() (shared, sync) cannot do: fetch it
        # first when it will be needed, and hand prepare() a lookup.
        if self._kb.exact_tokens == "always" and self._kb.token_counter is None:
            counts["exact"] = await self._kb_exact_count(body)
        try:
            prepared = prepare(self._kb, body, _lookup(counts))
        except _NeedsExactCount:
            try:
                counts["exact"] = await self._kb_exact_count(body)
            except openai.APIError as exc:
                counts["failed"] = 1
                log_count_failure(exc)
            prepared = prepare(self._kb, body, _lookup(counts))
        call = self._kb_call(prepared, options, bool(body.get("stream")) or stream)
        try:
            try:
                await self._kb_reserve(call)
            except BudgetExceededError as refused:
                if prepared.estimate.exact or self._kb.exact_tokens == "never":
                    raise
                try:
                    counts["exact"] = await self._kb_exact_count(body)
                except openai.APIError:
                    raise refused from None
                recount_exactly(prepared, _lookup(counts), self._kb)
                call = self._kb_call(prepared, options, bool(body.get("stream")) or stream)
                await self._kb_reserve(call)
        except BudgetExceededError as exc:
            raise _explained(exc, prepared) from None
        return call

    async def _kb_batch(self, action: tuple[str, str | None], send: Any, options: Any) -> Any:
        """As the sync client's (see ``_batch``)."""
        if action[0] == "create":
            body = _batch.create_body(options)
            content = (await self.files.content(str(body.get("input_file_id")))).text
            reservation = _batch.reservation_for(
                self._kb, _batch.plan_batch(self._kb, content), body.get("completion_window")
            )
            await self._kb_reserve_off_loop(reservation)
            options = _batch.with_call_id(options, reservation.call_id)
            try:
                result = await send(options)
            except BaseException as exc:
                _batch.release(self._kb, reservation, exc)
                raise
            _batch.remember(str(_batch.parsed(result).id), reservation)
            return result
        result = await send(options)
        batch = _batch.parsed(result)
        if _batch.TERMINAL.get(str(getattr(batch, "status", ""))) is not None:
            output_id = getattr(batch, "output_file_id", None)
            text = (await self.files.content(output_id)).text if output_id else ""
            _batch.settle_batch(self._kb, batch, lambda _file_id: text)
        return result

    async def _kb_reserve(self, call: Call) -> None:
        """Reserve a call in the ledger (see ``_kb_reserve_off_loop``)."""

        def release(recorded: Reservation) -> None:
            call.reservation = recorded
            call.failed(asyncio.CancelledError())

        call.reservation = await self._kb_reserve_off_loop(call.reservation, release, call=True)

    async def _kb_reserve_off_loop(
        self,
        reservation: Reservation,
        release: Callable[[Reservation], None] | None = None,
        *,
        call: bool = False,
    ) -> Reservation:
        """Reserve in the ledger, never waiting on the event loop: on a network (a server
        ledger) or for a lock (a local ledger another process is writing: its ``try_reserve``
        says so) the reservation is taken in a worker thread. ``call``: for a call about to
        be sent (``reserve_call``). Returns the reservation as recorded.

        ``release``: gives the reservation back if the task is cancelled while a worker thread
        takes it (the call was never sent), instead of letting it expire at full price.
        """
        ledger = self._kb.ledger
        budgets = self._kb.budgets

        def reserve(reservation: Reservation, budgets: Sequence[Budget]) -> Reservation:
            if call:
                return ledger.reserve_call(reservation, budgets)
            ledger.reserve(reservation, budgets)
            return reservation

        if not getattr(ledger, "blocking_io", False):
            try_reserve = getattr(ledger, "try_reserve_call" if call else "try_reserve", None)
            if try_reserve is None:
                return reserve(reservation, budgets)  # a short local transaction
            # ``try_reserve_call`` returns the reservation as recorded, ``try_reserve`` a bool.
            recorded = (
                try_reserve(reservation, budgets)
                if call
                else (reservation if try_reserve(reservation, budgets) else None)
            )
            if recorded is not None:
                return recorded  # done on the loop: nothing had to wait
            # The local ledger is busy (another process writing, 8 processes contending): the
            # wait for its lock happens in a worker thread, never on the event loop.
        task = asyncio.ensure_future(asyncio.to_thread(reserve, reservation, budgets))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if release is not None:
                undo = release

                def taken(done: asyncio.Future[Reservation]) -> None:
                    if not done.cancelled() and done.exception() is None:
                        undo(done.result())

                task.add_done_callback(taken)
            raise

    async def _kb_exact_count(self, body: Mapping[str, Any]) -> int:
        response = await self.post(
            "/tokenizers/estimate-token-count",
            body=_count_request(body),
            cast_to=_http_response_type(),
        )
        return _total_tokens(response.content)

    async def _send_request(self, request: Any, *, stream: bool, **kwargs: Any) -> Any:
        call = ACTIVE_CALL.get()
        if call is not None:
            call.before_attempt(call.attempts + 1)
            call.in_flight = True
        try:
            response = await super()._send_request(request, stream=stream, **kwargs)
        except Exception as exc:
            if call is None:
                raise
            call.on_transport_error(exc)
            if was_sent(exc):
                raise stop_resending(exc, request) from exc
            raise
        if response.status_code >= 400 and not body_was_read(response):
            # _should_retry reads Moonshot's error type; the body may carry usage too.
            await response.aread()
        if call is not None:
            call.on_response(response, stream)  # watches the body for the bill
        return response

    async def balance(self) -> Balance:
        """The account's balance (``GET /users/me/balance``): available, voucher and cash."""
        response = await self.get("/users/me/balance", cast_to=_http_response_type())
        return parse_balance(response.content, str(self.base_url))

    def copy(
        self,
        *,
        api_key: str | Callable[[], Awaitable[str]] | None = None,
        admin_api_key: str | None = None,
        workload_identity: WorkloadIdentity | X509WorkloadIdentity | None = None,
        provider: _Provider | NotGiven | None = not_given,
        organization: str | None = None,
        project: str | None = None,
        webhook_secret: str | None = None,
        websocket_base_url: str | httpx2.URL | None = None,
        base_url: str | httpx2.URL | NotGiven | None = not_given,
        data_residency: DataResidency | None = None,
        timeout: float | Timeout | NotGiven | None = not_given,
        http_client: httpx2.AsyncClient | None = None,
        max_retries: int | NotGiven = not_given,
        default_headers: Mapping[str, str] | None = None,
        set_default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        set_default_query: Mapping[str, object] | None = None,
        ledger: Ledger | str | os.PathLike[str] | NotGiven = not_given,
        budget: Budget | Iterable[Budget] | NotGiven | None = not_given,
        tags: Mapping[str, str] | None = None,
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        token_counter: Callable[[Mapping[str, Any]], int] | None = None,
        exact_tokens: str | None = None,
        reservation_margin: float | None = None,
        currency: str | None = None,
        _enforce_credentials: bool | None = None,
        _extra_kwargs: Mapping[str, Any] = {},  # the SDK's own signature
    ) -> Self:
        """A new client with the same options, some overridden: the SDK's ``copy()``.

        Keeps the ledger, budgets, tags and prices; ``ledger=`` and ``budget=`` replace them
        (``budget=None``: no caps), ``tags=`` are merged into the current tags, so
        ``client.with_options(tags={"job": "nightly"})`` tags one batch of calls, and the
        constructor's other arguments (``prices=``, ``exact_tokens=``, ...) replace theirs.
        ``data_residency=`` exists from openai 3.x on, as in the SDK.
        """
        given = _given(locals(), AsyncOpenAI.copy)
        return cast("Self", self._kb_copy(super().copy, given))

    # The SDK binds with_options = copy in its own class body; rebind it to ours (as AzureOpenAI).
    with_options = copy


class _NeedsExactCount(Exception):
    pass


def _lookup(counts: dict[str, int]) -> Callable[[Mapping[str, Any]], int]:
    def exact(body: Mapping[str, Any]) -> int:
        if "failed" in counts:
            raise ExactCountUnavailable
        if "exact" not in counts:
            raise _NeedsExactCount
        return counts["exact"]

    return exact


def _http_response_type() -> Any:
    import openai._base_client as base

    return (getattr(base, "httpx2", None) or getattr(base, "httpx")).Response  # noqa: B009


def _count_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a token-count request: the chat request's model, messages and tools."""
    return {key: body[key] for key in ("model", "messages", "tools") if key in body}


def _total_tokens(content: bytes) -> int:
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    total = data.get("data", {}).get("total_tokens") if isinstance(data, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise openai.APIError(
            f"Moonshot's token-count endpoint answered without a token count: {str(data)[:200]}",
            request=None,  # type: ignore[arg-type]
            body=data,
        )
    return total
