"""Local token estimation for Moonshot (Kimi) chat requests.

Why this exists
---------------
The client refuses a request *before* sending it when the prompt plus ``max_tokens`` would
overflow the model's context window or the spend cap.  That needs a prompt-token count that is
cheap (it runs on every request) and, where possible, equal to the ``usage.prompt_tokens`` the
server will bill.

Approach
--------
``tokenizer="kimi_k2"`` / ``"kimi_k3"`` count with Moonshot's own vocabularies, bundled by the
``splintr-rs`` package.  The server does not bill the JSON body: it renders the request through
the model's chat template and tokenizes the result.  This module reproduces that rendering
*arithmetically*: every control token of the template (``<|im_user|>``, ``<|im_middle|>``,
``<|im_end|>``, ``<think>``, ``<|open|>``, ...) is one id, so it is added as a constant, and each
text run between two control tokens is encoded on its own with ``encode_ordinary``.  That is the
same split the server's tokenizer makes (special tokens cut the text), it never builds the
rendered prompt string, and it counts a literal ``"<|im_end|>"`` typed by a user as the 7
ordinary tokens the server sees rather than as a control token (``encode`` would match it).

Kimi K2 family (K2-0711/0905/turbo, K2-Thinking, K2.5, K2.6, K2.7) -- the template of
``moonshotai/Kimi-K2-Instruct(-0905)``, ``Kimi-K2-Thinking`` and ``Kimi-K2.5``
(``chat_template.jinja``; mirrored in ggml-org/llama.cpp ``models/templates/``)::

    <|im_system|>tool_declare<|im_middle|>{tools}<|im_end|>               only when tools
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
                                                       only when messages[0] is not a system
    <|im_user|>{name or "user"}<|im_middle|>{content}<|im_end|>
    <|im_assistant|>{name or "assistant"}<|im_middle|>[<think>{rc}</think>]{content}
        [<|tool_calls_section_begin|>(<|tool_call_begin|>{id}<|tool_call_argument_begin|>{args}
         <|tool_call_end|>)*<|tool_calls_section_end|>]<|im_end|>
    <|im_system|>{name or "tool"}<|im_middle|>## Return of {tool_call_id}\\n{content}<|im_end|>
    <|im_system|>{name or role}<|im_middle|>{content}<|im_end|>          system / other roles
    <|im_assistant|>assistant<|im_middle|>[<think>]                       generation prompt

So a message costs 3 control tokens + its role name (1 token for user/assistant/system/tool) +
its text, and the generation prompt 3 (+1 for K2.5's ``<think>``).  Details taken from the
templates and checked against the published usage figures in
``tests/data/published_usage.json`` (all kimi-k2-0905, English, via OpenRouter's Moonshot AI
provider; none published for K2.5+ or with Chinese text):

* The server tokenizes the tool list as a TypeScript-style declaration (``# Tools`` /
  ``namespace functions { type f = (_: {...}) => any; }``, the Kimi-K2.5 template's
  ``tools_ts_str``).  Recordings from March 2026 match that form exactly (all 6 figures);
  recordings from September 2025 match compact JSON instead (``tojson(separators=(',', ':'))``
  without ``strict``, all 6 figures), 8 tokens more for one small tool and 30 for two.  The
  current form is counted; an older deployment would be under-counted by that difference.
* Tool-call ids are rendered in the model's native ``functions.{id}`` form: every recorded
  multi-turn tool conversation is exactly one token per id occurrence above the raw ids.  (The
  recorded ids were Moonshot's own ``name:index``, so the figures cannot tell "prefixed" from
  "rebuilt as ``functions.{name}:{index}``"; for foreign ids such as ``call_abc123`` the prefix
  form is counted, the longer of the two.)
* ``response_format`` JSON modes: the K2 templates define no text for them; the K3 template's
  instruction is counted as a system turn and the estimate is marked inexact.
* "Thinking" models (K2-Thinking, K2.5 and later) wrap every assistant turn in
  ``<think>...</think>``; ``reasoning_content`` is kept only after the last assistant turn that
  has no tool calls (earlier turns render ``<think></think>``).  K2.5+ prefill ``<think>`` in the
  generation prompt (``<think></think>`` with ``thinking: {"type": "disabled"}``).
* The default system prompt is counted whenever the first message is not a system message
  (the K2, K2-Thinking and K2.5 templates all inject it; one third-party K2.6 rendering omits it,
  so for K2.6+ this may over-count by 18 tokens -- the safe direction).
* ``partial: true`` on the last assistant message is a prefill: it replaces the generation
  prompt and has no ``<|im_end|>``.

Kimi K3 (``tokenizer="kimi_k3"``) uses XML-like control tokens
(``<|open|>message role="user"<|sep|>...<|close|>message<|sep|><|end_of_msg|>``), sorted
compact JSON for tools, adds an internal "thinking-effort" system message when thinking is on
(the default, effort ``max``), messages for ``tool_choice`` required/none and for JSON
``response_format``, and ends with ``<|open|>message role="assistant"<|sep|><|open|>think<|sep|>``
(source: ggml-org/llama.cpp ``models/templates/Kimi-K3.jinja``).  No published K3 usage figure
was found, so K3 counts are template reproductions that have not been checked against the API.

Images and videos are not countable locally: an image costs ``ceil(h/28) * ceil(w/28)``
``<|media_pad|>`` tokens after MoonViT's resize (patch 14, 2x2 merge, at most 16384 patches
for K2.5/K2.6 and 65536 for K3) plus its ``<|media_begin|>image<|media_content|>...<|media_end|>``
wrapper.  Dimensions are read from the header of ``data:`` URLs (PNG, GIF, WebP, JPEG);
otherwise the largest value that resize can produce is used.  Videos use a fixed allowance.
Any image or video, and anything the template does not define (unknown part types, builtin
tools, non-dict messages, numbers as content), makes ``exact`` False and is counted on the
high side; nothing in a request body makes counting raise.

``tokenizer="approximate"`` serves the moonshot-v1 models, whose tokenizer is not public.  It
needs no vocabulary: a few ``bytes.translate``/``count`` passes over the UTF-8 text give letter
runs, digits, punctuation, newlines and non-ASCII bytes, and a linear formula fitted to
*over*-estimate the K2 tokenizer on English, Chinese and code (``benchmarks/token_accuracy.py``
prints the measured error).  Messages are framed like K2-Instruct (3 control tokens and a role
name each, default system prompt when none), tools are counted as their compact JSON.  The
client uses it only to pre-check and confirms with Moonshot's exact count endpoint before
refusing a request.
"""

