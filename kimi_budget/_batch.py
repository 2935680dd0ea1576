"""The Batch API, guarded and priced.

``batches.create`` sends a file of chat requests to be run within a window (24 h). Before the
batch is created, every request of its input file (fetched with ``files.content``: a free GET)
is priced at its worst case, at the Batch API's price (60 % of standard; a model the Batch API
does not serve, kimi-k3, at the standard price: the server decides whether to run it), and the
total is reserved in the ledger as ONE row for the batch. A batch that does not fit a cap is
refused before it is created. The row's ``call_id`` rides in the batch's ``metadata``
(``kimi_budget_call_id``), so any process holding the same ledger can settle it.

When the batch ends (seen through ``batches.retrieve``, or :func:`settle_batch`, or
``kimi-budget batch-settle BATCH_ID``), each line of its output file is priced from its own
usage and the row is settled with the totals: tokens summed, ``cost_nanos`` the exact sum of
the lines' costs, ``note`` the counts. The ledger settles a row once; retrieving a finished
batch again changes nothing. A batch whose output cannot be read keeps its reservation until
it expires, and is then charged in full (uncertainty costs the budget, never the wallet).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ._exceptions import LedgerError
from ._usage import read_usage
from .pricing import ModelPrice, PriceTable

__all__ = [
    "METADATA_KEY",
    "BatchPlan",
    "batch_action",
    "plan_batch",
    "price_output",
    "settle_batch",
]

log = logging.getLogger("kimi_budget")

METADATA_KEY = "kimi_budget_call_id"
BATCH_TAG = ("api", "batch")
TERMINAL = {"completed": "ok", "cancelled": "cancelled", "failed": "error", "expired": "error"}
_WINDOW_SECONDS = {"24h": 24 * 3600}
_CHAT = "/v1/chat/completions"

# Batches created in this process whose row is not settled yet: batch id -> reservation.
_open_batches: dict[str, Any] = {}
_open_lock = threading.Lock()


def batch_action(options: Any) -> tuple[str, str | None] | None:
    """("create", None) for ``POST /batches``, ("retrieve", id) for ``GET /batches/{id}``,
    ("cancel", id) for ``POST /batches/{id}/cancel``; None for any other request."""
    from urllib.parse import urlsplit

    method = str(getattr(options, "method", "")).lower()
    path = urlsplit(str(getattr(options, "url", ""))).path.strip("/")
    parts = path.split("/")
    if "batches" not in parts:
        return None
    rest = parts[parts.index("batches") + 1 :]
    if method == "post" and not rest:
        return "create", None
    if method == "get" and len(rest) == 1:
        return "retrieve", rest[0]
    return None


@dataclass
class BatchPlan:
    """The worst case of every request in a batch's input file."""

    requests: int = 0
    projected_nanos: int = 0
    prompt_tokens: int = 0
    models: dict[str, int] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The model of every request, or ``batch(m1,m2)`` when they differ."""
        names = sorted(self.models)
        return names[0] if len(names) == 1 else f"batch({','.join(names)})"


def batch_price(price: ModelPrice) -> ModelPrice:
    """What a batch request to this model costs: 60 % of standard, or standard if the Batch
    API does not serve the model."""
    return price.at_batch_price() if price.batch else price


def plan_batch(settings: Any, content: str) -> BatchPlan:
    """Price every line of a batch input file at its worst case (raises on a line that cannot
    be priced: the batch is refused before it is created)."""
    from ._exceptions import InvalidRequestError
    from ._guard import prepare
    from .pricing import declares_web_search, requested_cache_ttl

    plan = BatchPlan()
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            raise InvalidRequestError(
                f"Refused before creating the batch: line {number} of its input file is not "
                "JSON. Each line must be one request: "
                '{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", '
                '"body": {...}}.'
            ) from None
        body = request.get("body") if isinstance(request, dict) else None
        url = request.get("url") if isinstance(request, dict) else None
        if not isinstance(body, dict) or (url is not None and url.rstrip("/") != _CHAT):
            raise InvalidRequestError(
                f"Refused before creating the batch: line {number} of its input file is not a "
                f"chat completion request (url {_CHAT!r} with a JSON body); kimi-budget can "
                "only price those."
            )
        prepared = prepare(settings, dict(body), None)
        price = batch_price(prepared.price)
        plan.projected_nanos += price.projected_nanos(
            prepared.estimate.tokens,
            prepared.max_output,
            prepared.choices,
            cache_ttl=requested_cache_ttl(body),
            web_search=declares_web_search(body),
        )
        plan.prompt_tokens += prepared.estimate.tokens
        plan.requests += 1
        plan.models[price.model] = plan.models.get(price.model, 0) + 1
    if plan.requests == 0:
        raise InvalidRequestError(
            "Refused before creating the batch: its input file holds no request."
        )
    return plan


def reservation_for(settings: Any, plan: BatchPlan, window: object) -> Any:
    """The ledger reservation of a planned batch (one row), valid for its whole window."""
    from .ledger import Reservation

    now = settings.now()
    seconds = _WINDOW_SECONDS.get(str(window), 24 * 3600) + settings.reservation_margin
    return Reservation(
        call_id=uuid.uuid4().hex,
        model=plan.model,
        tags={**settings.tags, BATCH_TAG[0]: BATCH_TAG[1]},
        created_at=now,
        expires_at=now + timedelta(seconds=seconds),
        projected_nanos=plan.projected_nanos,
        prompt_estimate=plan.prompt_tokens,
        price_cache_hit=0,
        price_cache_miss=0,
        price_output=0,
        stream=False,
        currency=settings.prices.currency,
    )


@dataclass
class OutputTotals:
    """What a batch's output lines billed."""

    requests: int = 0
    priced: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_nanos: int = 0
    problems: list[str] = field(default_factory=list)


