"""Real packets through the iptables backend's rules: the shared packet suite
(:mod:`kpy.testing.packets` on the :mod:`kpy.testing.netns` topology) in both iptables
flavours, plus what only this backend shows (per-endpoint packet counters in the dump)
and two cases its rules once got wrong: a LoadBalancer IP with source ranges and no
endpoints, and pods told by the Node's pod CIDR (NodeCIDR detect-local mode).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator

import pytest
from kpy_iptables import IptablesBackend

from kpy.core.backend import Backend, BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b
from kpy.testing.netns import CLIENT_IP, NODE_IP, OUTSIDE_IP, POD_B, Topology, tcp, topology
from kpy.testing.packets import (
    NODE,
    MakeBackend,
    PacketConformance,
    applied,
    config_for,
    ranged_lb,
    remote_only,
)

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


def _gap_states() -> list[ServicePortState]:
    return [b.state(ranged_lb("lb-empty"), [], NODE), remote_only()]


@pytest.fixture(scope="module")
def gap_topology() -> Iterator[Topology]:
    with topology("kpy-ig") as topo:
        yield topo


@pytest.mark.parametrize("mode", ["nft", "legacy"])
class TestRenderGaps:
    @pytest.fixture
    def programmed(self, gap_topology: Topology, mode: str) -> Iterator[Topology]:
        # No --cluster-cidr, --detect-local-mode NodeCIDR: pods are told by the Node's
        # pod CIDR (10.244.1.0/24).
        config = dataclasses.replace(
            config_for(gap_topology),
            cluster_cidrs=(),
            detect_local_mode="NodeCIDR",
            options=(("iptables_mode", mode),),
        )
        with applied(IptablesBackend(config), b.plan(_gap_states(), node_info=NODE)):
            yield gap_topology

    def test_source_ranges_without_endpoints_drop_outside_and_reject_inside(
        self, programmed: Topology
    ) -> None:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            tcp(programmed.client, "172.18.0.50", 80, source=OUTSIDE_IP, timeout=1.0)
        assert time.monotonic() - started >= 0.9  # dropped, not rejected
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            tcp(programmed.client, "172.18.0.50", 80, source=CLIENT_IP)
        assert time.monotonic() - started < 0.5

    def test_a_pod_in_the_nodes_pod_cidr_is_short_circuited(self, programmed: Topology) -> None:
        replies = {tcp(programmed.pods["pod-a"], NODE_IP, 30083) for _ in range(5)}
        assert {r.split()[0] for r in replies} == {"pod-b"}
        # an outside client still finds no local endpoint
        with pytest.raises(TimeoutError):
            tcp(programmed.client, NODE_IP, 30083, timeout=1.0)
