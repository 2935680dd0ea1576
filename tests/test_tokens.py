"""Local token counting: vocabulary, chat-template arithmetic, media, fuzzing, calibration.

Template tests render the prompt string by hand and compare with ``encode`` (which matches
control tokens): that checks the module's arithmetic (constants + separately encoded text runs)
against a plain tokenization of the same rendering.  Calibration tests compare with usage
figures Moonshot returned for published requests (tests/data/published_usage.json).
"""

from __future__ import annotations

import base64
import json
import random
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kimi_budget._tokens as T
from kimi_budget._tokens import (
    TokenEstimate,
    TokenizerUnavailableError,
    count_request_tokens,
    count_text_tokens,
    image_tokens,
    load_tokenizer,
)

DATA = Path(__file__).parent / "data" / "published_usage.json"
PUBLISHED: list[dict[str, Any]] = json.loads(DATA.read_text(encoding="utf-8"))

K2 = load_tokenizer("kimi_k2")
K3 = load_tokenizer("kimi_k3")
DEFAULT_SYSTEM = (
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
    "<|im_end|>"
)
GEN = "<|im_assistant|>assistant<|im_middle|>"

ENGLISH = (
    "The committee met on Tuesday to review the budget for the coming year. Most of the "
    "discussion concerned the cost of cloud computing, which has grown faster than any other "
    "line item. Several members argued that the organisation should negotiate a fixed annual "
    "contract instead of paying by the hour, while others worried that a long commitment would "
    "leave them unable to switch providers if prices fell. In the end they agreed to collect "
    "three quotes, compare them against last year's invoices, and decide at the next meeting.\n\n"
    "Meanwhile, the engineering team will measure how much of the spend comes from experiments "
    "that were never turned off. A quick audit last month found two forgotten test clusters "
    "that had been running since the spring, quietly costing more than the whole design team."
)
CHINESE = (
    "周二上午，委员会开会审议了明年的预算。讨论主要集中在云计算的费用上，这一项的增长速度超过了"
    "其他所有支出。几位委员认为，应当与供应商谈判签订固定的年度合同，而不是按小时付费；另一些委员"
    "则担心，长期合同会让他们在价格下降时无法更换供应商。最后大家同意先收集三份报价，与去年的发票"
    "逐项比较，再在下次会议上做出决定。\n\n与此同时，工程团队将统计有多少开支来自早已无人使用却"
    "从未关闭的实验环境。上个月的一次快速检查发现，有两个测试集群从春天起就一直在运行，悄悄花掉的"
    "钱比整个设计团队还多。"
)
CODE = '''import json
from pathlib import Path


def load_prices(path: Path) -> dict[str, int]:
    """Read a price table and return micro-dollars per million tokens."""
    table: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, price = line.partition("=")
        table[name.strip()] = int(price.strip().replace("_", ""))
    return table


class Ledger:
    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows

    def total(self, model: str | None = None) -> int:
        return sum(int(r["cost"]) for r in self.rows if model in (None, r["model"]))


if __name__ == "__main__":
    print(json.dumps(load_prices(Path("prices.txt")), indent=2))
'''
SAMPLES = {"english": ENGLISH, "chinese": CHINESE, "code": CODE}


def enc(text: str, tok: Any = K2) -> int:
    """Tokens of a rendered prompt, control tokens matched (how the server encodes it)."""
    return len(tok.encode(text))


def body(
    *messages: dict[str, Any], model: str = "kimi-k2-0905-preview", **extra: Any
) -> dict[str, Any]:
    return {"model": model, "messages": list(messages), **extra}


# --------------------------------------------------------------------------------------------
# Vocabulary and interface
# --------------------------------------------------------------------------------------------


def test_known_encodings() -> None:
    assert K2.encode_ordinary("Hello world") == [19180, 2695]
    assert K2.encode_ordinary("你好世界") == [33845, 2243]
    assert K3.encode_ordinary("Hello world") == [19180, 2695]  # K3 shares K2's ranks
    assert count_text_tokens("Hello world", "kimi_k2") == 2
    assert count_text_tokens("你好世界", "kimi_k3") == 2
    for name in ("<|im_user|>", "<|im_middle|>", "<|im_end|>", "<|im_system|>", "<|im_assistant|>"):
        assert name in K2.special_tokens()


