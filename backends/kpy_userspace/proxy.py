"""The userspace data plane: TCP and UDP relays for every service port, on one event loop.

:class:`Proxy` owns a dedicated thread that enters the node's network namespace once
and runs its own asyncio event loop there. Every socket the proxy makes (listeners,
connections to endpoints, UDP sessions, the netlink socket for ``lo``'s addresses) is
created on that thread, so it lives in the node namespace for its whole life. The
agent's loop (or ``asyncio.run`` in a test) talks to it only through :meth:`Proxy.call`,
which hands a coroutine over with ``run_coroutine_threadsafe``; all proxy state is
touched on the proxy thread only, so nothing here needs a lock.

TCP: each accepted connection is one :class:`~kpy_userspace.tcp.Relay` moving bytes
between two non-blocking sockets, called by a :class:`~kpy_userspace.tcp.Reactor` (an
epoll set of the relays' sockets that the loop watches as one reader; no thread, task,
future, transport or protocol per connection): the accept callback takes
every connection the listener has queued, chooses each one's endpoints and starts a
non-blocking connect to the first; reads go into one buffer the proxy owns; a side that
does not take what is written to it stops the reading of the other (backpressure); an
EOF is passed on as a write shutdown (half-close), and the pair closes once both
directions have ended (docs/decisions/userspace.md). UDP: a session per
client address with its own connected socket to one endpoint; replies are sent back
through the listener with ``IP_PKTINFO`` / ``IPV6_PKTINFO`` naming the address the
client used, so a NodePort on a wildcard socket answers from the right address.

The pieces: :mod:`~kpy_userspace.tcp` and :mod:`~kpy_userspace.udp` (the relays),
:mod:`~kpy_userspace.flows` (endpoint choice, affinity, counters per port),
:mod:`~kpy_userspace.listeners` and :mod:`~kpy_userspace.filters` (sockets and their
source-range filters), :mod:`~kpy_userspace.addresses` (the addresses on ``lo``); this
module is the proxy thread that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from kpy.core.model import IPAddress, Protocol, ServicePortName
from kpy.kernel.netns import run_in_netns
from kpy_userspace.addresses import Addresses
from kpy_userspace.filters import FilterSpec
from kpy_userspace.flows import Flow, PortRuntime, client_ip, source_allowed
from kpy_userspace.listeners import Listener, filter_spec, open_socket, set_filter
from kpy_userspace.render import (
    INTERFACE,
    Frontend,
    ListenKey,
    PortTable,
)
from kpy_userspace.tcp import CHUNK, ConnectTimeouts, Reactor, Relay
from kpy_userspace.udp import UdpListener, UdpSession

T = TypeVar("T")
log = structlog.get_logger("kpy.userspace")


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


class Proxy:
    """The data plane: a thread in the node namespace running one event loop."""

    def __init__(self, netns: str | None, settings: Settings) -> None:
        self.netns = netns
        self.settings = settings
        self.loop = asyncio.new_event_loop()  # runs on the proxy thread once started
        # every TCP relay reads into this one buffer and writes from it at once
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self.timeouts = ConnectTimeouts(self.loop, settings.connect_timeout)
        self.reactor = Reactor(self.loop)  # the relays' sockets
        self.ports: dict[ServicePortName, PortRuntime] = {}
        self.listeners: dict[ListenKey, Listener] = {}
        self.owned: set[IPAddress] = set()  # addresses this backend put on lo
        self.users: dict[IPAddress, int] = {}  # how many installed tables need each address
        self._addresses: Addresses | None = None
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
                self._addresses = Addresses()
                self.loop.run_until_complete(self._addresses.setup())
            except BaseException as exc:  # handed to start()'s caller
                self._start_error = exc
                if self._addresses is not None:
                    self._addresses.close()
                self.reactor.close()
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
                self.reactor.close()
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
        self.timeouts.close()
        self.reactor.close()
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

    def schedule_hard_stop(self, flow: Flow) -> None:
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
            if isinstance(flow, UdpSession):
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
                elif isinstance(flow, UdpSession):
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
            spec = filter_spec(table, frontend)
            try:
                if listener is None:
                    listener = self._open_listener(key, table.name, spec)
                    result.listeners_opened += 1
                    port.listening.add(key)
                elif listener.filter != spec:
                    set_filter(listener.sock, key, spec)
                    listener.filter = spec
            except OSError as exc:
                result.errors.append(f"listening on {key} for {table.name}: {exc}")

    def _open_listener(self, key: ListenKey, owner: ServicePortName, spec: FilterSpec) -> Listener:
        sock = open_socket(key)
        try:
            set_filter(sock, key, spec)  # before listen(): no SYN slips past it
        except OSError:
            sock.close()
            raise
        listener = Listener(key=key, owner=owner, sock=sock, filter=spec)
        if key.protocol is Protocol.TCP:
            sock.listen(4096)
            listener.server = _Server(self, key, sock)
        else:
            listener.udp = UdpListener(self, key, sock)
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


ACCEPT_BATCH = 128  # connections taken per wake-up at most, so other sockets get a turn


class _Server(asyncio.AbstractServer):
    """Accepts on a listening socket with ``loop.add_reader``: each wake-up takes every
    connection queued (up to :data:`ACCEPT_BATCH`), and each one gets its endpoint
    candidates and starts connecting to the first in the same callback."""

    def __init__(self, proxy: Proxy, key: ListenKey, sock: socket.socket) -> None:
        self.proxy = proxy
        self.key = key
        self.sock = sock
        self.open = True
        proxy.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        proxy = self.proxy
        accept = self.sock.accept
        found: tuple[PortRuntime, Frontend] | None = None
        for i in range(ACCEPT_BATCH):
            try:
                conn, peer = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                log.warning("userspace_accept_failed", frontend=str(self.key), error=str(exc))
                return
            if i == 0:  # the tables change only between callbacks
                found = proxy.frontend_of(self.key)
            client = client_ip(peer)
            # a filter normally drops clients outside the source ranges before the
            # handshake; closing an unread connection resets it
            if found is None or not source_allowed(found[1], client):
                conn.close()
                continue
            port, frontend = found
            candidates = port.candidates(frontend, client, proxy.loop.time())
            if not candidates:
                conn.close()
                continue
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                continue
            Relay(proxy, port, frontend, client, candidates, conn).connect_next()

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


__all__ = ["PortStats", "Proxy", "Settings", "Snapshot", "SyncResult"]
