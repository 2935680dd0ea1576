"""A key is only ever sent to the provider it belongs to.

Two stand-ins play the two providers: one named by the Moonshot variables, one by the OpenAI
ones. Each accepts only its own key, and counts the requests it received, so a key sent to the
wrong one shows up as a request there (and a 401).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import kimi_budget as kb
from kimi_budget.testing import MoonshotStandIn

MOONSHOT_KEY = "sk-moonshot-key-0123456789abcdef"
OPENAI_KEY = "sk-openai-key-fedcba9876543210"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def moonshot() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=MOONSHOT_KEY) as server:
        yield server


@pytest.fixture
def other() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=OPENAI_KEY) as server:
        yield server


def _call(client: kb.OpenAI) -> None:
    try:
        client.chat.completions.create(model="kimi-k2.5", messages=MESSAGES, max_tokens=16)
    finally:
        client.close()


def test_moonshot_key_never_goes_to_openai_base_url(
    monkeypatch: pytest.MonkeyPatch,
    moonshot: MoonshotStandIn,
    other: MoonshotStandIn,
    ledger_path: Path,
) -> None:
    monkeypatch.setenv("MOONSHOT_API_KEY", MOONSHOT_KEY)
    monkeypatch.setenv("MOONSHOT_BASE_URL", moonshot.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
    _call(kb.OpenAI(ledger=ledger_path))
    assert len(moonshot.chat_requests) == 1
    assert other.chat_requests == []


def test_moonshot_key_without_moonshot_url_goes_to_moonshot_not_openai_base_url(
    monkeypatch: pytest.MonkeyPatch, other: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("MOONSHOT_API_KEY", MOONSHOT_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
    client = kb.OpenAI(ledger=ledger_path)
    assert str(client.base_url).startswith("https://api.moonshot.ai/v1")
    assert client.api_key == MOONSHOT_KEY
    # Read from the environment and passed on, it is still the Moonshot key.
    passed = kb.OpenAI(api_key=MOONSHOT_KEY, ledger=ledger_path)
    assert str(passed.base_url).startswith("https://api.moonshot.ai/v1")


def test_openai_key_is_never_sent_to_moonshot_by_default(
    monkeypatch: pytest.MonkeyPatch, ledger_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    with pytest.raises(openai.OpenAIError, match="MOONSHOT_API_KEY") as info:
        kb.OpenAI(ledger=ledger_path)
    assert OPENAI_KEY not in str(info.value)
    monkeypatch.setenv("MOONSHOT_BASE_URL", "https://api.moonshot.ai/v1")
    with pytest.raises(openai.OpenAIError, match="does not send an OpenAI key"):
        kb.AsyncOpenAI(ledger=ledger_path)


def test_openai_key_with_its_own_base_url_goes_there(
    monkeypatch: pytest.MonkeyPatch, other: MoonshotStandIn, ledger_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
    _call(kb.OpenAI(ledger=ledger_path))
    assert len(other.chat_requests) == 1


def test_an_explicit_base_url_takes_either_key(
    monkeypatch: pytest.MonkeyPatch,
    moonshot: MoonshotStandIn,
    other: MoonshotStandIn,
    ledger_path: Path,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    _call(kb.OpenAI(base_url=other.base_url, ledger=ledger_path))
    assert len(other.chat_requests) == 1
    monkeypatch.setenv("MOONSHOT_API_KEY", MOONSHOT_KEY)
    _call(kb.OpenAI(base_url=moonshot.base_url, ledger=ledger_path))
    assert len(moonshot.chat_requests) == 1


def test_without_any_key_the_error_says_what_to_set(ledger_path: Path) -> None:
    with pytest.raises(openai.OpenAIError, match="set MOONSHOT_API_KEY"):
        kb.OpenAI(ledger=ledger_path)
