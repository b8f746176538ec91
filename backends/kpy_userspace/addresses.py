"""The Service addresses the proxy binds, kept on ``lo`` of the node's namespace."""

from __future__ import annotations

import ipaddress

from kpy.core.model import IPAddress
from kpy_userspace.render import (
    ADDRESS_PROTO,
    INTERFACE,
)


class Addresses:
    """This backend's VIP addresses on the namespace's ``lo`` (IFA_PROTO marks them).

    pyroute2's asynchronous API on the proxy loop: its netlink socket is made on the
    proxy thread, inside the namespace (the synchronous API runs a loop of its own,
    which cannot run on a thread whose loop is already running)."""

    def __init__(self) -> None:
        from pyroute2 import AsyncIPRoute  # on the proxy thread, inside the namespace

        self.ipr = AsyncIPRoute()
        self.index = 0

    async def setup(self) -> None:
        await self.ipr.setup_endpoint()
        self.index = (await self.ipr.link_lookup(ifname=INTERFACE))[0]

    async def list(self) -> tuple[set[IPAddress], set[IPAddress]]:
        """(ours, everyone's) addresses on lo."""
        ours: set[IPAddress] = set()
        every: set[IPAddress] = set()
        async for msg in await self.ipr.get_addr(index=self.index):
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            every.add(addr)
            if msg.get_attr("IFA_PROTO") == ADDRESS_PROTO:
                ours.add(addr)
        return ours, every

    async def add(self, address: IPAddress) -> None:
        await self.ipr.addr(
            "add",
            index=self.index,
            address=str(address),
            prefixlen=address.max_prefixlen,
            proto=ADDRESS_PROTO,
        )

    async def remove(self, address: IPAddress) -> None:
        await self.ipr.addr(
            "del", index=self.index, address=str(address), prefixlen=address.max_prefixlen
        )

    def close(self) -> None:
        self.ipr.close()
