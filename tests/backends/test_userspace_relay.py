"""The userspace proxy's TCP relay and accept callback, on real sockets over loopback,
driven by the proxy's own (not started) event loop in the test's thread: data and EOF a
client sends before its endpoint answers, backpressure, a client gone early, failover,
connect deadlines, and accepting every queued connection per wake-up."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from kpy_userspace import render
from kpy_userspace.flows import PortRuntime
from kpy_userspace.listeners import Listener, open_socket
from kpy_userspace.proxy import ACCEPT_BATCH, Proxy, Settings, _Server
from kpy_userspace.render import ListenKey
from kpy_userspace.tcp import CHUNK, IN, ConnectTimeouts, Relay

from kpy.core.model import Endpoint, Protocol
from kpy.testing import builders as b

LOOPBACK = "127.0.0.1"


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    proxy = Proxy(None, Settings(connect_timeout=5.0))  # never started: no thread
    yield proxy
    proxy._close_everything()
    proxy.stop()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """An endpoint on loopback that accepts when the test says so."""
    sock = socket.create_server((LOOPBACK, 0), backlog=1024)
    sock.settimeout(10)
    with sock:
        yield sock


def port_for(proxy: Proxy, *endpoints: Endpoint) -> PortRuntime:
    """A port table on the proxy (whose close at the end aborts its relays)."""
    state = b.state(b.service("web", cluster_ip="10.96.0.10"), list(endpoints), b.node())
    table = render.port_table(state)
    assert table is not None
    port = proxy.ports[table.name] = PortRuntime(table)
    return port


def endpoint_of(sock: socket.socket) -> Endpoint:
    return b.endpoint(LOOPBACK, sock.getsockname()[1])


def run_until(proxy: Proxy, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the proxy's loop until ``done()`` (checked after every loop iteration)."""

    async def wait() -> None:
        while not done():
            await asyncio.sleep(0)

    proxy.loop.run_until_complete(asyncio.wait_for(wait(), timeout))


def relay(
    proxy: Proxy, port: PortRuntime, candidates: list[Endpoint]
) -> tuple[Relay, socket.socket]:
    """A relay for a fresh client connection over loopback (the client's end is returned)."""
    with socket.create_server((LOOPBACK, 0)) as listening:
        client = socket.create_connection(listening.getsockname(), timeout=10)
        accepted, _ = listening.accept()
    accepted.setblocking(False)
    frontend = next(iter(port.forward.values()))
    return Relay(proxy, port, frontend, "10.244.1.9", candidates, accepted), client


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def test_what_the_client_sent_before_the_endpoint_answered_arrives_in_order(
    proxy: Proxy, server: socket.socket
) -> None:
    port = port_for(proxy, endpoint_of(server))
    flow, client = relay(proxy, port, list(port.table.internal))
    client.sendall(b"GET / ")
    client.sendall(b"HTTP/1.0\r\n\r\n")
    client.shutdown(socket.SHUT_WR)  # the half-close follows the data
    flow.connect_next()
    conn, _ = server.accept()
    with conn, client:
        conn.setblocking(False)
        got = bytearray()

        def request_read() -> bool:
            try:
                chunk = conn.recv(4096)
            except BlockingIOError:
                return False
            got.extend(chunk)
            return chunk == b""  # EOF after the data

        run_until(proxy, request_read)
        assert flow.usock is not None  # small writes leave at once
        assert flow.usock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert bytes(got) == b"GET / HTTP/1.0\r\n\r\n"
        conn.sendall(b"200 OK")
        conn.close()  # the endpoint's EOF ends the other direction too
        run_until(proxy, lambda: flow.closed)
        assert recv_all(client) == b"200 OK"
    assert port.bytes_in == len(b"GET / HTTP/1.0\r\n\r\n") and port.bytes_out == len(b"200 OK")
    assert port.connections == 1 and flow not in port.flows


def test_a_slow_reader_stops_the_reading_of_the_other_side(
    proxy: Proxy, server: socket.socket
) -> None:
    port = port_for(proxy, endpoint_of(server))
    flow, client = relay(proxy, port, list(port.table.internal))
    flow.connect_next()
    conn, _ = server.accept()
    payload = os.urandom(16 * 1024 * 1024)

    def send() -> None:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    with conn, client:
        sender.start()
        # the endpoint reads nothing: the relay keeps at most one read's worth
        run_until(proxy, lambda: flow.to_up is not None)
        for _ in range(100):
            proxy.loop.run_until_complete(asyncio.sleep(0))
            assert flow.to_up is not None and len(flow.to_up) <= CHUNK
        assert port.bytes_in < len(payload)
        received = hashlib.sha256()
        count = 0
        conn.setblocking(False)

        def drained() -> bool:
            nonlocal count
            try:
                chunk = conn.recv(1 << 20)
            except BlockingIOError:
                return False
            received.update(chunk)
            count += len(chunk)
            return chunk == b""

        run_until(proxy, drained, timeout=60)
        sender.join(10)
    assert count == len(payload) and port.bytes_in == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_a_client_gone_before_the_endpoint_answers_ends_the_endpoint_side(
    proxy: Proxy, server: socket.socket
) -> None:
    port = port_for(proxy, endpoint_of(server))
    flow, client = relay(proxy, port, list(port.table.internal))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # reset
    flow.connect_next()
    conn, _ = server.accept()
    with conn:
        run_until(proxy, lambda: flow.closed)
        conn.settimeout(10)
        assert conn.recv(4096) == b""  # the relay closed its side
    assert flow not in port.flows and flow.usock is not None and flow.usock.fileno() == -1


