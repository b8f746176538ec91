"""Listening sockets: one per (address, port, protocol), with their socket filter."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kpy.core.model import Protocol, ServicePortName
from kpy_userspace.filters import FilterSpec, attach_filter, filter_program
from kpy_userspace.render import (
    Disposition,
    Frontend,
    ListenKey,
    PortTable,
)

if TYPE_CHECKING:
    from kpy_userspace.udp import UdpListener


# Linux constants the socket module does not export.
IP_PKTINFO = 8
IP_FREEBIND = 15


def open_socket(key: ListenKey) -> socket.socket:
    family = socket.AF_INET if key.family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if key.protocol is Protocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a VIP socket and another Service's wildcard NodePort socket may share a port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:  # accepted connections inherit it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == socket.SOCK_DGRAM:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        host = key.address or ("0.0.0.0" if key.family == 4 else "::")
        sock.bind((host, key.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class Listener:
    key: ListenKey
    owner: ServicePortName
    sock: socket.socket
    server: asyncio.AbstractServer | None = None  # TCP
    udp: UdpListener | None = None
    filter: FilterSpec = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()  # accepted connections stay open (graceful)
        if self.udp is not None:
            self.udp.close()
        self.sock.close()

    @property
    def alive(self) -> bool:
        """Still listening: its socket open and (TCP) still accepting. A listener closed
        behind the proxy's back (its socket closed, its server stopped) is drift: not
        counted by a snapshot, reopened by the next full sync."""
        if self.sock.fileno() == -1:
            return False
        return self.server is None or self.server.is_serving()


def set_filter(sock: socket.socket, key: ListenKey, spec: FilterSpec) -> None:
    attach_filter(sock, None if spec is None else filter_program(key.family, spec[1] or None))


def filter_spec(table: PortTable, frontend: Frontend) -> FilterSpec:
    if table.disposition(frontend) is Disposition.DROP:
        return ("drop", ())
    if frontend.source_ranges:
        return ("ranges", frontend.source_ranges)
    return None
