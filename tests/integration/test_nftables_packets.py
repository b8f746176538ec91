"""Real packets through the nftables backend's rules (the shared packet suite)."""

from __future__ import annotations

import pytest
from kpy_nftables import NftablesBackend

from kpy.testing.packets import MakeBackend, PacketConformance

pytestmark = pytest.mark.root


class TestNftablesPackets(PacketConformance):
    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        return NftablesBackend
