"""How accurate and how fast is kimi_budget's local token counting?

    python benchmarks/token_accuracy.py [--quick]

Prints three tables:

(a) every published ``usage.prompt_tokens`` in tests/data/published_usage.json against the
    local Kimi K2 counter (chat template + K2 vocabulary) and the moonshot-v1 approximation;
(b) the moonshot-v1 approximation against the K2 tokenizer on English, Chinese and code,
    whole-corpus and per window (how often and how far it errs low);
(c) timings: tokenizer load (fresh interpreter), a 200,000-token mixed prompt (cold and warm
    splintr cache), and the per-call cost of a 2-message prompt.

Corpora: text shipped with the OS when present (license texts for English prose, the zh_CN
gettext catalogs for Chinese, the Python standard library for code), plus a built-in sample
of each so the script runs anywhere.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import random
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_budget._tokens import (  # noqa: E402  (path set up above)
    count_request_tokens,
    count_text_tokens,
    load_tokenizer,
)

BUILTIN = {
    "english": (
        "The committee met on Tuesday to review the budget for the coming year. Most of the "
        "discussion concerned the cost of cloud computing, which has grown faster than any "
        "other line item. Several members argued that the organisation should negotiate a "
        "fixed annual contract instead of paying by the hour, while others worried that a long "
        "commitment would leave them unable to switch providers if prices fell.\n"
    ),
    "chinese": (
        "周二上午，委员会开会审议了明年的预算。讨论主要集中在云计算的费用上，这一项的增长速度超过了"
        "其他所有支出。几位委员认为，应当与供应商谈判签订固定的年度合同，而不是按小时付费；另一些"
        "委员则担心，长期合同会让他们在价格下降时无法更换供应商。\n"
    ),
    "code": (
        "def total(rows: list[dict[str, object]], model: str | None = None) -> int:\n"
        "    return sum(int(r['cost']) for r in rows if model in (None, r['model']))\n"
    ),
}


def _mo_strings(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a GNU gettext .mo catalog."""
    data = Path(path).read_bytes()
    order = "<" if struct.unpack("<I", data[:4])[0] == 0x950412DE else ">"
    _, count, orig, trans = struct.unpack(order + "4I", data[4:20])
    pairs = []
    for i in range(count):
        olen, ooff = struct.unpack(order + "2I", data[orig + 8 * i : orig + 8 * i + 8])
        tlen, toff = struct.unpack(order + "2I", data[trans + 8 * i : trans + 8 * i + 8])
        try:
            pairs.append((data[ooff : ooff + olen].decode(), data[toff : toff + tlen].decode()))
        except UnicodeDecodeError:
            continue
    return pairs


def load_corpora(limit: int) -> dict[str, str]:
    english = [BUILTIN["english"]]
    for name in ("GPL-3", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3"):
        path = Path("/usr/share/common-licenses") / name
        if path.exists():
            english.append(path.read_text(encoding="utf-8", errors="replace"))
    chinese = [BUILTIN["chinese"]]
    for mo in sorted(glob.glob("/usr/share/locale/zh_CN/LC_MESSAGES/*.mo")):
        chinese.extend(t.split("\x00")[0] for _, t in _mo_strings(mo) if len(t) > 20)
    catalog = Path("/usr/lib/systemd/catalog/systemd.zh_CN.catalog")
    if catalog.exists():
        chinese.append(catalog.read_text(encoding="utf-8", errors="replace"))
    code = [BUILTIN["code"]]
    for py in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py")):
        code.append(Path(py).read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, code)) > limit:
            break
    return {
        "english": "\n".join(english)[:limit],
        "chinese": "\n".join(chinese)[:limit],
        "code": "\n".join(code)[:limit],
    }


def pct(estimate: int, truth: int) -> str:
    return f"{(estimate - truth) * 100 / truth:+.1f}%" if truth else "n/a"


def direction(estimate: int, truth: int) -> str:
    return "over" if estimate > truth else "under" if estimate < truth else "exact"


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()


def published_figures() -> None:
    figures = json.loads((ROOT / "tests/data/published_usage.json").read_text(encoding="utf-8"))
    print("(a) Local counts against published usage.prompt_tokens")
    print("    kimi_k2 = chat template + K2 vocabulary; approx = moonshot-v1 approximation\n")
    rows = []
    for e in figures:
        req = e["request"]
        k2 = count_request_tokens(req, "kimi_k2").tokens
        approx = count_request_tokens(req, "approximate").tokens
        truth = e["prompt_tokens"]
        src = (
            e["source"].split("TestOpenRouterCommon/")[-1]
            if "fantasy" in e["source"]
            else (e["source"][:38] + "...")
        )
        rows.append(
            [
                src[:52],
                e["model"][:18],
                str(e.get("observed", "")),
                e.get("language", ""),
                str(truth),
                str(k2),
                pct(k2, truth),
                str(approx),
                pct(approx, truth),
                "uncertain pairing" if e.get("pairing") == "uncertain" else "",
            ]
        )
    table(
        [
            "source",
            "model",
            "observed",
            "text",
            "published",
            "kimi_k2",
            "err",
            "approx",
            "err",
            "note",
        ],
        rows,
    )
    print("    kimi-k2 figures from 2025-09 predate the server's switch from a JSON to a")
    print("    TypeScript tool declaration; this module counts the current (2026-03) form.\n")


