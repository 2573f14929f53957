"""The one rule for test prerequisites: a test that cannot run here is skipped, but under ``CI`` it fails,
so a missing install step never turns into a silent skip."""

from __future__ import annotations

import os
from typing import NoReturn


def missing(reason: str) -> NoReturn:
    """Call from a test or fixture when a prerequisite (a tool, a kernel feature) is missing."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)