def test_special_token_spellings_in_user_text_count_as_text() -> None:
    # The server does not let a user forge control tokens: "<|im_end|>" is 7 ordinary tokens.
    assert count_text_tokens("a<|im_end|>b", "kimi_k2") == 8
    assert len(K2.encode("a<|im_end|>b")) == 3  # what encode() would have said
    plain = count_request_tokens(body({"role": "user", "content": "ab"}), "kimi_k2").tokens
    forged = count_request_tokens(body({"role": "user", "content": "a<|im_end|>b"}), "kimi_k2")
    assert forged.tokens - plain == count_text_tokens("a<|im_end|>b", "kimi_k2") - 1


def test_unknown_tokenizer_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer"):
        count_request_tokens(body(), "kimi_k9")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        count_text_tokens("x", "cl100k_base")
    with pytest.raises(ValueError):
        load_tokenizer("approximate")


def test_load_is_cached_and_thread_safe() -> None:
    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(load_tokenizer("kimi_k2"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(tok is K2 for tok in got)


def test_missing_splintr_gives_clear_error_and_approximate_still_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(T, "_TOKENIZERS", {})
    monkeypatch.setattr(T, "_PROFILES", {})
    monkeypatch.setitem(sys.modules, "splintr", None)  # makes "import splintr" fail
    with pytest.raises(TokenizerUnavailableError, match="splintr-rs"):
        load_tokenizer("kimi_k2")
    with pytest.raises(ImportError):
        count_request_tokens(body({"role": "user", "content": "hi"}), "kimi_k2")
    est = count_request_tokens(body({"role": "user", "content": "hi"}), "approximate")
    assert est.method == "approximate" and not est.exact and est.tokens > 0


def test_estimate_is_frozen() -> None:
    est = count_request_tokens(body({"role": "user", "content": "hi"}), "kimi_k2")
    assert isinstance(est, TokenEstimate) and est.method == "kimi_k2" and est.exact
    with pytest.raises(AttributeError):
        est.tokens = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# K2 template arithmetic
# --------------------------------------------------------------------------------------------


def test_per_message_overhead_is_three_control_tokens_plus_role() -> None:
    one = body({"role": "system", "content": "S"}, {"role": "user", "content": "hello there"})
    two = body(
        *one["messages"], {"role": "assistant", "content": "hi"}, {"role": "user", "content": "ok"}
    )
    a = count_request_tokens(one, "kimi_k2").tokens
    b = count_request_tokens(two, "kimi_k2").tokens
    # <|im_assistant|>assistant<|im_middle|>hi<|im_end|> + <|im_user|>user<|im_middle|>ok<|im_end|>
    assert b - a == (3 + 1 + 1) + (3 + 1 + 1)
    rendered = (
        "<|im_system|>system<|im_middle|>S<|im_end|>"
        "<|im_user|>user<|im_middle|>hello there<|im_end|>" + GEN
    )
    assert a == enc(rendered)


def test_default_system_prompt_when_none_given() -> None:
    user = {"role": "user", "content": "What is 1+1?"}
    # K2-Instruct (0905): the injected system turn is followed by a literal newline.
    got = count_request_tokens(body(user), "kimi_k2").tokens
    assert got == enc(DEFAULT_SYSTEM + "\n<|im_user|>user<|im_middle|>What is 1+1?<|im_end|>" + GEN)
    # K2.5 (Unsloth's published rendering of apply_chat_template): no newline, <think> prefill.
    got = count_request_tokens(body(user, model="kimi-k2.5"), "kimi_k2").tokens
    assert got == enc(
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>What is 1+1?<|im_end|>" + GEN + "<think>"
    )
    off = body(user, model="kimi-k2.5", thinking={"type": "disabled"})
    assert count_request_tokens(off, "kimi_k2").tokens == got + 1  # <think></think>


def test_names_replace_the_role_label() -> None:
    plain = count_request_tokens(body({"role": "user", "content": "x"}), "kimi_k2").tokens
    named = count_request_tokens(
        body({"role": "user", "content": "x", "name": "alice_smith"}), "kimi_k2"
    )
    assert named.tokens - plain == count_text_tokens("alice_smith", "kimi_k2") - 1


def test_tool_calls_and_results_render_like_the_template() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather.\nUse it for forecasts.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "City name", "maxLength": 80},
                        "days": {"type": "integer", "default": 1, "minimum": 1},
                        "unit": {"enum": ["c", "f"]},
                        "tags": {
                            "type": "array",
                            "items": {"type": "string", "description": "a tag"},
                        },
                    },
                    "required": ["city"],
                },
            },
        }
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "get_weather:0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "get_weather:0", "content": '{"temp": -3}'},
    ]
    ts = (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "// Get the weather.\n// Use it for forecasts.\n"
        "type get_weather = (_: {\n  // City name\n  // maxLength: 80\n  city: string,\n"
        "  // minimum: 1\n  // Default: 1\n  days?: number,\n  tags?: Array<\n    // a tag\n"
        '    string\n  >,\n  unit?: "c" | "f"\n}) => any;\n}\n'
    )
    rendered = (
        f"<|im_system|>tool_declare<|im_middle|>{ts}<|im_end|>"
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Oslo?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        '<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n{"temp": -3}<|im_end|>'
        + GEN
    )
    est = count_request_tokens(body(*messages, tools=tools), "kimi_k2")
    assert est.exact
    assert est.tokens == enc(rendered)