def windows(text: str, size: int, n: int, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    if len(text) <= size:
        return [text]
    return [text[i : i + size] for i in (rnd.randrange(0, len(text) - size) for _ in range(n))]


def approximation_vs_k2(corpora: dict[str, str], n_windows: int) -> None:
    print("(b) moonshot-v1 approximation against the K2 tokenizer (signed error = approx/K2 - 1)\n")
    rows = []
    for name, text in corpora.items():
        k2 = count_text_tokens(text, "kimi_k2")
        approx = count_text_tokens(text, "approximate")
        row = [
            name,
            f"{len(text):,}",
            f"{k2:,}",
            f"{approx:,}",
            pct(approx, k2),
            direction(approx, k2),
        ]
        for size in (200, 2000):
            ratios = []
            for w in windows(text, size, n_windows):
                truth = count_text_tokens(w, "kimi_k2")
                if truth:
                    ratios.append(count_text_tokens(w, "approximate") / truth)
            under = sum(r < 1 for r in ratios)
            row += [
                f"{statistics.median(ratios) - 1:+.0%}",
                f"{under}/{len(ratios)}",
                f"{min(ratios) - 1:+.0%}",
            ]
        rows.append(row)
    rnd = random.Random(5)
    for name, blob in (
        ("hex ids", " ".join(rnd.randbytes(16).hex() for _ in range(2000))),
        ("base64", base64.b64encode(rnd.randbytes(60000)).decode()),
    ):
        k2 = count_text_tokens(blob, "kimi_k2")
        approx = count_text_tokens(blob, "approximate")
        rows.append(
            [
                name,
                f"{len(blob):,}",
                f"{k2:,}",
                f"{approx:,}",
                pct(approx, k2),
                direction(approx, k2),
                "",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    table(
        [
            "text",
            "chars",
            "K2",
            "approx",
            "error",
            "errs",
            "200c med",
            "200c under",
            "200c worst",
            "2000c med",
            "2000c under",
            "2000c worst",
        ],
        rows,
    )


def mixed_prompt(corpora: dict[str, str], target: int) -> list[str]:
    parts = []
    for name in ("english", "chinese", "code"):
        text = corpora[name]
        while count_text_tokens(text, "kimi_k2") < target // 3:
            text += "\n" + text
        # Trim to about a third of the target.
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if count_text_tokens(text[:mid], "kimi_k2") < target // 3:
                lo = mid + 1
            else:
                hi = mid
        parts.append(text[:lo])
    return parts


def best_of(
    fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None
) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timings(corpora: dict[str, str]) -> None:
    print("(c) Timings\n")
    # Import the package first: kimi_budget/__init__ pulls in openai, which is not our cost.
    code = (
        "import time, kimi_budget._tokens as t; s=time.perf_counter(); "
        "t.load_tokenizer('{name}'); print(time.perf_counter()-s)"
    )
    rows = []
    for name in ("kimi_k2", "kimi_k3"):
        samples = []
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, "-c", code.format(name=name)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            samples.append(float(out.stdout.strip()))
        rows.append([f"load_tokenizer({name!r}), fresh process", f"{min(samples) * 1000:.1f} ms"])

    tok = load_tokenizer("kimi_k2")
    en, zh, code_part = mixed_prompt(corpora, 200_000)
    body = {
        "model": "kimi-k2.5",
        "messages": [
            {"role": "system", "content": en},
            {"role": "user", "content": zh},
            {"role": "user", "content": code_part},
        ],
    }
    n = count_request_tokens(body, "kimi_k2").tokens
    cold = best_of(lambda: count_request_tokens(body, "kimi_k2"), 5, before=tok.clear_cache)
    warm = best_of(lambda: count_request_tokens(body, "kimi_k2"), 5)
    approx = best_of(lambda: count_request_tokens(body, "approximate"), 5)
    rows += [
        [f"{n:,}-token mixed prompt, kimi_k2, cold cache", f"{cold * 1000:.1f} ms"],
        [f"{n:,}-token mixed prompt, kimi_k2, warm cache", f"{warm * 1000:.1f} ms"],
        [f"{n:,}-token mixed prompt, approximate", f"{approx * 1000:.1f} ms"],
    ]
    small: dict[str, Any] = {
        "model": "kimi-k2-0905-preview",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather in Paris today?"},
        ],
    }
    reps = 20000
    per_call = (
        best_of(lambda: [count_request_tokens(small, "kimi_k2") for _ in range(reps)], 3) / reps
    )
    encode = tok.encode_ordinary
    texts = [m["content"] for m in small["messages"]]
    per_encode = best_of(lambda: [[encode(t) for t in texts] for _ in range(reps)], 3) / reps
    rows += [
        ["2-message prompt, count_request_tokens", f"{per_call * 1e6:.2f} us"],
        ["2-message prompt, the two encode calls alone", f"{per_encode * 1e6:.2f} us"],
    ]
    table(["what", "time"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpora, fewer windows")
    args = parser.parse_args()
    corpora = load_corpora(200_000 if args.quick else 1_500_000)
    published_figures()
    approximation_vs_k2(corpora, 100 if args.quick else 400)
    timings(corpora)


if __name__ == "__main__":
    main()
