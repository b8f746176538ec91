"""Real packets through the iptables backend's rules: the shared packet suite
(:mod:`kpy.testing.packets` on the :mod:`kpy.testing.netns` topology) in both iptables
flavours, plus what only this backend shows (per-endpoint packet counters in the dump).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from kpy_iptables import IptablesBackend

from kpy.backend import Backend, BackendConfig
from kpy.testing.netns import POD_B, Topology, tcp
from kpy.testing.packets import MakeBackend, PacketConformance

pytestmark = pytest.mark.root


class TestIptablesNftPackets(PacketConformance):
    mode = "nft"

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        def make(config: BackendConfig) -> Backend:
            options = (*config.options, ("iptables_mode", self.mode))
            return IptablesBackend(dataclasses.replace(config, options=options))

        return make

    def test_dump_counts_packets_per_endpoint(
        self, topology: Topology, programmed: Backend
    ) -> None:
        for _ in range(5):
            tcp(topology.client, "192.0.2.10", 80)
        view = asyncio.run(programmed.observe()).services["default/ext:http/TCP"]
        assert view.frontends == ("10.96.0.14:80/TCP", "192.0.2.10:80/TCP")
        assert view.endpoints == (f"{POD_B}:8080",)
        assert int(view.extra[f"packets {POD_B}:8080"]) >= 5


class TestIptablesLegacyPackets(TestIptablesNftPackets):
    mode = "legacy"
