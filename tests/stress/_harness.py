"""What the stress tests, their worker processes and ``run.py`` share.

The parent process hosts the loopback stand-in and owns the verdict; workers (``_worker.py``)
are separate Python processes that make guarded calls against one shared ledger and report
what every call did. Each call carries its plan index twice: as the ledger tag ``call`` and as
the request header ``x-kb-call``. That way every server request can be matched to its one
ledger row (retries included) without trusting anything the client says about itself.

Sizes: ``REDUCED`` runs in CI on every push; ``FULL`` (``KB_STRESS_SIZE=full`` or
``python tests/stress/run.py --full``) is the published run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
CALL_TAG = "call"
CALL_HEADER = "x-kb-call"
KEY = "sk-stress-canary-7f3a9c1e5b2d4a6f8e0c"
UTC = timezone.utc
# Three prices (one without a cache discount) so that rows priced with the wrong model show.
MODELS = ("kimi-k2.5", "kimi-k2-turbo-preview", "moonshot-v1-8k")
# A status that means the call is over; "pending" is a reservation in flight.
FINAL = {"ok", "error", "abandoned", "interrupted", "cancelled", "expired"}


@dataclass(frozen=True)
class Size:
    name: str
    processes: int  # processes running sync clients in threads
    threads: int  # threads per such process
    async_concurrency: int  # concurrent calls of the one asyncio process
    calls: int
    kills_per_point: int  # SIGKILLs at each scripted point of the call lifecycle
    random_kills: int  # SIGKILLs at random moments
    steady_calls: int  # calls of the process that keeps working while others are killed
    fuzz_examples: int  # hypothesis examples per fuzz test


REDUCED = Size("reduced", 4, 2, 20, 400, 1, 3, 80, 60)
FULL = Size("full", 8, 4, 50, 5600, 4, 24, 400, 1000)


def current_size() -> Size:
    return FULL if os.environ.get("KB_STRESS_SIZE", "").lower() == "full" else REDUCED


# -- the plan: what call number i sends ------------------------------------------------------

_WORDS = (
    "ledger",
    "budget",
    "window",
    "reserve",
    "settle",
    "token",
    "cache",
    "prompt",
    "stream",
    "usage",
    "retry",
    "cap",
    "moonshot",
    "kimi",
    "process",
    "thread",
    "asyncio",
    "sqlite",
    "journal",
    "checkpoint",
    "refusal",
    "projection",
    "overshoot",
)


def _system_prompt(k: int) -> str:
    rng = random.Random(f"system:{k}")
    # Well over Moonshot's 256-token floor for prefix caching, under any token counter.
    return f"You are stress assistant {k}. " + " ".join(rng.choice(_WORDS) for _ in range(500))


SYSTEM_PROMPTS = tuple(_system_prompt(k) for k in range(3))


def plan_call(seed: int, i: int) -> dict[str, Any]:
    """The keyword arguments of call number ``i`` (deterministic in ``seed`` and ``i``)."""
    rng = random.Random(f"{seed}:{i}")
    model = rng.choices(MODELS, weights=(6, 3, 1))[0]
    question = {
        "role": "user",
        "content": f"Question {i}: "
        + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40))),
    }
    messages: list[dict[str, Any]] = [question]
    if rng.random() < 0.5:
        # A shared long system prompt: repeated prefixes become cache hits on the stand-in.
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": rng.randint(1, 80),
    }
    if rng.random() < 0.05:
        body["n"] = 2
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return body


# -- workers -----------------------------------------------------------------------------------


def spawn_worker(
    config: Mapping[str, Any], *, stdout: Any = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_BUDGET_", "MOONSHOT_"))}
    env["PYTHONHASHSEED"] = "0"
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(dict(config))],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(config.get("cwd") or HERE),
    )


def read_results(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


# -- reading a ledger without the library ------------------------------------------------------


# A ledger under test: a SQLite file (Path) or a PostgreSQL database (its postgresql:// URL).
Target = Path | str


def is_server(target: Target) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _server_rows(url: str, sql: str) -> list[dict[str, Any]]:
    """Rows of a PostgreSQL ledger, shaped as SQLite returns them (text instants, JSON text
    tags, 0/1 flags), so that one judge reads both backends."""
    import psycopg
    from psycopg.rows import dict_row

    from kimi_budget._budget import format_utc, tags_json

    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = conn.execute(sql).fetchall()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, datetime):
                row[key] = format_utc(value)
            elif isinstance(value, bool):
                row[key] = int(value)
            elif key in ("tags", "scope") and isinstance(value, dict):
                row[key] = tags_json(value)
    return rows


def fallback_file(target: Target) -> Path:
    """Where the workers would have put settlements the ledger could not take."""
    if is_server(target):
        from kimi_budget._redact import redact_url
        from kimi_budget.ledger._postgres import _fallback_path

        return _fallback_path(redact_url(str(target)))
    path = Path(target)
    return path.with_name(path.name + ".fallback.jsonl")


def ledger_rows(path: Target) -> list[dict[str, Any]]:
    if is_server(path):
        return _server_rows(str(path), "SELECT * FROM calls ORDER BY id")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        # calls_all: the settled calls and the reservations still in flight.
        return [dict(r) for r in conn.execute("SELECT * FROM calls_all ORDER BY id")]
    finally:
        conn.close()


def window_totals(path: Target) -> list[dict[str, Any]]:
    if is_server(path):
        return _server_rows(
            str(path),
            "SELECT w.*, s.scope, s.tz FROM window_totals w JOIN budget_scopes s "
            'ON s.id = w.scope_id ORDER BY w.scope_id, w."window", w.start',
        )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in conn.execute(
                "SELECT w.*, s.scope, s.tz FROM window_totals w JOIN budget_scopes s "
                "ON s.id = w.scope_id ORDER BY w.scope_id, w.window, w.start"
            )
        ]
    finally:
        conn.close()


def integrity(path: Target) -> str:
    if is_server(path):
        return "ok"  # PostgreSQL checks its own pages; nothing like SQLite's file to check
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def priced(usage: Mapping[str, int] | None, row: Mapping[str, Any]) -> int:
    """What the server billed for one request, at the prices the row recorded."""
    if not usage:
        return 0
    prompt, cached = usage["prompt_tokens"], usage.get("cached_tokens", 0)
    return int(
        (prompt - cached) * row["price_cache_miss"]
        + cached * row["price_cache_hit"]
        + usage["completion_tokens"] * row["price_output"]
    )


def recomputed_totals(
    rows: Iterable[Mapping[str, Any]], tz_name: str, windows: Sequence[str]
) -> dict[tuple[str, str], tuple[int, int]]:
    """(window, start) -> (spent, reserved), summed from the rows themselves."""
    from zoneinfo import ZoneInfo

    from kimi_budget._budget import format_utc, parse_utc, window_bounds

    tz = ZoneInfo(tz_name)
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        created = parse_utc(row["created_at"])
        for window in windows:
            key = "" if window == "total" else format_utc(window_bounds(window, created, tz)[0])
            entry = totals[(window, key)]
            if row["status"] == "pending":
                entry[1] += row["projected_nanos"]
            else:
                entry[0] += row["cost_nanos"]
    return {k: (v[0], v[1]) for k, v in totals.items()}


def check_totals(path: Target, tz_name: str, windows: Sequence[str]) -> list[str]:
    """Every stored window total equals the sum of its rows; nothing is left reserved."""
    problems = []
    rows = ledger_rows(path)
    expected = recomputed_totals(rows, tz_name, windows)
    stored = {
        (w["window"], w["start"]): (w["spent_nanos"], w["reserved_nanos"])
        for w in window_totals(path)
        if w["scope"] == "{}" and w["tz"] == tz_name
    }
    for key in sorted(set(expected) | set(stored)):
        want = expected.get(key, (0, 0))
        have = stored.get(key, (0, 0))
        if want != have:
            problems.append(f"window {key}: stored (spent, reserved) {have} != rows {want}")
    return problems


def check_rollup(path: Target) -> list[str]:
    """The report rollup equals a GROUP BY over the settled rows, to the nano-dollar."""
    if is_server(path):
        return []  # the PostgreSQL ledger keeps no rollup table
    conn = sqlite3.connect(path)
    try:
        rows = dict(
            ((model, tags), (calls, cost))
            for model, tags, calls, cost in conn.execute(
                "SELECT model, tags, count(*), sum(cost_nanos) FROM calls "
                "WHERE status != 'pending' GROUP BY model, tags"
            )
        )
        rollup = dict(
            ((model, tags), (calls, cost))
            for model, tags, calls, cost in conn.execute(
                "SELECT model, tags, sum(calls), sum(cost_nanos) FROM usage_rollup "
                "GROUP BY model, tags HAVING sum(calls) > 0"
            )
        )
    finally:
        conn.close()
    if rows == rollup:
        return []
    return [f"rollup (calls, cost) by (model, tags) {rollup} != rows {rows}"]


# -- 1. concurrency ----------------------------------------------------------------------------


@dataclass
class ConcurrencyReport:
    calls: int = 0
    processes: int = 0
    threads: int = 0
    async_concurrency: int = 0
    ok: int = 0
    errors: int = 0
    refused: int = 0
    rows: int = 0
    server_requests: int = 0
    retried_rows: int = 0
    cache_hit_rows: int = 0
    stream_rows: int = 0
    cap_nanos: int = 0
    spent_nanos: int = 0
    billed_nanos: int = 0
    overshoot_nanos: int = 0
    lost_rows: int = 0
    duplicate_rows: int = 0
    restarts: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def measure_reply_tokens(base_url: str) -> int:
    """Completion tokens of the stand-in's full reply, asked once with a plain openai client."""
    import openai

    with openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=5) as plain:
        resp = plain.chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "x"}], max_tokens=4000
        )
    assert resp.usage is not None
    return int(resp.usage.completion_tokens)


