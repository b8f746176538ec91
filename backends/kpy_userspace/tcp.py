"""TCP relaying: each accepted connection is a pair of :class:`asyncio.Protocol`
objects, the client's (:class:`Inbound`) and the endpoint's (:class:`Outbound`)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING, cast

import structlog

from kpy.core.model import Endpoint
from kpy_userspace.flows import Flow, PortRuntime
from kpy_userspace.render import (
    Frontend,
)

if TYPE_CHECKING:
    from kpy_userspace.proxy import Proxy

log = structlog.get_logger("kpy.userspace")

WRITE_HIGH_WATER = 256 * 1024


class Inbound(asyncio.Protocol, Flow):
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
        self.upstream: Outbound | None = None
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
                connect_failed(endpoint, exc.strerror)
                continue
            try:
                sock.setblocking(False)
                err = sock.connect_ex(address)
            except OSError as exc:
                sock.close()
                connect_failed(endpoint, exc.strerror)
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
                connect_failed(endpoint, os.strerror(err))
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
            connect_failed(endpoint, os.strerror(err))
            self.connect_next()
            return
        self._connected(sock, endpoint, address)

    def _connect_timed_out(self) -> None:
        self.timer = None
        pending = self._stop_connecting()
        if pending is not None:
            pending[0].close()
            connect_failed(pending[1], "timed out")
            self.connect_next()

    def _connected(self, sock: socket.socket, endpoint: Endpoint, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.port.chosen(self.frontend, self.client, endpoint, self.proxy.loop.time())
        self.upstream = Outbound(self)
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


def connect_failed(endpoint: Endpoint, error: str | None) -> None:
    log.debug("userspace_connect_failed", endpoint=str(endpoint), error=error)


class Outbound(asyncio.Protocol):
    """The endpoint's side of one relayed TCP connection."""

    def __init__(self, inbound: Inbound) -> None:
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
