"""Shared fixtures: an isolated environment, the loopback stand-in, respx, and clients."""

from __future__ import annotations

import gc
import os
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# The suite starts many Python processes (xdist workers, CLI and crash-test subprocesses) that
# import the same modules. Where PYTHONDONTWRITEBYTECODE is set (some containers set it), each
# one compiled them all again, and pytest rewrote every test module's asserts in every worker:
# a tenth of the suite's CPU. For this run, bytecode caches go to the checkout's __pycache__
# folders (ignored by git), as they would by default.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import openai._base_client as openai_base
import pytest
import respx
from hypothesis import HealthCheck, settings

import kimi_budget as kb
from kimi_budget.testing import MoonshotStandIn
from tests.fuzz_tally import flush
from tests.pg_cluster import ENV_DATA, ENV_URL, PostgresUnavailable, Server, install_hint


def _share_the_default_tls_context() -> None:
    """Every SDK client builds an HTTP transport, and each transport a TLS context with the
    system's CA certificates loaded: about 30 ms of CPU per client, a fifth of the suite's
    CPU, for connections that are all plain HTTP to 127.0.0.1 (or mocked). For this run, a
    transport asking for the default context gets one built once; any other ``verify`` or
    ``cert`` is built as asked."""
    import importlib

    for name in ("httpx2._transports.default", "httpx._transports.default"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.create_ssl_context = _sharing_the_default(module.create_ssl_context)


def _sharing_the_default(create: Callable[..., ssl.SSLContext]) -> Callable[..., ssl.SSLContext]:
    built: dict[tuple[object, ...], ssl.SSLContext] = {}

    def create_ssl_context(
        verify: object = True, cert: object = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if verify is not True or cert is not None:
            return create(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in built:
            built[key] = create(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    return create_ssl_context


_share_the_default_tls_context()

# openai >= 3 sends through httpx2 (pytest-httpx2 adds respx's "httpcore2" mocker), 2.x httpx.
RESPX_USING = "httpcore2" if hasattr(openai_base, "httpx2") else "httpcore"
MOCK_BASE_URL = "https://api.moonshot.test/v1"
KEY = "sk-kimibudget-test-canary-0123456789abcdef"
# Read before any test runs: the isolated_env fixture removes every KIMI_BUDGET_ variable.
_POSTGRES_URL = os.environ.get(ENV_URL)
_POSTGRES_DATA = os.environ.get(ENV_DATA)

# No wall-clock checks in tests: hypothesis's default 200 ms deadline per example, and its
# "too slow" health check, fail on a loaded machine for reasons that are not bugs.
settings.register_profile(
    "kimi-budget", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("kimi-budget")

# The suite runs in parallel (pytest-xdist, -n auto); a test that runs for tens of seconds and
# starts last makes the whole run wait for it. These start first.
_STARTED_FIRST = ("test_benchmarks_smoke.py", "stress", "test_examples.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        parts = item.path.parts
        return next((i for i, name in enumerate(_STARTED_FIRST) if name in parts), 99)

    items.sort(key=rank)  # stable: the order within each file is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    # What is alive once the tests are collected (modules, test functions, hypothesis's
    # strategies) stays alive for the whole run. Frozen, it is left out of every collection:
    # the tests that drop a stream and call gc.collect() to free it then pay for their own
    # objects only, where each full collection cost about 0.2 s.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's keys, ledger or config files."""
    for name in list(os.environ):
        if name.startswith(("KIMI_BUDGET_", "MOONSHOT_")) or name in (
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
        ):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield


@pytest.fixture(autouse=True, scope="module")
def fuzz_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    flush(request.module.__name__)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def standin() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY) as server:
        yield server


@pytest.fixture
def client(standin: MoonshotStandIn, ledger_path: Path) -> Iterator[kb.OpenAI]:
    guarded = kb.OpenAI(api_key=KEY, base_url=standin.base_url, ledger=ledger_path)
    yield guarded
    guarded.close()


@pytest.fixture
def moonshot_mock() -> Iterator[respx.Router]:
    """respx, patched into whichever HTTP stack the installed openai uses."""
    with respx.mock(using=RESPX_USING, base_url=MOCK_BASE_URL, assert_all_called=False) as router:
        yield router


@pytest.fixture
def mocked_client(moonshot_mock: respx.Router, ledger_path: Path) -> Iterator[kb.OpenAI]:
    guarded = kb.OpenAI(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path)
    yield guarded
    guarded.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """A PostgreSQL server for the tests: .ci/run's (``KIMI_BUDGET_TEST_POSTGRES``), else a
    throwaway cluster started here from Debian's server binaries; skipped when neither is
    possible, saying how to run these tests."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip('PostgreSQL tests need psycopg: pip install -e ".[postgres]"')
    try:
        server = Server.from_environment(_POSTGRES_URL, _POSTGRES_DATA)
    except PostgresUnavailable as exc:
        if _POSTGRES_URL:
            raise
        pytest.skip(f"PostgreSQL tests need a server ({exc}); {install_hint()}")
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server: Server) -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a new, empty ledger of each backend lives: ``kb.Ledger(ledger_url)`` opens it.

    Tests that take this fixture run once per backend: a SQLite file, then a database on a
    real PostgreSQL server (skipped, saying how to run it, when there is no server).
    """
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    import importlib.util

    if importlib.util.find_spec("kimi_budget.ledger._postgres") is None:
        pytest.skip("the PostgreSQL backend (kimi_budget/ledger/_postgres.py) is not built yet")
    url: str = request.getfixturevalue("postgres_url")
    return url
