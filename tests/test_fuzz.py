"""Hostile and broken input (issue 5, part 4), with hypothesis.

Response side: whatever a server (or a proxy in front of it) answers, a guarded call leaves
exactly one ledger row with a cost of zero or more; a row whose usage could not be read is
flagged (``estimated`` or a ``note``) and the caller is told, by a warning or an exception;
and no exception starts inside kimi-budget. Responses come from respx (any bytes at all) and
from the loopback stand-in's own faults (real sockets, torn streams).

Request side: every message shape the API accepts (text parts, image parts, tool calls,
``None`` content, partial assistant turns, tools) estimates without error.
"""

from __future__ import annotations

import base64
import json
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import openai._base_client as openai_base
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

import kimi_budget as kb
from kimi_budget._guard import GuardSettings, prepare
from kimi_budget._tokens import count_request_tokens
from kimi_budget.pricing import PriceTable
from kimi_budget.testing import Fault, MoonshotStandIn
from tests.fuzz_tally import tried
from tests.helpers import LogCapture

# As in conftest.py (imported by value, so that plain `pytest` and `python -m pytest` both work):
# openai >= 3 sends through httpx2, mocked by pytest-httpx2's "httpcore2" respx mocker.
RESPX_USING = "httpcore2" if hasattr(openai_base, "httpx2") else "httpcore"
MOCK_BASE_URL = "https://api.moonshot.test/v1"

FULL = os.environ.get("KB_STRESS_SIZE", "").lower() == "full"
EXAMPLES = 1000 if FULL else 40
KEY = "sk-fuzz-0123456789abcdef"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PACKAGE = str(Path(kb.__file__).parent)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def call_and_consume(client: kb.OpenAI, stream: bool) -> tuple[list[str], BaseException | None]:
    """One chat call read to the end: what kimi-budget logged, and what it raised, if anything."""
    raised: BaseException | None = None
    with LogCapture() as caught:
        try:
            result = client.chat.completions.create(
                model="kimi-k2.5", messages=HI, max_tokens=50, stream=stream
            )
            if stream:
                for _ in result:
                    pass
        except Exception as exc:
            raised = exc
        client.ledger.flush()  # a returned call's bill is read by the ledger's writer
    return list(caught), raised


# -- strategies -----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
token_counts = st.one_of(
    st.integers(0, 5_000),  # plausible
    st.integers(-(10**12), -1),  # negative
    st.integers(10**8, 10**40),  # absurdly large
    st.floats(allow_nan=False, allow_infinity=False),  # non-integer (and integral floats)
    st.sampled_from(["12", "", "NaN", "1e3"]),
    st.booleans(),
    st.none(),
    json_values,
)
MISSING = object()


@st.composite
def usages(draw: st.DrawFn) -> Any:
    """A ``usage`` value: sometimes valid, mostly not."""
    shape = draw(st.sampled_from(["valid", "fields", "cached>prompt", "not-a-dict", "missing"]))
    if shape == "missing":
        return MISSING
    if shape == "not-a-dict":
        return draw(json_values)
    if shape == "valid":
        prompt = draw(st.integers(0, 5_000))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": draw(st.integers(0, 5_000)),
        }
        cached = draw(st.none() | st.integers(0, prompt))
        if cached is not None:
            if draw(st.booleans()):
                usage["cached_tokens"] = cached
            else:
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage
    if shape == "cached>prompt":
        prompt = draw(st.integers(0, 1_000))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": draw(st.integers(0, 100)),
            "cached_tokens": prompt + draw(st.integers(1, 10**6)),
        }
    usage = {}
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens"):
        value = draw(st.just(MISSING) | token_counts)
        if value is not MISSING:
            usage[name] = value
    return usage


def completion_body(usage: Any, choices: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fuzz",
        "object": "chat.completion",
        "created": 1,
        "model": "kimi-k2.5",
        "choices": choices
        if choices is not None
        else [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    if usage is not MISSING:
        body["usage"] = usage
    return body


garbage_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>",
            b'{"id": "x", "choices": [',
            b"null",
            b"[]",
            b'"just a string"',
            b"NaN",
            b'{"usage": {"prompt_tokens": 1e999, "completion_tokens": 1}}',
        ]
    ),
)