from __future__ import annotations

import binascii
import json
import math
import re
import string
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "TOKENIZER_NAMES",
    "TokenEstimate",
    "TokenizerUnavailableError",
    "count_request_tokens",
    "count_text_tokens",
    "image_tokens",
    "load_tokenizer",
]

TOKENIZER_NAMES: Final = ("kimi_k2", "kimi_k3", "approximate")


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """Prompt tokens of a request as the server would count them."""

    tokens: int
    # True only when every part was counted with the model's own vocabulary: no image, no
    # approximation, nothing the chat template leaves undefined.
    exact: bool
    method: str  # "kimi_k2" | "kimi_k3" | "approximate"


class TokenizerUnavailableError(ImportError):
    """The ``splintr-rs`` package (which bundles the Kimi vocabularies) cannot be loaded."""


# --------------------------------------------------------------------------------------------
# Tokenizer loading
# --------------------------------------------------------------------------------------------

_LOAD_LOCK = threading.Lock()
_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(name: str) -> Any:
    """Return the splintr tokenizer ``"kimi_k2"`` or ``"kimi_k3"``, loaded once per process."""
    tok = _TOKENIZERS.get(name)
    if tok is not None:
        return tok
    if name not in ("kimi_k2", "kimi_k3"):
        raise ValueError(
            f"unknown tokenizer {name!r}: expected 'kimi_k2' or 'kimi_k3'"
            + (" ('approximate' needs no tokenizer)" if name == "approximate" else "")
        )
    with _LOAD_LOCK:
        tok = _TOKENIZERS.get(name)
        if tok is None:
            try:
                import splintr
            except ImportError as exc:
                raise TokenizerUnavailableError(
                    "counting Kimi tokens locally needs the 'splintr-rs' package "
                    "(pip install 'splintr-rs>=0.22,<0.23'), or use tokenizer='approximate'"
                ) from exc
            try:
                tok = splintr.Tokenizer.from_pretrained(name)
            except (ValueError, OSError, RuntimeError) as exc:
                raise TokenizerUnavailableError(
                    f"splintr could not load the {name!r} vocabulary "
                    f"(splintr {getattr(splintr, '__version__', '?')}; need >=0.22): {exc}"
                ) from exc
            # The first encode compiles the pre-tokenizer regex and the first real BPE merge
            # builds splintr's tables (~80 ms): pay both here, not on the first request.
            tok.encode_ordinary("qzxv antidisestablishmentarianism 预热")
            _TOKENIZERS[name] = tok
    return tok


# --------------------------------------------------------------------------------------------
# The moonshot-v1 approximation
# --------------------------------------------------------------------------------------------

_LETTER_DIGIT_MAP: Final = bytes(
    ord("a") if chr(i) in string.ascii_letters else ord("0") if chr(i) in string.digits else 32
    for i in range(256)
)
_ALNUM_MAP: Final = bytes(
    ord("a") if chr(i) in string.ascii_letters + string.digits else 32 for i in range(256)
)
_PUNCT: Final = string.punctuation.encode()
_BLOCK16: Final = b"a" * 16
_HIGH_BYTES: Final = bytes(range(128, 256))
_HAN: Final = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ACCENTED_LATIN: Final = re.compile("[\u00c0-\u024f]")


def _approx_count(text: str) -> int:
    """Conservative token estimate from character classes, with no vocabulary.

    Coefficients were fitted on English, Chinese and Python code so that the estimate exceeds
    the K2 tokenizer on 95% of 200-character windows; in total it is over by about +22% on
    English, +25% on code and +13% (mixed UI strings) to +47% (pure prose) on Chinese, and
    +30% to +44% over the two published moonshot-v1 counts (benchmarks/token_accuracy.py).
    Each term below bounds, roughly from above, what the K2 tokenizer does with that character
    class.
    """
    if not text:
        return 0
    b = text.encode("utf-8", "surrogatepass")
    n = len(b)
    m = b.translate(_LETTER_DIGIT_MAP)
    letters = m.count(b"a")
    digits = m.count(b"0")
    # A word (letter run) is usually one K2 token; words longer than 4 letters sometimes split.
    word_runs = m.count(b" a") + m.count(b"0a") + (m[:1] == b"a")
    # K2 splits digit runs into groups of at most 3: ceil(run/3) <= run/3 + 2/3.
    digit_runs = m.count(b" 0") + m.count(b"a0") + (m[:1] == b"0")
    punct = n - len(b.translate(None, _PUNCT))
    newlines = b.count(b"\n")
    indent = b.count(b"  ") + b.count(b"\t")
    # Non-ASCII: K2 averages ~0.53 token per Han character, so 0.75 leaves a margin for rarer
    # ones; accented Latin, Cyrillic, kana and the rest run close to one token per character.
    non_ascii = len(text) - len(b.translate(None, _HIGH_BYTES))
    han = len(_HAN.findall(text)) if non_ascii else 0
    # Accented Latin letters split the words they sit in: count them double.
    latin = len(_ACCENTED_LATIN.findall(text)) if non_ascii else 0
    # 16+ character alphanumeric runs are ids, hashes, base64: K2 needs ~0.5-0.7 token per
    # character there, far above the word rate, so each 16-character block gets 8 more.
    blocks = b.translate(_ALNUM_MAP).count(_BLOCK16)
    est = (
        word_runs
        + 0.3 * max(0, letters - 4 * word_runs)
        + digits / 3
        + 0.67 * digit_runs
        + 0.6 * punct
        + 1.5 * newlines
        + 0.25 * indent
        + 0.75 * han
        + 1.0 * (non_ascii - han)
        + 1.0 * latin
        + 8 * blocks
    )
    return max(1, math.ceil(est))


