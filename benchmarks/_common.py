"""Shared pieces of the benchmarks: machine facts, statistics, the stand-in server in a
subprocess, big ledgers built fast, and a timer that splits the wrapper's time by stage.

Nothing here is a test: the benchmarks print figures, and ``tests/test_benchmarks_smoke.py``
only checks that they still run at a tiny size.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

UTC = timezone.utc
ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello in one short sentence."}]
MODEL = "kimi-k2.5"
# A budget with every cap set: each call checks and updates five windows.
CAPS = dict(
    per_call="5",
    hourly="100000",
    daily="1000000",
    weekly="5000000",
    monthly="20000000",
    total="1000000000",
)
TAGS = {"project": "bench", "team": "perf"}
# Only the loopback stand-in ever sees it.
KEY = "sk-bench-0000000000000000"


def make_budget() -> Any:
    """A ``kimi_budget.Budget`` with every cap of ``CAPS``."""
    import kimi_budget as kb

    return kb.Budget(
        per_call=CAPS["per_call"],
        hourly=CAPS["hourly"],
        daily=CAPS["daily"],
        weekly=CAPS["weekly"],
        monthly=CAPS["monthly"],
        total=CAPS["total"],
    )


def scratch_dir() -> Path:
    """Where big ledgers are built and cached (``KIMI_BUDGET_BENCH_DIR``, else a temp dir)."""
    base = os.environ.get("KIMI_BUDGET_BENCH_DIR")
    path = Path(base) if base else Path(os.environ.get("TMPDIR", "/tmp")) / "kimi-budget-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    return "n/a"


def machine_info() -> list[tuple[str, str]]:
    import openai

    import kimi_budget

    base = __import__("openai._base_client", fromlist=["x"])
    http = "httpx2" if hasattr(base, "httpx2") else "httpx"
    http_version = getattr(sys.modules.get(http), "__version__", "?")
    return [
        (
            "machine",
            f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        ),
        ("load average at start (1/5/15 min)", load_average()),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("openai", f"{openai.__version__} (over {http} {http_version})"),
        ("sqlite", sqlite3.sqlite_version),
        ("kimi-budget", getattr(kimi_budget, "__version__", "?")),
    ]


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Sample:
    """Timings in nanoseconds."""

    values: list[int] = field(default_factory=list)

    def add(self, ns: int) -> None:
        self.values.append(ns)

    @property
    def median_us(self) -> float:
        return statistics.median(self.values) / 1000 if self.values else float("nan")

    @property
    def p99_us(self) -> float:
        return percentile(self.values, 99) / 1000

    @property
    def mean_us(self) -> float:
        return statistics.fmean(self.values) / 1000 if self.values else float("nan")


def fmt_us(us: float) -> str:
    if us != us:  # NaN
        return "n/a"
    if abs(us) >= 10_000:
        return f"{us / 1000:,.1f} ms"
    return f"{us:,.0f} µs" if abs(us) >= 100 else f"{us:,.1f} µs"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (it reads fine in a terminal too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells[1:]
    ]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# -- the stand-in server -----------------------------------------------------------------------


@contextlib.contextmanager
def standin(
    *,
    stream_chunks: int | None = None,
    subprocess_: bool = True,
    latency: tuple[float, float] | None = None,
) -> Iterator[str]:
    """Yield the base URL of a MoonshotStandIn.

    In a subprocess by default: the server's own CPU then stays off the client's GIL, so the
    client-side figures are not inflated by the server's work.
    """
    if not subprocess_:
        from kimi_budget.testing import MoonshotStandIn

        with MoonshotStandIn(stream_chunks=stream_chunks, latency=latency or (0, 0)) as server:
            yield server.base_url
        return
    argv = [sys.executable, "-m", "kimi_budget.testing", "--port", "0", "--seed", "1"]
    if stream_chunks is not None:
        argv += ["--stream-chunks", str(stream_chunks)]
    if latency is not None:
        argv += ["--latency", str(latency[0]), str(latency[1])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the stand-in did not start (printed {url!r})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- processes ---------------------------------------------------------------------------------


def run_processes(
    target: Callable[..., Any], args: Sequence[tuple[Any, ...]], *, timeout: float
) -> tuple[list[Any], str]:
    """Run ``target(barrier, results, *args[i])`` in one process per ``args`` entry.

    The workers share a barrier (so they start their measured part together) and put one
    result each on ``results``. Returns the results in worker order (each result's first item
    is its index) and the start method used (fork where the platform has it).
    """
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx: Any = mp.get_context(method)
    barrier = ctx.Barrier(len(args))
    results = ctx.Queue()
    workers = [ctx.Process(target=target, args=(barrier, results, *a)) for a in args]
    for p in workers:
        p.start()
    try:
        outcomes = [results.get(timeout=timeout) for _ in workers]
    finally:
        for p in workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(outcomes, key=lambda o: o[0]), method


def cycle_worker(
    barrier: Any,
    results: Any,
    worker: int,
    target: str,
    seconds: float,
    settle: str = "background",
    *,
    pause: float = 0.0,
) -> None:
    """A ``run_processes`` worker: reserve+settle cycles on ``target`` for ``seconds``.

    Puts ``(worker, cycles, locked, other errors, latencies in ns, first error, seconds until
    every settlement was written)``; "locked" counts the errors that say the database was
    locked or busy. ``settle`` as in :func:`cycle`. ``pause``: seconds of sleep after each
    cycle (0: back to back).
    """
    import kimi_budget as kb

    ledger = kb.Ledger(target)
    budgets = (make_budget(),)
    tags = {**TAGS, "worker": str(worker)}
    cycles = locked = other = 0
    latencies: list[int] = []
    first_error = ""
    barrier.wait()
    begun = time.perf_counter()
    deadline = begun + seconds
    while time.perf_counter() < deadline:
        try:
            reserve_ns, settle_ns = cycle(ledger, budgets, tags, settle)
        except (kb.LedgerError, sqlite3.Error) as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                locked += 1
            else:
                other += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            continue
        latencies.append(reserve_ns + settle_ns)
        cycles += 1
        if pause:
            time.sleep(pause)
    ledger.close()  # flushes: every settlement is written before the clock stops
    elapsed = time.perf_counter() - begun
    results.put((worker, cycles, locked, other, latencies, first_error, elapsed))


# -- ledgers -----------------------------------------------------------------------------------

_MODELS = [  # (model, share, price per token in nano-dollars: cache hit, miss, output)
    ("kimi-k2.5", 0.55, 100, 600, 3000),
    ("kimi-k2-turbo-preview", 0.2, 150, 1150, 8000),
    ("kimi-k3", 0.15, 200, 1500, 7500),
    ("moonshot-v1-8k", 0.1, 200, 200, 2000),
]
_PROJECTS = ["bench", "crawler", "chatbot", "eval", "docs"]
# Bump when the rows below or the ledger's schema change, so cached templates are rebuilt
# (3: the usage rollup of migration m002; 4: time-ordered call ids; 5: m005 reservations).
_BUILD_VERSION = 5


def _call_id(created: datetime, rng: random.Random) -> str:
    """A UUIDv7 of ``created`` (the shape of ``kimi_budget.ledger.new_call_id``)."""
    ms = int(created.timestamp() * 1000)
    value = ms << 80 | 0x7 << 76 | rng.getrandbits(12) << 64 | 2 << 62 | rng.getrandbits(62)
    return f"{value:032x}"


def _rows(count: int, start: datetime, end: datetime, seed: int) -> Iterator[tuple[Any, ...]]:
    """``count`` finished calls spread evenly over ``[start, end)``, oldest first."""
    from kimi_budget._budget import format_utc

    rng = random.Random(seed)
    span = (end - start).total_seconds()
    step = span / max(count, 1)
    weights = [m[1] for m in _MODELS]
    models = rng.choices(_MODELS, weights=weights, k=count)
    for i in range(count):
        created = start + timedelta(seconds=i * step + rng.random() * step * 0.5)
        model, _, hit, miss, out = models[i]
        prompt = rng.randint(200, 6000)
        cached = rng.randint(0, prompt) if rng.random() < 0.3 else 0
        completion = rng.randint(10, 1200)
        ok = rng.random() < 0.97
        cost = (cached * hit + (prompt - cached) * miss + completion * out) if ok else 0
        project = _PROJECTS[i % len(_PROJECTS)]
        yield (
            _call_id(created, rng),
            format_utc(created),
            format_utc(created + timedelta(milliseconds=rng.randint(300, 9000))),
            model,
            f'{{"project":"{project}","team":"perf"}}',
            "ok" if ok else "error",
            prompt if ok else None,
            cached if ok else None,
            completion if ok else None,
            cost,
            prompt * miss + 1024 * out,
            prompt,
            hit,
            miss,
            out,
            1 if ok else 2,
            rng.randint(300, 9000),
        )


_INSERT = (
    "INSERT INTO calls (call_id, created_at, finished_at, model, tags, status, prompt_tokens, "
    "cached_tokens, completion_tokens, cost_nanos, projected_nanos, prompt_estimate, "
    "price_cache_hit, price_cache_miss, price_output, attempts, latency_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def build_ledger(path: Path, rows: int, *, now: datetime | None = None, seed: int = 7) -> float:
    """Create a ledger at ``path`` holding ``rows`` finished calls in the current (UTC) month.

    The file is created through ``kimi_budget.Ledger`` (schema, migrations, application id) and
    filled with ``executemany``; the schema's triggers fill the usage rollup as the rows go in,
    as they do for real calls. It has no registered budgets: registering one (any write or
    ``status``) backfills its window totals from these rows. Returns the seconds it took.
    """
    from kimi_budget import Ledger

    started = time.perf_counter()
    for suffix in ("", "-wal", "-shm", ".fallback.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    Ledger(path).close()
    now = now or datetime.now(UTC)
    # End a minute before now: the rows are history, whatever the benchmark does next.
    first, last = month_start(now), now - timedelta(minutes=1)
    if last <= first:
        last = first + timedelta(seconds=30)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB while building only
        conn.execute("BEGIN")
        batch: list[tuple[Any, ...]] = []
        for row in _rows(rows, first, last, seed):
            batch.append(row)
            if len(batch) >= 50_000:
                conn.executemany(_INSERT, batch)
                batch.clear()
        if batch:
            conn.executemany(_INSERT, batch)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def ledger_copy(rows: int, name: str, *, now: datetime | None = None) -> Path:
    """A private copy of a cached ``rows``-row ledger for this month (built on first use)."""
    now = now or datetime.now(UTC)
    directory = scratch_dir()
    template = directory / f"template-{rows}-{now:%Y-%m}-v{_BUILD_VERSION}.db"
    if not template.exists():
        building = directory / f"building-{rows}-{os.getpid()}.db"
        build_ledger(building, rows, now=now)
        os.replace(building, template)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{building}{suffix}")
    target = directory / f"{name}-{os.getpid()}.db"
    remove_ledger(target)
    shutil.copyfile(template, target)
    os.chmod(target, 0o600)
    return target


def remove_ledger(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".fallback.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def check_totals(ledger: Any, budget: Any) -> None:
    """Fail loudly if the budget's stored window totals disagree with a scan of the rows."""
    from decimal import Decimal

    from kimi_budget._budget import window_bounds

    now = ledger.clock()
    for status in ledger.status(budget):
        if status.window == "per_call":
            continue
        if status.window == "total":
            since = until = None
        else:
            since, until = window_bounds(status.window, now, budget.tz)
        scanned = ledger.spend(since=since, until=until, tags=budget.scope)
        if status.spent_usd != scanned:
            raise AssertionError(
                f"{status.window} total {status.spent_usd} != {scanned} scanned from the rows"
            )
        assert isinstance(scanned, Decimal)


