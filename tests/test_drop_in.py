"""Our clients accept and expose what the SDK's clients do: copy()/with_options() signatures,
and the SDK's other ways to authenticate."""

from __future__ import annotations

import inspect
from pathlib import Path

import openai
import pytest

import kimi_budget as kb
import kimi_budget._client
from tests.conftest import KEY, MOCK_BASE_URL

PRICE = {"cache_hit": "0.1", "cache_miss": "1", "output": "2", "context_window": 8192}
PAIRS = [(kb.OpenAI, openai.OpenAI), (kb.AsyncOpenAI, openai.AsyncOpenAI)]
# The guard's own arguments (ledger, budget, tags, prices, currency, ...).
OURS = set(kb._client._GUARD_ARGS)


@pytest.mark.parametrize(("ours", "parent"), PAIRS)
def test_copy_spells_out_every_parameter_of_the_sdk(ours: type, parent: type) -> None:
    mine = inspect.signature(ours.copy).parameters
    theirs = inspect.signature(parent.copy).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values())
    for name, parameter in theirs.items():
        assert name in mine, name
        assert mine[name].kind is parameter.kind, name
    # Beyond the SDK's: only the guard's (and data_residency, which openai 2.x lacks).
    assert set(mine) - set(theirs) <= OURS | {"data_residency"}
    assert set(mine) >= OURS
    assert ours.with_options is ours.copy


@pytest.mark.parametrize(("ours", "parent"), PAIRS)
def test_the_constructor_spells_out_every_parameter_and_copy_takes_them(
    ours: type, parent: type
) -> None:
    mine = inspect.signature(ours.__init__).parameters
    theirs = inspect.signature(parent.__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values())
    for name, parameter in theirs.items():
        assert name in mine and mine[name].kind is parameter.kind, name
        if parameter.default is not inspect.Parameter.empty and name != "base_url":
            # (base_url: openai 2.x's default is None, ours 3.x's NOT_GIVEN; both mean unset)
            assert mine[name].default == parameter.default, name
    assert set(mine) - set(theirs) <= OURS | {"data_residency"}
    # As the SDK's own test_copy_signature: whatever the constructor takes, copy() takes.
    copy = inspect.signature(ours.copy).parameters
    assert set(mine) - {"self", "_strict_response_validation"} <= set(copy)


@pytest.mark.parametrize(("ours", "parent"), PAIRS)
def test_copy_passes_the_sdk_arguments_through(ours: type, parent: type, ledger_path: Path) -> None:
    client = ours(api_key=KEY, base_url=MOCK_BASE_URL, ledger=ledger_path, tags={"a": "1"})
    copied = client.with_options(
        timeout=7,
        max_retries=5,
        default_headers={"x-team": "search"},
        organization="org-x",
        tags={"b": "2"},
    )
    assert type(copied) is ours
    assert copied.timeout == 7 and copied.max_retries == 5 and copied.organization == "org-x"
    assert copied.default_headers["x-team"] == "search"
    assert copied.tags == {"a": "1", "b": "2"} and copied.ledger is client.ledger
    assert copied.api_key == KEY and str(copied.base_url) == str(client.base_url)
    replaced = copied.copy(set_default_headers={"x-only": "1"}, budget=kb.Budget(daily="2"))
    assert "x-team" not in replaced.default_headers and replaced.default_headers["x-only"] == "1"
    assert replaced.budgets == (kb.Budget(daily="2"),)
    assert replaced.copy(budget=None).budgets == ()
    tuned = client.copy(exact_tokens="never", reservation_margin=5, prices={"my-model": PRICE})
    assert tuned._kb.exact_tokens == "never" and tuned._kb.reservation_margin == 5.0
    assert tuned._kb.prices.get("my-model").context_window == 8192
    assert tuned._kb.prices.get("kimi-k2.5") == client._kb.prices.get("kimi-k2.5")
    assert client._kb.exact_tokens == "auto"  # the original is unchanged
    with pytest.raises(ValueError, match="mutually exclusive"):
        client.copy(default_headers={"a": "b"}, set_default_headers={"c": "d"})


@pytest.mark.parametrize("cls", [kb.OpenAI, kb.AsyncOpenAI])
def test_admin_key_alone_is_accepted_as_by_the_sdk(
    cls: type, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OPENAI_API_KEY is not ours to send to Moonshot: the SDK must not pick it up either.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-key-not-for-moonshot-000000")
    client = cls(admin_api_key="admin-key", ledger=ledger_path)
    assert client.admin_api_key == "admin-key"
    assert client.api_key == ""
    assert str(client.base_url).startswith("https://api.moonshot.ai/")


@pytest.mark.parametrize("cls", [kb.OpenAI, kb.AsyncOpenAI])
def test_no_credentials_at_all_is_still_refused_with_our_sentence(cls: type) -> None:
    with pytest.raises(openai.OpenAIError, match="MOONSHOT_API_KEY"):
        cls()


def test_workload_identity_alone_is_accepted_as_by_the_sdk(ledger_path: Path) -> None:
    auth = pytest.importorskip("openai.auth")
    if not hasattr(auth, "SubjectTokenWorkloadIdentity"):
        pytest.skip("this openai has no workload identity")
    identity = {
        "identity_provider_id": "provider_123",
        "service_account_id": "service_account_123",
        "provider": {"get_token": lambda: "subject-token", "token_type": "jwt"},
    }
    client = kb.OpenAI(workload_identity=identity, ledger=ledger_path)
    assert client.workload_identity is not None
    copied = client.with_options(timeout=3)
    assert copied.workload_identity is not None and copied.ledger is client.ledger
