"""What only a ledger on a PostgreSQL server must do: many processes (hosts) sharing one cap,
lock order, concurrent migrations, fork, the server going away, async, and secrets in URLs.

The guarantees both backends share (reserve, settle, expiry, totals) are in the
backend-parametrised ledger tests; these need a server (see tests/pg_cluster.py).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import kimi_budget as kb
from kimi_budget import LedgerError
from kimi_budget.ledger import Ledger, Reservation, Settlement
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY
from tests.pg_cluster import Bouncer, Cluster, PostgresUnavailable, Server

UTC = timezone.utc
FORK = multiprocessing.get_context("fork")


def reservation(
    call_id: str, projected: int = 1000, tags: dict[str, str] | None = None
) -> Reservation:
    now = datetime.now(UTC)
    return Reservation(
        call_id=call_id,
        model="kimi-k2.5",
        tags=tags or {},
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        projected_nanos=projected,
        prompt_estimate=10,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )


def settlement(res: Reservation, cost: int) -> Settlement:
    return Settlement(
        reservation=res,
        status="ok",
        prompt_tokens=10,
        cached_tokens=0,
        completion_tokens=1,
        cost_nanos=cost,
        estimated=False,
        attempts=1,
        finished_at=datetime.now(UTC),
    )


def rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def ledger(postgres_url: str) -> Iterator[Ledger]:
    with Ledger(postgres_url) as opened:
        yield opened


def _reserve_many(url: str, budget: kb.Budget, worker: int, n: int, out: Any) -> None:
    ledger = Ledger(url)
    accepted = 0
    for i in range(n):
        try:
            ledger.reserve(reservation(f"w{worker}-{i}"), [budget])
            accepted += 1
        except kb.BudgetExceededError:
            pass
    ledger.close()
    out.put(accepted)


def test_processes_sharing_a_cap_reserve_exactly_what_fits_and_not_a_nano_more(
    postgres_url: str,
) -> None:
    budget = kb.Budget(daily=Decimal("0.000037"))  # room for exactly 37 calls of 1,000 nanos
    Ledger(postgres_url).close()  # migrated once, so the workers race on reservations only
    out = FORK.Queue()
    workers = [
        FORK.Process(target=_reserve_many, args=(postgres_url, budget, w, 25, out))
        for w in range(4)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    accepted = sum(out.get(timeout=5) for _ in workers)
    assert accepted == 37
    assert rows(postgres_url, "SELECT count(*), sum(projected_nanos) FROM calls") == [(37, 37000)]
    with Ledger(postgres_url) as ledger:
        daily = ledger.status(budget)[0]
    assert (daily.spent_usd, daily.reserved_usd) == (0, Decimal("0.000037"))


def _overlapping_budgets_worker(url: str, worker: int, n: int, out: Any) -> None:
    import random

    rng = random.Random(worker)
    budgets = [
        kb.Budget(hourly=5, daily=10),
        kb.Budget(daily=10, scope={"team": "a"}),
        kb.Budget(daily=10, monthly=20, scope={"project": "b"}),
        kb.Budget(total=50, scope={"team": "a", "project": "b"}),
    ]
    ledger = Ledger(url)
    errors = 0
    for i in range(n):
        tags = rng.choice([{}, {"team": "a"}, {"project": "b"}, {"team": "a", "project": "b"}])
        rng.shuffle(budgets)
        res = reservation(f"w{worker}-{i}", projected=rng.randint(1, 5000), tags=tags)
        try:
            ledger.reserve(res, budgets)
            ledger.settle(settlement(res, rng.randint(0, res.projected_nanos)))
        except LedgerError:
            errors += 1
    ledger.close()
    out.put(errors)


def test_budgets_sharing_windows_never_deadlock_and_their_totals_stay_exact(
    postgres_url: str,
) -> None:
    out = FORK.Queue()
    Ledger(postgres_url).close()
    workers = [
        FORK.Process(target=_overlapping_budgets_worker, args=(postgres_url, w, 40, out))
        for w in range(4)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    assert [out.get(timeout=5) for _ in workers] == [0, 0, 0, 0]
    # PostgreSQL's own count: not one deadlock was detected (and then retried) in the run.
    assert rows(
        postgres_url,
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    ) == [(0,)]
    # Every stored total equals the sum of the rows its scope matches.
    totals = rows(
        postgres_url,
        'SELECT s.scope, w."window", w.spent_nanos, w.reserved_nanos FROM window_totals w '
        "JOIN budget_scopes s ON s.id = w.scope_id",
    )
    assert len(totals) >= 6
    for scope, window, spent, reserved in totals:
        (expected,) = rows(
            postgres_url,
            "SELECT coalesce(sum(cost_nanos), 0) FROM calls WHERE tags @> %s::jsonb",
            scope,
        )
        assert (window, spent, reserved) == (window, expected[0], 0)
    assert rows(postgres_url, "SELECT count(*) FROM calls WHERE status = 'ok'") == [(160,)]


def _open_at_once(url: str, barrier: Any, out: Any) -> None:
    barrier.wait(30)
    try:
        Ledger(url).close()
        out.put("ok")
    except Exception as exc:  # reported to the parent, which fails the test
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_database_at_once_migrate_it_exactly_once(
    postgres_url: str,
) -> None:
    barrier = FORK.Barrier(4)
    out = FORK.Queue()
    workers = [
        FORK.Process(target=_open_at_once, args=(postgres_url, barrier, out)) for _ in range(4)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [out.get(timeout=5) for _ in workers] == ["ok"] * 4
    assert rows(postgres_url, "SELECT name, count(*) FROM kimi_budget_migrations GROUP BY name")
    assert all(
        n == 1
        for _, n in rows(
            postgres_url, "SELECT name, count(*) FROM kimi_budget_migrations GROUP BY name"
        )
    )


def _child_uses_the_ledger(ledger: Ledger, out: Any) -> None:
    res = reservation("child")
    ledger.reserve(res)
    ledger.settle(settlement(res, 700))
    out.put(ledger._conn.backend_pid)  # type: ignore[attr-defined]
    ledger.close()


def test_a_forked_child_connects_anew_and_never_touches_its_parents_connection(
    ledger: Ledger,
) -> None:
    ledger.reserve(reservation("parent-1"))
    parent_backend = ledger._conn.backend_pid  # type: ignore[attr-defined]
    out = FORK.Queue()
    child = FORK.Process(target=_child_uses_the_ledger, args=(ledger, out))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert out.get(timeout=5) != parent_backend
    # Same server session as before the fork: the child sent nothing on the parent's socket
    # (a goodbye message there would have ended this session).
    ledger.reserve(reservation("parent-2"))
    assert ledger._conn.backend_pid == parent_backend  # type: ignore[attr-defined]
    assert ledger.spend() == Decimal("0.0000007")


def test_an_unreachable_server_is_one_ledger_error_without_the_password() -> None:
    with socket_port() as port:
        url = f"postgresql://ann:hunter2-secret@127.0.0.1:{port}/kb"
        with pytest.raises(LedgerError) as caught:
            Ledger(url, reconnect_timeout=0, connect_timeout=1)
    message = str(caught.value)
    assert "hunter2-secret" not in message and "hunter2-secret" not in repr(caught.value)
    assert f"postgresql://ann:***@127.0.0.1:{port}/kb" in message
    assert caught.value.path is not None and "hunter2" not in caught.value.path


def test_the_url_in_repr_and_errors_never_shows_its_password(postgres_url: str) -> None:
    with_password = postgres_url.replace("://kb@", "://kb:pa55-w0rd-x@") + "?application_name=t"
    with Ledger(with_password) as ledger:
        assert "pa55-w0rd-x" not in repr(ledger)
        assert "kb:***@" in repr(ledger)
        ledger.close()
        with pytest.raises(LedgerError) as caught:
            ledger.reserve(reservation("after-close"))
    assert "pa55-w0rd-x" not in str(caught.value)


def test_without_psycopg_a_server_url_is_one_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what a missing package looks like
    with pytest.raises(LedgerError, match=r'pip install "kimi-budget\[postgres\]"'):
        Ledger("postgresql://ann:secret@db.example/kb")


@pytest.fixture(scope="module")
def private_server(postgres_server: Server) -> Iterator[Server]:
    """A cluster of this module's own, which its tests stop and start: other tests (in other
    xdist workers) keep using the shared one undisturbed."""
    try:
        cluster = Cluster.temporary()
    except PostgresUnavailable as exc:
        pytest.skip(f"needs PostgreSQL's server binaries to stop and start a server ({exc})")
    server = Server(cluster.url, cluster, owned=True)
    yield server
    server.close()


@pytest.fixture
def private_url(private_server: Server) -> Iterator[str]:
    url = private_server.create_database()
    yield url
    private_server.drop_database(url)


def restartable(server: Server) -> Cluster:
    assert server.cluster is not None
    return server.cluster


def test_server_down_refuses_new_calls_and_keeps_billed_ones_until_it_is_back(
    private_server: Server, private_url: str, standin: MoonshotStandIn
) -> None:
    postgres_url = private_url
    cluster = restartable(private_server)
    ledger = Ledger(postgres_url, reconnect_timeout=0.3)
    client = kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger)
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}]}
    stream = client.chat.completions.create(**body, stream=True, max_tokens=20)
    first = next(iter(stream))  # reserved and sent; the bill arrives at the end
    cluster.stop()
    try:
        rest = list(stream)  # the caller gets every chunk although the ledger is down
        with pytest.raises(LedgerError, match=r"127\.0\.0\.1"):
            client.chat.completions.create(**body, max_tokens=5)
        assert len(standin.chat_requests) == 1  # the refused call was never sent
        assert ledger.fallback_path.exists()
    finally:
        cluster.start()
    assert first is not None and rest
    client.chat.completions.create(**body, max_tokens=5)  # reaches the server: merges
    assert not ledger.fallback_path.exists()
    settled = rows(postgres_url, "SELECT status, cost_nanos > 0, estimated FROM calls ORDER BY id")
    assert settled == [("ok", True, False), ("ok", True, False)]
    client.close()


def test_an_async_client_never_waits_for_the_server_on_its_event_loop(
    postgres_url: str, standin: MoonshotStandIn
) -> None:
    ledger = Ledger(postgres_url)
    threads: list[int] = []
    real_run = ledger._run  # type: ignore[attr-defined]

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_run(*args, **kwargs)

    ledger._run = spy  # type: ignore[attr-defined]

    async def main() -> int:
        client = kb.AsyncOpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger)
        body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}]}
        await asyncio.gather(
            *(client.chat.completions.create(**body, max_tokens=5) for _ in range(5))
        )
        await client.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    ledger.flush()  # type: ignore[attr-defined]
    assert threads and loop_thread not in threads
    assert rows(postgres_url, "SELECT status, count(*) FROM calls GROUP BY status") == [("ok", 5)]
    ledger.close()


class socket_port:
    """A loopback port with nothing listening on it (bound, not listening, while in use)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_reconnects_after_a_server_restart_without_losing_a_reservation(
    private_server: Server, private_url: str
) -> None:
    postgres_url = private_url
    cluster = restartable(private_server)
    ledger = Ledger(postgres_url, reconnect_timeout=20)
    first = reservation("before")
    ledger.reserve(first)
    cluster.restart()  # every session is closed: the ledger's connection is dead
    second = reservation("after")
    ledger.reserve(second)  # a new connection, transparently
    ledger.settle(settlement(first, 100))
    ledger.settle(settlement(second, 200))
    assert ledger.spend() == Decimal("0.0000003")
    ledger.close()


