"""The tiny HTTP layer under kpy's servers (health, metrics, healthCheckNodePorts).

Deliberately minimal: stdlib asyncio streams, GET/HEAD only, one request per
connection, bounded header size and read time; a handler is a plain function
``(method, path) -> Response``. :func:`serve_forever` binds (inside a network namespace
when asked, retrying while the address is taken) and serves until cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import structlog

from kpy.kernel import netns as netns_socket

log = structlog.get_logger("kpy.health")


MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"

    @staticmethod
    def json(status: int, data: object) -> Response:
        return Response(status=status, body=(json.dumps(data, sort_keys=True) + "\n").encode())

    @staticmethod
    def text(status: int, text: str) -> Response:
        return Response(status=status, body=text.encode(), content_type="text/plain")


Handler = Callable[[str, str], Response]  # (method, path without query) -> Response


def parse_bind_address(value: str) -> tuple[str, int]:
    """``0.0.0.0:10256``, ``[::]:10256``, ``:10256``, ``127.0.0.1:0`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not an address:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


async def _handle(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            response = Response.text(400, "bad request\n")
            method = "GET"
        else:
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                response = Response.text(405, "method not allowed\n")
            else:
                try:
                    response = handler(method, path)
                except Exception as exc:  # a broken handler answers 500, never kills the server
                    log.error("http_handler_failed", path=path, error=str(exc))
                    response = Response.text(500, "internal error\n")
        reason = HTTPStatus(response.status).phrase
        header = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if method == "HEAD" else header + response.body)
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass  # a slow, truncated or oversized request just gets the connection closed
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


async def start_http(handler: Handler, sock: socket.socket) -> asyncio.Server:
    """Serve ``handler`` on an already listening socket (so it may come from another netns)."""
    return await asyncio.start_server(
        lambda r, w: _handle(handler, r, w), sock=sock, limit=MAX_REQUEST_HEAD
    )


async def serve_forever(
    name: str,
    handler: Handler,
    address: str,
    *,
    netns: str | None = None,
    bound: Callable[[int], None] | None = None,
    retry_after: float = 5.0,
) -> None:
    """Bind ``address`` (retrying while it is taken) and serve until cancelled.

    ``bound`` receives the port actually bound (useful with port 0 in tests).
    """
    host, port = parse_bind_address(address)
    while True:
        try:
            sock = await netns_socket.listen(netns, host, port)
            break
        except OSError as exc:
            log.warning(
                "http_bind_failed", server=name, address=address, error=str(exc), retry_in_s=5
            )
            await asyncio.sleep(retry_after)
    server = await start_http(handler, sock)
    actual = sock.getsockname()[1]
    log.info("http_serving", server=name, address=address, port=actual)
    if bound is not None:
        bound(actual)
    try:
        async with server:
            await server.serve_forever()
    finally:
        server.close()