# --------------------------------------------------------------------------------------------
# Per-tokenizer counting profile
# --------------------------------------------------------------------------------------------

# Template constants (K2 family and K3).
_DEFAULT_SYSTEM: Final = "You are Kimi, an AI assistant created by Moonshot AI."
_STYLE_INSTRUCT: Final = 0  # K2-0711/0905/turbo, moonshot-v1: no <think> anywhere
_STYLE_THINKING: Final = 1  # kimi-k2-thinking*: <think></think> turns, plain generation prompt
_STYLE_K25: Final = 2  # K2.5 and later (the default): thinking turns + <think> prefill

_INSTRUCT_MODELS: Final = re.compile(
    r"moonshot-v1|kimi-k2-(?:0711|0905|turbo|instruct)|kimi-latest|kimi-k2$", re.IGNORECASE
)
_STYLE_CACHE: dict[str, int] = {}

# K3 internal system messages, verbatim from the K3 template.
_K3_EFFORTS: Final = ("low", "medium", "high", "max")
_K3_EFFORT_TEXT: Final = (
    "`thinking_effort` guides on how much to think in your thinking channel (not including "
    "the response channel), supported values include `low`, `medium`, `high`, and `max`.\n"
    "Now the system is invoked with `thinking_effort={}`."
)
_K3_TOOL_CHOICE_TEXT: Final = {
    "required": "The system is invoked with `tool_choice=required`.\n"
    "You MUST call tools in the next message.",
    "none": "The system is invoked with `tool_choice=none`.\n"
    "You MUST NOT call any tools in the next message.",
}
_JSON_OBJECT_TEXT: Final = (
    "The system is invoked with `response_format=json_object`.\n"
    "Your response must be raw JSON data without markdown code blocks (```json) or any "
    "additional formatting."
)
_JSON_SCHEMA_TEXT: Final = (
    "The system is invoked with `response_format=json_schema`.\n"
    "Your response must be raw JSON data without markdown code blocks (```json) or any "
    "additional formatting.\nThe JSON data must match the following schema:\n```json\n"
)
_K3_TOOLS_HEADER: Final = (
    "# Tools\nHere are the available tools, described in JSONSchema.\n\n```json\n"
)

# Media.  MoonViT: 14-pixel patches merged 2x2, so one token per 28x28 pixels after resize.
_K2_IN_PATCH_LIMIT: Final = 16384  # Kimi-K2.5/K2.6 preprocessor_config media_proc_cfg
_K3_IN_PATCH_LIMIT: Final = 65536  # Kimi-K3 preprocessor_config (4x K2.5)
# Largest token count the resize formula yields for any size, found by search (4464 for
# 16384 patches, 16800 for 65536), rounded up: used when the size cannot be read.
_K2_IMAGE_MAX: Final = 4608
_K3_IMAGE_MAX: Final = 17408
# <|media_begin|> "image" <|media_content|> ... <|media_end|> "\n"
_MEDIA_WRAPPER: Final = 5
# Video length is unknowable without decoding; K2.5 samples 2 frames/s, merges 4 frames and
# caps a frame at 4096 patches (1024 tokens), i.e. <= 512 tokens/s.  This allowance covers
# about a minute at full resolution.
_VIDEO_TOKENS: Final = 32768