def test_thinking_models_keep_reasoning_only_after_the_last_plain_answer() -> None:
    turns: list[dict[str, Any]] = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "q2"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "plan the call",
            "tool_calls": [
                {"id": "f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "f:0", "content": "ok"},
    ]
    rendered = (
        "<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>user<|im_middle|>q1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>a1<|im_end|>"
        "<|im_user|>user<|im_middle|>q2<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>plan the call</think>"
        "<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.f:0\nok<|im_end|>" + GEN
    )
    assert count_request_tokens(body(*turns, model="kimi-k2-thinking"), "kimi_k2").tokens == enc(
        rendered
    )
    # The same history on a non-thinking K2 drops every <think> block.
    instruct = count_request_tokens(body(*turns), "kimi_k2").tokens
    assert instruct == enc(
        rendered.replace("<think></think>", "").replace("<think>plan the call</think>", "")
    )


def test_partial_prefill_replaces_the_generation_prompt() -> None:
    base = [{"role": "user", "content": "Write a haiku"}]
    prefill = {"role": "assistant", "content": "Autumn", "partial": True}
    without = count_request_tokens(body(*base), "kimi_k2").tokens
    with_prefill = count_request_tokens(body(*base, prefill), "kimi_k2").tokens
    assert with_prefill - without == count_text_tokens("Autumn", "kimi_k2")


def test_request_extras_do_not_break_or_count_unless_rendered() -> None:
    msgs = ({"role": "user", "content": "hi"},)
    plain = count_request_tokens(body(*msgs), "kimi_k2")
    extras = count_request_tokens(
        body(
            *msgs,
            temperature=0.3,
            max_tokens=10,
            stream=True,
            n=2,
            tool_choice="auto",
            stream_options={"include_usage": True},
            provider={"only": ["x"]},
        ),
        "kimi_k2",
    )
    assert extras == plain
    json_mode = count_request_tokens(
        body(*msgs, response_format={"type": "json_object"}), "kimi_k2"
    )
    assert json_mode.tokens > plain.tokens and not json_mode.exact


def test_builtin_web_search_tool_counts_and_is_not_exact() -> None:
    web = [{"type": "builtin_function", "function": {"name": "$web_search"}}]
    msgs = ({"role": "user", "content": "news today?"},)
    plain = count_request_tokens(body(*msgs), "kimi_k2")
    est = count_request_tokens(body(*msgs, tools=web), "kimi_k2")
    assert est.tokens > plain.tokens + count_text_tokens("$web_search", "kimi_k2")
    assert not est.exact


# --------------------------------------------------------------------------------------------
# K3 template arithmetic
# --------------------------------------------------------------------------------------------


def _k3_msg(attrs: str, content: str) -> str:
    return f"<|open|>message {attrs}<|sep|>{content}<|close|>message<|sep|><|end_of_msg|>"


def test_k3_rendering_matches_the_template() -> None:
    effort = (
        "`thinking_effort` guides on how much to think in your thinking channel (not including the "
        "response channel), supported values include `low`, `medium`, `high`, and `max`.\n"
        "Now the system is invoked with `thinking_effort=max`."
    )
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "use add",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a":2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    rendered = (
        _k3_msg(
            'role="system" type="tool-declare"',
            "# Tools\nHere are the available tools, described in JSONSchema.\n\n```json\n"
            '[{"function":{"name":"add","parameters":{"type":"object"}},"type":"function"}]\n```',
        )
        + _k3_msg('role="system" type="thinking-effort"', effort)
        + _k3_msg('role="system"', "Be brief.")
        + _k3_msg('role="user"', "2+3?")
        + _k3_msg(
            'role="assistant"',
            "<|open|>think<|sep|>use add<|close|>think<|sep|>"
            "<|open|>response<|sep|><|close|>response<|sep|>"
            '<|open|>tools<|sep|><|open|>call tool="add" index="1"<|sep|>'
            '<|open|>json type="object"<|sep|>'
            '{"a":2}<|close|>json<|sep|><|close|>call<|sep|><|close|>tools<|sep|>',
        )
        + _k3_msg('role="tool" tool="add" index="1"', "5")
        + '<|open|>message role="assistant"<|sep|><|open|>think<|sep|>'
    )
    est = count_request_tokens(body(*messages, model="kimi-k3", tools=tools), "kimi_k3")
    assert est.exact and est.method == "kimi_k3"
    assert est.tokens == enc(rendered, K3)


