"""What the stand-in knows: models, the canned reply, the balance, cache and wire constants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ModelInfo:
    """What the stand-in knows about a model."""

    context_window: int
    default_max_tokens: int = 1024


# Windows and default outputs as in kimi_budget/pricing/usd.toml (moonshot-models-2026.md). The
# 2025 models are retired on the real service; here they still answer unless passed in
# ``retired=``, so that tests written against them keep working.
KNOWN_MODELS: Final[Mapping[str, ModelInfo]] = {
    "kimi-k2.5": ModelInfo(262_144),
    "kimi-k2-0905-preview": ModelInfo(262_144),
    "kimi-k2-0711-preview": ModelInfo(131_072),
    "kimi-k2-turbo-preview": ModelInfo(262_144),
    "kimi-k2-thinking": ModelInfo(262_144),
    "kimi-k2-thinking-turbo": ModelInfo(262_144),
    "kimi-k2.6": ModelInfo(262_144, 32_768),
    "kimi-k2.7-code": ModelInfo(262_144, 32_768),
    "kimi-k2.7-code-highspeed": ModelInfo(262_144, 32_768),
    "kimi-k3": ModelInfo(1_048_576, 131_072),
    "kimi-k3.1-pro": ModelInfo(1_048_576, 131_072),
    "kimi-k3.1-pro-highspeed": ModelInfo(1_048_576, 131_072),
    "moonshot-v1-8k": ModelInfo(8_192),
    "moonshot-v1-32k": ModelInfo(32_768),
    "moonshot-v1-128k": ModelInfo(131_072),
    "moonshot-v1-8k-vision-preview": ModelInfo(8_192),
    "moonshot-v1-32k-vision-preview": ModelInfo(32_768),
    "moonshot-v1-128k-vision-preview": ModelInfo(131_072),
}

DEFAULT_REPLY: Final = (
    "Hello! This is the kimi-budget stand-in for Moonshot's Kimi API. The reply is canned, "
    "and its tokens are counted with the Kimi K2 tokenizer, so usage is exact and repeatable."
)

DEFAULT_BALANCE: Final[Mapping[str, float]] = {
    "available_balance": 49.58894,
    "voucher_balance": 46.58893,
    "cash_balance": 3.00001,
}

# Moonshot's cache only serves prompts above this size (moonshot-api.md).
CACHE_MIN_PROMPT_TOKENS: Final = 256
CACHE_BLOCK_TOKENS: Final = 16

_USAGE_STYLES: Final = ("moonshot", "openai", "both")
# Sized so a 100_000-chunk benchmark stream costs a few hundred syscalls, not 100_000.
_STREAM_FLUSH_BYTES: Final = 32 * 1024