class _Profile:
    """Everything a render needs for one tokenizer name, built once per process."""

    __slots__ = ("_consts", "count", "exact", "family", "image_max", "in_patch_limit", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.exact = method != "approximate"
        self.family = "k3" if method == "kimi_k3" else "k2"
        if method == "approximate":
            self.count: Callable[[str], int] = _approx_count
        else:
            encode = load_tokenizer(method).encode_ordinary

            def count(text: str) -> int:
                if not text:
                    return 0
                try:
                    return len(encode(text))
                except UnicodeEncodeError:
                    # Lone surrogates (e.g. from a JSON "\ud800") cannot cross into Rust; count
                    # each of their bytes as a replacement character, the dear side.
                    raw = text.encode("utf-8", "surrogatepass")
                    return len(encode(raw.decode("utf-8", "replace")))

            self.count = count
        if self.family == "k3":
            self.in_patch_limit, self.image_max = _K3_IN_PATCH_LIMIT, _K3_IMAGE_MAX
        else:
            self.in_patch_limit, self.image_max = _K2_IN_PATCH_LIMIT, _K2_IMAGE_MAX
        self._consts: dict[str, int] = {}

    def const(self, text: str) -> int:
        """Count of a short text that recurs across requests (role names, tag bodies)."""
        n = self._consts.get(text)
        if n is None:
            n = self.count(text)
            if len(self._consts) < 4096:  # role names come from users; keep the cache bounded
                self._consts[text] = n
        return n


_PROFILES: dict[str, _Profile] = {}


def _profile(tokenizer: str) -> _Profile:
    prof = _PROFILES.get(tokenizer)
    if prof is None:
        if tokenizer not in TOKENIZER_NAMES:
            raise ValueError(
                f"unknown tokenizer {tokenizer!r}: expected one of {', '.join(TOKENIZER_NAMES)}"
            )
        # load_tokenizer locks; two threads racing here build two equal profiles, harmless.
        prof = _PROFILES[tokenizer] = _Profile(tokenizer)
    return prof


def count_text_tokens(text: str, tokenizer: str) -> int:
    """Tokens of a bare text (no chat template), special-token spellings counted as text."""
    prof = _profile(tokenizer)
    return prof.count(text if isinstance(text, str) else _to_text(text))


# --------------------------------------------------------------------------------------------
# Helpers shared by the renderers
# --------------------------------------------------------------------------------------------


def _to_text(value: object) -> str:
    """Text stand-in for a value the template does not define: its JSON, never an error."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, TypeError, RecursionError):
        try:
            return repr(value)
        except Exception:  # a hostile __repr__ must not break a budget check
            return ""


class _Content:
    """Text runs and media of one message body, in template order."""

    __slots__ = ("exact", "media", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.media = 0  # media tokens, wrappers included
        self.exact = True


def _split_content(content: object, prof: _Profile) -> _Content:
    """Flatten a non-string ``content`` the way the templates do.

    Adjacent text parts are concatenated with no separator (``{{ content['text'] }}`` in a
    loop); media parts are control-token delimited, so they cut the text into separate runs.
    """
    out = _Content()
    if content is None:
        return out
    if not isinstance(content, (list, tuple)):
        # Numbers, dicts: not a shape the API defines; count their JSON.
        out.texts.append(_to_text(content))
        out.exact = False
        return out
    run: list[str] = []
    for part in content:
        if not isinstance(part, Mapping):
            run.append(part if isinstance(part, str) else _to_text(part))
            out.exact = False
            continue
        ptype = part.get("type")
        if ptype == "text" or (ptype is None and "text" in part and len(part) == 1):
            text = part.get("text")
            if not isinstance(text, str):
                text = _to_text(text)
                out.exact = False
            run.append(text)
            continue
        out.exact = False
        media = _media_tokens(part, ptype, prof)
        if media is None:
            # input_audio, file, unknown types: the template would print part['text'];
            # counting the whole part as text is the safe upper side.
            run.append(_to_text(part))
        else:
            out.texts.append("".join(run))
            run = []
            out.media += media
    out.texts.append("".join(run))
    return out


def _media_tokens(part: Mapping[str, Any], ptype: object, prof: _Profile) -> int | None:
    """Tokens of an image or video part, wrapper included; None if the part is neither."""
    # The templates' own test: type 'image', or an 'image' / 'image_url' key.
    if ptype in ("image_url", "image") or "image_url" in part or "image" in part:
        return _MEDIA_WRAPPER + _image_part_tokens(part, prof)
    if ptype in ("video_url", "video") or "video_url" in part or "video" in part:
        return _MEDIA_WRAPPER + _VIDEO_TOKENS
    return None


def _content_tokens(content: object, prof: _Profile, prefix: str = "") -> tuple[int, bool]:
    """Tokens of a message body; ``prefix`` is template text glued before it (tool results)."""
    if isinstance(content, str):
        return prof.count(prefix + content if prefix else content), True
    if content is None:
        return prof.count(prefix), True
    parts = _split_content(content, prof)
    if prefix:
        parts.texts[0] = prefix + parts.texts[0]
    count = prof.count
    return sum(count(t) for t in parts.texts) + parts.media, parts.exact


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def image_tokens(width: int, height: int, in_patch_limit: int = _K2_IN_PATCH_LIMIT) -> int:
    """``<|media_pad|>`` tokens MoonViT emits for an image of this size (wrapper excluded).

    The NaViT resize of Kimi's vision processor: scale down (never up) until the 14-pixel patch
    grid fits ``in_patch_limit`` patches and 512 patches a side, pad each side to a multiple of
    28 pixels, one token per 28x28 block.
    """
    if width <= 0 or height <= 0:
        return 0
    patch, side = 14, 512
    s1 = math.sqrt(in_patch_limit / (max(1, width // patch) * max(1, height // patch)))
    scale = min(1.0, s1, side * patch / width, side * patch / height)
    new_w = min(max(1, int(width * scale)), side * patch)
    new_h = min(max(1, int(height * scale)), side * patch)
    return math.ceil(new_h / 28) * math.ceil(new_w / 28)


def _image_part_tokens(part: Mapping[str, Any], prof: _Profile) -> int:
    url: object = part.get("image_url")
    if isinstance(url, Mapping):
        url = url.get("url")
    if not isinstance(url, str):
        url = part.get("image") if isinstance(part.get("image"), str) else None
    dims = _data_url_dimensions(url) if isinstance(url, str) else None
    if dims is None:
        return prof.image_max
    return min(prof.image_max, image_tokens(dims[0], dims[1], prof.in_patch_limit))


_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _data_url_dimensions(url: str) -> tuple[int, int] | None:
    """(width, height) from the header of a base64 ``data:`` URL, or None.

    Decodes at most 48 KiB of the payload: enough for PNG/GIF/WebP headers and for JPEG frame
    headers behind typical EXIF blocks, without touching the rest of a multi-megabyte image.
    """
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 5, 512)
    if comma < 0 or ";base64" not in url[5:comma]:
        return None
    chunk = url[comma + 1 : comma + 1 + 65536]
    chunk = chunk[: len(chunk) - len(chunk) % 4]
    try:
        data = binascii.a2b_base64(chunk)
    except (binascii.Error, ValueError):
        return None
    try:
        return _image_header_dimensions(data)
    except (struct.error, IndexError):
        return None


def _image_header_dimensions(b: bytes) -> tuple[int, int] | None:
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return int(w), int(h)
    if b[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", b[6:10])
        return int(w), int(h)
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        kind = b[12:16]
        if kind == b"VP8 ":
            return (
                int.from_bytes(b[26:28], "little") & 0x3FFF,
                int.from_bytes(b[28:30], "little") & 0x3FFF,
            )
        if kind == b"VP8L" and b[20] == 0x2F:
            bits = int.from_bytes(b[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
        return None
    if b[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(b):
            if b[i] != 0xFF:
                i += 1
                continue
            marker = b[i + 1]
            if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
                i += 2 if marker != 0xFF else 1
                continue
            if marker in _SOF_MARKERS:
                h, w = struct.unpack(">HH", b[i + 5 : i + 9])
                return int(w), int(h)
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


# --------------------------------------------------------------------------------------------
# Tool declarations
# --------------------------------------------------------------------------------------------


class _SchemaError(Exception):
    """A JSON schema the TypeScript renderer does not handle; fall back to JSON."""


def _ts_doc(schema: Mapping[str, Any], kind: str, indent: str) -> str:
    lines = []
    desc = schema.get("description")
    if desc:
        lines.append("\n".join(f"{indent}// {ln}" if ln else "" for ln in str(desc).split("\n")))
    keys = {
        "string": ("maxLength", "minLength", "pattern"),
        "number": ("maximum", "minimum"),
        "integer": ("maximum", "minimum"),
        "array": ("maxItems", "minItems"),
    }.get(kind, ())
    constraints = sorted((k, schema[k]) for k in keys if k in schema)
    if constraints:
        lines.append(f"{indent}// " + ", ".join(f"{k}: {v}" for k, v in constraints))
    return "".join(line + "\n" for line in lines)


def _ts_kind(schema: object) -> str:
    if not isinstance(schema, Mapping):
        return "scalar"
    if "$ref" in schema:
        return "ref"
    if "anyOf" in schema:
        return "anyOf"
    if "enum" in schema:
        return "enum"
    t = schema.get("type")
    if isinstance(t, list):
        return "union"
    return t if isinstance(t, str) else "scalar"


_TS_UNION: Final = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "{}",
    "array": "Array<any>",
}


def _ts_type(schema: object, indent: str, defs: dict[str, Any]) -> str:
    if isinstance(schema, bool):
        return "any" if schema else "null"
    if not isinstance(schema, Mapping):
        raise _SchemaError
    if "$ref" in schema:
        ref = str(schema["$ref"])
        if ref == "#":
            return "parameters"
        if not ref.startswith("#/$defs/") or ref.rsplit("/", 1)[-1] not in defs:
            raise _SchemaError
        return ref.rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_ts_type(t, indent, defs) for t in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(f'"{e}"' if isinstance(e, str) else str(e) for e in schema["enum"])
    t = schema.get("type")
    if isinstance(t, list):
        return " | ".join(_TS_UNION[x] for x in t)
    if t == "object":
        return _ts_object(schema, indent, defs)
    if t == "array":
        item = schema.get("items") or {}
        item_doc = _ts_doc(item, _ts_kind(item), indent + "  ") if isinstance(item, Mapping) else ""
        if item_doc:
            inner = _ts_type(item, indent + "  ", defs)
            return f"Array<\n{item_doc}{indent}  {inner}\n{indent}>"
        return f"Array<{_ts_type(item, indent, defs) if item else 'any'}>"
    if isinstance(t, str):
        return "number" if t == "integer" else t
    if not schema or set(schema) <= {"description", "default", "title"}:
        return "any"
    raise _SchemaError


def _ts_object(schema: Mapping[str, Any], indent: str, defs: dict[str, Any]) -> str:
    if isinstance(schema.get("$defs"), Mapping):
        defs.update(schema["$defs"])
    props = schema.get("properties") or {}
    if not isinstance(props, Mapping):
        raise _SchemaError
    required = schema.get("required") or []
    req = sorted(k for k in props if k in required)
    opt = sorted(k for k in props if k not in required)
    inner = indent + "  "
    fields = []
    for name in req + opt:
        prop = props[name]
        kind = _ts_kind(prop)
        doc = _ts_doc(prop, kind, inner) if isinstance(prop, Mapping) else ""
        if isinstance(prop, Mapping) and prop.get("default") is not None:
            d = prop["default"]
            if isinstance(d, (int, float, bool)):
                shown = repr(d)
            else:
                shown = json.dumps(d, ensure_ascii=False)
            doc += f"{inner}// Default: {shown}\n"
        optional = "?" if name not in required else ""
        fields.append(f"{doc}{inner}{name}{optional}: {_ts_type(prop, inner, defs)}")
    extra = schema.get("additionalProperties")
    if extra is not None:
        if extra is True:
            ap = "any"
        elif extra is False:
            ap = "never"
        else:
            ap = _ts_type(extra, inner, defs)
        fields.append(f"{inner}[k: string]: {ap}")
    if not fields:
        return "{}"
    return "{\n" + ",\n".join(fields) + "\n" + indent + "}"


def _ts_function(fn: Mapping[str, Any]) -> str:
    params = fn.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise _SchemaError
    defs: dict[str, Any] = {}
    body = _ts_object(params, "", defs)
    name = str(fn.get("name", "function"))
    interfaces = []
    self_ref = '"$ref": "#"' in json.dumps(params) or "'$ref': '#'" in repr(params)
    if self_ref:
        interfaces.append(f"interface parameters {body}")
        type_def = f"type {name} = (_: parameters) => any;"
    else:
        type_def = f"type {name} = (_: {body}) => any;"
    for def_name, def_schema in list(defs.items()):
        text = _ts_type(def_schema, "", defs)
        desc = def_schema.get("description", "") if isinstance(def_schema, Mapping) else ""
        head = "\n".join(f"// {ln}" if ln else "" for ln in str(desc).split("\n")) + "\n"
        interfaces.append(f"{head if desc else ''}interface {def_name} {text}")
    desc = fn.get("description")
    doc = "\n".join(f"// {ln}" if ln else "" for ln in str(desc).split("\n")) if desc else ""
    return "\n".join(x for x in ("\n".join(interfaces), doc, type_def) if x)


def _k2_tool_declaration(tools: object) -> tuple[str, bool]:
    """Text between ``<|im_system|>tool_declare<|im_middle|>`` and ``<|im_end|>``."""
    if not isinstance(tools, (list, tuple)):
        return _to_text(tools), False
    functions: list[str] = []
    others: list[object] = []
    exact = True
    try:
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if isinstance(fn, Mapping) and tool.get("type", "function") == "function":
                exact = exact and tool.get("type") == "function"
                functions.append(_ts_function(fn))
            else:
                # builtin_function ($web_search) and unknown entries: the server expands
                # them with text we cannot see; count their JSON.
                others.append(tool)
                exact = False
    except (_SchemaError, KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return _compact_tools_json(tools), False
    text = "# Tools\n\n"
    if functions:
        text += "## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
    if others:
        text += _to_text(others)
    return text, exact


def _compact_tools_json(tools: Sequence[object]) -> str:
    """The pre-2026 declaration: compact JSON of the tools, ``strict`` dropped."""
    cleaned: list[object] = []
    for tool in tools:
        if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
            fn = {k: v for k, v in tool["function"].items() if k != "strict"}
            cleaned.append({**tool, "function": fn})
        else:
            cleaned.append(tool)
    return _to_text(cleaned)


def _json_sorted(value: object) -> str:
    """K3's ``json_sorted`` macro: compact JSON, keys in Jinja ``dictsort`` (case-insensitive)."""
    try:
        return _json_sorted_inner(value)
    except RecursionError:  # self-referencing or absurdly deep: not wire JSON anyway
        return _to_text(value)


def _json_sorted_inner(value: object) -> str:
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]).lower())
        dump = json.dumps
        return (
            "{"
            + ",".join(
                dump(str(k), ensure_ascii=False) + ":" + _json_sorted_inner(v) for k, v in items
            )
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json_sorted_inner(v) for v in value) + "]"
    if value is None or isinstance(value, (str, int, float, bool)):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(str(value), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Request-level options
# --------------------------------------------------------------------------------------------


def _k2_style(model: object) -> int:
    if not isinstance(model, str):
        return _STYLE_K25
    style = _STYLE_CACHE.get(model)
    if style is None:
        low = model.lower()
        if "thinking" in low and "k2.5" not in low and "k2.6" not in low:
            style = _STYLE_THINKING
        elif _INSTRUCT_MODELS.search(low):
            style = _STYLE_INSTRUCT
        else:
            style = _STYLE_K25
        if len(_STYLE_CACHE) < 1024:
            _STYLE_CACHE[model] = style
    return style


def _thinking_enabled(body: Mapping[str, Any]) -> bool:
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping):
        return thinking.get("type") != "disabled"
    return thinking is not False


