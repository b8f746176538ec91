"""The shared conformance suite against the iptables backend, in both flavours.

Each test gets its own network namespace (created here, deleted afterwards even when
the test fails); the backend programs nothing outside it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kpy_iptables import IptablesBackend

from kpy.core.backend import Backend, BackendConfig
from kpy.testing.conformance import BackendConformance

pytestmark = pytest.mark.root


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