def test_a_refused_endpoint_is_skipped(proxy: Proxy, server: socket.socket) -> None:
    closed = socket.create_server((LOOPBACK, 0))
    refused = endpoint_of(closed)
    closed.close()  # nothing listens there any more
    port = port_for(proxy, refused, endpoint_of(server))
    flow, client = relay(proxy, port, [refused, endpoint_of(server)])
    flow.connect_next()
    run_until(proxy, lambda: flow.endpoint is not None)
    assert flow.endpoint == endpoint_of(server) and flow.tried == 2
    conn, _ = server.accept()
    conn.close()
    client.close()


class FakeRelay:
    def __init__(self, log: list[tuple[int, int]], number: int) -> None:
        self.log, self.number = log, number

    def connect_timed_out(self, attempt: int) -> None:
        self.log.append((self.number, attempt))


def test_connect_deadlines_expire_in_order_on_one_timer(proxy: Proxy) -> None:
    timeouts = ConnectTimeouts(proxy.loop, 0.05)
    expired: list[tuple[int, int]] = []
    for number in range(5):
        timeouts.add(FakeRelay(expired, number), number + 1)  # type: ignore[arg-type]
    assert timeouts.timer is not None
    first = timeouts.timer
    timeouts.add(FakeRelay(expired, 5), 6)  # type: ignore[arg-type]
    assert timeouts.timer is first  # one timer for all of them
    run_until(proxy, lambda: len(expired) == 6)
    assert expired == [(n, n + 1) for n in range(6)]
    assert timeouts.timer is None and not timeouts.queue


def test_one_wake_up_accepts_every_queued_connection_up_to_the_batch(
    proxy: Proxy, server: socket.socket
) -> None:
    port = port_for(proxy, endpoint_of(server))
    frontend = next(iter(port.forward.values()))
    listening = socket.create_server((LOOPBACK, 0), backlog=1024)
    listening.setblocking(False)
    proxy.listeners[frontend.key] = Listener(
        key=frontend.key, owner=port.table.name, sock=listening
    )
    n = ACCEPT_BATCH + 20
    clients = [socket.create_connection(listening.getsockname(), timeout=10) for _ in range(n)]
    try:
        accept = _Server(proxy, frontend.key, listening)
        accept._accept()  # one wake-up
        assert port.connections == ACCEPT_BATCH
        run_until(proxy, lambda: port.connections == n)  # the rest on the next one
        conns = [server.accept()[0] for _ in range(n)]
        for conn in conns:
            conn.close()
    finally:
        for client in clients:
            client.close()


def test_connections_accepted_by_a_proxy_listener_send_small_writes_at_once() -> None:
    """TCP_NODELAY is set on the listener once; accepted connections inherit it."""
    key = ListenKey(protocol=Protocol.TCP, family=4, address=LOOPBACK, port=0)
    with open_socket(key) as listening:
        listening.listen(1)
        with socket.create_connection(listening.getsockname(), timeout=10):
            conn, _ = listening.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_an_event_for_a_socket_closed_earlier_in_the_same_wake_up_is_dropped(
    proxy: Proxy,
) -> None:
    """A handler that closes another socket whose event is still in the batch (and opens
    a new one that gets its number) does not have that event delivered to the new one."""
    reactor = proxy.reactor
    a, a_peer = socket.socketpair()
    b_sock, b_peer = socket.socketpair()
    called: list[str] = []
    made: list[socket.socket] = []

    def on_a(events: int) -> None:
        called.append("a")
        reactor.forget(b_sock.fileno())
        number = b_sock.fileno()
        b_sock.close()
        c, c_peer = socket.socketpair()  # the lowest free number: b's
        made.extend((c, c_peer))
        assert number in (c.fileno(), c_peer.fileno())
        for end in (c, c_peer):
            reactor.watch(end.fileno(), 0, IN, lambda events: called.append("c"))

    reactor.watch(a.fileno(), 0, IN, on_a)
    reactor.watch(b_sock.fileno(), 0, IN, lambda events: called.append("b"))
    a_peer.send(b"x")  # a is ready first, then b
    b_peer.send(b"x")
    reactor._ready()
    assert called == ["a"]
    for sock in (a, a_peer, b_peer, *made):
        sock.close()


def test_a_failing_handler_does_not_keep_the_others_from_their_events(proxy: Proxy) -> None:
    reactor = proxy.reactor
    reported: list[BaseException] = []
    proxy.loop.set_exception_handler(lambda loop, context: reported.append(context["exception"]))
    pairs = [socket.socketpair() for _ in range(3)]
    called: list[int] = []

    def handler(i: int) -> Callable[[int], None]:
        def on_event(events: int) -> None:
            called.append(i)
            if i == 0:
                raise RuntimeError("broken relay")

        return on_event

    for i, (mine, peer) in enumerate(pairs):
        reactor.watch(mine.fileno(), 0, IN, handler(i))
        peer.send(b"x")
    reactor._ready()
    assert sorted(called) == [0, 1, 2]
    assert [str(exc) for exc in reported] == ["broken relay"]
    for pair in pairs:
        for sock in pair:
            reactor.forget(sock.fileno())
            sock.close()