def test_k3_thinking_off_and_json_mode() -> None:
    msgs = ({"role": "user", "content": "hi"},)
    off = body(*msgs, model="kimi-k3", thinking={"type": "disabled"})
    assert count_request_tokens(off, "kimi_k3").tokens == enc(
        _k3_msg('role="user"', "hi")
        + '<|open|>message role="assistant"<|sep|><|open|>response<|sep|>',
        K3,
    )
    on = count_request_tokens(body(*msgs, model="kimi-k3"), "kimi_k3").tokens
    assert on > count_request_tokens(off, "kimi_k3").tokens + 40  # the effort message
    js = count_request_tokens(dict(off, response_format={"type": "json_object"}), "kimi_k3")
    assert js.exact and js.tokens > count_request_tokens(off, "kimi_k3").tokens + 20


# --------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------


def _png(w: int, h: int) -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    )


def _jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 3000) + bytes(3000)  # a bulky APP1 first
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xda" + bytes(100)


def _gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + bytes(20)


def _webp_vp8x(w: int, h: int) -> bytes:
    return (
        b"RIFF"
        + bytes(4)
        + b"WEBPVP8X"
        + bytes(8)
        + (w - 1).to_bytes(3, "little")
        + (h - 1).to_bytes(3, "little")
    )


def _data_url(kind: str, raw: bytes) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw + bytes(5000)).decode()


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("png", _png(1024, 768)),
        ("jpeg", _jpeg(1024, 768)),
        ("gif", _gif(1024, 768)),
        ("webp", _webp_vp8x(1024, 768)),
    ],
)
def test_data_url_dimensions_are_read_from_the_header(kind: str, raw: bytes) -> None:
    assert T._data_url_dimensions(_data_url(kind, raw)) == (1024, 768)


def test_image_tokens_follow_moonvit_resize() -> None:
    assert image_tokens(1024, 768) == 37 * 28  # 28-pixel blocks, sides padded up
    assert image_tokens(28, 28) == 1
    assert image_tokens(4000, 3000) <= 16384 // 4 + 200  # scaled down to the patch limit
    assert image_tokens(4000, 3000, 65536) > image_tokens(4000, 3000)  # K3 keeps more pixels


@given(st.integers(1, 60000), st.integers(1, 60000))
@settings(max_examples=150, deadline=None)
def test_unknown_size_allowance_bounds_every_size(w: int, h: int) -> None:
    assert image_tokens(w, h) <= T._K2_IMAGE_MAX
    assert image_tokens(w, h, T._K3_IN_PATCH_LIMIT) <= T._K3_IMAGE_MAX


def test_images_make_counts_inexact_and_cost_by_size() -> None:
    def req(url: str) -> dict[str, Any]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return body(
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
            model="kimi-k2.5",
        )

    small = count_request_tokens(req(_data_url("png", _png(56, 56))), "kimi_k2")
    big = count_request_tokens(req(_data_url("png", _png(1024, 768))), "kimi_k2")
    remote = count_request_tokens(req("https://example.com/cat.png"), "kimi_k2")
    text_only = count_request_tokens(
        body(
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
            model="kimi-k2.5",
        ),
        "kimi_k2",
    )
    assert not small.exact and not big.exact and not remote.exact and text_only.exact
    assert big.tokens - small.tokens == image_tokens(1024, 768) - image_tokens(56, 56)
    assert remote.tokens - text_only.tokens == T._MEDIA_WRAPPER + T._K2_IMAGE_MAX
    video = body(
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "ms://v"}}]}
    )
    assert count_request_tokens(video, "kimi_k2").tokens >= T._VIDEO_TOKENS


