"""Stress tests run at a reduced size unless ``KB_STRESS_SIZE=full``.

An environment variable (not a command-line option) selects the size, because pytest only
reads options from the root conftest; ``python tests/stress/run.py --full`` sets it for you.
"""

from __future__ import annotations

import pytest

from ._harness import Size, current_size


@pytest.fixture(scope="session")
def stress_size() -> Size:
    return current_size()
