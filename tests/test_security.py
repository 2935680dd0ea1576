"""Security (issue 5, part 5): secrets, file modes, bound SQL, foreign files, bad prices.

A canary API key goes through every path a call can take (success, stream, retry, refusals,
quota error, a ledger that cannot be written, malformed and hostile responses that echo the
key back), and then must not be found in the ledger's bytes, the fallback file, any warning,
any log record at DEBUG, any exception we raise, or anything the CLI prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai._base_client as openai_base
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

import kimi_budget as kb
from kimi_budget.ledger import Reservation, Settlement
from kimi_budget.testing import Fault, MoonshotStandIn

# As in conftest.py (imported by value, so that plain `pytest` and `python -m pytest` both work):
# openai >= 3 sends through httpx2, mocked by pytest-httpx2's "httpcore2" respx mocker.
RESPX_USING = "httpcore2" if hasattr(openai_base, "httpx2") else "httpcore"
MOCK_BASE_URL = "https://api.moonshot.test/v1"

CANARIES = [
    "sk-kbcanary" + "Q7x" * 12,  # shaped like a Moonshot key
    "canary-key-without-prefix-" + "Zp4" * 8,  # any string a user passes as api_key
]
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _all_text(exc: BaseException) -> str:
    """What a user could see of an exception: message, repr, and the printed traceback."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's write transaction, held open: our writes time out."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize("canary", CANARIES, ids=["sk-shaped", "free-form"])
