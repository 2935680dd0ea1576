"""Local token counting: a 200,000-token prompt of mixed English, Chinese and code, and the
counter's start-up cost.

The prompt is generated (seeded), not repeated paragraphs, so that no word-level cache in the
tokenizer can make the figure look better than a real prompt would.

    python benchmarks/tokens.py [--tiny]
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt_us, table

_WORDS = [
    "budget",
    "ledger",
    "token",
    "model",
    "request",
    "stream",
    "window",
    "cache",
    "price",
    "spend",
    "limit",
    "call",
    "server",
    "reply",
    "error",
    "retry",
    "answer",
    "daily",
    "monthly",
    "project",
    "crawler",
    "agent",
    "memory",
    "context",
    "prompt",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "on",
    "was",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "when",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "will",
    "would",
    "about",
    "into",
    "than",
]
# Common Hanzi: any mix of them is valid Chinese text as far as the tokenizer cares.
_HANZI = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之"
    "年过发后作里用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样"
    "理心她本前开但因只从想实日军者意无力它与长把机十民第公此已工使情明性知全三又关点正业外将"
    "预算账本模型请求流式窗口缓存价格花费限制调用服务器回答错误重试项目上下文提示"
)
_IDENTS = ("ledger", "budget", "call_id", "spent", "reserved", "window", "total", "row", "conn")


def _english(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        word = rng.choice(_WORDS)
        out.append(word.capitalize() if i % 12 == 0 else word)
        if i % 12 == 11:
            out[-1] += rng.choice(".,;:!?")
    return " ".join(out)


def _chinese(rng: random.Random, chars: int) -> str:
    text = "".join(rng.choice(_HANZI) for _ in range(chars))
    return "。".join(text[i : i + 24] for i in range(0, len(text), 24))


def _code(rng: random.Random, lines: int) -> str:
    out = []
    for i in range(lines):
        a, b = rng.choice(_IDENTS), rng.choice(_IDENTS)
        n = rng.randint(0, 10_000)
        out.append(
            rng.choice(
                [
                    f"def {a}_{i}({b}: int = {n}) -> int:",
                    f"    {a} = {b}.get('{a}', {n}) + {rng.random():.4f}",
                    f"    if {a} > {n}:\n        return {b}[{n % 7}]",
                    f"    for {a} in range({n}):  # {rng.choice(_WORDS)} {rng.choice(_WORDS)}",
                    f'    {a}.execute("SELECT {b} FROM calls WHERE id = ?", ({n},))',
                ]
            )
        )
    return "\n".join(out)


def mixed_prompt(target_tokens: int, *, seed: int = 5) -> tuple[dict[str, Any], int]:
    """A chat body whose prompt is about ``target_tokens`` Kimi K2 tokens, and its count."""
    from kimi_budget._tokens import count_request_tokens

    rng = random.Random(seed)
    parts: list[str] = []
    tokens = 0
    body: dict[str, Any] = {}
    while tokens < target_tokens:
        kind = len(parts) % 3
        piece = (
            _english(rng, 400) if kind == 0 else _chinese(rng, 500) if kind == 1 else _code(rng, 40)
        )
        parts.append(piece)
        if len(parts) % 30 == 0 or tokens == 0:
            body = _body(parts)
            tokens = count_request_tokens(body, "kimi_k2").tokens
    while tokens > target_tokens and len(parts) > 1:  # trim to just above the target
        trial = _body(parts[:-1])
        trial_tokens = count_request_tokens(trial, "kimi_k2").tokens
        if trial_tokens < target_tokens:
            break
        parts.pop()
        body, tokens = trial, trial_tokens
    return body, tokens


def _body(parts: list[str]) -> dict[str, Any]:
    third = max(len(parts) // 3, 1)
    return {
        "model": "kimi-k2.5",
        "messages": [
            {"role": "system", "content": "\n\n".join(parts[:third])},
            {"role": "user", "content": "\n\n".join(parts[third : 2 * third])},
            {"role": "assistant", "content": "\n\n".join(parts[2 * third :]) or "ok"},
            {"role": "user", "content": "Summarise the above in one line."},
        ],
        "max_tokens": 1024,
    }


_LOAD_PROBE = r"""
import json, time
t0 = time.perf_counter()
import kimi_budget
t1 = time.perf_counter()
import kimi_budget._tokens as tokens
t2 = time.perf_counter()
first = tokens.load_tokenizer("kimi_k2")
t3 = time.perf_counter()
body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hello"}]}
tokens.count_request_tokens(body, "kimi_k2")
t4 = time.perf_counter()
again = tokens.load_tokenizer("kimi_k2")
tokens.count_request_tokens(body, "kimi_k2")
t5 = time.perf_counter()
tokens.load_tokenizer("kimi_k3")
t6 = time.perf_counter()
print(json.dumps({"package": t1 - t0, "import": t2 - t1, "load_k2": t3 - t2,
                  "first_count": t4 - t3, "second_load_and_count": t5 - t4, "load_k3": t6 - t5,
                  "same_object": first is again}))
