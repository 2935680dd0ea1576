"""Counts the examples hypothesis tries in each test module, for ``tests/stress/run.py``.

A test calls ``tried(__name__)`` once per example; ``tests/conftest.py`` appends each module's
count to the file named by ``KB_FUZZ_TALLY`` when the module finishes.
"""

from __future__ import annotations

import os
from collections import Counter

_counts: Counter[str] = Counter()


def tried(module: str) -> None:
    _counts[module] += 1


def flush(module: str) -> None:
    target = os.environ.get("KB_FUZZ_TALLY")
    if target and module in _counts:
        with open(target, "a", encoding="utf-8") as out:
            out.write(f"{module} {_counts.pop(module)}\n")
