"""UDP relaying: one session per client address, each with its own connected socket to
one endpoint; replies leave through the listener from the address the client used."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Any

from kpy.core.model import Endpoint
from kpy_userspace.flows import Flow, PortRuntime, client_ip, source_allowed
from kpy_userspace.listeners import IP_PKTINFO
from kpy_userspace.render import (
    ListenKey,
)

if TYPE_CHECKING:
    from kpy_userspace.proxy import Proxy


UDP_MAX = 65535


class UdpSession(Flow):
    """One client of one UDP frontend, talking to one endpoint over a connected socket."""

    def __init__(
        self,
        listener: UdpListener,
        port: PortRuntime,
        client: tuple[Any, ...],
        local: bytes,
        endpoint: Endpoint,
        sock: socket.socket,
    ) -> None:
        self.listener = listener
        self.port = port
        self.client = client
        self.local = local  # the packed address the client sent to (reply source)
        self.endpoint = endpoint
        self.hard_stop = None
        self.sock = sock
        self.last = listener.proxy.loop.time()
        self.closed = False
        self.idle = listener.proxy.loop.call_later(
            listener.proxy.settings.udp_idle_timeout, self._check_idle
        )
        listener.proxy.loop.add_reader(sock.fileno(), self._readable)

    def send(self, data: bytes) -> None:
        self.last = self.listener.proxy.loop.time()
        try:
            self.sock.send(data)
            self.port.bytes_in += len(data)
        except BlockingIOError:
            pass  # a full buffer drops the datagram, as a kernel queue would
        except OSError:
            self.abort()  # e.g. the endpoint answered ICMP unreachable: pick anew next time

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(UDP_MAX)
            except BlockingIOError:
                return
            except OSError:
                self.abort()
                return
            self.last = self.listener.proxy.loop.time()
            self.port.bytes_out += len(data)
            self.listener.reply(data, self.local, self.client)

    def _check_idle(self) -> None:
        loop = self.listener.proxy.loop
        left = self.last + self.listener.proxy.settings.udp_idle_timeout - loop.time()
        if left > 0:
            self.idle = loop.call_later(left, self._check_idle)
        else:
            self.abort()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.idle.cancel()
        if self.hard_stop is not None:
            self.hard_stop.cancel()
        self.listener.proxy.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.listener.sessions.pop(self.client, None)
        self.port.flows.discard(self)


class UdpListener:
    """A UDP frontend socket: datagrams in, sessions out, replies from the right address."""

    def __init__(self, proxy: Proxy, key: ListenKey, sock: socket.socket) -> None:
        self.proxy = proxy
        self.key = key
        self.sock = sock
        self.family = sock.family
        self.sessions: dict[tuple[Any, ...], UdpSession] = {}
        proxy.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, ancillary, _flags, client = self.sock.recvmsg(UDP_MAX, socket.CMSG_SPACE(64))
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket; the next read goes on
            session = self.sessions.get(client)
            if session is None:
                session = self._open(client, self._destination(ancillary))
                if session is None:
                    continue
            session.send(data)

    def _destination(self, ancillary: list[tuple[int, int, bytes]]) -> bytes:
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                return data[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                return data[:16]  # struct in6_pktinfo: addr, ifindex
        return b""

    def _open(self, client: tuple[Any, ...], local: bytes) -> UdpSession | None:
        found = self.proxy.frontend_of(self.key)
        if found is None:
            return None
        port, frontend = found
        who = client_ip(client)
        if not source_allowed(frontend, who):
            return None
        now = self.proxy.loop.time()
        for endpoint in port.candidates(frontend, who, now):
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(port.sockaddr(endpoint)[1])
            except OSError:
                sock.close()
                continue
            port.chosen(frontend, who, endpoint, now)
            port.connections += 1
            session = UdpSession(self, port, client, local, endpoint, sock)
            self.sessions[client] = session
            port.flows.add(session)
            return session
        return None

    def reply(self, data: bytes, local: bytes, client: tuple[Any, ...]) -> None:
        ancillary: list[tuple[int, int, bytes]] = []
        if len(local) == 4:
            ancillary = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, local, b""))]
        elif len(local) == 16:
            ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", local, 0))]
        with contextlib.suppress(OSError):  # full buffer or vanished client: dropped
            self.sock.sendmsg([data], ancillary, 0, client)

    def close(self) -> None:
        self.proxy.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        # sessions keep their own sockets; they end by idle timeout or endpoint removal