"""


def load_cost(runs: int) -> dict[str, Any]:
    """Start-up figures from fresh processes (median of ``runs``)."""
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", _LOAD_PROBE], capture_output=True, text=True, check=True
        ).stdout
        samples.append(json.loads(out.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        key: statistics.median(s[key] for s in samples)
        for key in samples[0]
        if key != "same_object"
    }
    result["same_object"] = all(s["same_object"] for s in samples)
    return result


def fmt_t(seconds: float) -> str:
    return fmt_us(seconds * 1e6)


def run(*, tiny: bool = False) -> dict[str, Any]:
    from kimi_budget._tokens import count_request_tokens

    target = 5_000 if tiny else 200_000
    runs = 2 if tiny else 9
    body, tokens = mixed_prompt(target)
    chars = sum(len(m["content"]) for m in body["messages"])
    timings = {}
    for tokenizer in ("kimi_k2", "kimi_k3", "approximate"):
        count_request_tokens(body, tokenizer)  # loads the vocabulary once, outside the timing
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            estimate = count_request_tokens(body, tokenizer)
            samples.append(time.perf_counter() - started)
        timings[tokenizer] = (statistics.median(samples), max(samples), estimate.tokens)
    load = load_cost(1 if tiny else 5)
    rows = [
        [name, f"{count:,}", fmt_t(median), fmt_t(worst), f"{count / median / 1e6:.1f} M tokens/s"]
        for name, (median, worst, count) in timings.items()
    ]
    text = "\n\n".join(
        [
            f"Prompt: {chars:,} characters of generated English, Chinese and Python in 4 messages, "
            f"{tokens:,} Kimi K2 tokens; median of {runs} counts.",
            table(["counter", "tokens counted", "median", "worst", "throughput"], rows),
            table(
                ["start-up (fresh process, median)", "time"],
                [
                    ["import kimi_budget (the package, its names lazily)", fmt_t(load["package"])],
                    ["then import kimi_budget._tokens", fmt_t(load["import"])],
                    [
                        "load the Kimi K2 vocabulary (load_tokenizer, first use)",
                        fmt_t(load["load_k2"]),
                    ],
                    ["first count of a one-word request after loading", fmt_t(load["first_count"])],
                    [
                        "load_tokenizer() again + a count (same object: "
                        f"{'yes' if load['same_object'] else 'NO'})",
                        fmt_t(load["second_load_and_count"]),
                    ],
                    ["load the Kimi K3 vocabulary", fmt_t(load["load_k3"])],
                ],
            ),
        ]
    )
    return {"tokens": tokens, "timings": timings, "load": load, "text": text}


def main() -> None:
    print(run(tiny="--tiny" in sys.argv)["text"])


if __name__ == "__main__":
    main()
