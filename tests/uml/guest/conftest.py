"""Fixtures for tests that run inside the UML guest (root of a throwaway kernel)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("KPY_IN_UML") != "1" or not os.path.exists("/proc/net/ip_vs"):
        skip = pytest.mark.skip(reason="runs only inside the UML guest (tests/uml)")
        for item in items:
            item.add_marker(skip)
