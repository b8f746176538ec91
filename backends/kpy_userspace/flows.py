"""The per-port runtime (endpoint choice, session affinity, counters) and what TCP
connections and UDP sessions share."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from kpy.core.model import Endpoint
from kpy_userspace.render import (
    Disposition,
    Frontend,
    ListenKey,
    PortTable,
    Role,
)


class PortRuntime:
    """One service port on the proxy loop: its table, round-robin cursors, ClientIP
    affinity, open flows and byte counters.

    What a new connection needs from the table (the forwarding frontends by listening
    key, the endpoints per role and family, every live endpoint, each endpoint's socket
    address) is worked out once per table, not once per connection."""

    def __init__(self, table: PortTable) -> None:
        self.listening: set[ListenKey] = set()
        self.cursor: dict[tuple[Role, int], int] = {}
        self.affinity: dict[tuple[Role, str], tuple[Endpoint, float]] = {}
        self.flows: set[Flow] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections = 0
        self.table = table

    @property
    def table(self) -> PortTable:
        return self._table

    @table.setter
    def table(self, table: PortTable) -> None:
        self._table = table
        self._endpoints: dict[tuple[Role, int], tuple[Endpoint, ...]] = {}
        self.forward: dict[ListenKey, Frontend] = {
            fe.key: fe for fe in table.frontends if table.disposition(fe) is Disposition.FORWARD
        }
        self.live: frozenset[Endpoint] = table.endpoint_set()
        self._sockaddrs: dict[Endpoint, tuple[int, tuple[str, int]]] = {}

    def endpoints(self, role: Role, family: int) -> tuple[Endpoint, ...]:
        eps = self._endpoints.get((role, family))
        if eps is None:
            eps = self._endpoints[(role, family)] = self._table.endpoints(role, family)
        return eps

    def sockaddr(self, endpoint: Endpoint) -> tuple[int, tuple[str, int]]:
        """(address family, socket address) to connect to ``endpoint``."""
        found = self._sockaddrs.get(endpoint)
        if found is None:
            family = socket.AF_INET if endpoint.ip.version == 4 else socket.AF_INET6
            found = self._sockaddrs[endpoint] = (family, (str(endpoint.ip), endpoint.port))
        return found

    def candidates(self, frontend: Frontend, client: str, now: float) -> list[Endpoint]:
        """Endpoints to try, in order: the sticky one first, then round robin."""
        eps = self.endpoints(frontend.role, frontend.key.family)
        if not eps:
            return []
        slot = (frontend.role, frontend.key.family)
        start = self.cursor.get(slot, 0) % len(eps)
        self.cursor[slot] = start + 1
        order = [*eps[start:], *eps[:start]]
        if self._table.affinity_timeout is not None:
            sticky = self.affinity.get((frontend.role, client))
            if sticky is not None and sticky[1] > now and sticky[0] in eps:
                order.remove(sticky[0])
                order.insert(0, sticky[0])
        return order

    def chosen(self, frontend: Frontend, client: str, endpoint: Endpoint, now: float) -> None:
        if self._table.affinity_timeout is None:
            return
        if len(self.affinity) > 4096:  # forget expired clients now and then
            self.affinity = {k: v for k, v in self.affinity.items() if v[1] > now}
        self.affinity[(frontend.role, client)] = (endpoint, now + self._table.affinity_timeout)


class Flow:
    """A relayed TCP connection or a UDP session, as the port sees it."""

    __slots__ = ("endpoint", "hard_stop")
    endpoint: Endpoint | None  # the one connected to; None while still connecting
    hard_stop: asyncio.TimerHandle | None  # the end of its grace period, once scheduled

    def abort(self) -> None:
        raise NotImplementedError


def client_ip(peer: Any) -> str:
    host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
    return host.removeprefix("::ffff:")


def source_allowed(frontend: Frontend, client: str) -> bool:
    if not frontend.source_ranges:
        return True
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in frontend.source_ranges)
