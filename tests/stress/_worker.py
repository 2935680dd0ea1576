"""A stress worker process: ``python _worker.py '<json config>'``.

Modes:

- ``threads``: one guarded ``kb.OpenAI`` shared by ``threads`` threads, making calls ``ids``.
- ``async``: one ``kb.AsyncOpenAI`` running ``concurrency`` calls at a time.
- ``unknown``: like ``threads``, but each call leaves its bill unknown in its own way
  (``_harness.UNKNOWN_KINDS``): abandoned, dropped or unread streams, timeouts after sending,
  answers without usage or with malformed usage.
- ``crash``: calls without end, announcing ``RESERVED <id>`` on stdout; at ``point`` it says
  ``AT <point>`` and (for the points inside a transaction or before sending) waits there for
  the parent's SIGKILL.

Every outcome is written to ``out`` as JSON: the parent matches them with the ledger and with
what the stand-in saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # type: ignore[import-not-found]

import kimi_budget as kb
from kimi_budget._retry import RetryPolicy
from kimi_budget.ledger import Ledger
from kimi_budget.ledger._sqlite import SQLiteLedger

# Stand-in errors say "try again after 0 seconds"; 500/503 back off briefly, still jittered.
FAST_RETRY = RetryPolicy(initial_wait=0.02, max_backoff=0.2, jitter=0.1)

_seen_warnings: list[str] = []
_warn_lock = threading.Lock()


def _record_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    with _warn_lock:
        _seen_warnings.append(f"{category.__name__}: {message}")


def _budget(cfg: dict[str, Any]) -> kb.Budget:
    caps = {
        k: cfg[k] for k in ("per_call", "hourly", "daily", "weekly", "monthly", "total") if k in cfg
    }
    return kb.Budget(**caps)


def _client_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        api_key=cfg["key"],
        base_url=cfg["base_url"],
        ledger=Ledger(cfg["ledger"]),
        budget=_budget(cfg),
        timeout=cfg.get("timeout", 60.0),
        reservation_margin=cfg.get("margin", 60.0),
        max_retries=2,
    )


def _outcome(i: int, exc: BaseException | None) -> dict[str, Any]:
    if exc is None:
        return {"id": i, "outcome": "ok"}
    if isinstance(exc, kb.BudgetExceededError):
        return {
            "id": i,
            "outcome": "refused",
            "window": exc.window,
            "limit": str(exc.limit_usd),
            "spent": str(exc.spent_usd),
            "reserved": str(exc.reserved_usd),
            "projected": str(exc.projected_usd),
        }
    return {"id": i, "outcome": "error", "type": type(exc).__name__, "message": str(exc)[:500]}


def _sync_call(
    client: kb.OpenAI, seed: int, i: int, on_chunk: Callable[[int], None] | None = None
) -> None:
    body = h.plan_call(seed, i)
    tagged = client.with_options(tags={h.CALL_TAG: str(i)})
    headers = {h.CALL_HEADER: str(i)}
    if body.get("stream"):
        stream = tagged.chat.completions.create(**body, extra_headers=headers)
        for n, _ in enumerate(stream, start=1):
            if on_chunk is not None:
                on_chunk(n)
    else:
        tagged.chat.completions.create(**body, extra_headers=headers)


def run_threads(cfg: dict[str, Any]) -> None:
    client = kb.OpenAI(**_client_kwargs(cfg))
    client._kb.retry = FAST_RETRY
    ids: list[int] = cfg["ids"]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work(mine: list[int]) -> None:
        for i in mine:
            try:
                _sync_call(client, cfg["seed"], i)
                outcome = _outcome(i, None)
            except Exception as exc:
                outcome = _outcome(i, exc)
            with lock:
                results.append(outcome)

    n = cfg["threads"]
    threads = [threading.Thread(target=work, args=(ids[t::n],)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _write(cfg, results)


def _unknown_call(client: kb.OpenAI, seed: int, i: int) -> None:
    """Call ``i`` of the unknown-bills run: read to the end, or left with its bill unknown."""
    import gc

    kind = h.unknown_kind(seed, i)
    body = h.unknown_call(seed, i)
    tagged = client.with_options(tags={h.CALL_TAG: str(i)})
    headers = {h.CALL_HEADER: str(i), h.FAULT_HEADER: kind}
    result = tagged.chat.completions.create(**body, extra_headers=headers)
    if kind == "abandon":
        next(iter(result))
        result.close()
    elif kind == "drop":
        next(iter(result))
        del result
        gc.collect()
    elif kind == "unread":
        result.close()
    elif body.get("stream"):
        for _ in result:
            pass


def run_unknown(cfg: dict[str, Any]) -> None:
    import openai

    client = kb.OpenAI(**_client_kwargs(cfg))
    client._kb.retry = FAST_RETRY
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work(mine: list[int]) -> None:
        for i in mine:
            try:
                _unknown_call(client, cfg["seed"], i)
                outcome = _outcome(i, None)
            except openai.APITimeoutError:
                outcome = {"id": i, "outcome": "timeout"}
            except Exception as exc:
                outcome = _outcome(i, exc)
            with lock:
                results.append(outcome)

    ids: list[int] = cfg["ids"]
    n = cfg["threads"]
    threads = [threading.Thread(target=work, args=(ids[t::n],)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _write(cfg, results)


def run_async(cfg: dict[str, Any]) -> None:
    async def main() -> list[dict[str, Any]]:
        client = kb.AsyncOpenAI(**_client_kwargs(cfg))
        client._kb.retry = FAST_RETRY
        gate = asyncio.Semaphore(cfg["concurrency"])

        async def one(i: int) -> dict[str, Any]:
            async with gate:
                body = h.plan_call(cfg["seed"], i)
                tagged = client.with_options(tags={h.CALL_TAG: str(i)})
                headers = {h.CALL_HEADER: str(i)}
                try:
                    if body.get("stream"):
                        stream = await tagged.chat.completions.create(**body, extra_headers=headers)
                        async for _ in stream:
                            pass
                    else:
                        await tagged.chat.completions.create(**body, extra_headers=headers)
                    return _outcome(i, None)
                except Exception as exc:
                    return _outcome(i, exc)

        try:
            return list(await asyncio.gather(*(one(i) for i in cfg["ids"])))
        finally:
            await client.close()

    _write(cfg, asyncio.run(main()))


def run_crash(cfg: dict[str, Any]) -> None:
    point = cfg["point"]

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def stop_here(name: str, *, wait: bool = True) -> None:
        if point == name:
            say(f"AT {name}")
            while wait:
                time.sleep(60)  # the parent's SIGKILL ends this

    original_reserve = SQLiteLedger.reserve_call
    original_settle = SQLiteLedger._settle
    original_add = SQLiteLedger._add_totals

    def reserve(self: SQLiteLedger, reservation: Any, budgets: Any = ()) -> Any:
        stop_here("before-reserve")
        recorded = original_reserve(self, reservation, budgets)
        say(f"RESERVED {reservation.tags[h.CALL_TAG]}")
        stop_here("holding")
        stop_here("in-flight", wait=False)
        return recorded

    def add_totals(
        self: SQLiteLedger,
        conn: Any,
        scopes: Any,
        tags: Any,
        instant: Any,
        *,
        spent: int,
        reserved: int,
        **more: Any,
    ) -> None:
        original_add(self, conn, scopes, tags, instant, spent=spent, reserved=reserved, **more)
        if reserved > 0 and spent == 0:
            stop_here("in-reserve")  # the row is inserted, the transaction not committed

    def settle(self: SQLiteLedger, conn: Any, s: Any, *more: Any) -> bool:
        done = original_settle(self, conn, s, *more)
        stop_here("in-settle")  # the row is updated, the transaction not committed
        return done

    SQLiteLedger.reserve_call = reserve  # type: ignore[method-assign]
    SQLiteLedger._add_totals = add_totals  # type: ignore[method-assign]
    SQLiteLedger._settle = settle  # type: ignore[method-assign]

    client = kb.OpenAI(**_client_kwargs(cfg))
    client._kb.retry = FAST_RETRY
    say("READY")
    i = cfg["first_id"]
    while True:

        def on_chunk(n: int) -> None:
            if n == 3:
                # hold_mid_stream: stay there, the stream open, until the parent's SIGKILL.
                stop_here("mid-stream", wait=bool(cfg.get("hold_mid_stream")))

        body_stream = bool(h.plan_call(cfg["seed"], i).get("stream"))
        if point == "mid-stream" and not body_stream:
            i += 1
            continue  # only streamed calls can be killed mid-stream
        try:
            _sync_call(client, cfg["seed"], i, on_chunk)
        except kb.KimiBudgetError as exc:
            say(f"ERROR {type(exc).__name__}: {exc}")
        except Exception:
            pass
        i += 1


def _write(cfg: dict[str, Any], results: list[dict[str, Any]]) -> None:
    with _warn_lock:
        seen = list(_seen_warnings)
    Path(cfg["out"]).write_text(json.dumps({"calls": results, "warnings": seen}), "utf-8")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    warnings.simplefilter("always")
    warnings.showwarning = _record_warning
    modes = {"threads": run_threads, "async": run_async, "crash": run_crash, "unknown": run_unknown}
    modes[cfg["mode"]](cfg)


if __name__ == "__main__":
    main()