def price_output(prices: PriceTable, content: str) -> OutputTotals:
    """Price each line of a batch output file from its own usage, at the batch price."""
    totals = OutputTotals()
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        totals.requests += 1
        try:
            record = json.loads(line)
            response = record.get("response") or {}
            body = response.get("body") or {}
        except (ValueError, AttributeError):
            totals.problems.append(f"output line {number} is not JSON")
            continue
        if not isinstance(body, Mapping) or body.get("usage") is None:
            continue  # a failed request: no usage, not billed
        usage = read_usage(body.get("usage"))
        model = body.get("model")
        if usage is None or not isinstance(model, str) or model not in prices:
            totals.problems.append(f"output line {number}: usage or model unreadable")
            continue
        price = batch_price(prices.get(model))
        totals.priced += 1
        totals.prompt_tokens += usage.prompt_tokens
        totals.cached_tokens += usage.cached_tokens
        totals.completion_tokens += usage.completion_tokens
        totals.cost_nanos += price.cost_nanos(
            usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens
        )
    return totals


def remember(batch_id: str, reservation: Any) -> None:
    with _open_lock:
        _open_batches[batch_id] = reservation


def reservation_of(settings: Any, batch: Any) -> Any | None:
    """The reservation of a batch: kept by this process, or found in the ledger's pending rows
    by the call id the batch carries in its metadata."""
    batch_id = getattr(batch, "id", None)
    with _open_lock:
        known = _open_batches.get(str(batch_id))
    if known is not None:
        return known
    metadata = getattr(batch, "metadata", None) or {}
    call_id = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
    if not call_id:
        return None
    from ._budget import parse_utc
    from .ledger import Reservation

    # The settling client calls the batch's platform (a key works on one only): its currency.
    for row in settings.ledger.pending():
        if row["call_id"] != call_id:
            continue
        tags = row["tags"]
        return Reservation(
            call_id=call_id,
            model=row["model"],
            tags=json.loads(tags) if isinstance(tags, str) else dict(tags or {}),
            created_at=_as_datetime(row["created_at"], parse_utc),
            expires_at=_as_datetime(row["expires_at"], parse_utc),
            projected_nanos=row["projected_nanos"],
            prompt_estimate=0,
            price_cache_hit=0,
            price_cache_miss=0,
            price_output=0,
            currency=row.get("currency") or settings.prices.currency,
        )
    return None