def _response_format_text(body: Mapping[str, Any]) -> tuple[str | None, bool]:
    """Instruction text the server adds for JSON modes (K3 template), or None."""
    rf = body.get("response_format")
    if rf is None:
        return None, True
    rtype = rf.get("type") if isinstance(rf, Mapping) else rf
    if rtype == "json_object":
        return _JSON_OBJECT_TEXT, True
    if rtype == "json_schema" and isinstance(rf, Mapping):
        wrapper = rf.get("json_schema")
        schema = wrapper
        if isinstance(wrapper, Mapping):
            schema = wrapper.get("schema", wrapper.get("json_schema", wrapper))
        return _JSON_SCHEMA_TEXT + _json_sorted(schema) + "\n```", True
    if rtype in (None, "text"):
        return None, True
    return _to_text(rf), False


def _messages_of(body: Mapping[str, Any], prof: _Profile) -> tuple[Any, int]:
    """The request's message list, and the tokens of a ``messages`` that is not a list."""
    messages = body.get("messages")
    if messages is None:
        return (), 0
    if not isinstance(messages, (list, tuple)):
        return (), _garbage_messages(messages, prof)
    return messages, 0


def _garbage_messages(messages: object, prof: _Profile) -> int:
    """Tokens for a ``messages`` that is not a list: its text in one user turn."""
    return 4 + prof.count(_to_text(messages))