@pytest.fixture
def bouncer(postgres_server: Server) -> Iterator[Bouncer]:
    try:
        pooler = Bouncer(postgres_server.url)
        pooler.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PgBouncer tests need pgbouncer ({exc})")
    yield pooler
    pooler.stop()


def test_works_through_pgbouncer_in_transaction_pooling_mode(
    postgres_url: str, bouncer: Bouncer
) -> None:
    # Two server connections shared by four processes: consecutive transactions of one
    # process run on different server sessions, so no session state may be relied on.
    pooled = bouncer.url_for(postgres_url.rsplit("/", 1)[1])
    budget = kb.Budget(daily=Decimal("0.000037"))
    Ledger(pooled).close()
    out = FORK.Queue()
    workers = [
        FORK.Process(target=_reserve_many, args=(pooled, budget, w, 25, out)) for w in range(4)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    assert sum(out.get(timeout=5) for _ in workers) == 37
    with Ledger(pooled) as ledger:
        res = reservation("settled-through-the-pool")
        with pytest.raises(kb.BudgetExceededError):
            ledger.reserve(res, [budget])
        ledger.reserve(res)
        assert ledger.settle(settlement(res, 500)) is True
        assert ledger.settle(settlement(res, 500)) is False
        assert ledger.spend() == Decimal("0.0000005")


def test_a_read_only_ledger_reads_and_never_writes(postgres_url: str) -> None:
    with Ledger(postgres_url, read_only=True) as fresh:
        assert fresh.read_only
    # Opening read-only created nothing: no schema, no migration.
    assert rows(postgres_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [
        (0,)
    ]
    with Ledger(postgres_url) as writer:
        res = reservation("written")
        writer.reserve(res)
        writer.settle(settlement(res, 4200))
    with Ledger(postgres_url, read_only=True) as reader:
        assert reader.spend() == Decimal("0.0000042")
        assert [c["call_id"] for c in reader.calls()] == ["written"]
        with pytest.raises(LedgerError, match="read-only"):
            reader.reserve(reservation("refused"))
        with pytest.raises(LedgerError, match="read-only"):
            reader.settle(settlement(reservation("late"), 1))
    assert rows(postgres_url, "SELECT call_id FROM calls") == [("written",)]
