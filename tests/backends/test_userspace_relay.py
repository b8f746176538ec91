"""The userspace proxy's TCP relay state machine with stand-in transports (no sockets):
what a client sends before its endpoint has answered is kept and passed on in order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kpy_userspace import render
from kpy_userspace.flows import PortRuntime
from kpy_userspace.proxy import Proxy, Settings
from kpy_userspace.tcp import Inbound, Outbound

from kpy.testing import builders as b


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.eof = False
        self.reading = True
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    proxy = Proxy(None, Settings())  # never started: no thread, no sockets
    yield proxy
    proxy.stop()


def inbound(proxy: Proxy) -> tuple[Inbound, PortRuntime]:
    state = b.state(b.service("web", cluster_ip="10.96.0.10"), [b.endpoint("10.244.1.2")], b.node())
    table = render.port_table(state)
    assert table is not None
    port = PortRuntime(table)
    frontend = next(iter(port.forward.values()))
    flow = Inbound(proxy, port, frontend, "10.244.1.9", list(table.internal))
    return flow, port


def connect(flow: Inbound) -> FakeTransport:
    """What the proxy does once the endpoint's connect completed."""
    flow.endpoint = flow.candidates[0]
    flow.upstream = Outbound(flow)
    upstream = FakeTransport()
    flow.upstream.connection_made(upstream)
    return upstream


def test_data_and_eof_before_the_endpoint_answers_are_passed_on_in_order(proxy: Proxy) -> None:
    flow, port = inbound(proxy)
    client = FakeTransport()
    flow.connection_made(client)
    assert not client.reading  # paused until the endpoint answers
    # a loop may deliver data although reading was paused in connection_made
    flow.data_received(b"GET / ")
    flow.data_received(b"HTTP/1.0\r\n\r\n")
    flow.eof_received()
    assert not client.reading
    upstream = connect(flow)
    assert upstream.written == [b"GET / ", b"HTTP/1.0\r\n\r\n"]
    assert upstream.eof  # the half-close follows the data
    assert port.bytes_in == len(b"GET / HTTP/1.0\r\n\r\n")
    assert port.connections == 1 and flow in port.flows


def test_reading_resumes_when_the_endpoint_answers(proxy: Proxy) -> None:
    flow, _ = inbound(proxy)
    client = FakeTransport()
    flow.connection_made(client)
    upstream = connect(flow)
    assert client.reading and not upstream.eof
    flow.data_received(b"ping")
    flow.upstream_data(b"pong")
    assert upstream.written == [b"ping"]
    assert client.written == [b"pong"]


def test_client_gone_before_the_endpoint_answers_closes_the_endpoint_side(proxy: Proxy) -> None:
    flow, port = inbound(proxy)
    flow.connection_made(FakeTransport())
    flow.connection_lost(ConnectionResetError())
    assert flow.closed and flow not in port.flows
    flow.upstream = Outbound(flow)
    upstream = FakeTransport()
    flow.upstream.connection_made(upstream)
    assert upstream.closed and upstream.written == []