def test_base64_payload_is_never_tokenized() -> None:
    # 3 MB of base64 would be millions of tokens as text; as an image it is its pixel count.
    # (How long it takes is measured in benchmarks/tokens.py, not asserted here.)
    huge = _data_url("png", _png(640, 480) + random.Random(1).randbytes(3_000_000))
    req = body({"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]})
    est = count_request_tokens(req, "kimi_k2")
    assert est.tokens < 1000


# --------------------------------------------------------------------------------------------
# Fuzzing: every shape counts, never raises, respects a floor and grows with the conversation
# --------------------------------------------------------------------------------------------

_text = st.text(max_size=30)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _text)
_json = st.recursive(
    _json_scalar,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_text, kids, max_size=3)),
    max_leaves=8,
)
_url = st.sampled_from(
    [
        "https://example.com/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/png;base64,!!!",
        "data:,",
        _data_url("png", _png(300, 200)),
        _data_url("jpeg", _jpeg(90, 9000)),
        "ms://file-id",
    ]
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _url})}
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _url}),
    st.fixed_dictionaries(
        {"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": _url})}
    ),
    st.dictionaries(st.sampled_from(["type", "text", "input_audio", "file"]), _json, max_size=3),
    _text,
    st.integers(),
)
_content = st.one_of(_text, st.none(), st.lists(_part, max_size=4), _json)
_tool_call = st.one_of(
    st.fixed_dictionaries(
        {
            "id": _text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": _text, "arguments": st.one_of(_text, _json)}
            ),
        }
    ),
    _json,
)
_message = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", ""]),
            "content": _content,
        },
        optional={
            "name": st.one_of(_text, _json_scalar),
            "tool_calls": st.one_of(st.lists(_tool_call, max_size=3), _json),
            "tool_call_id": st.one_of(_text, _json_scalar),
            "partial": st.booleans(),
            "reasoning_content": st.one_of(_text, st.none(), _json),
        },
    ),
    st.fixed_dictionaries({"content": _content}),  # no role
    st.fixed_dictionaries({"role": _json_scalar, "content": _content}),
    _json,  # not a dict at all
)
_schema = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "object", "array"])},
        optional={
            "description": _text,
            "enum": st.lists(_json_scalar, max_size=3),
            "items": st.just({"type": "string"}),
            "default": _json_scalar,
        },
    ),
    st.fixed_dictionaries({"anyOf": st.lists(st.just({"type": "string"}), max_size=2)}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/$defs/X", "http://x"])}),
    _json,
)
_tool = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": _text},
                optional={
                    "description": _text,
                    "parameters": st.fixed_dictionaries(
                        {
                            "type": st.just("object"),
                            "properties": st.dictionaries(_text, _schema, max_size=3),
                        },
                        optional={
                            "required": st.lists(_text, max_size=2),
                            "additionalProperties": _json,
                            "$defs": st.dictionaries(st.just("X"), _schema, max_size=1),
                        },
                    ),
                },
            ),
        }
    ),
    st.just({"type": "builtin_function", "function": {"name": "$web_search"}}),
    _json,
)
_body = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=1, max_size=5)},
    optional={
        "model": st.sampled_from(
            [
                "kimi-k2-0905-preview",
                "kimi-k2-thinking",
                "kimi-k2.5",
                "kimi-k3",
                "moonshot-v1-8k",
                "kimi-k2.7-code",
            ]
        ),
        "tools": st.one_of(st.lists(_tool, max_size=3), _json),
        "response_format": st.one_of(
            st.sampled_from([{"type": "json_object"}, {"type": "text"}]), _json
        ),
        "thinking": st.one_of(st.just({"type": "disabled"}), _json),
        "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), _json),
        "reasoning_effort": st.one_of(st.sampled_from(["low", "max"]), _json),
        "extra_key": _json,
    },
)
_FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _floor(req: dict[str, Any], method: str) -> int:
    """3 tokens a message at least, plus every user/system string content."""
    n = 3 * len(req["messages"])
    for m in req["messages"]:
        if (
            isinstance(m, dict)
            and m.get("role") in ("user", "system")
            and isinstance(m.get("content"), str)
            # A K3 system message carrying "tools" renders the tools instead of its content.
            and not (method == "kimi_k3" and m.get("role") == "system" and m.get("tools"))
        ):
            n += count_text_tokens(m["content"], method)
    return n