# -- splitting the wrapper's time by stage --------------------------------------------------------


class StageTimer:
    """Wraps kimi-budget's hooks to time each stage of each call (an instrumented pass only:
    the wrappers themselves cost about a microsecond each, so the clean pass is separate)."""

    STAGES = ("estimate", "check+reserve", "send hooks", "settle")

    def __init__(self) -> None:
        self.current: dict[str, int] = defaultdict(int)
        self.calls: list[dict[str, int]] = []
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, name: str, stage: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        current = self.current

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                current[stage] += time.perf_counter_ns() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self, ledger: Any) -> StageTimer:
        from kimi_budget import _client, _guard, _streams
        from kimi_budget._guard import Call

        self._wrap(_client, "prepare", "estimate")
        self._wrap(Call, "__init__", "check+reserve")
        self._wrap(ledger, "reserve_call", "check+reserve")
        self._wrap(Call, "on_response", "send hooks")
        self._wrap(_guard, "watch_body", "send hooks")
        self._wrap(_streams, "_feed", "send hooks")
        self._wrap(Call, "succeeded", "settle")
        self._wrap(Call, "stream_ended", "settle")
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def end_call(self) -> None:
        self.calls.append(dict(self.current))
        self.current.clear()

    def median_us(self, stage: str) -> float:
        return statistics.median(c.get(stage, 0) for c in self.calls) / 1000 if self.calls else 0.0

    def p99_us(self, stage: str) -> float:
        return percentile([c.get(stage, 0) for c in self.calls], 99) / 1000

    def median_sum_us(self) -> float:
        return statistics.median(sum(c.values()) for c in self.calls) / 1000 if self.calls else 0.0