# --------------------------------------------------------------------------------------------
# Kimi K2 family
# --------------------------------------------------------------------------------------------


def _render_k2(body: Mapping[str, Any], prof: _Profile) -> tuple[int, bool]:
    count = prof.count
    const = prof.const
    exact = True
    n = 0
    style = _k2_style(body.get("model"))

    messages, garbage = _messages_of(body, prof)
    if garbage:
        n, exact = n + garbage, False

    tools = body.get("tools")
    if tools is None and body.get("functions"):
        # Legacy OpenAI "functions": not a Moonshot parameter, count it as tools anyway.
        fns = body["functions"]
        tools = [{"type": "function", "function": f} for f in fns] if isinstance(fns, list) else fns
        exact = False
    if tools:
        if prof.exact:
            decl, ok = _k2_tool_declaration(tools)
        else:
            # moonshot-v1's tool rendering is unknown; compact JSON is the larger of the two
            # forms Kimi servers have used.
            if isinstance(tools, (list, tuple)):
                decl = _compact_tools_json(tools)
            else:
                decl = _to_text(tools)
            ok = False
        # <|im_system|> tool_declare <|im_middle|> {decl} <|im_end|>
        n += 3 + const("tool_declare") + count(decl)
        exact = exact and ok

    rf_text, ok = _response_format_text(body)
    if rf_text is not None:
        # The K2 templates define no JSON-mode text; assume K3's instruction as a system turn.
        n += 3 + const("system") + count(rf_text)
        exact = False
    exact = exact and ok

    first = messages[0] if messages else None
    if not isinstance(first, Mapping) or first.get("role") != "system":
        # Default system prompt; the K2-Instruct template follows it with a literal newline.
        n += 3 + const("system") + const(_DEFAULT_SYSTEM)
        if style == _STYLE_INSTRUCT:
            n += const("\n")

    # Thinking templates keep reasoning_content only after the last assistant turn without
    # tool calls; earlier turns render an empty <think></think>.
    last_plain = -1
    if style != _STYLE_INSTRUCT:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if isinstance(m, Mapping) and m.get("role") == "assistant" and not m.get("tool_calls"):
                last_plain = i
                break

    think_prefill = 0
    if style == _STYLE_K25:
        think_prefill = 1 if _thinking_enabled(body) else 2  # <think> or <think></think>
    last = len(messages) - 1
    prefilled = False

    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            n += 4 + count(_to_text(m))
            exact = False
            continue
        role = m.get("role")
        if not isinstance(role, str):
            role = "user"
            exact = False
        name = m.get("name")
        role_name = name if isinstance(name, str) and name else role
        content = m.get("content")

        if role == "assistant":
            if i == last and m.get("partial") is True:
                # Prefill: the message stands in for the generation prompt and stays open.
                prefilled = True
                n += 2 + const(role_name) + think_prefill
            else:
                n += 3 + const(role_name)
                if style != _STYLE_INSTRUCT:
                    n += 2  # <think></think>
                    rc = m.get("reasoning_content")
                    if i > last_plain and rc:
                        n += count(rc if isinstance(rc, str) else _to_text(rc))
            c, ok = _content_tokens(content, prof)
            n += c
            exact = exact and ok
            tool_calls = m.get("tool_calls")
            if tool_calls:
                c, ok = _k2_tool_calls(tool_calls, prof)
                n += c
                exact = exact and ok
        elif role == "tool":
            call_id = m.get("tool_call_id")
            call_id = call_id if isinstance(call_id, str) else _to_text(call_id)
            if call_id and not call_id.startswith("functions."):
                call_id = "functions." + call_id
            n += 3 + const(name if isinstance(name, str) and name else "tool")
            c, ok = _content_tokens(content, prof, f"## Return of {call_id}\n")
            n += c
            exact = exact and ok
        else:
            n += 3 + const(role_name)
            c, ok = _content_tokens(content, prof)
            n += c
            exact = exact and ok

    if not prefilled:
        # <|im_assistant|> assistant <|im_middle|> [<think> | <think></think>]
        n += 2 + const("assistant") + think_prefill
    return n, exact


