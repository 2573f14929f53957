"""The trafficmgr pytest plugin (entry point ``pytest11``): options and fixtures for plugin authors.

- ``--update-golden``: rewrite golden files instead of comparing them (fixture ``update_golden``).
"""

from __future__ import annotations

import pytest

from trafficmgr.testing.golden import UPDATE_FLAG


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trafficmgr")
    group.addoption(UPDATE_FLAG, action="store_true", default=False, help="rewrite golden files instead of comparing")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when pytest runs with ``--update-golden``."""
    return bool(request.config.getoption(UPDATE_FLAG))