def run_concurrency(
    size: Size,
    workdir: Path,
    *,
    seed: int = 20261128,
    error_rate: float = 0.08,
    ledger: str | None = None,
    restart: Callable[[], None] | None = None,
) -> ConcurrencyReport:
    """Workers in processes, threads and asyncio share one ledger and one daily cap.

    ``ledger``: a postgresql:// URL to run on PostgreSQL (default: a SQLite file in
    ``workdir``). ``restart``: called once, when a third of the calls are in the ledger (a
    server restart in the middle of the run); it must return when the server is back.
    """
    import kimi_budget as kb
    from kimi_budget.testing import MoonshotStandIn

    report = ConcurrencyReport(
        calls=size.calls,
        processes=size.processes + 1,
        threads=size.processes * size.threads,
        async_concurrency=size.async_concurrency,
    )
    target: Target = ledger if ledger is not None else workdir / "ledger.db"
    prices = kb.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1", ledger=workdir / "p.db")
    table = prices._kb.prices
    prices.close()
    with MoonshotStandIn(
        api_key=KEY,
        latency=(0.0, 0.05),
        error_rate=error_rate,
        rate_limit_retry_after=0,  # "try again after 0 seconds": retries stay quick
        seed=seed,
    ) as server:
        reply_tokens = measure_reply_tokens(server.base_url)
        server.reset()
        # The cap is set from what the plan would really cost if every call ran (all cache
        # misses), so that it is certainly reached halfway through and refusals are exercised.
        expected = 0
        for i in range(size.calls):
            body = plan_call(seed, i)
            price = table.get(body["model"])
            prompt = server.count_prompt_tokens(body)
            output = min(body["max_tokens"], reply_tokens) * body.get("n", 1)
            expected += prompt * price.cache_miss + output * price.output
        cap_nanos = expected // 2
        report.cap_nanos = cap_nanos
        cap = str(Decimal(cap_nanos) / 10**9)

        # Every process, the asyncio one included, gets an equal share of the calls.
        concurrent = size.processes * size.threads + size.async_concurrency
        async_share = size.calls // (size.processes + 1)
        ids = list(range(size.calls))
        random.Random(seed).shuffle(ids)
        async_ids, sync_ids = ids[:async_share], ids[async_share:]
        common = {
            "base_url": server.base_url,
            "key": KEY,
            "ledger": str(target),
            "daily": cap,
            "seed": seed,
            "cwd": str(workdir),
        }
        jobs: list[tuple[subprocess.Popen[str], Path]] = []
        started = time.perf_counter()
        for p in range(size.processes):
            out = workdir / f"sync-{p}.json"
            cfg = {
                **common,
                "mode": "threads",
                "threads": size.threads,
                "ids": sync_ids[p :: size.processes],
                "out": str(out),
            }
            jobs.append((spawn_worker(cfg), out))
        out = workdir / "async.json"
        cfg = {
            **common,
            "mode": "async",
            "concurrency": size.async_concurrency,
            "ids": async_ids,
            "out": str(out),
        }
        jobs.append((spawn_worker(cfg), out))
        restarter = None
        if restart is not None:
            restarter = _RestartMidway(target, size.calls // 3, restart)
            restarter.start()
        results: list[dict[str, Any]] = []
        warnings_seen: list[str] = []
        for proc, out in jobs:
            _, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                report.problems.append(f"worker exited {proc.returncode}: {err[-2000:]}")
                continue
            data = read_results(out)
            results += data["calls"]
            warnings_seen += data["warnings"]
        report.seconds = time.perf_counter() - started
        requests = server.chat_requests
        server_errors = list(server.errors)
        billed = list(server.billed)
        if restarter is not None:
            restarter.join(60)
            report.restarts = restarter.restarts
            if restarter.error:
                report.problems.append(f"the server restart failed: {restarter.error}")
            elif not restarter.restarts:
                report.problems.append("the run ended before the server could be restarted")

    report.problems += [f"stand-in error: {e!r}" for e in server_errors]
    report.problems += _judge_concurrency(
        report, target, results, warnings_seen, requests, billed, concurrent
    )
    return report


class _RestartMidway(threading.Thread):
    """Restarts the server once the ledger holds ``rows`` calls (polled on its own connection)."""

    def __init__(self, target: Target, rows: int, restart: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.target, self.rows, self.restart = target, rows, restart
        self.restarts = 0
        self.error = ""

    def run(self) -> None:
        import psycopg

        deadline = time.monotonic() + 600
        try:
            with psycopg.connect(str(self.target), autocommit=True) as conn:
                while time.monotonic() < deadline:
                    with contextlib.suppress(psycopg.Error):
                        count = conn.execute("SELECT count(*) FROM calls").fetchone()
                        if count is not None and count[0] >= self.rows:
                            break
                    time.sleep(0.05)
            self.restart()
            self.restarts += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


def _judge_concurrency(
    report: ConcurrencyReport,
    ledger: Target,
    results: list[dict[str, Any]],
    warnings_seen: list[str],
    requests: Sequence[Any],
    billed: Sequence[Mapping[str, int]],
    concurrent: int,
) -> list[str]:
    problems: list[str] = []
    outcomes = Counter(r["outcome"] for r in results)
    report.ok, report.errors, report.refused = (
        outcomes["ok"],
        outcomes["error"],
        outcomes["refused"],
    )
    if len(results) != report.calls or len({r["id"] for r in results}) != report.calls:
        problems.append(f"{len(results)} outcomes reported for {report.calls} planned calls")
    for r in results:
        text = f"{r.get('type')}: {r.get('message')}"
        if "locked" in text.lower() or r.get("type") == "LedgerError":
            problems.append(f"call {r['id']} saw the ledger locked: {text}")
        elif r["outcome"] == "error" and r.get("type") not in (
            "RateLimitError",
            "InternalServerError",
            "APIStatusError",
        ):
            # Only the stand-in's retryable errors, after the retries ran out, may reach a caller.
            problems.append(f"call {r['id']} failed unexpectedly: {text}")
    for text in warnings_seen:
        problems.append(f"a worker was warned: {text}")
    if fallback_file(ledger).exists():
        problems.append("settlements went to the fallback file: the ledger was not writable")

    rows = ledger_rows(ledger)
    report.rows = len(rows)
    by_call: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_call[int(json.loads(row["tags"])[CALL_TAG])].append(row)
    reqs: dict[int, list[Any]] = defaultdict(list)
    for rec in requests:
        reqs[int(rec.headers[CALL_HEADER])].append(rec)
    report.server_requests = len(requests)

    refused = [r for r in results if r["outcome"] == "refused"]
    if not refused:
        problems.append("the cap was never reached: the run did not test refusals")
    max_projected = max((row["projected_nanos"] for row in rows), default=0)
    for r in refused:
        limit, spent, reserved, projected = (
            Decimal(r[k]) for k in ("limit", "spent", "reserved", "projected")
        )
        if r["window"] != "daily":
            problems.append(f"call {r['id']} refused by {r['window']}, not the daily cap")
        if not spent + reserved + projected > limit:
            problems.append(f"false refusal of call {r['id']}: {r}")
        # Reservations can only be held by calls in flight: more would be a leak.
        if reserved * 10**9 > concurrent * max_projected:
            problems.append(f"call {r['id']} saw {reserved} reserved, more than can be in flight")
        if by_call.get(r["id"]) or reqs.get(r["id"]):
            problems.append(f"refused call {r['id']} still reached the ledger or the server")

    for r in results:
        if r["outcome"] == "refused":
            continue
        got = by_call.get(r["id"], [])
        if not got:
            report.lost_rows += 1
            problems.append(f"call {r['id']} ({r['outcome']}) has no ledger row")
            continue
        if len(got) > 1:
            report.duplicate_rows += len(got) - 1
            problems.append(f"call {r['id']} has {len(got)} ledger rows")
        row = got[0]
        seen = reqs.get(r["id"], [])
        if row["attempts"] != len(seen):
            problems.append(
                f"call {r['id']}: row says {row['attempts']} attempts, server saw {len(seen)}"
            )
        if row["attempts"] > 1:
            report.retried_rows += 1
        owed = sum(priced(rec.usage, row) for rec in seen)
        if row["cost_nanos"] != owed:
            problems.append(f"call {r['id']}: row cost {row['cost_nanos']} != billed {owed}")
        if row["cost_nanos"] > row["projected_nanos"]:
            problems.append(f"call {r['id']} cost more than it reserved: {row}")
        if row["status"] != r["outcome"] or row["estimated"]:
            problems.append(f"call {r['id']}: caller saw {r['outcome']}, row says {row}")
        report.cache_hit_rows += bool(row["cached_tokens"])
        report.stream_rows += bool(row["stream"])
    for call in reqs:
        if call not in by_call:
            report.lost_rows += 1
            problems.append(f"the server answered call {call}, which has no ledger row")

    report.spent_nanos = sum(row["cost_nanos"] for row in rows)
    report.billed_nanos = sum(
        priced(rec.usage, by_call[int(rec.headers[CALL_HEADER])][0])
        for rec in requests
        if rec.usage and by_call.get(int(rec.headers[CALL_HEADER]))
    )
    if report.spent_nanos != report.billed_nanos:
        problems.append(f"ledger total {report.spent_nanos} != server billed {report.billed_nanos}")
    tokens = ("prompt_tokens", "cached_tokens", "completion_tokens")
    server_tokens = [sum(b[k] for b in billed) for k in tokens]
    ledger_tokens = [sum(row[k] or 0 for row in rows) for k in tokens]
    if server_tokens != ledger_tokens:
        problems.append(f"tokens billed {server_tokens} != tokens recorded {ledger_tokens}")

    stored = [w for w in window_totals(ledger) if w["window"] == "daily"]
    for w in stored:
        report.overshoot_nanos = max(report.overshoot_nanos, w["spent_nanos"] - report.cap_nanos)
        if w["reserved_nanos"] != 0:
            problems.append(f"daily window {w['start']} still has {w['reserved_nanos']} reserved")
    if report.overshoot_nanos > 0:
        problems.append(f"the daily cap was overshot by {report.overshoot_nanos} nano-dollars")
    problems += check_totals(ledger, "UTC", ["daily"])
    problems += check_rollup(ledger)
    if any(row["status"] not in FINAL for row in rows):
        problems.append("rows are still pending after every caller returned")
    return problems


# -- 2. crashes --------------------------------------------------------------------------------

POINTS = ("before-reserve", "in-reserve", "holding", "in-flight", "mid-stream", "in-settle")


@dataclass
class CrashReport:
    kills: int = 0
    kills_by_point: dict[str, int] = field(default_factory=dict)
    reserved_seen: int = 0
    rows: int = 0
    expired_rows: int = 0
    steady_calls: int = 0
    integrity: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class _LineReader:
    """Lines of a child's stdout, with a deadline. Reads the raw pipe: a buffered reader would
    hide lines that already arrived from ``select``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def lines(self, deadline: float) -> Iterator[str]:
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                yield line.decode("utf-8", "replace").strip()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                return
            data = os.read(self.fd, 65536)
            if not data:
                return
            self.buffer += data


def run_crashes(size: Size, workdir: Path, *, seed: int = 7) -> CrashReport:
    """SIGKILL workers at every point of a call's life while another keeps working."""
    from kimi_budget.testing import MoonshotStandIn

    report = CrashReport()
    rng = random.Random(seed)
    ledger = workdir / "ledger.db"
    budget = {"daily": "50", "total": "100"}
    started = time.perf_counter()
    with MoonshotStandIn(
        api_key=KEY,
        latency=(0.02, 0.12),
        stream_chunks=30,
        chunk_delay=0.01,
        error_rate=0.05,
        rate_limit_retry_after=0,
        seed=seed,
    ) as server:
        common = {
            "base_url": server.base_url,
            "key": KEY,
            "ledger": str(ledger),
            **budget,
            "seed": seed,
            "cwd": str(workdir),
            # A short request timeout and no margin: a dead process's reservation expires
            # two seconds after it was taken.
            "timeout": 2.0,
            "margin": 0.0,
        }
        steady_out = workdir / "steady.json"
        steady = spawn_worker(
            {
                **common,
                "mode": "threads",
                "threads": 2,
                "out": str(steady_out),
                "ids": list(range(1_000_000, 1_000_000 + size.steady_calls)),
            }
        )
        schedule = [p for p in POINTS for _ in range(size.kills_per_point)]
        schedule += ["random"] * size.random_kills
        rng.shuffle(schedule)
        reserved: set[int] = set()
        next_id = 0
        for point in schedule:
            cfg = {**common, "mode": "crash", "point": point, "first_id": next_id, "out": ""}
            next_id += 10_000
            proc = spawn_worker(cfg, stdout=subprocess.PIPE)
            reader = _LineReader(proc)
            reached = False
            deadline = time.monotonic() + 60
            if point == "random":
                # Let it get going (imports done, calls flowing), then kill it wherever it is.
                for line in reader.lines(deadline):
                    if line.startswith("RESERVED "):
                        reserved.add(int(line.split()[1]))
                    if line == "READY":
                        break
                kill_at = time.monotonic() + rng.uniform(0.05, 1.5)
                for line in reader.lines(kill_at):
                    if line.startswith("RESERVED "):
                        reserved.add(int(line.split()[1]))
                reached = True
            else:
                for line in reader.lines(deadline):
                    if line.startswith("RESERVED "):
                        reserved.add(int(line.split()[1]))
                    if line == f"AT {point}":
                        reached = True
                        break
                if point in ("in-flight", "mid-stream"):
                    time.sleep(rng.uniform(0.0, 0.08))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
            if not reached:
                report.problems.append(f"worker never reached {point}: {err[-2000:]}")
            elif proc.returncode != -signal.SIGKILL:
                report.problems.append(f"worker at {point} ended {proc.returncode}: {err[-2000:]}")
            else:
                report.kills += 1
                report.kills_by_point[point] = report.kills_by_point.get(point, 0) + 1
        _, err = steady.communicate(timeout=900)
        if steady.returncode != 0:
            report.problems.append(f"the steady worker failed: {err[-2000:]}")
        requests = server.chat_requests
        server_errors = list(server.errors)
    report.seconds = time.perf_counter() - started
    report.reserved_seen = len(reserved)
    report.problems += [f"stand-in error: {e!r}" for e in server_errors]
    report.problems += _judge_crashes(report, ledger, steady_out, reserved, requests, budget)
    return report


def _judge_crashes(
    report: CrashReport,
    ledger: Path,
    steady_out: Path,
    reserved: set[int],
    requests: Sequence[Any],
    budget: Mapping[str, str],
) -> list[str]:
    import kimi_budget as kb
    from kimi_budget.ledger import Reservation

    problems: list[str] = []
    if steady_out.exists():
        steady = read_results(steady_out)
        report.steady_calls = len(steady["calls"])
        for r in steady["calls"]:
            text = f"{r.get('type')}: {r.get('message')}"
            if (
                r["outcome"] == "refused"
                or "locked" in text.lower()
                or r.get("type") == "LedgerError"
            ):
                problems.append(f"steady call {r['id']} hurt by the crashes: {text}")
        problems += [f"steady worker warned: {w}" for w in steady["warnings"]]

    report.integrity = integrity(ledger)
    if report.integrity != "ok":
        problems.append(f"integrity_check: {report.integrity}")

    rows = ledger_rows(ledger)
    now = datetime.now(UTC)
    # Reservations of the dead stay until their expiry, and not a moment less.
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        from kimi_budget._budget import parse_utc

        earliest = min(parse_utc(r["expires_at"]) for r in pending)
        with kb.Ledger(ledger, clock=lambda: earliest - timedelta(milliseconds=1)) as early:
            if early.expire_stale() != 0:
                problems.append("a reservation expired before its expires_at")
    with kb.Ledger(ledger, clock=lambda: now + timedelta(seconds=30)) as later:
        later.expire_stale()
    rows = ledger_rows(ledger)
    report.rows = len(rows)
    report.expired_rows = sum(r["status"] == "expired" for r in rows)
    if report.expired_rows < report.kills_by_point.get("holding", 0):
        problems.append("killed holders left fewer expired rows than there were holders")
    for row in rows:
        if row["status"] not in FINAL:
            problems.append(f"row {row['call_id']} is still {row['status']} after expiry")
        if row["cost_nanos"] < 0:
            problems.append(f"row {row['call_id']} has a negative cost")
        if row["status"] == "expired" and (
            not row["estimated"] or not row["note"] or row["cost_nanos"] != row["projected_nanos"]
        ):
            problems.append(f"expired row not charged its full reservation, flagged: {row}")

    by_call = Counter(int(json.loads(r["tags"])[CALL_TAG]) for r in rows)
    dupes = {c: n for c, n in by_call.items() if n > 1}
    if dupes:
        problems.append(f"duplicated rows: {dupes}")
    request_ids = Counter(r["request_id"] for r in rows if r["request_id"])
    if any(n > 1 for n in request_ids.values()):
        problems.append("two rows share a server request id")
    missing = reserved - set(by_call)
    if missing:
        problems.append(f"reservations announced but not in the ledger: {sorted(missing)[:10]}")
    for rec in requests:
        if int(rec.headers[CALL_HEADER]) not in by_call:
            problems.append(f"the server saw call {rec.headers[CALL_HEADER]}, which has no row")

    problems += check_totals(ledger, "UTC", ["daily", "total"])
    problems += check_rollup(ledger)
    # The budget is whole again: exactly the headroom left can be reserved, not a nano more.
    with kb.Ledger(ledger) as after:
        caps = kb.Budget(daily=budget["daily"], total=budget["total"])
        status = {s.window: s for s in after.status(caps)}
        spent = sum(r["cost_nanos"] for r in rows)
        total = status["total"]
        if total.reserved_usd != 0 or total.spent_usd * 10**9 != spent:
            problems.append(f"total window after recovery: {total}")
        headroom = int((total.limit_usd - total.spent_usd) * 10**9)
        daily = status["daily"]
        headroom = min(
            headroom, int((daily.limit_usd - daily.spent_usd - daily.reserved_usd) * 10**9)
        )

        def probe(projected: int, n: int) -> Reservation:
            t = after.clock()
            return Reservation(
                call_id=f"probe-{n}",
                model="kimi-k2.5",
                tags={CALL_TAG: str(-n)},
                created_at=t,
                expires_at=t + timedelta(minutes=5),
                projected_nanos=projected,
                prompt_estimate=0,
                price_cache_hit=100,
                price_cache_miss=600,
                price_output=3000,
            )

        try:
            after.reserve(probe(headroom + 1, 1), [caps])
            problems.append("a reservation above the headroom left was accepted")
        except kb.BudgetExceededError:
            pass
        try:
            after.reserve(probe(headroom, 2), [caps])
        except kb.BudgetExceededError as exc:
            problems.append(f"the budget is not fully available after the crashes: {exc}")
    return problems


# -- 3. unknown bills ----------------------------------------------------------------------------

# What each call of the unknown-bills run does: read to the end, or leave its bill unknown.
UNKNOWN_KINDS = ("ok", "abandon", "drop", "unread", "timeout", "no-usage", "bad-usage")
FAULT_HEADER = "x-kb-fault"
# Long enough that every call generates (and is billed) its whole max_tokens.
LONG_REPLY = "The quick brown fox jumps over the lazy dog. " * 40


def unknown_kind(seed: int, i: int) -> str:
    return random.Random(f"unknown:{seed}:{i}").choice(UNKNOWN_KINDS)


def unknown_call(seed: int, i: int) -> dict[str, Any]:
    """The keyword arguments of call ``i`` of the unknown-bills run."""
    rng = random.Random(f"unknown-body:{seed}:{i}")
    kind = unknown_kind(seed, i)
    body: dict[str, Any] = {
        "model": "kimi-k2.5",
        "messages": [{"role": "user", "content": f"Story {i}, please."}],
        "max_tokens": rng.randint(40, 120),
    }
    if kind in ("abandon", "drop", "unread") or (kind == "bad-usage" and rng.random() < 0.5):
        body["stream"] = True
    return body


def fault_for_request(record: Any) -> Any:
    """The stand-in's fault for a request of the unknown-bills run, from its header."""
    from kimi_budget.testing import Fault

    kind = record.headers.get(FAULT_HEADER)
    if kind == "timeout":
        return Fault.slow(1.0)  # answered (and billed) after the client gave up
    if kind == "no-usage":
        return Fault.without_usage()
    if kind == "bad-usage":
        return Fault.bad_usage({"prompt_tokens": -1, "completion_tokens": 5})
    return None


@dataclass
class UnknownBillsReport:
    calls: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    refused: int = 0
    rows: int = 0
    estimated_rows: int = 0
    server_requests: int = 0
    cap_nanos: int = 0
    billed_nanos: int = 0  # what the stand-in would bill: every request it generated for
    spent_nanos: int = 0  # what the ledger charged
    overshoot_nanos: int = 0  # billed beyond the cap
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def run_unknown_bills(size: Size, workdir: Path, *, seed: int = 9) -> UnknownBillsReport:
    """Calls whose bills are unknown (abandoned, dropped and unread streams, timeouts after
    sending, missing and malformed usage, processes killed mid-stream) under one daily cap:
    the server never bills more than the cap."""
    from kimi_budget.pricing import PriceTable
    from kimi_budget.testing import MoonshotStandIn

    report = UnknownBillsReport(calls=size.calls // 2)
    price = PriceTable.load().get("kimi-k2.5")
    ledger = workdir / "ledger.db"
    started = time.perf_counter()
    with MoonshotStandIn(
        api_key=KEY,
        reply=LONG_REPLY,
        latency=(0.0, 0.02),
        seed=seed,
        fault_for=fault_for_request,
    ) as server:
        # The cap fits about a third of the calls at their worst case: refusals are certain.
        worst = 0
        for i in range(report.calls):
            body = unknown_call(seed, i)
            worst += (
                server.count_prompt_tokens(body) * price.cache_miss
                + body["max_tokens"] * price.output
            )
        report.cap_nanos = worst // 3
        cap = str(Decimal(report.cap_nanos) / 10**9)
        common = {
            "base_url": server.base_url,
            "key": KEY,
            "ledger": str(ledger),
            "daily": cap,
            "seed": seed,
            "cwd": str(workdir),
            "timeout": 0.5,
            "margin": 0.0,
        }
        # First, processes killed while a stream of theirs is being read: their reservations
        # stay until they expire (two seconds), while the others run into the cap.
        for k in range(max(size.kills_per_point, 1) * 2):
            cfg = {
                **common,
                "mode": "crash",
                "point": "mid-stream",
                "first_id": 100_000 + 10_000 * k,
                "out": "",
                "timeout": 2.0,
                "hold_mid_stream": True,
            }
            proc = spawn_worker(cfg, stdout=subprocess.PIPE)
            reader = _LineReader(proc)
            reached = any(line == "AT mid-stream" for line in reader.lines(time.monotonic() + 60))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
            if reached and proc.returncode == -signal.SIGKILL:
                report.kills += 1
            else:
                report.problems.append(f"a mid-stream kill did not happen: {err[-2000:]}")
        ids = list(range(report.calls))
        jobs: list[tuple[subprocess.Popen[str], Path]] = []
        for p in range(size.processes):
            out = workdir / f"unknown-{p}.json"
            cfg = {
                **common,
                "mode": "unknown",
                "threads": size.threads,
                "ids": ids[p :: size.processes],
                "out": str(out),
            }
            jobs.append((spawn_worker(cfg), out))
        results: list[dict[str, Any]] = []
        for proc, out in jobs:
            _, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                report.problems.append(f"worker exited {proc.returncode}: {err[-2000:]}")
                continue
            data = read_results(out)
            results += data["calls"]
            report.problems += [f"a worker was warned: {w}" for w in data["warnings"]]
        # Requests the server is still finishing (a timed-out call's answer) are billed too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            not (r.status or r.dropped or r.usage is not None) for r in server.chat_requests
        ):
            time.sleep(0.05)
        requests = server.chat_requests
        server_errors = list(server.errors)
    report.seconds = time.perf_counter() - started
    report.problems += [f"stand-in error: {e!r}" for e in server_errors]
    report.problems += _judge_unknown_bills(report, ledger, results, requests, seed)
    return report


def _judge_unknown_bills(
    report: UnknownBillsReport,
    ledger: Path,
    results: list[dict[str, Any]],
    requests: Sequence[Any],
    seed: int,
) -> list[str]:
    import kimi_budget as kb

    problems: list[str] = []
    report.kinds = dict(Counter(unknown_kind(seed, r["id"]) for r in results))
    report.refused = sum(r["outcome"] == "refused" for r in results)
    if report.refused == 0:
        problems.append("the cap was never reached: the run did not test refusals")
    if len(results) != report.calls:
        problems.append(f"{len(results)} outcomes reported for {report.calls} planned calls")
    # Killed processes leave reservations: another process expires them once they are due.
    with kb.Ledger(ledger, clock=lambda: datetime.now(UTC) + timedelta(minutes=5)) as later:
        later.expire_stale()
    rows = ledger_rows(ledger)
    report.rows = len(rows)
    report.estimated_rows = sum(bool(r["estimated"]) for r in rows)
    by_call: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_call[int(json.loads(row["tags"])[CALL_TAG])].append(row)
    report.server_requests = len(requests)
    for rec in requests:
        call = int(rec.headers[CALL_HEADER])
        got = by_call.get(call, [])
        if len(got) != 1:
            problems.append(f"the server saw call {call}, which has {len(got)} ledger rows")
            continue
        report.billed_nanos += priced(rec.usage, got[0])
    for row in rows:
        if row["status"] not in FINAL:
            problems.append(f"row {row['call_id']} is still {row['status']}")
        if row["estimated"] and row["cost_nanos"] < row["projected_nanos"]:
            # A bill that could not be read costs the call's whole reservation.
            problems.append(f"estimated row charged less than its reservation: {row}")
    report.spent_nanos = sum(r["cost_nanos"] for r in rows)
    report.overshoot_nanos = max(report.billed_nanos - report.cap_nanos, 0)
    if report.overshoot_nanos:
        problems.append(
            f"the server billed {report.billed_nanos} nano-dollars over a cap of "
            f"{report.cap_nanos}: {report.overshoot_nanos} over"
        )
    if report.spent_nanos < report.billed_nanos:
        problems.append(
            f"the ledger charged {report.spent_nanos}, less than the server billed "
            f"{report.billed_nanos}"
        )
    if report.estimated_rows == 0:
        problems.append("no bill was unknown: the run did not test what it claims")
    problems += check_totals(ledger, "UTC", ["daily"])
    return problems
