"""The shared conformance suite against the iptables backend, in both flavours.

Each test gets its own network namespace (created here, deleted afterwards even when
the test fails); the backend programs nothing outside it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
from kpy_iptables import IptablesBackend

from kpy.backend import Backend, BackendConfig
from kpy.testing.conformance import BackendConformance
from tests.conftest import require_root

pytestmark = pytest.mark.root

_counter = iter(range(1_000_000))


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = f"kpy-ipt-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _config(netns: str, mode: str) -> BackendConfig:
    return BackendConfig(
        node_name="node-a",
        cluster_cidrs=(),
        netns=netns,
        options=(("iptables_mode", mode),),
    )


class TestIptablesNftConformance(BackendConformance):
    mode = "nft"

    @pytest.fixture
    def make_backend(self, netns: str) -> Callable[[], Backend]:
        return lambda: IptablesBackend(_config(netns, self.mode))


class TestIptablesLegacyConformance(TestIptablesNftConformance):
    mode = "legacy"
