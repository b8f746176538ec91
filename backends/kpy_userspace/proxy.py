"""The userspace data plane: TCP and UDP relays for every service port, on one event loop.

:class:`Proxy` owns a dedicated thread that enters the node's network namespace once
and runs its own asyncio event loop there. Every socket the proxy makes (listeners,
connections to endpoints, UDP sessions, the netlink socket for ``lo``'s addresses) is
created on that thread, so it lives in the node namespace for its whole life. The
agent's loop (or ``asyncio.run`` in a test) talks to it only through :meth:`Proxy.call`,
which hands a coroutine over with ``run_coroutine_threadsafe``; all proxy state is
touched on the proxy thread only, so nothing here needs a lock.

TCP: each accepted connection is a pair of :class:`asyncio.Protocol` objects (no thread
and no task per byte): reads on one side pause while the other side's write buffer is
above its high-water mark (backpressure), an EOF is passed on as a write shutdown
(half-close), and the pair closes once both directions have ended. A new connection
costs no task and no future either: the accept callback chooses the endpoints and
starts a non-blocking connect to the first, watched with ``add_writer`` and a timer,
and both transports come straight from the selector loop's transport factory
(docs/decisions/userspace.md). UDP: a session per
client address with its own connected socket to one endpoint; replies are sent back
through the listener with ``IP_PKTINFO`` / ``IPV6_PKTINFO`` naming the address the
client used, so a NodePort on a wildcard socket answers from the right address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog

from kpy.core.model import Endpoint, IPAddress, IPNetwork, Protocol, ServicePortName
from kpy.kernel.netns import run_in_netns
from kpy_userspace.render import (
    ADDRESS_PROTO,
    INTERFACE,
    Disposition,
    Frontend,
    ListenKey,
    PortTable,
    Role,
)

T = TypeVar("T")
log = structlog.get_logger("kpy.userspace")

# Linux constants the socket module does not export.
IP_PKTINFO = 8
IP_FREEBIND = 15
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SKF_NET_OFF = -0x100000
BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JMP_JEQ_K, BPF_RET_K = 0x20, 0x54, 0x15, 0x06

WRITE_HIGH_WATER = 256 * 1024
UDP_MAX = 65535


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    connect_timeout: float = 2.0  # seconds before trying the next endpoint
    grace_period: float = 30.0  # hard limit for connections to removed endpoints
    udp_idle_timeout: float = 30.0  # a UDP session ends after this long without traffic


@dataclass(slots=True, kw_only=True)
class SyncResult:
    addresses_added: int = 0
    addresses_removed: int = 0
    listeners_opened: int = 0
    listeners_closed: int = 0
    tables_changed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return (
            self.addresses_added
            + self.addresses_removed
            + self.listeners_opened
            + self.listeners_closed
            + self.tables_changed
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PortStats:
    table: PortTable
    listeners: int
    active: int  # open TCP connections and UDP sessions
    bytes_in: int  # client → endpoint
    bytes_out: int  # endpoint → client
    connections: int  # accepted since the port was installed


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    addresses: frozenset[IPAddress]  # this backend's addresses on lo, read from the kernel
    listeners: frozenset[ListenKey]  # the ones still listening
    ports: Mapping[ServicePortName, PortStats]


# --- socket filters: drop, or admit only some source ranges, in the kernel ------------------


def filter_program(family: int, ranges: tuple[IPNetwork, ...] | None) -> list[bytes]:
    """A classic BPF program for a listening socket: None drops every packet (a Local
    policy with no local endpoint); otherwise it admits packets whose source address is
    in one of ``ranges`` and drops the rest. Dropped SYNs never open a connection."""
    insns: list[bytes] = []

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)

    source_offset = 12 if family == 4 else 8  # IPv4 / IPv6 header
    for net in ranges or ():
        block: list[tuple[int, int, int, int]] = []
        packed, mask = net.network_address.packed, net.netmask.packed
        for i in range(len(packed) // 4):
            m = int.from_bytes(mask[4 * i : 4 * i + 4], "big")
            if m == 0:
                continue
            n = int.from_bytes(packed[4 * i : 4 * i + 4], "big")
            block.append((BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + source_offset + 4 * i))
            block.append((BPF_ALU_AND_K, 0, 0, m))
            block.append((BPF_JMP_JEQ_K, 0, -1, n))  # jf patched below: the next range
        block.append((BPF_RET_K, 0, 0, 0xFFFFFFFF))
        for j, (code, jt, jf, k) in enumerate(block):
            insns.append(insn(code, jt, len(block) - j - 1 if jf == -1 else jf, k))
    insns.append(insn(BPF_RET_K, 0, 0, 0))
    return insns


def attach_filter(sock: socket.socket, insns: list[bytes] | None) -> None:
    if insns is None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        return
    code = ctypes.create_string_buffer(b"".join(insns))
    fprog = struct.pack("@HL", len(insns), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# ("drop", ()) or ("ranges", source ranges) or None (no filter)
_FilterSpec = tuple[str, tuple[IPNetwork, ...]] | None


# --- the port runtime: endpoint choice, affinity, counters -------------------------------------


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
        self.flows: set[_Flow] = set()
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


class _Flow:
    """A TCP connection pair or a UDP session, as the port sees it."""

    endpoint: Endpoint | None = None
    hard_stop: asyncio.TimerHandle | None = None

    def abort(self) -> None:
        raise NotImplementedError


def _client_ip(peer: Any) -> str:
    host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
    return host.removeprefix("::ffff:")


def _allowed(frontend: Frontend, client: str) -> bool:
    if not frontend.source_ranges:
        return True
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in frontend.source_ranges)


# --- TCP ------------------------------------------------------------------------------------


class _Inbound(asyncio.Protocol, _Flow):
    """The client's side of one relayed TCP connection.

    Made by :class:`_Server` right after ``accept()``, with the endpoints to try already
    chosen. The connection to the first one starts at once, as a non-blocking
    ``connect()`` watched with ``add_writer`` and a timer (no task, no future); the
    client's reads stay paused until an endpoint has answered."""

    def __init__(
        self,
        proxy: Proxy,
        port: PortRuntime,
        frontend: Frontend,
        client: str,
        candidates: list[Endpoint],
    ) -> None:
        self.proxy = proxy
        self.port = port
        self.frontend = frontend
        self.client = client
        self.candidates = candidates
        self.tried = 0
        self.transport: asyncio.Transport | None = None
        self.upstream: _Outbound | None = None
        # a connect under way: the socket, its endpoint and socket address
        self.pending: tuple[socket.socket, Endpoint, tuple[str, int]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.relaying = False  # the endpoint answered: the client's reads are on
        self.early: list[bytes] = []  # what the client sent before that
        self.eof_in = False
        self.eof_out = False
        self.closed = False
        port.flows.add(self)
        port.connections += 1

    # client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.closed:  # every endpoint failed before the transport came
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.relaying:
            self.transport.pause_reading()

    # the connection to an endpoint
    def connect_next(self) -> None:
        """Start connecting to the next candidate; none left: reset the client."""
        while not self.closed and self.tried < len(self.candidates):
            endpoint = self.candidates[self.tried]
            self.tried += 1
            family, address = self.port.sockaddr(endpoint)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # EMFILE and friends
                _connect_failed(endpoint, exc.strerror)
                continue
            try:
                sock.setblocking(False)
                err = sock.connect_ex(address)
            except OSError as exc:
                sock.close()
                _connect_failed(endpoint, exc.strerror)
                continue
            if err == 0:
                self._connected(sock, endpoint, address)
            elif err == errno.EINPROGRESS:
                loop = self.proxy.loop
                self.pending = (sock, endpoint, address)
                loop.add_writer(sock.fileno(), self._connect_done)
                self.timer = loop.call_later(
                    self.proxy.settings.connect_timeout, self._connect_timed_out
                )
            else:
                sock.close()
                _connect_failed(endpoint, os.strerror(err))
                continue
            return
        if not self.closed:
            log.info(
                "userspace_no_endpoint_answered",
                service=str(self.port.table.name),
                client=self.client,
            )
            self.abort()

    def _stop_connecting(self) -> tuple[socket.socket, Endpoint, tuple[str, int]] | None:
        pending, self.pending = self.pending, None
        if pending is not None:
            self.proxy.loop.remove_writer(pending[0].fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return pending

    def _connect_done(self) -> None:
        pending = self._stop_connecting()
        if pending is None:
            return
        sock, endpoint, address = pending
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            _connect_failed(endpoint, os.strerror(err))
            self.connect_next()
            return
        self._connected(sock, endpoint, address)

    def _connect_timed_out(self) -> None:
        self.timer = None
        pending = self._stop_connecting()
        if pending is not None:
            pending[0].close()
            _connect_failed(pending[1], "timed out")
            self.connect_next()

    def _connected(self, sock: socket.socket, endpoint: Endpoint, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.port.chosen(self.frontend, self.client, endpoint, self.proxy.loop.time())
        self.upstream = _Outbound(self)
        try:
            self.upstream.transport = self.proxy.transport_for(sock, self.upstream, address)
        except OSError:
            sock.close()
            self.abort()

    def upstream_connected(self) -> None:
        """The endpoint's transport is up: relay."""
        if self.endpoint not in self.port.live:  # removed while connecting
            self.proxy.schedule_hard_stop(self)
        self.relaying = True
        for data in self.early:
            self.data_received(data)
        self.early.clear()
        if self.eof_in:
            self.eof_received()
        elif self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if not self.relaying:
            # A loop may deliver data before a pause in connection_made takes effect:
            # kept until the endpoint answers, reading paused again meanwhile.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)
            self.port.bytes_in += len(data)

    def eof_received(self) -> bool:
        self.eof_in = True
        if not self.relaying:
            return True  # passed on once the endpoint answers
        upstream = self.upstream.transport if self.upstream is not None else None
        if upstream is not None and upstream.can_write_eof():
            upstream.write_eof()
        self._maybe_close()
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc is not None)

    # the endpoint's side reports here
    def upstream_data(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.port.bytes_out += len(data)

    def upstream_eof(self) -> None:
        self.eof_out = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def upstream_lost(self, exc: Exception | None) -> None:
        self._finish(exc is not None)

    def _maybe_close(self) -> None:
        if self.eof_in and self.eof_out:
            self._finish(False)

    def abort(self) -> None:
        self._finish(True)

    def _finish(self, error: bool) -> None:
        if self.closed:
            return
        self.closed = True
        pending = self._stop_connecting()
        if pending is not None:
            pending[0].close()
        if self.hard_stop is not None:
            self.hard_stop.cancel()
        for transport in (
            self.transport,
            self.upstream.transport if self.upstream is not None else None,
        ):
            if transport is None:
                continue
            if error:
                transport.abort()
            else:
                transport.close()  # flushes what is buffered first
        self.port.flows.discard(self)


def _connect_failed(endpoint: Endpoint, error: str | None) -> None:
    log.debug("userspace_connect_failed", endpoint=str(endpoint), error=error)


class _Outbound(asyncio.Protocol):
    """The endpoint's side of one relayed TCP connection."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.inbound.closed:  # the client left while the transport was being made
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.inbound.upstream_connected()

    def data_received(self, data: bytes) -> None:
        self.inbound.upstream_data(data)

    def eof_received(self) -> bool:
        self.inbound.upstream_eof()
        return True

    def pause_writing(self) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.inbound.transport is not None and not self.inbound.closed:
            self.inbound.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbound.upstream_lost(exc)


# --- UDP ------------------------------------------------------------------------------------


class _UdpSession(_Flow):
    """One client of one UDP frontend, talking to one endpoint over a connected socket."""

    def __init__(
        self,
        listener: _UdpListener,
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


class _UdpListener:
    """A UDP frontend socket: datagrams in, sessions out, replies from the right address."""

    def __init__(self, proxy: Proxy, key: ListenKey, sock: socket.socket) -> None:
        self.proxy = proxy
        self.key = key
        self.sock = sock
        self.family = sock.family
        self.sessions: dict[tuple[Any, ...], _UdpSession] = {}
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

    def _open(self, client: tuple[Any, ...], local: bytes) -> _UdpSession | None:
        found = self.proxy.frontend_of(self.key)
        if found is None:
            return None
        port, frontend = found
        who = _client_ip(client)
        if not _allowed(frontend, who):
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
            session = _UdpSession(self, port, client, local, endpoint, sock)
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


# --- listeners --------------------------------------------------------------------------------


def _open_socket(key: ListenKey) -> socket.socket:
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
class _Listener:
    key: ListenKey
    owner: ServicePortName
    sock: socket.socket
    server: asyncio.AbstractServer | None = None  # TCP
    udp: _UdpListener | None = None
    filter: _FilterSpec = None

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


def _set_filter(sock: socket.socket, key: ListenKey, spec: _FilterSpec) -> None:
    attach_filter(sock, None if spec is None else filter_program(key.family, spec[1] or None))


def _filter_spec(table: PortTable, frontend: Frontend) -> _FilterSpec:
    if table.disposition(frontend) is Disposition.DROP:
        return ("drop", ())
    if frontend.source_ranges:
        return ("ranges", frontend.source_ranges)
    return None


# --- addresses on lo ------------------------------------------------------------------------


class _Addresses:
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


# --- the proxy --------------------------------------------------------------------------------


class Proxy:
    """The data plane: a thread in the node namespace running one event loop."""

    def __init__(self, netns: str | None, settings: Settings) -> None:
        self.netns = netns
        self.settings = settings
        self.loop = asyncio.new_event_loop()  # runs on the proxy thread once started
        # the selector loop's transport factory, used directly (see transport_for)
        self.make_transport: Callable[..., asyncio.Transport] | None = getattr(
            self.loop, "_make_socket_transport", None
        )
        self._adopting: set[asyncio.Task[Any]] = set()
        self.ports: dict[ServicePortName, PortRuntime] = {}
        self.listeners: dict[ListenKey, _Listener] = {}
        self.owned: set[IPAddress] = set()  # addresses this backend put on lo
        self.users: dict[IPAddress, int] = {}  # how many installed tables need each address
        self._addresses: _Addresses | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._lock = threading.Lock()

    # --- life cycle (any thread) --------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name=f"kpy-userspace-{self.netns or 'host'}", daemon=True
                )
                self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        if self.loop.is_closed():
            raise RuntimeError("the userspace proxy was stopped")

    def _main(self) -> None:
        def body() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self._addresses = _Addresses()
                self.loop.run_until_complete(self._addresses.setup())
            except BaseException as exc:  # handed to start()'s caller
                self._start_error = exc
                if self._addresses is not None:
                    self._addresses.close()
                self.loop.close()
                self._started.set()
                return
            self._started.set()
            try:
                self.loop.run_forever()
            finally:
                self._close_everything()
                self.loop.close()

        try:
            run_in_netns(self.netns, body)
        except BaseException as exc:  # the namespace vanished before we entered it
            self._start_error = exc
            self._started.set()

    async def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the proxy loop from another loop and await its result."""
        self.start()
        future = asyncio.run_coroutine_threadsafe(factory(), self.loop)
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """Close every socket and end the thread (what an agent's exit does). Addresses on
        ``lo`` stay, so a restarted agent adopts them. Idempotent; any thread."""
        with self._lock:
            thread = self._thread
            if thread is None:  # never started: nothing but the loop to close
                self._thread = threading.current_thread()
                self._started.set()
                self._start_error = RuntimeError("the userspace proxy was stopped")
                self.loop.close()
                return
        if not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not thread:
            thread.join(timeout=10)

    def _close_everything(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for port in self.ports.values():
            for flow in list(port.flows):
                flow.abort()
        self.ports.clear()
        if self._addresses is not None:
            self._addresses.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        # let closed transports and cancelled tasks finish before the loop goes
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    # --- on the proxy loop -------------------------------------------------------------------

    def frontend_of(self, key: ListenKey) -> tuple[PortRuntime, Frontend] | None:
        listener = self.listeners.get(key)
        if listener is None:
            return None
        port = self.ports.get(listener.owner)
        if port is None:
            return None
        frontend = port.forward.get(key)
        return None if frontend is None else (port, frontend)

    def transport_for(
        self, sock: socket.socket, protocol: asyncio.Protocol, peer: Any
    ) -> asyncio.Transport | None:
        """A transport of the proxy loop for a connected socket; ``protocol``'s
        ``connection_made`` follows on the loop. With the selector loop's own transport
        factory (what ``connect_accepted_socket`` calls, minus the task and the future
        it wraps around it) the transport is returned at once; without it (another
        loop implementation) ``connect_accepted_socket`` runs as a task and None is
        returned: the transport arrives through ``connection_made``."""
        if self.make_transport is not None:
            return self.make_transport(sock, protocol, extra={"peername": peer})
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: protocol, sock))
        self._adopting.add(task)

        def adopted(task: asyncio.Task[Any]) -> None:
            self._adopting.discard(task)
            error = None if task.cancelled() else task.exception()
            if task.cancelled() or error is not None:
                sock.close()
                protocol.connection_lost(error if isinstance(error, Exception) else None)

        task.add_done_callback(adopted)
        return None

    def schedule_hard_stop(self, flow: _Flow) -> None:
        if flow.hard_stop is None:
            flow.hard_stop = self.loop.call_later(self.settings.grace_period, flow.abort)

    async def sync(
        self, updates: Mapping[ServicePortName, PortTable | None], *, replace: bool
    ) -> SyncResult:
        """Install, change or remove the given ports. ``replace``: ``updates`` is the
        whole desired state (a full sync): every other port goes, the addresses on ``lo``
        are read back and adopted, strays removed."""
        assert self._addresses is not None
        result = SyncResult()
        updates = dict(updates)
        if replace:
            for name in self.ports:
                updates.setdefault(name, None)
            ours, _ = await self._addresses.list()
            self.owned = ours
        # 1. addresses first, so listeners can bind them
        delta: dict[IPAddress, int] = {}
        for name, new in updates.items():
            old = self.ports[name].table if name in self.ports else None
            for addr in old.addresses if old is not None else ():
                delta[addr] = delta.get(addr, 0) - 1
            for addr in new.addresses if new is not None else ():
                delta[addr] = delta.get(addr, 0) + 1
        for addr, change in delta.items():
            count = self.users.get(addr, 0) + change
            if count > 0:
                self.users[addr] = count
            else:
                self.users.pop(addr, None)
        need = [a for a, c in delta.items() if c > 0 and a in self.users]
        if replace:
            need = list(self.users)
        if need:
            _, every = await self._addresses.list()
            for addr in sorted(need, key=lambda a: (a.version, int(a))):
                if addr in every:
                    continue  # ours already (adopted), or someone else's: not ours to add
                try:
                    await self._addresses.add(addr)
                except Exception as exc:  # pyroute2's NetlinkError
                    result.errors.append(f"adding {addr} to {INTERFACE}: {exc}")
                    continue
                self.owned.add(addr)
                result.addresses_added += 1
        # 2. tables and listeners
        for name in sorted(updates):
            new = updates[name]
            if new is None:
                self._remove_port(name, result)
            else:
                self._install_port(new, result)
        # 3. addresses nobody needs any more
        unused = (
            self.owned - set(self.users)
            if replace
            else {a for a in delta if a in self.owned and a not in self.users}
        )
        for addr in sorted(unused, key=lambda a: (a.version, int(a))):
            try:
                await self._addresses.remove(addr)
            except Exception as exc:  # pyroute2's NetlinkError
                result.errors.append(f"removing {addr} from {INTERFACE}: {exc}")
                continue
            self.owned.discard(addr)
            result.addresses_removed += 1
        return result

    def _remove_port(self, name: ServicePortName, result: SyncResult) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            return
        result.tables_changed += 1
        for key in port.listening:
            self._close_listener(key, result)
        for flow in list(port.flows):  # existing flows finish, up to the grace period
            if isinstance(flow, _UdpSession):
                flow.abort()
            else:
                self.schedule_hard_stop(flow)

    def _install_port(self, table: PortTable, result: SyncResult) -> None:
        port = self.ports.get(table.name)
        if port is None:
            port = self.ports[table.name] = PortRuntime(table)
            result.tables_changed += 1
        elif port.table != table:
            port.table = table
            result.tables_changed += 1
            keep = port.live
            for flow in list(port.flows):
                if flow.endpoint is None or flow.endpoint in keep:
                    if flow.hard_stop is not None:  # the endpoint came back
                        flow.hard_stop.cancel()
                        flow.hard_stop = None
                elif isinstance(flow, _UdpSession):
                    flow.abort()  # as conntrack cleanup does: the next datagram picks anew
                else:
                    self.schedule_hard_stop(flow)
        wanted = {fe.key: fe for fe in table.listening()}
        for key in sorted(port.listening - set(wanted)):
            self._close_listener(key, result)
            port.listening.discard(key)
        for key, frontend in sorted(wanted.items()):
            listener = self.listeners.get(key)
            if listener is not None and not listener.alive and listener.owner == table.name:
                log.warning(
                    "userspace_listener_reopened", service=str(table.name), frontend=str(key)
                )
                self._close_listener(key, result)
                port.listening.discard(key)
                listener = None
            if listener is not None and listener.owner != table.name:
                log.warning(
                    "userspace_frontend_conflict",
                    service=str(table.name),
                    held_by=str(listener.owner),
                    frontend=str(key),
                )
                continue
            spec = _filter_spec(table, frontend)
            try:
                if listener is None:
                    listener = self._open_listener(key, table.name, spec)
                    result.listeners_opened += 1
                    port.listening.add(key)
                elif listener.filter != spec:
                    _set_filter(listener.sock, key, spec)
                    listener.filter = spec
            except OSError as exc:
                result.errors.append(f"listening on {key} for {table.name}: {exc}")

    def _open_listener(
        self, key: ListenKey, owner: ServicePortName, spec: _FilterSpec
    ) -> _Listener:
        sock = _open_socket(key)
        try:
            _set_filter(sock, key, spec)  # before listen(): no SYN slips past it
        except OSError:
            sock.close()
            raise
        listener = _Listener(key=key, owner=owner, sock=sock, filter=spec)
        if key.protocol is Protocol.TCP:
            sock.listen(4096)
            listener.server = _Server(self, key, sock)
        else:
            listener.udp = _UdpListener(self, key, sock)
        self.listeners[key] = listener
        return listener

    def _close_listener(self, key: ListenKey, result: SyncResult) -> None:
        listener = self.listeners.pop(key, None)
        if listener is not None:
            listener.close()
            result.listeners_closed += 1

    async def snapshot(self) -> Snapshot:
        assert self._addresses is not None
        ours, _ = await self._addresses.list()
        ports = {
            name: PortStats(
                table=port.table,
                listeners=len(port.listening),
                active=len(port.flows),
                bytes_in=port.bytes_in,
                bytes_out=port.bytes_out,
                connections=port.connections,
            )
            for name, port in self.ports.items()
        }
        alive = frozenset(k for k, listener in self.listeners.items() if listener.alive)
        return Snapshot(addresses=frozenset(ours), listeners=alive, ports=ports)

    async def remove_all(self) -> int:
        """Close everything and remove every address of ours on ``lo`` (cleanup)."""
        assert self._addresses is not None
        removed = 0
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for port in self.ports.values():
            for flow in list(port.flows):
                flow.abort()
        self.ports.clear()
        self.users.clear()
        ours, _ = await self._addresses.list()
        for addr in ours:
            await self._addresses.remove(addr)
            removed += 1
        self.owned.clear()
        return removed


class _Server(asyncio.AbstractServer):
    """Accepts on a listening socket with ``loop.add_reader``, up to 128 connections per
    wake-up. Each one gets its endpoint candidates and starts connecting to the first in
    the same callback; its transport comes from :meth:`Proxy.transport_for`."""

    def __init__(self, proxy: Proxy, key: ListenKey, sock: socket.socket) -> None:
        self.proxy = proxy
        self.key = key
        self.sock = sock
        self.open = True
        proxy.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        proxy = self.proxy
        for _ in range(128):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                log.warning("userspace_accept_failed", frontend=str(self.key), error=str(exc))
                return
            found = proxy.frontend_of(self.key)
            client = _client_ip(peer)
            # a filter normally drops clients outside the source ranges before the
            # handshake; closing an unread connection resets it
            if found is None or not _allowed(found[1], client):
                conn.close()
                continue
            port, frontend = found
            candidates = port.candidates(frontend, client, proxy.loop.time())
            if not candidates:
                conn.close()
                continue
            inbound = _Inbound(proxy, port, frontend, client, candidates)
            try:
                conn.setblocking(False)
                inbound.transport = proxy.transport_for(conn, inbound, peer)
            except OSError:
                conn.close()
                inbound.abort()
                continue
            inbound.connect_next()

    def close(self) -> None:
        if self.open:
            self.open = False
            with contextlib.suppress(ValueError, OSError):
                self.proxy.loop.remove_reader(self.sock.fileno())

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.proxy.loop

    def is_serving(self) -> bool:
        return self.open

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        return None


__all__ = ["PortStats", "Proxy", "Settings", "Snapshot", "SyncResult", "filter_program"]