def _k2_tool_calls(tool_calls: object, prof: _Profile) -> tuple[int, bool]:
    if not isinstance(tool_calls, (list, tuple)):
        return 2 + prof.count(_to_text(tool_calls)), False
    count = prof.count
    n = 2  # <|tool_calls_section_begin|> ... <|tool_calls_section_end|>
    exact = True
    for j, tc in enumerate(tool_calls):
        if not isinstance(tc, Mapping):
            n += 3 + count(_to_text(tc))
            exact = False
            continue
        fn = tc.get("function")
        fn = fn if isinstance(fn, Mapping) else {}
        fname = fn.get("name")
        call_id = tc.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"functions.{fname if isinstance(fname, str) else ''}:{j}"
        elif not call_id.startswith("functions."):
            call_id = "functions." + call_id
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False) if _jsonable(args) else _to_text(args)
        # <|tool_call_begin|> id <|tool_call_argument_begin|> args <|tool_call_end|>
        n += 3 + count(call_id) + count(args)
    return n, exact


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Kimi K3
# --------------------------------------------------------------------------------------------


def _attr(value: object) -> str:
    return str(value).replace("&", "&amp;").replace('"', "&quot;")


def _k3_tag(prof: _Profile, body: str) -> int:
    """``<|open|>{body}<|sep|>`` and ``<|close|>{body}<|sep|>`` both cost 2 + the body."""
    return 2 + prof.const(body)


def _k3_internal(prof: _Profile, kind: str, text: str) -> int:
    # <|open|>message role="system" type="kind"<|sep|>{text}<|close|>message<|sep|><|end_of_msg|>
    return (
        _k3_tag(prof, f'message role="system" type="{kind}"')
        + prof.count(text.strip())
        + _k3_tag(prof, "message")
        + 1
    )


