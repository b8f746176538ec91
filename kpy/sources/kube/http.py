"""kpy's HTTP/1.1 client for the API server, on asyncio streams: responses streamed and
bounded, kept-alive connections for lists, one connection per watch."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote, urlencode

import structlog

from kpy.sources.kube.api import MAX_EVENT_BYTES, MAX_LIST_BYTES, USER_AGENT, ProtocolError
from kpy.sources.kube.config import ApiTarget

log = structlog.get_logger("kpy.sources.kube")


class Response:
    """A response whose body is read as a whole (lists) or as lines (watch streams)."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer
        self._pool = pool
        self._complete = False  # the body was read to its end: the connection may be reused

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            return max(0.0, parsed.timestamp() - time.time()) if parsed else None

    async def _chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                if size > MAX_EVENT_BYTES:  # read in pieces, never buffered whole
                    async for piece in self._read(size):
                        yield piece
                    if await reader.readexactly(2) != b"\r\n":
                        raise ProtocolError("chunk not terminated by CRLF")
                    continue
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    self._complete = True
                    return
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise ProtocolError("chunk not terminated by CRLF")
                yield data[:-2]
        elif "content-length" in self.headers:
            async for piece in self._read(int(self.headers["content-length"])):
                yield piece
            self._complete = True
        else:
            while data := await reader.read(1 << 20):
                yield data

    async def _read(self, remaining: int) -> AsyncIterator[bytes]:
        """Exactly ``remaining`` bytes, in pieces of at most 1 MiB."""
        while remaining > 0:
            data = await self._reader.read(min(remaining, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body; one longer than ``limit`` bytes (default
        :data:`MAX_LIST_BYTES`) raises ProtocolError."""
        limit = MAX_LIST_BYTES if limit is None else limit
        chunks, size = [], 0
        async for chunk in self._chunks():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"response larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def lines(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """Newline-delimited records; a partial last record (a cut stream) raises. A
        record longer than ``limit`` bytes (default :data:`MAX_EVENT_BYTES`) is skipped
        with a warning, and not buffered."""
        limit = MAX_EVENT_BYTES if limit is None else limit
        pending = b""
        dropping = False
        async for chunk in self._chunks():
            if dropping:
                end = chunk.find(b"\n")
                if end < 0:
                    continue
                chunk, dropping = chunk[end + 1 :], False
            pending += chunk
            if b"\n" in chunk:
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    if len(line) > limit:
                        log.warning("kube_event_too_large", bytes=len(line), note="skipped")
                    elif line.strip():
                        yield line
            if len(pending) > limit:
                log.warning("kube_event_too_large", bytes=f">{limit}", note="skipped")
                pending, dropping = b"", True
        if pending.strip():
            raise ProtocolError("stream ended in the middle of an event")

    def close(self) -> None:
        """Give the connection back to its pool if the body was read to its end and the
        server keeps it open; otherwise close it."""
        pool, self._pool = self._pool, None
        reusable = (
            pool is not None
            and self._complete
            and self.headers.get("connection", "").lower() != "close"
            and not self._writer.is_closing()
        )
        if pool is not None and reusable:
            pool.release(self._reader, self._writer)
        else:
            self._writer.transport.abort()


class ConnectionPool:
    """Kept-alive HTTP/1.1 connections to one API server, for requests other than watches.

    A request takes an idle connection (one the server has closed meanwhile is
    dropped) or opens one; a response read to its end gives it back. At most
    ``max_idle`` are kept. A watch never uses the pool: it holds its own connection.
    """

    def __init__(self, max_idle: int = 2) -> None:
        self.max_idle = max_idle
        self.opened = 0  # connections opened for the pool's requests
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.transport.abort()  # closed by the server meanwhile: drop it
                continue
            return reader, writer
        return None

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._idle) >= self.max_idle:
            writer.transport.abort()
        else:
            self._idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self._idle:
            writer.transport.abort()
        self._idle.clear()


def _keepalive(sock: socket.socket | None) -> None:
    """TCP keepalive: a dead peer (node rebooted, network gone) is noticed in ~1 min."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def _connect(
    target: ApiTarget, connect_timeout: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.ssl_context,
                server_hostname=(target.server_hostname or target.host)
                if target.ssl_context
                else None,
                limit=1 << 22,
            )
    except TimeoutError:
        raise TimeoutError(
            f"no connection to {target.host}:{target.port} within {connect_timeout} s"
        ) from None
    _keepalive(writer.get_extra_info("socket"))
    return reader, writer


class _ClosedBeforeAnswer(Exception):
    """A kept-alive connection ended before any byte of the response."""


async def request(
    target: ApiTarget,
    method: str,
    path: str,
    params: Mapping[str, str] | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    *,
    connect_timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> Response:
    """Send one request and read the status line and headers.

    Without ``pool``, on a new connection that ends with the response (``Connection:
    close``: watches). With one, on a kept-alive connection from it; if a reused
    connection turns out closed by the server before any byte of the answer (its idle
    timeout raced the request), a ``GET`` is sent once more on a new connection.

    ``connect_timeout`` bounds the TCP connect and the TLS handshake (a black-holed
    address or a peer that never answers the handshake); the caller reads the body,
    closes the response (which gives a pooled connection back) and bounds the rest.
    """
    headers = await asyncio.to_thread(target.auth) if target.auth_may_block else target.auth()
    query = f"?{urlencode(params)}" if params else ""
    host = f"[{target.host}]" if ":" in target.host else target.host
    lines = [
        f"{method} {target.base_path}{quote(path)}{query} HTTP/1.1",
        f"Host: {host}:{target.port}",
        f"User-Agent: {USER_AGENT}",
        "Accept: application/json",
        "Connection: keep-alive" if pool is not None else "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    kept = pool.take() if pool is not None else None
    if kept is not None:
        try:
            return await _exchange(kept, data, pool, reused=True)
        except _ClosedBeforeAnswer:
            if method != "GET":
                raise ConnectionResetError("the kept-alive connection was closed") from None
    connection = await _connect(target, connect_timeout)
    if pool is not None:
        pool.opened += 1
    try:
        return await _exchange(connection, data, pool, reused=False)
    except _ClosedBeforeAnswer:
        raise ConnectionResetError("the server closed the connection without answering") from None


async def _exchange(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    data: bytes,
    pool: ConnectionPool | None,
    *,
    reused: bool,
) -> Response:
    reader, writer = connection
    try:
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClosedBeforeAnswer from None
            raise
        except ConnectionError:
            if reused:
                raise _ClosedBeforeAnswer from None
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.1 response: {status_line[:60]!r}")
        response_headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                response_headers[k.strip().lower()] = v.strip()
        if parts[0] == "HTTP/1.0":
            response_headers.setdefault("connection", "close")
        return Response(int(parts[1]), response_headers, reader, writer, pool)
    except BaseException:
        writer.transport.abort()
        raise