@pytest.mark.parametrize("method", ["kimi_k2", "kimi_k3", "approximate"])
@given(req=_body)
@_FUZZ
def test_fuzz_never_raises_and_respects_the_floor(method: str, req: dict[str, Any]) -> None:
    est = count_request_tokens(req, method)
    assert isinstance(est.tokens, int) and est.method == method
    assert est.tokens >= _floor(req, method)


@pytest.mark.parametrize("method", ["kimi_k2", "kimi_k3", "approximate"])
@given(garbage=_json)
@_FUZZ
def test_fuzz_garbage_bodies(method: str, garbage: Any) -> None:
    est = count_request_tokens(garbage, method)
    assert est.tokens > 0
    assert not est.exact or isinstance(garbage, dict)


@pytest.mark.parametrize("method", ["kimi_k2", "kimi_k3", "approximate"])
def test_self_referencing_and_surrogate_values_do_not_raise(method: str) -> None:
    loop: list[Any] = []
    loop.append(loop)
    deep: Any = "x"
    for _ in range(3000):
        deep = [deep]
    req = body(
        {"role": "user", "content": loop},
        {"role": "user", "content": "lone surrogate \ud800 here"},
        {"role": "assistant", "content": deep, "tool_calls": [{"function": {"arguments": loop}}]},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": loop}}}],
        response_format={"type": "json_schema", "json_schema": {"schema": loop}},
    )
    est = count_request_tokens(req, method)
    assert est.tokens > 0 and not est.exact
    assert count_text_tokens("\ud800", method) >= 1


def _drops_history_reasoning(message: Any) -> bool:
    """A new final answer turns earlier reasoning into history, which the template drops."""
    return (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and not message.get("tool_calls")
        and message.get("partial") is not True
    )


@pytest.mark.parametrize("method", ["kimi_k2", "kimi_k3", "approximate"])
@given(req=_body, extra=_message)
@_FUZZ
def test_fuzz_adding_a_message_never_lowers_the_count(
    method: str, req: dict[str, Any], extra: Any
) -> None:
    # The approximation renders the K2 template too (only its text counts are estimated), so
    # it drops history reasoning exactly as kimi_k2 does.
    if method in ("kimi_k2", "approximate") and _drops_history_reasoning(extra):
        extra = {"role": "user", "content": extra.get("content")}
    before = count_request_tokens(req, method).tokens
    after = count_request_tokens(dict(req, messages=[*req["messages"], extra]), method).tokens
    assert after >= before


