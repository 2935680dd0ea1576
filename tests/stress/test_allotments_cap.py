"""The cap holds when calls share allotments, under concurrency and a crash.

Processes with threads make calls with the same tags, so each process reserves allotments and
most of its calls take shares in memory; one process is SIGKILLed with shares in flight. All
share one daily cap. What the server would bill never exceeds the cap, the ledger never
charged less than that, and once the dead process's allotment has expired every call is one
row (those it had in flight charged in full, from its journal) and nothing is left reserved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import kimi_budget as kb
from kimi_budget._money import to_usd
from kimi_budget.testing import MoonshotStandIn
from tests.conftest import KEY
from tests.test_e2e import billed_nanos

from ._harness import FULL, Size, check_totals, current_size, ledger_rows

pytestmark = [
    pytest.mark.stress,
    pytest.mark.timeout(1800 if current_size() is FULL else 300),
]

THREADS = 4
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    import kimi_budget as kb
    base_url, ledger, key, worker, calls, cap, die_after, threads = sys.argv[1:9]
    client = kb.OpenAI(api_key=key, base_url=base_url, ledger=ledger, timeout=5, max_retries=0,
                       budget=kb.Budget(daily=cap), tags={"job": "stress"})
    lock, outcomes = threading.Lock(), []

    def run(thread):
        for i in range(int(calls)):
            try:
                client.chat.completions.create(
                    model="kimi-k2.5", max_tokens=50,
                    messages=[{"role": "user", "content": f"worker {worker} {thread} call {i}"}])
                outcome = "ok"
            except kb.BudgetExceededError:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)
                if len(outcomes) == int(die_after):
                    os.kill(os.getpid(), signal.SIGKILL)  # the other threads are mid-call

    running = [threading.Thread(target=run, args=(t,)) for t in range(int(threads))]
    for t in running:
        t.start()
    for t in running:
        t.join()
    print(json.dumps(outcomes))
    """
)


def test_processes_sharing_allotments_never_overshoot_and_a_dead_one_is_charged(
    tmp_path: Path, stress_size: Size
) -> None:
    processes = stress_size.processes + 1  # the last one dies
    calls = 15 if stress_size is not FULL else 60  # per thread
    ledger_path = tmp_path / "ledger.db"
    kb.Ledger(ledger_path).close()
    with MoonshotStandIn(api_key=KEY, latency=(0.002, 0.02)) as server:
        # About three calls in five fit under the cap: what one call costs, from a probe.
        with kb.Ledger(tmp_path / "probe.db") as probe:
            kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=probe).chat.completions.create(
                model="kimi-k2.5", max_tokens=50, messages=[{"role": "user", "content": "probe"}]
            )
            [row] = probe.calls(1)
        server.reset()
        cap = to_usd(processes * THREADS * calls * row["cost_nanos"] * 6 // 10)

        def worker(n: int, die_after: int) -> subprocess.Popen[str]:
            argv = [server.base_url, str(ledger_path), KEY, str(n), str(calls), str(cap)]
            return subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv, str(die_after), str(THREADS)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        # First, one process dies at its fifth call's end: every thread has had a call by
        # then, so what it has in flight is shares of an allotment, far from the cap.
        dying = worker(processes - 1, die_after=THREADS + 1)
        _, err = dying.communicate(timeout=600)
        assert dying.returncode == -9, err
        assert list(tmp_path.glob("ledger.db.allotment-*.jsonl")), "the dead one's journal"
        # Then the others share the cap, its allotment still reserved.
        outcomes: list[str] = []
        for running in [worker(n, die_after=0) for n in range(processes - 1)]:
            out, err = running.communicate(timeout=600)
            assert running.returncode == 0, err
            outcomes += json.loads(out)
        assert "refused" in outcomes and "ok" in outcomes
        # Once its allotment has expired (a 5 s timeout, the 60 s margin), a write expires it.
        later = datetime.now(timezone.utc) + timedelta(minutes=5)
        with kb.Ledger(ledger_path, clock=lambda: later) as ledger:
            ledger.expire_stale()
            billed = billed_nanos(
                server, kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=ledger)
            )
        requests = server.chat_requests

    rows = ledger_rows(ledger_path)
    spent = sum(r["cost_nanos"] for r in rows)
    cap_nanos = int(cap * 10**9)
    assert billed <= spent <= cap_nanos, "the server billed more than the ledger, or the cap"
    assert [r for r in rows if r["status"] == "pending"] == []
    assert [r for r in rows if r["model"] == "(allotment)"] == []
    assert list(tmp_path.glob("ledger.db.allotment-*.jsonl")) == []
    # Every request the server saw is a row; a row without one is a call of the dead process
    # that was journaled but not sent yet (at most one per thread).
    assert len(requests) <= len(rows) <= len(requests) + THREADS
    assert sum(r["status"] == "ok" for r in rows) >= outcomes.count("ok")
    dead = [r for r in rows if r["status"] == "expired"]
    assert dead and all(r["estimated"] and r["cost_nanos"] == r["projected_nanos"] for r in dead)
    with_ids = [r["request_id"] for r in rows if r["request_id"]]
    assert len(with_ids) == len(set(with_ids))
    assert check_totals(ledger_path, "UTC", ["daily"]) == []