@st.composite
def non_stream_responses(draw: st.DrawFn) -> tuple[httpx.Response, Any]:
    """(response, the usage it carries or None when the body is not a completion)."""
    if draw(st.integers(0, 4)) == 0:
        content_type = draw(st.sampled_from(["application/json", "text/html", "text/plain", ""]))
        headers = {"content-type": content_type} if content_type else {}
        return httpx.Response(200, content=draw(garbage_bytes), headers=headers), None
    usage = draw(usages())
    choices = draw(st.none() | st.just([]) | json_values)
    body = json.dumps(completion_body(usage, choices)).encode()
    return httpx.Response(200, content=body, headers={"content-type": "application/json"}), usage


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@st.composite
def stream_responses(draw: st.DrawFn) -> tuple[list[bytes], Any]:
    """(the SSE body cut in random pieces, the usage its final chunk carries, if any)."""
    events: list[bytes] = [
        sse(
            {
                "id": "chatcmpl-fuzz",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
        )
    ]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["content", "content", "garbage", "comment", "blank", "json"]))
        if kind == "content":
            events.append(
                sse(
                    {
                        "id": "chatcmpl-fuzz",
                        "choices": [{"index": 0, "delta": {"content": draw(st.text(max_size=10))}}],
                    }
                )
            )
        elif kind == "garbage":
            # Garbage, not an end: "[DONE]" (which hypothesis finds among the constants of the
            # code under test) would end the stream before its usage, a case of its own
            # (test_unknown_bills: a stream ended without usage is charged in full). Nor a
            # usage: bytes that happen to be {"usage": ...} are the "json" kind's case below.
            junk = draw(garbage_bytes.filter(lambda g: b"[DONE]" not in g and b"usage" not in g))
            events.append(b"data: " + junk.replace(b"\n", b" ") + b"\n\n")
        elif kind == "comment":
            events.append(b": keep-alive\n\n")
        elif kind == "blank":
            events.append(b"\n")
        else:
            # Any JSON but a "usage" (which hypothesis finds among the code's constants): a
            # malformed usage mid-stream makes the bill uncertain, judged as if it were not.
            events.append(sse(draw(json_values.filter(lambda v: "usage" not in json.dumps(v)))))
    usage = draw(usages())
    where = draw(st.sampled_from(["choice", "top", "nowhere"]))
    final: dict[str, Any] = {
        "id": "chatcmpl-fuzz",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    if usage is not MISSING and where == "choice":
        final["choices"][0]["usage"] = usage
    elif usage is not MISSING and where == "top":
        final["usage"] = usage
    else:
        usage = MISSING
    events.append(sse(final))
    if draw(st.booleans()):
        events.append(b"data: [DONE]\n\n")
    body = b"".join(events)
    # Cut anywhere, even inside a line or a UTF-8 character: the sniffer must stitch them.
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return [p for p in pieces if p], usage


# -- the judge ----------------------------------------------------------------------------------


def _is_valid(usage: Any) -> bool:
    """Usage any honest server could send: whole non-negative counts, cached <= prompt."""
    if not isinstance(usage, dict):
        return False

    def count(value: Any) -> int | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**6
        return value if ok else None

    prompt = count(usage.get("prompt_tokens"))
    if prompt is None or count(usage.get("completion_tokens")) is None:
        return False
    cached = count(
        usage.get(
            "cached_tokens", (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        )
    )
    return cached is not None and cached <= prompt


def _raised_inside_us(exc: BaseException) -> bool:
    """True if the innermost frame of the traceback is kimi-budget's own code."""
    if isinstance(exc, openai.APIConnectionError) and exc.__cause__ is not None:
        # A sent chat call is stopped from being sent again by raising the SDK's own error
        # from _send_request (on purpose): what failed is the transport error it wraps.
        exc = exc.__cause__
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE)


def judge(
    ledger: kb.Ledger,
    before: int,
    caught: list[str],
    raised: BaseException | None,
    usage: Any,
) -> None:
    rows = ledger.calls(before + 5)
    assert len(rows) == before + 1, "a call must leave exactly one row"
    row = rows[0]
    assert row["status"] != "pending"
    assert row["cost_nanos"] >= 0
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        assert row[name] is None or row[name] >= 0, row
    if raised is not None:
        assert isinstance(raised, Exception), raised
        assert not _raised_inside_us(raised) or isinstance(raised, kb.KimiBudgetError), "".join(
            traceback.format_exception(raised)
        )
    flagged = bool(row["estimated"]) or bool(row["note"]) or bool(row["error"])
    ours = [message for message in caught if message.startswith("kimi-budget")]
    if _is_valid(usage) and raised is None:
        # Good usage is taken as billed: not estimated, and priced exactly.
        cached = usage.get(
            "cached_tokens", (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        )
        assert not row["estimated"], row
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            cached,
            usage["completion_tokens"],
        )
        expected = (
            (usage["prompt_tokens"] - cached) * row["price_cache_miss"]
            + cached * row["price_cache_hit"]
            + usage["completion_tokens"] * row["price_output"]
        )
        assert row["cost_nanos"] == expected
    elif not flagged:
        # Unflagged means the usage was read as given; only then may the caller hear nothing.
        assert isinstance(usage, dict), row
    if flagged and row["status"] in ("ok", "abandoned"):
        assert ours or raised is not None, f"the caller was not told: {row}"
    if row["estimated"] and row["status"] in ("ok", "abandoned"):
        # A delivered response whose bill could not be read costs its full reservation.
        assert row["cost_nanos"] >= row["projected_nanos"], row
    for message in ours:
        assert row["call_id"] in message  # the log line names the call it is about


@pytest.fixture
def fuzz_client(tmp_path: Path) -> Iterator[kb.OpenAI]:
    client = kb.OpenAI(
        api_key=KEY, base_url=MOCK_BASE_URL, ledger=tmp_path / "fuzz.db", max_retries=0
    )
    yield client
    client.close()


def _call(
    client: kb.OpenAI, respond: Any, *, stream: bool
) -> tuple[list[str], BaseException | None]:
    raised: BaseException | None = None
    with (
        respx.mock(using=RESPX_USING, base_url=MOCK_BASE_URL) as router,
        LogCapture() as caught,
    ):
        router.post("/chat/completions").mock(side_effect=respond)
        try:
            result = client.chat.completions.create(
                model="kimi-k2.5", messages=HI, max_tokens=50, stream=stream
            )
            if stream:
                for _ in result:
                    pass
            else:
                # Touch what a caller would: fields of a parsed completion.
                getattr(result, "choices", None)
                getattr(result, "usage", None)
        except Exception as exc:
            raised = exc
        client.ledger.flush()  # a returned call's bill is read by the ledger's writer
    return list(caught), raised


@FUZZ
@given(case=non_stream_responses())
def test_any_non_stream_response_is_one_flagged_row(fuzz_client: kb.OpenAI, case: Any) -> None:
    tried(__name__)
    response, usage = case
    before = len(fuzz_client.ledger.calls(10**6))
    caught, raised = _call(fuzz_client, lambda request: response, stream=False)
    judge(fuzz_client.ledger, before, caught, raised, usage if usage is not None else MISSING)


@FUZZ
@given(
    case=stream_responses(),
    content_type=st.sampled_from(
        ["text/event-stream", "text/event-stream; charset=utf-8", "application/json", "text/html"]
    ),
)
def test_any_stream_is_one_flagged_row(
    fuzz_client: kb.OpenAI, case: Any, content_type: str
) -> None:
    tried(__name__)
    pieces, usage = case

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            stream=httpx.ByteStream(b"".join(pieces)) if len(pieces) < 2 else _Pieces(pieces),
            headers={"content-type": content_type},
        )

    before = len(fuzz_client.ledger.calls(10**6))
    caught, raised = _call(fuzz_client, respond, stream=True)
    judge(
        fuzz_client.ledger,
        before,
        caught,
        raised,
        usage if "event-stream" in content_type else MISSING,
    )