def _render_k3(body: Mapping[str, Any], prof: _Profile) -> tuple[int, bool]:
    count = prof.count
    exact = True
    n = 0
    thinking = _thinking_enabled(body)
    effort = body.get("reasoning_effort")
    if effort not in _K3_EFFORTS:
        effort = "max"

    messages, garbage = _messages_of(body, prof)
    if garbage:
        n, exact = n + garbage, False

    tools = body.get("tools")
    if tools:
        if isinstance(tools, (list, tuple)):
            decl = _json_sorted(tools)
            if any(not isinstance(t, Mapping) or t.get("type") != "function" for t in tools):
                exact = False
        else:
            decl, exact = _to_text(tools), False
        n += (
            _k3_tag(prof, 'message role="system" type="tool-declare"')
            + count(_K3_TOOLS_HEADER + decl + "\n```")
            + _k3_tag(prof, "message")
            + 1
        )
    if thinking:
        n += _k3_internal(prof, "thinking-effort", _K3_EFFORT_TEXT.format(effort))

    # Tool results carry the function name; resolve it from the calls they answer.
    call_names: dict[str, str] = {}
    run_index = 0
    run_calls: list[str] = []
    last = len(messages) - 1
    prefilled = False

    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            n += _k3_tag(prof, 'message role="user"') + count(_to_text(m))
            n += _k3_tag(prof, "message") + 1
            exact = False
            continue
        role = m.get("role")
        if not isinstance(role, str):
            role, exact = "user", False
        name = m.get("name")
        name_attr = f' name="{_attr(name)}"' if name else ""
        content = m.get("content")
        if role != "tool":
            run_index = 0

        if role == "assistant":
            partial = i == last and m.get("partial") is True
            n += _k3_tag(prof, f'message role="assistant"{name_attr}')
            if thinking:
                rc = m.get("reasoning_content") or m.get("reasoning")
                n += 2 * _k3_tag(prof, "think")
                if rc:
                    rc_text = rc if isinstance(rc, str) else _to_text(rc)
                    if rc_text.strip():
                        n += count(rc_text)
            n += _k3_tag(prof, "response")
            c, ok = _content_tokens(content, prof)
            n += c
            exact = exact and ok
            run_calls = []
            tool_calls = m.get("tool_calls")
            if partial:
                prefilled = True
                continue
            n += _k3_tag(prof, "response")
            if tool_calls:
                c, ok = _k3_tool_calls(tool_calls, prof, call_names, run_calls)
                n += c
                exact = exact and ok
            n += _k3_tag(prof, "message") + 1
        elif role == "tool":
            run_index += 1
            call_id = m.get("tool_call_id", m.get("id"))
            tool_name = call_names.get(str(call_id)) if call_id is not None else None
            if tool_name is None:
                given = m.get("tool", m.get("name"))
                if given is not None:
                    tool_name = str(given)
                elif run_index <= len(run_calls):
                    tool_name = run_calls[run_index - 1]
                else:
                    tool_name, exact = "tool", False  # the template would raise here
            n += _k3_tag(prof, f'message role="tool" tool="{_attr(tool_name)}" index="{run_index}"')
            c, ok = _content_tokens(content, prof)
            n += c + _k3_tag(prof, "message") + 1
            exact = exact and ok
        elif role == "system" and m.get("tools"):
            dyn = m.get("tools")
            n += (
                _k3_tag(prof, 'message role="system" type="tool-declare"')
                + count(
                    "## New Tools Available\nThe system dynamically extends the toolset via "
                    "lazy-loading.\nYou have access to all existing and extended tools.\n"
                    "Here are the specs for the extended tools.\n\n```json\n"
                    + _json_sorted(dyn)
                    + "\n```"
                )
                + _k3_tag(prof, "message")
                + 1
            )
        else:
            if role not in ("user", "system"):
                exact = False  # the K3 template drops unknown roles; count them anyway
            n += _k3_tag(prof, f'message role="{_attr(role)}"{name_attr}')
            c, ok = _content_tokens(content, prof)
            n += c + _k3_tag(prof, "message") + 1
            exact = exact and ok

    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice in _K3_TOOL_CHOICE_TEXT:
        n += _k3_internal(prof, "tool-choice", _K3_TOOL_CHOICE_TEXT[choice])
    rf_text, ok = _response_format_text(body)
    exact = exact and ok
    if rf_text is not None:
        n += _k3_internal(prof, "response-format", rf_text)

    if not prefilled:
        n += _k3_tag(prof, 'message role="assistant"') + _k3_tag(
            prof, "think" if thinking else "response"
        )
    return n, exact


def _k3_tool_calls(
    tool_calls: object, prof: _Profile, call_names: dict[str, str], run_calls: list[str]
) -> tuple[int, bool]:
    if not isinstance(tool_calls, (list, tuple)):
        return 2 * _k3_tag(prof, "tools") + prof.count(_to_text(tool_calls)), False
    count = prof.count
    exact = True
    n = 2 * _k3_tag(prof, "tools")
    for k, tc in enumerate(tool_calls, start=1):
        if not isinstance(tc, Mapping):
            n += count(_to_text(tc))
            exact = False
            continue
        fn_obj = tc.get("function")
        fn: Mapping[str, Any] = fn_obj if isinstance(fn_obj, Mapping) else tc
        fname = str(fn.get("name", ""))
        if "name" not in fn:
            exact = False
        if tc.get("id") is not None:
            call_names[str(tc["id"])] = fname
        run_calls.append(fname)
        n += _k3_tag(prof, f'call tool="{_attr(fname)}" index="{k}"') + _k3_tag(prof, "call")
        args = fn.get("arguments", {})
        if isinstance(args, Mapping):
            for key, value in args.items():
                kind = _xtml_type(value)
                shown = value if isinstance(value, str) else _to_text(value)
                n += (
                    _k3_tag(prof, f'argument key="{_attr(key)}" type="{kind}"')
                    + count(shown)
                    + _k3_tag(prof, "argument")
                )
        elif isinstance(args, str):
            if args.strip():
                n += _k3_tag(prof, 'json type="object"') + count(args) + _k3_tag(prof, "json")
        elif args is not None:
            n += count(_to_text(args))
            exact = False
    return n, exact


def _xtml_type(value: object) -> str:
    """The K3 template's ``xtml_type`` macro."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, Mapping) else "array"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def count_request_tokens(body: Mapping[str, Any], tokenizer: str) -> TokenEstimate:
    """Prompt tokens of a chat-completions request body, as the server renders it.

    ``tokenizer`` is ``"kimi_k2"`` (Kimi K2 to K2.7), ``"kimi_k3"`` or ``"approximate"``
    (moonshot-v1; an over-estimate).  Unknown names raise ValueError; request bodies never do.
    """
    prof = _profile(tokenizer)
    if not isinstance(body, Mapping):
        # Not a request body at all: its text as one user turn plus a generation prompt.
        return TokenEstimate(7 + prof.count(_to_text(body)), False, prof.method)
    if prof.family == "k3":
        n, exact = _render_k3(body, prof)
    else:
        n, exact = _render_k2(body, prof)
    return TokenEstimate(n, exact and prof.exact, prof.method)