def cycle(
    ledger: Any,
    budgets: tuple[Any, ...],
    tags: dict[str, str] | None = None,
    settle: str = "background",
) -> tuple[int, int]:
    """One call's ledger work: check and reserve, then the settlement, as the caller pays
    them (durations in ns). ``settle="background"`` (the call path): the settlement is handed
    to the ledger's background writer (``settle_later``); ``"sync"``: written by the caller
    (``settle``, a second transaction)."""
    from kimi_budget.ledger import Reservation, Settlement, new_call_id

    now = datetime.now(UTC)
    reservation = Reservation(
        call_id=new_call_id(),
        model=MODEL,
        tags=TAGS if tags is None else tags,
        created_at=now,
        expires_at=now + timedelta(seconds=660),
        projected_nanos=250_000,
        prompt_estimate=40,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )
    started = time.perf_counter_ns()
    ledger.reserve(reservation, budgets)
    reserved = time.perf_counter_ns()
    settlement = Settlement(
        reservation=reservation,
        status="ok",
        prompt_tokens=40,
        cached_tokens=0,
        completion_tokens=35,
        cost_nanos=40 * 600 + 35 * 3000,
        estimated=False,
        attempts=1,
        finished_at=datetime.now(UTC),
        request_id="chatcmpl-bench",
        latency_ms=1,
    )
    settling = time.perf_counter_ns()
    if settle == "sync":
        ledger.settle(settlement)
    else:
        ledger.settle_later(settlement)
    return reserved - started, time.perf_counter_ns() - settling