def test_a_new_answer_drops_earlier_reasoning_as_the_template_does() -> None:
    # The documented exception to monotonicity (server-side too): reasoning after the last
    # plain answer is sent; once a newer plain answer exists, it renders as <think></think>.
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "a long chain of thought " * 20,
            "tool_calls": [
                {"id": "f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "f:0", "content": "42"},
    ]
    req = body(*turns, model="kimi-k2.5")
    before = count_request_tokens(req, "kimi_k2").tokens
    after = count_request_tokens(
        body(*turns, {"role": "assistant", "content": "b"}, model="kimi-k2.5"), "kimi_k2"
    )
    assert after.tokens < before


# --------------------------------------------------------------------------------------------
# The moonshot-v1 approximation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_approximation_over_estimates_k2_on_samples(name: str) -> None:
    text = SAMPLES[name]
    k2 = count_text_tokens(text, "kimi_k2")
    approx = count_text_tokens(text, "approximate")
    # Over, by a margin the benchmark measured (+10% to +45% on these kinds of text).
    assert k2 < approx <= 1.6 * k2, (k2, approx)
    req = body(
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": text},
        model="moonshot-v1-32k",
    )
    assert (
        count_request_tokens(req, "approximate").tokens
        > count_request_tokens(req, "kimi_k2").tokens
    )


def test_approximation_over_estimates_own_source_code() -> None:
    src = Path(T.__file__).read_text(encoding="utf-8")
    assert count_text_tokens(src, "approximate") > count_text_tokens(src, "kimi_k2")


def test_approximation_covers_ids_and_base64() -> None:
    rnd = random.Random(7)
    for blob in (rnd.randbytes(300).hex(), base64.b64encode(rnd.randbytes(300)).decode()):
        assert count_text_tokens(blob, "approximate") > 0.9 * count_text_tokens(blob, "kimi_k2")


def test_approximation_needs_no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its speed is measured in benchmarks/tokens.py ("approximate"), not asserted here.
    def no_vocabulary(name: str) -> None:
        raise AssertionError(f"the approximation loaded the {name} vocabulary")

    monkeypatch.setattr(T, "load_tokenizer", no_vocabulary)
    text = (ENGLISH + CHINESE + CODE) * 200  # ~400k characters
    assert count_text_tokens(text, "approximate") > len(text) // 10


# --------------------------------------------------------------------------------------------
# Calibration against published usage
# --------------------------------------------------------------------------------------------

_K2_FIGURES = [e for e in PUBLISHED if e["model"].startswith("kimi-k2")]
_V1_FIGURES = [e for e in PUBLISHED if e["model"].startswith("moonshot-v1")]


def test_calibration_file_is_well_formed() -> None:
    assert len(PUBLISHED) >= 10
    for e in PUBLISHED:
        assert {"source", "model", "request", "prompt_tokens"} <= set(e)
        assert isinstance(e["prompt_tokens"], int) and isinstance(e["request"]["messages"], list)


@pytest.mark.parametrize(
    "entry", [e for e in _K2_FIGURES if e["observed"] >= "2026"], ids=lambda e: e["source"][-40:]
)
def test_k2_reproduces_current_server_counts_exactly(entry: dict[str, Any]) -> None:
    est = count_request_tokens(entry["request"], "kimi_k2")
    assert est.exact
    assert est.tokens == entry["prompt_tokens"]


@pytest.mark.parametrize(
    "entry", [e for e in _K2_FIGURES if e["observed"] < "2026"], ids=lambda e: e["source"][-40:]
)
def test_k2_reproduces_2025_counts_with_the_json_tool_declaration(
    entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # September 2025 the server declared tools as compact JSON; only that part differs.
    current = count_request_tokens(entry["request"], "kimi_k2").tokens
    monkeypatch.setattr(
        T, "_k2_tool_declaration", lambda tools: (T._compact_tools_json(tools), True)
    )
    assert count_request_tokens(entry["request"], "kimi_k2").tokens == entry["prompt_tokens"]
    # Measured drift of the TypeScript form against those old figures: at most 20% under.
    assert 0.8 * entry["prompt_tokens"] <= current <= entry["prompt_tokens"]


@pytest.mark.parametrize("entry", _V1_FIGURES, ids=lambda e: e["source"][-40:])
def test_approximation_over_estimates_published_moonshot_v1_counts(entry: dict[str, Any]) -> None:
    approx = count_request_tokens(entry["request"], "approximate").tokens
    assert entry["prompt_tokens"] < approx <= 1.5 * entry["prompt_tokens"]
    # The K2 vocabulary lands within 11% of moonshot-v1 here (measured +2.5% and -10.3%), in
    # both directions: it is no substitute for the approximation.
    k2 = count_request_tokens(entry["request"], "kimi_k2").tokens
    assert abs(k2 - entry["prompt_tokens"]) <= 0.11 * entry["prompt_tokens"]


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def _mixed_prompt(target_tokens: int) -> list[str]:
    rnd = random.Random(3)
    words = ENGLISH.split()
    hanzi = [c for c in CHINESE if "\u4e00" <= c <= "\u9fff"]
    code = CODE.splitlines()
    parts = []
    for kind in ("en", "zh", "code"):
        out: list[str] = []
        total = 0
        while total < target_tokens // 3:
            if kind == "en":
                piece = " ".join(rnd.choice(words) for _ in range(60)) + ".\n"
            elif kind == "zh":
                piece = "".join(rnd.choice(hanzi) for _ in range(80)) + "。\n"
            else:
                piece = "\n".join(rnd.choice(code) for _ in range(12)) + "\n"
            out.append(piece)
            total += count_text_tokens(piece, "kimi_k2")
        parts.append("".join(out))
    return parts


def test_counting_a_200k_token_prompt() -> None:
    # How long this takes is measured in benchmarks/tokens.py, not asserted here.
    en, zh, code = _mixed_prompt(200_000)
    req = body(
        {"role": "system", "content": en},
        {"role": "user", "content": zh},
        {"role": "user", "content": code},
    )
    K2.clear_cache()  # no help from splintr's chunk cache
    est = count_request_tokens(req, "kimi_k2")
    assert est.tokens >= 190_000