class _Pieces(httpx.SyncByteStream):
    """A body delivered in the given pieces, so that lines and characters arrive split."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces


@FUZZ
@given(
    status=st.sampled_from([400, 401, 403, 404, 429, 500, 502, 503, 504]),
    body=st.one_of(garbage_bytes, json_values.map(lambda v: json.dumps(v).encode())),
)
def test_any_error_response_is_one_row_and_an_sdk_error(
    fuzz_client: kb.OpenAI, status: int, body: bytes
) -> None:
    tried(__name__)
    before = len(fuzz_client.ledger.calls(10**6))
    caught, raised = _call(
        fuzz_client, lambda request: httpx.Response(status, content=body), stream=False
    )
    assert isinstance(raised, openai.APIStatusError) and raised.status_code == status
    judge(fuzz_client.ledger, before, caught, raised, MISSING)
    row = fuzz_client.ledger.calls(1)[0]
    assert row["status"] == "error" and row["error"]


# -- the stand-in's faults, over real sockets ----------------------------------------------------

FAULTS = {
    "drop-after-0": Fault.drop_stream(0),
    "drop-after-3": Fault.drop_stream(3),
    "garbage-at-1": Fault.garbage(1),
    "garbage-at-4": Fault.garbage(4),
    "no-usage": Fault.without_usage(),
    "html": Fault.html_body(),
    "usage-null": Fault.bad_usage(None),
    "usage-negative": Fault.bad_usage({"prompt_tokens": -5, "completion_tokens": 3}),
    "usage-float": Fault.bad_usage({"prompt_tokens": 5.5, "completion_tokens": 3}),
    "usage-huge": Fault.bad_usage({"prompt_tokens": 10**30, "completion_tokens": 3}),
    "cached>prompt": Fault.bad_usage(
        {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 50}
    ),
    "error-html-502": Fault.error(502, None),
}


@pytest.fixture(scope="module")
def server() -> Iterator[MoonshotStandIn]:
    with MoonshotStandIn(api_key=KEY, stream_chunks=6) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_stand_in_faults_leave_one_flagged_row(
    server: MoonshotStandIn, tmp_path: Path, name: str, stream: bool
) -> None:
    client = kb.OpenAI(
        api_key=KEY, base_url=server.base_url, ledger=tmp_path / "l.db", max_retries=0, timeout=5
    )
    server.queue_fault(FAULTS[name])
    caught, raised = call_and_consume(client, stream)
    rows = client.ledger.calls(5)
    assert len(rows) == 1
    row = rows[0]
    assert row["cost_nanos"] >= 0 and row["status"] != "pending"
    if raised is not None:
        assert not _raised_inside_us(raised), "".join(traceback.format_exception(raised))
    flagged = row["estimated"] or row["note"] or row["error"]
    if flagged:
        # The usage could not be trusted: the caller hears of it.
        assert raised is not None or any(message.startswith("kimi-budget") for message in caught)
    else:
        # Unflagged only if the row holds exactly what Moonshot bills for that request (a
        # garbage chunk in a stream that still ends with its usage, say).
        billed = server.chat_requests[-1].usage
        assert billed is not None, row
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            billed["prompt_tokens"],
            billed["cached_tokens"],
            billed["completion_tokens"],
        )
    if name.startswith(("drop", "usage", "no-usage", "html", "cached")):
        assert flagged, row  # these break or lose the usage itself
    client.close()


@settings(
    max_examples=max(EXAMPLES // 4, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(usage=usages(), stream=st.booleans())
def test_stand_in_with_any_usage(
    server: MoonshotStandIn, tmp_path: Path, usage: Any, stream: bool
) -> None:
    """The same judgement over real HTTP, with the usage the stand-in reports fuzzed."""
    tried(__name__)
    from kimi_budget.testing import OMIT

    path = tmp_path / "stand-in.db"
    client = kb.OpenAI(api_key=KEY, base_url=server.base_url, ledger=path, max_retries=0)
    before = len(client.ledger.calls(10**6))
    server.queue_fault(Fault.bad_usage(OMIT if usage is MISSING else usage))
    caught, raised = call_and_consume(client, stream)
    judge(client.ledger, before, caught, raised, usage)
    client.close()


# -- the request side ----------------------------------------------------------------------------

texts = st.text(max_size=40)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
headers_ = st.sampled_from(
    [
        PNG,
        b"GIF89a",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"RIFF\x00\x00\x00\x00WEBPVP8L",
        b"RIFF\x00\x00\x00\x00WEBPVP8X",
        b"\xff\xd8\xff\xe0",
        b"\xff\xd8\xff\xc0",
        b"",
    ]
)


@st.composite
def image_urls(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["https", "data", "data-garbage", "text"]))
    if kind == "https":
        return "https://example.com/" + draw(st.text("abc/.", max_size=10)) + ".png"
    if kind == "text":
        return draw(texts)
    payload = draw(headers_) + draw(st.binary(max_size=64))
    encoded = base64.b64encode(payload).decode()
    if kind == "data-garbage":
        encoded = encoded[: draw(st.integers(0, len(encoded)))] + draw(st.text("!@#=", max_size=3))
    mime = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", ""]))
    return f"data:{mime};base64,{encoded}"


parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": image_urls()}, optional={"detail": st.sampled_from(["low", "high", "auto"])}
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_urls()}),
    st.fixed_dictionaries(
        {
            "type": st.just("video_url"),
            "video_url": st.fixed_dictionaries({"url": st.just("https://example.com/v.mp4")}),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("input_audio"),
            "input_audio": st.fixed_dictionaries(
                {"data": st.just("AAAA"), "format": st.just("wav")}
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("file"), "file": st.fixed_dictionaries({"file_id": texts})}
    ),
)
contents = st.one_of(texts, st.none(), st.lists(parts, max_size=4))
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.one_of(st.just("search:0"), st.just("call_abc123"), texts),
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                    "arguments": st.one_of(texts, json_values.map(json.dumps)),
                }
            ),
        }
    ),
    min_size=1,
    max_size=3,
)
messages = st.one_of(
    st.fixed_dictionaries(
        {"role": st.just("system"), "content": st.one_of(texts, st.lists(parts, max_size=2))},
        optional={"name": texts},
    ),
    st.fixed_dictionaries({"role": st.just("user"), "content": contents}, optional={"name": texts}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": contents},
        optional={
            "tool_calls": tool_calls,
            "partial": st.booleans(),
            "reasoning_content": texts,
            "name": texts,
        },
    ),
    st.fixed_dictionaries(
        {"role": st.just("tool"), "content": contents, "tool_call_id": texts},
        optional={"name": texts},
    ),
)
schemas = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null"])},
        optional={"description": texts, "enum": st.lists(json_scalars, max_size=3)},
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(
                    st.from_regex(r"[a-z]{1,6}", fullmatch=True), inner, max_size=3
                ),
            },
            optional={
                "required": st.lists(texts, max_size=2),
                "additionalProperties": st.booleans(),
            },
        ),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"$ref": st.just("#/$defs/x")}),
    ),
    max_leaves=5,
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
                optional={"description": texts, "parameters": schemas, "strict": st.booleans()},
            ),
        }
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(sorted(PriceTable.load().models)),
        "messages": st.lists(messages, min_size=1, max_size=6),
    },
    optional={
        "tools": tools,
        "max_tokens": st.integers(1, 4096),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
        "thinking": st.sampled_from([{"type": "enabled"}, {"type": "disabled"}]),
        "n": st.integers(1, 5),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
    },
)


@FUZZ
@given(body=bodies)
def test_every_request_shape_estimates(body: dict[str, Any]) -> None:
    tried(__name__)
    for tokenizer in ("kimi_k2", "kimi_k3", "approximate"):
        estimate = count_request_tokens(body, tokenizer)
        assert isinstance(estimate.tokens, int) and estimate.tokens >= 0
        assert count_request_tokens(json.loads(json.dumps(body)), tokenizer) == estimate


@FUZZ
@given(body=bodies)
def test_every_request_shape_prepares(tmp_path: Path, body: dict[str, Any]) -> None:
    """prepare() projects a cost (or refuses with the context error), never anything else."""
    tried(__name__)
    settings_ = GuardSettings(
        ledger=_shared_ledger(tmp_path),
        budgets=(),
        tags={},
        prices=PriceTable.load(),
        exact_tokens="never",
    )
    try:
        prepared = prepare(settings_, dict(body), None)
    except kb.ContextLengthExceededError:
        return
    assert prepared.projected_nanos >= 0
    assert prepared.max_output >= 0


_ledgers: dict[Path, kb.Ledger] = {}


def _shared_ledger(tmp_path: Path) -> kb.Ledger:
    if tmp_path not in _ledgers:
        _ledgers[tmp_path] = kb.Ledger(tmp_path / "prepare.db")
    return _ledgers[tmp_path]


@settings(
    max_examples=max(EXAMPLES // 4, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=bodies)
def test_every_request_shape_goes_through_the_client(
    fuzz_client: kb.OpenAI, body: dict[str, Any]
) -> None:
    """End to end: the guarded client sends it, records it, and the row's estimate is sane."""
    tried(__name__)
    before = len(fuzz_client.ledger.calls(10**6))
    with respx.mock(using=RESPX_USING, base_url=MOCK_BASE_URL, assert_all_called=False) as router:
        router.post("/chat/completions").mock(
            return_value=httpx.Response(
                200, json=completion_body({"prompt_tokens": 7, "completion_tokens": 1})
            )
        )
        # Asked when only an approximate count says the request does not fit.
        router.post("/tokenizers/estimate-token-count").mock(
            return_value=httpx.Response(
                200, json={"code": 0, "data": {"total_tokens": 7}, "status": True}
            )
        )
        try:
            sdk_args = {k: v for k, v in body.items() if k != "thinking"}
            extra = {"thinking": body["thinking"]} if "thinking" in body else None
            fuzz_client.chat.completions.create(**sdk_args, stream=False, extra_body=extra)
        except kb.ContextLengthExceededError:
            assert len(fuzz_client.ledger.calls(10**6)) == before
            return
    rows = fuzz_client.ledger.calls(10**6)
    assert len(rows) == before + 1
    assert rows[0]["prompt_estimate"] >= 0 and rows[0]["status"] == "ok"
