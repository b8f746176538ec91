"""The echo server every lab and test pod runs: it says who it is and whom it saw.

Run inside a pod's network namespace::

    ip netns exec POD python -m kpy.tools.lab.echo --name POD --tcp 8080 --udp 5353 --http 80

* TCP: right after accept, one line ``"<name> <client-ip>\\n"``; then it echoes
  whatever it receives until the client half-closes (EOF), then closes — so large
  transfers and half-close can be tested.
* HTTP: every request is answered with JSON ``{"pod": name, "client": ip}``
  (``Connection: close``), which is what ``curl`` from a netshoot pod would show.
* UDP: each datagram is answered with ``"<name> <client-ip>"``.

Every listener takes both IPv4 and IPv6 (one dual-stack socket; IPv4 clients are
reported without the ``::ffff:`` prefix). Once every port is bound the server prints
``ready`` on stdout, so whoever starts it knows when it can be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Sequence
from typing import cast

READY = "ready"


def client_ip(peer: object) -> str:
    """The client address as a pod would report it (IPv4-mapped IPv6 unwrapped)."""
    host = peer[0] if isinstance(peer, tuple) else str(peer)
    return str(host).removeprefix("::ffff:")


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.name} {client_ip(addr)}".encode(), addr)


class EchoServer:
    """The servers of one pod; :meth:`start` binds, :meth:`close` stops them."""

    def __init__(
        self,
        name: str,
        *,
        tcp: Sequence[int] = (),
        udp: Sequence[int] = (),
        http: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.tcp_ports = tuple(tcp)
        self.udp_ports = tuple(udp)
        self.http_ports = tuple(http)
        self._servers: list[asyncio.Server] = []
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.tcp_ports:
            sock = _dual_stack(socket.SOCK_STREAM, port)
            self._servers.append(await asyncio.start_server(self._tcp, sock=sock))
        for port in self.http_ports:
            sock = _dual_stack(socket.SOCK_STREAM, port)
            self._servers.append(await asyncio.start_server(self._http, sock=sock))
        for port in self.udp_ports:
            sock = _dual_stack(socket.SOCK_DGRAM, port)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.name), sock=sock)
            self._transports.append(transport)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = client_ip(writer.get_extra_info("peername"))
        with contextlib.suppress(OSError):
            writer.write(f"{self.name} {peer}\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()
            await writer.wait_closed()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = client_ip(writer.get_extra_info("peername"))
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            body = json.dumps({"pod": self.name, "client": peer}).encode() + b"\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        with contextlib.suppress(OSError, TimeoutError):
            writer.close()
            await writer.wait_closed()


async def serve(server: EchoServer) -> None:
    """Start ``server``, say ``ready``, and serve until SIGTERM/SIGINT."""
    await server.start()
    print(READY, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpy.tools.lab.echo", description=__doc__)
    parser.add_argument("--name", required=True, help="the pod name to answer with")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP line port")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port")
    parser.add_argument("--http", type=int, action="append", default=[], help="HTTP port")
    args = parser.parse_args(argv)
    if not (args.tcp or args.udp or args.http):
        parser.error("give at least one of --tcp, --udp, --http")
    asyncio.run(serve(EchoServer(args.name, tcp=args.tcp, udp=args.udp, http=args.http)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