def test_the_api_key_never_leaves(
    canary: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    ledger_dir = tmp_path / "data"
    ledger_path = ledger_dir / "ledger.db"
    seen: list[str] = []  # every exception text and warning we produced
    fallback_bytes: list[bytes] = []
    hold: list[contextlib.ExitStack] = []

    def lock_ledger(_: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(_locked(ledger_path))
        hold.append(stack)

    with MoonshotStandIn(api_key=canary) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = kb.OpenAI(
            api_key=canary,
            base_url=server.base_url,
            ledger=kb.Ledger(ledger_path, busy_timeout=0.2),
            budget=kb.Budget(daily="0.01"),
            tags={"job": "security"},
        )
        client._kb.retry = kb._retry.RetryPolicy(initial_wait=0.01, max_backoff=0.02)

        def attempt(**kwargs: Any) -> None:
            try:
                result = client.chat.completions.create(
                    **{"model": "kimi-k2.5", "messages": HI, "max_tokens": 20, **kwargs}
                )
                if kwargs.get("stream"):
                    for _ in result:
                        pass
            except Exception as exc:
                seen.append(_all_text(exc))

        attempt()
        attempt(stream=True)
        server.fail_next(500, "server_error")
        attempt()  # retried, then fine
        server.fail_next(429, "exceeded_current_quota_error", f"quota exceeded for key {canary}")
        attempt()  # our clearer quota error quotes the server's message
        server.queue_fault(Fault.bad_usage({"prompt_tokens": canary, "completion_tokens": 2}))
        attempt()  # a hostile server echoing the key where the usage belongs
        server.queue_fault(
            Fault.bad_usage({"prompt_tokens": 5, "cached_tokens": canary, "completion_tokens": 2})
        )
        attempt(stream=True)
        server.queue_fault(Fault.html_body())
        attempt()
        server.queue_fault(Fault(on_request=lock_ledger))
        attempt()  # the ledger is locked when the answer arrives: the fallback file takes it
        client.ledger.flush()  # the settle writer has tried (and failed) by now
        fallback = ledger_path.with_name(ledger_path.name + ".fallback.jsonl")
        assert fallback.exists()
        fallback_bytes.append(fallback.read_bytes())
        assert stat.S_IMODE(fallback.stat().st_mode) == 0o600
        for stack in hold:
            stack.close()
        attempt(max_tokens=10**7)  # context window
        attempt(model="kimi-unknown")  # no price
        attempt(max_tokens=100_000)  # over the daily cap
        try:
            client.with_options(budget=kb.Budget(per_call="0.0000001")).chat.completions.create(
                model="kimi-k2.5", messages=HI, max_tokens=5
            )
        except kb.BudgetExceededError as exc:
            seen.append(_all_text(exc))
        balance = client.balance()
        assert balance.available > 0
        for bad_ledger in (tmp_path, tmp_path / "not-a-ledger.txt"):
            (tmp_path / "not-a-ledger.txt").write_text("hello")
            try:
                kb.OpenAI(api_key=canary, base_url=server.base_url, ledger=bad_ledger)
                raise AssertionError(f"{bad_ledger} was accepted as a ledger")
            except kb.LedgerError as exc:
                seen.append(_all_text(exc))
        client.close()
        reopened = kb.Ledger(ledger_path)  # merges the fallback file
        rows = reopened.calls(100)
        reopened.close()
        cli_output = _run_cli(canary, ledger_path, server.base_url)

    assert len(seen) >= 6, seen  # the failure paths above really raised
    seen += [str(w.message) for w in caught]
    told = [r.getMessage() for r in caplog.records if r.name == "kimi_budget"]
    assert any("fallback" in message for message in told)  # logged, not warned
    assert any("malformed" in message for message in told)  # logged, not warned
    assert len(rows) == 8  # every sent call is one row, the fallback one merged back
    log_text = [r.getMessage() for r in caplog.records] + [r.exc_text or "" for r in caplog.records]
    assert caplog.records, "nothing was logged at DEBUG: the log check would prove nothing"

    for text in seen:
        assert canary not in text
    for text in log_text:
        assert canary not in text
    for name, data in {**_file_bytes(tmp_path), "fallback": b"".join(fallback_bytes)}.items():
        assert canary.encode() not in data, name
    assert canary not in cli_output
    assert len(cli_output) > 200  # the CLI said something worth checking


def _run_cli(canary: str, ledger_path: Path, base_url: str) -> str:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    runner = CliRunner()
    env = {"MOONSHOT_API_KEY": canary, "MOONSHOT_BASE_URL": base_url}
    out = []
    for args in (
        ["report", "--ledger", str(ledger_path)],
        ["report", "--ledger", str(ledger_path), "--json", "--by", "day"],
        ["calls", "--ledger", str(ledger_path), "--json"],
        ["calls", "--ledger", str(ledger_path)],
        ["status", "--ledger", str(ledger_path)],
        ["path", "--ledger", str(ledger_path)],
        ["balance", "--base-url", base_url],
        ["calls", "--ledger", str(ledger_path.with_name("missing.db"))],
    ):
        result = runner.invoke(cli, args, env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        out.append(result.output + (getattr(result, "stderr", "") or ""))
    return "\n".join(out)


# -- hostile responses that echo the key (respx) ---------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "kimi-k2.5",
                "choices": [],
                "usage": {"prompt_tokens": "{key}", "completion_tokens": 1},
            },
        ),
        httpx.Response(200, text="<html>key {key}</html>", headers={"content-type": "text/html"}),
        httpx.Response(
            429,
            json={
                "error": {"type": "exceeded_current_quota_error", "message": "no credit for {key}"}
            },
        ),
        httpx.Response(
            200,
            text='data: {"id":"x","choices":[{"index":0,"delta":{},'
            '"usage":{"prompt_tokens":"{key}","completion_tokens":1}}]}\n\n'
            "data: [DONE]\n\n",
            headers={"content-type": "text/event-stream"},
        ),
    ],
    ids=["usage", "html", "quota", "stream-usage"],
)
def test_an_echoed_key_is_redacted(
    response: httpx.Response, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary = CANARIES[0]
    caplog.set_level(logging.DEBUG)
    body = response.content.replace(b"{key}", canary.encode())
    echoed = httpx.Response(response.status_code, content=body, headers=response.headers)
    stream = b"event-stream" in response.headers.get("content-type", "").encode()
    with (
        respx.mock(using=RESPX_USING, base_url=MOCK_BASE_URL) as router,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        router.post("/chat/completions").mock(return_value=echoed)
        client = kb.OpenAI(
            api_key=canary, base_url=MOCK_BASE_URL, ledger=tmp_path / "l.db", max_retries=0
        )
        raised = ""
        try:
            result = client.chat.completions.create(
                model="kimi-k2.5", messages=HI, max_tokens=5, stream=stream
            )
            if stream:
                for _ in result:
                    pass
        except Exception as exc:
            raised = _all_text(exc)
        rows = client.ledger.calls(5)
        client.close()
    assert len(rows) == 1
    assert canary not in raised
    told = [r for r in caplog.records if r.name == "kimi_budget" and r.levelno >= logging.WARNING]
    assert caught or raised or told  # something told the user
    for w in caught:
        assert canary not in str(w.message)
    for r in caplog.records:
        assert canary not in r.getMessage()
    for name, data in _file_bytes(tmp_path).items():
        assert canary.encode() not in data, name


# -- file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_ledger_and_fallback_files_are_private(
    tmp_path: Path, umask: int, caplog: pytest.LogCaptureFixture
) -> None:
    old = os.umask(umask)
    try:
        path = tmp_path / "new" / "dir" / "ledger.db"
        ledger = kb.Ledger(path)
        _settle_one(ledger)  # writes: the WAL and shared-memory files exist now
        ledger.write_fallback(_settlement("fb"), RuntimeError("test"))
        assert "saved to" in caplog.text
        created = [
            path,
            path.with_name("ledger.db-wal"),
            path.with_name("ledger.db-shm"),
            ledger.fallback_path,
        ]
        for f in created:
            assert f.exists(), f
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        ledger.close()
    finally:
        os.umask(old)


def _settlement(call_id: str, tags: dict[str, str] | None = None, cost: int = 1000) -> Settlement:
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    res = Reservation(
        call_id=call_id,
        model="kimi-k2.5",
        tags=tags or {},
        created_at=now,
        expires_at=now + timedelta(hours=1),
        projected_nanos=cost,
        prompt_estimate=1,
        price_cache_hit=100,
        price_cache_miss=600,
        price_output=3000,
    )
    return Settlement(
        reservation=res,
        status="ok",
        prompt_tokens=1,
        cached_tokens=0,
        completion_tokens=0,
        cost_nanos=cost,
        estimated=False,
        attempts=1,
        finished_at=now,
    )


def _settle_one(
    ledger: kb.Ledger, call_id: str = "one", tags: dict[str, str] | None = None, cost: int = 1000
) -> None:
    s = _settlement(call_id, tags, cost)
    ledger.reserve(s.reservation, [])
    ledger.settle(s)


# -- foreign files ------------------------------------------------------------------------------


def test_a_symlink_to_a_foreign_file_is_refused(tmp_path: Path) -> None:
    tmp_path = tmp_path / "here"
    tmp_path.mkdir()
    victim = tmp_path / "notes.txt"
    victim.write_text("not yours\n")
    before = victim.read_bytes(), victim.stat().st_mtime_ns
    link = tmp_path / "ledger.db"
    link.symlink_to(victim)
    with pytest.raises(kb.LedgerError) as refused:
        kb.Ledger(link)
    assert str(link) in str(refused.value) and refused.value.path == str(link)
    with pytest.raises(kb.LedgerError):
        kb.OpenAI(api_key="sk-x", base_url=MOCK_BASE_URL, ledger=link)
    assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db", "notes.txt"]


def test_a_symlink_to_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = other.read_bytes()
    link = tmp_path / "ledger.db"
    link.symlink_to(other)
    with pytest.raises(kb.LedgerError):
        kb.Ledger(link)
    assert other.read_bytes() == before


def test_a_dangling_symlink_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    link = tmp_path / "ledger.db"
    link.symlink_to(tmp_path / "elsewhere" / "target.db")
    with pytest.raises(kb.LedgerError):
        kb.Ledger(link)
    assert not (tmp_path / "elsewhere").exists()


def test_a_symlink_to_our_own_ledger_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    with kb.Ledger(real) as ledger:
        _settle_one(ledger)
    link = tmp_path / "ledger.db"
    link.symlink_to(real)
    with kb.Ledger(link) as ledger:
        assert len(ledger.calls()) == 1


def test_a_foreign_file_at_the_ledger_path_is_left_untouched(tmp_path: Path) -> None:
    for name, content in [("text.db", b"just text\n" * 100), ("empty.db", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        if content:
            with pytest.raises(kb.LedgerError):
                kb.Ledger(path)
            assert path.read_bytes() == content


def test_a_symlink_at_the_fallback_path_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    ledger = kb.Ledger(tmp_path / "ledger.db")
    ledger.fallback_path.symlink_to(victim)
    ledger.write_fallback(_settlement("fb"), RuntimeError("disk full"))
    assert "record it by hand" in caplog.text and "symbolic link" in caplog.text
    assert victim.read_text() == "precious\n"
    ledger.close()


def test_an_unwritable_fallback_never_reaches_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ledger locked and fallback impossible: the billed call still returns, with a warning
    that carries the usage, so nothing is silently lost."""
    with MoonshotStandIn(api_key="sk-x") as server:
        path = tmp_path / "ledger.db"
        client = kb.OpenAI(
            api_key="sk-x",
            base_url=server.base_url,
            ledger=kb.Ledger(path, busy_timeout=0.1),
            max_retries=0,
        )
        client.ledger.fallback_path.mkdir()  # a directory: the fallback cannot be opened
        with contextlib.ExitStack() as hold:

            def lock(_: object) -> None:
                hold.enter_context(_locked(path))

            server.queue_fault(Fault(on_request=lock))
            response = client.chat.completions.create(model="kimi-k2.5", messages=HI, max_tokens=5)
            client.ledger.flush()  # the settle writer tries while the ledger is still locked
        assert response.usage is not None
        [lost] = [r for r in caplog.records if "record it by hand" in r.getMessage()]
        assert lost.levelname == "ERROR"
        assert f'"prompt_tokens":{response.usage.prompt_tokens}' in lost.getMessage()
        client.close()


# -- SQL built from user input ------------------------------------------------------------------

INJECTIONS = [
    "x' OR 1=1 --",
    'x" OR 1=1 --',
    "') OR ('1'='1",
    "x'; DROP TABLE calls; --",
    '$."team"',
    "team\" OR json_extract(tags, '$') --",
]


def _ledger_with_rows(path: Path) -> kb.Ledger:
    ledger = kb.Ledger(path)
    _settle_one(ledger, "a", {"team": "a"}, 1_000)
    _settle_one(ledger, "b", {"team": "b", 'we"ird': "q'uote"}, 2_000)
    _settle_one(ledger, "c", {}, 4_000)
    return ledger


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_filters_are_bound_parameters(tmp_path: Path, hostile: str) -> None:
    with _ledger_with_rows(tmp_path / "l.db") as ledger:
        for tags in ({"team": hostile}, {hostile: "a"}, {hostile: hostile}):
            assert ledger.spend(tags=tags) == 0
            clause, params = ledger.filters(tags=tags, model=hostile)
            assert hostile not in clause  # user text only ever travels as a parameter
            assert hostile in params or any(hostile in str(p) for p in params)
        assert ledger.spend(model=hostile) == 0
        assert ledger.spend() * 10**9 == 7_000  # and the table is still there, whole
        # Keys that need quoting still match what they should.
        assert ledger.spend(tags={'we"ird': "q'uote"}) * 10**9 == 2_000
        assert ledger.spend(tags={"team": "a"}) * 10**9 == 1_000


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_cli_filters_match_nothing(tmp_path: Path, hostile: str) -> None:
    from click.testing import CliRunner

    from kimi_budget.cli import cli

    path = tmp_path / "l.db"
    _ledger_with_rows(path).close()
    runner = CliRunner()
    for args in (
        ["calls", "--json", "--tag", f"team={hostile}"],
        ["calls", "--json", "--tag", f"{hostile}=a"],
        ["calls", "--json", "--model", hostile],
        ["report", "--json", "--model", hostile],
        ["report", "--json", "--tag", f"team={hostile}"],
    ):
        result = runner.invoke(cli, [*args, "--ledger", str(path)])
        # CliRunner keeps an uncaught exception (a traceback for a real user) in .exception.
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        if "," in hostile and "--tag" in args:
            # --tag takes k=v,k2=v2: a comma splits it, and a piece without "=" is a user error
            assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
            continue
        assert result.exit_code == 0, result.output
        import json

        data = json.loads(result.stdout if hasattr(result, "stdout") else result.output)
        if isinstance(data, list):
            assert data == []
        else:
            assert data["total_calls"] == 0
    with kb.Ledger(path) as ledger:
        assert len(ledger.calls()) == 3


tag_text = st.text(
    alphabet=st.sampled_from([*"ab\"'.$[]*\\ -=;,", "\n", "\x01", "é"]), min_size=1, max_size=6
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.dictionaries(tag_text, tag_text, max_size=3), min_size=1, max_size=6),
    wanted=st.dictionaries(tag_text, tag_text, max_size=2),
)
def test_tag_filters_match_exactly_the_rows_that_have_the_tags(
    tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, str]], wanted: dict[str, str]
) -> None:
    with kb.Ledger(tmp_path_factory.mktemp("tags") / "l.db") as ledger:
        for n, tags in enumerate(rows):
            _settle_one(ledger, f"r{n}", tags, 10**n)
        expected = sum(
            10**n for n, t in enumerate(rows) if all(t.get(k) == v for k, v in wanted.items())
        )
        assert ledger.spend(tags=wanted) * 10**9 == expected


# -- price files ----------------------------------------------------------------------------------

GOOD_ENTRY = '[models."my-model"]\ncache_hit = "0.10"\ncache_miss = "0.60"\n'


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('output = "-3.00"', "zero or more"),
        ("output = -3", "zero or more"),
        ('output = "three dollars"', "must be a number"),
        ('output = "NaN"', "zero or more"),
        ("output = 3.0", "as a string"),
        ('output = "0.0001"', "nano-dollars"),
    ],
)
def test_a_bad_price_is_refused_with_its_path_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("# my prices\n\n" + GOOD_ENTRY + line + "\ncontext_window = 8192\n")
    bad_line = 6  # two comment/blank lines, the header, two good prices, then this one
    assert path.read_text().splitlines()[bad_line - 1] == line
    with pytest.raises(kb.PriceTableError) as refused:
        kb.pricing.PriceTable.load(prices_file=path)
    assert f"{path}:{bad_line}" in str(refused.value)
    assert why in str(refused.value)
    # The client refuses it too, before any ledger or request exists.
    with pytest.raises(kb.PriceTableError):
        kb.OpenAI(
            api_key="sk-x", base_url=MOCK_BASE_URL, ledger=tmp_path / "l.db", prices_file=path
        )
