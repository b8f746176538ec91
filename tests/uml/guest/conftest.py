"""Fixtures for tests that run inside the UML guest (root of a throwaway kernel)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .netlab import Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("KPY_IN_UML") != "1" or not os.path.exists("/proc/net/ip_vs"):
        skip = pytest.mark.skip(reason="runs only inside the UML guest (tests/uml)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Three pods (IPv4 and IPv6) on the node's bridge and an outside client; one per
    test module."""
    lab = Lab()
    try:
        lab.add_pod("pod1", 1)
        lab.add_pod("pod2", 2)
        lab.add_pod("pod3", 3)
        for index, pod in enumerate(("pod1", "pod2", "pod3"), start=1):
            lab.add_ipv6(pod, index)
        lab.add_client()
        yield lab
    finally:
        lab.close()