def _as_datetime(value: Any, parse: Callable[[str], Any]) -> Any:
    return parse(value) if isinstance(value, str) else value


def settle_batch(
    settings: Any, batch: Any, read_file: Callable[[str], str]
) -> bool:
    """Settle the ledger row of a finished batch from its output file; True if this settled
    it (False: not finished yet, not ours, or already settled)."""
    from .ledger import Settlement

    status = TERMINAL.get(str(getattr(batch, "status", "")))
    if status is None:
        return False
    reservation = reservation_of(settings, batch)
    if reservation is None:
        return False
    batch_id = str(batch.id)
    output_id = getattr(batch, "output_file_id", None)
    totals = OutputTotals()
    if output_id:
        try:
            totals = price_output(settings.prices, read_file(str(output_id)))
        except Exception as exc:  # the output could not be read: keep the reservation
            log.warning(
                "kimi-budget: batch %s ended but its output file %s could not be read (%s); "
                "its reservation stays until it expires and is then charged in full",
                batch_id,
                output_id,
                type(exc).__name__,
            )
            return False
    counts = getattr(batch, "request_counts", None)
    note = (
        f"batch {batch_id} {batch.status}: {totals.requests} output lines, {totals.priced} "
        f"priced at the batch price"
    )
    if counts is not None:
        note += (
            f"; requests total {getattr(counts, 'total', '?')}, completed "
            f"{getattr(counts, 'completed', '?')}, failed {getattr(counts, 'failed', '?')}"
        )
    if totals.problems:
        note += "; " + "; ".join(totals.problems[:5])
    estimated = bool(totals.problems)
    cost = totals.cost_nanos
    if estimated:
        # Lines we could not price: charge the whole reservation rather than guess low.
        cost = max(cost, reservation.projected_nanos)
    settlement = Settlement(
        reservation=reservation,
        status=status,
        prompt_tokens=totals.prompt_tokens,
        cached_tokens=totals.cached_tokens,
        completion_tokens=totals.completion_tokens,
        cost_nanos=cost,
        estimated=estimated,
        attempts=1,
        finished_at=settings.now(),
        request_id=batch_id,
        note=note[:1000],
    )
    try:
        settled = bool(settings.ledger.settle(settlement))
    except LedgerError as exc:
        settings.ledger.write_fallback(settlement, exc)
        settled = True
    with _open_lock:
        _open_batches.pop(batch_id, None)
    return settled


def with_call_id(options: Any, call_id: str) -> Any:
    """``options`` of a ``batches.create`` with the row's call id added to its metadata."""
    options = options.model_copy()
    body = dict(options.json_data or {}) if isinstance(options.json_data, Mapping) else {}
    metadata = dict(body.get("metadata") or {})
    metadata[METADATA_KEY] = call_id
    body["metadata"] = metadata
    options.json_data = body
    return options


def release(settings: Any, reservation: Any, exc: BaseException) -> None:
    """A batch that was not created: its row ends as an error, charging nothing (a refused
    ``batches.create`` runs no request)."""
    from .ledger import Settlement

    with contextlib.suppress(LedgerError):
        settings.ledger.settle(
            Settlement(
                reservation=reservation,
                status="error",
                prompt_tokens=None,
                cached_tokens=None,
                completion_tokens=None,
                cost_nanos=0,
                estimated=False,
                attempts=1,
                finished_at=settings.now(),
                error=f"batches.create failed: {type(exc).__name__}"[:1000],
            )
        )


def create_body(options: Any) -> Mapping[str, Any]:
    return options.json_data if isinstance(options.json_data, Mapping) else {}


def parsed(result: Any) -> Any:
    """The batch object of a result, parsed if it is a raw response."""
    parse = getattr(result, "parse", None)
    return parse() if callable(parse) and not hasattr(result, "status") else result


