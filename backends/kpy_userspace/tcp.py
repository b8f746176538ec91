"""TCP relaying: each accepted connection is one :class:`Relay`, which moves bytes between
the client's socket and the endpoint's when the proxy's :class:`Reactor` (an epoll set
of the relays' sockets) says they are ready — no transport, protocol, task or future
per connection."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from kpy.core.model import Endpoint
from kpy_userspace.flows import Flow, PortRuntime
from kpy_userspace.render import (
    Frontend,
)

if TYPE_CHECKING:
    import asyncio

    from kpy_userspace.proxy import Proxy

log = structlog.get_logger("kpy.userspace")

# The most one read moves, and so the most a relay holds for a direction whose reader
# is slower than its writer: reading that side stops until it has been written out.
CHUNK = 256 * 1024
NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
IN, OUT = select.EPOLLIN, select.EPOLLOUT
FAILED = select.EPOLLERR | select.EPOLLHUP


class Reactor:
    """The relays' sockets in an epoll set of their own, which the proxy loop watches as
    one reader. A wake-up takes every ready socket from the set and calls its relay's
    handler directly: a relay's socket needs no selector key and its readiness no loop
    handle, and a socket about to be closed needs no ``epoll_ctl`` (closing it takes it
    out of the set)."""

    __slots__ = ("dispatching", "epoll", "handlers", "loop", "stale")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.dispatching = False
        # forgotten during this dispatch: a later event of the same batch is for the
        # closed socket, not a new one that got its number
        self.stale: set[int] = set()
        loop.add_reader(self.epoll.fileno(), self._ready)

    def watch(self, fd: int, old: int, new: int, handler: Callable[[int], None]) -> None:
        """Watch ``fd`` for ``new`` events instead of ``old`` (masks; 0: not watched)."""
        if old == new:
            return
        if old == 0:
            self.epoll.register(fd, new)
            self.handlers[fd] = handler
        elif new == 0:
            self.epoll.unregister(fd)
            self.forget(fd)
        else:
            self.epoll.modify(fd, new)

    def forget(self, fd: int) -> None:
        """Call nothing more for ``fd``: it is being closed (or was unregistered)."""
        if self.handlers.pop(fd, None) is not None and self.dispatching:
            self.stale.add(fd)

    def _ready(self) -> None:
        handlers, stale = self.handlers, self.stale
        self.dispatching = True
        try:
            for fd, events in self.epoll.poll(0, 1024):
                if stale and fd in stale:
                    continue
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception as exc:  # one relay's bug must not stop the others
                    self.loop.call_exception_handler(
                        {"message": "userspace relay handler failed", "exception": exc}
                    )
        finally:
            self.dispatching = False
            stale.clear()

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # closed already
            self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
        self.handlers.clear()


class Relay(Flow):
    """One relayed TCP connection: the client's socket, made by :class:`_Server` right
    after ``accept()`` with the endpoints to try already chosen, and the endpoint's.

    The connect to the first endpoint starts at once, as a non-blocking ``connect()``
    watched by the proxy's :class:`Reactor`, its deadline kept by
    :class:`ConnectTimeouts`; a
    refused or timed-out attempt moves on to the next endpoint. The client's socket is
    not read until an endpoint has answered (what it sent meanwhile waits in the
    kernel). Then each readable side is read into the proxy's one buffer and written
    to the other at once; what the other side does not take is kept, and the reading
    side is not read again until it has been written out (backpressure). A side's EOF
    is passed on as a write shutdown of the other (half-close), after what is kept for
    it; once both directions have ended both sockets are closed."""

    __slots__ = (
        "candidates",
        "cfd",
        "client",
        "closed",
        "cmask",
        "connecting",
        "csock",
        "eof_in",
        "eof_out",
        "frontend",
        "port",
        "proxy",
        "target",
        "to_client",
        "to_up",
        "tried",
        "ufd",
        "umask",
        "usock",
    )

    def __init__(
        self,
        proxy: Proxy,
        port: PortRuntime,
        frontend: Frontend,
        client: str,
        candidates: list[Endpoint],
        csock: socket.socket,
    ) -> None:
        self.endpoint: Endpoint | None = None
        self.hard_stop: asyncio.TimerHandle | None = None
        self.proxy = proxy
        self.port = port
        self.frontend = frontend
        self.client = client
        self.candidates = candidates
        self.tried = 0
        self.csock = csock  # the client's, non-blocking
        self.cfd = csock.fileno()
        self.cmask = 0  # what the reactor watches the client's socket for
        self.usock: socket.socket | None = None  # the endpoint's (or the one connecting)
        self.ufd = -1
        self.umask = 0  # and the endpoint's
        self.target: Endpoint | None = None  # the endpoint being connected to
        self.connecting = False
        self.to_up: memoryview | None = None  # read from the client, not yet written
        self.to_client: memoryview | None = None  # read from the endpoint, not yet written
        self.eof_in = False  # the client's EOF
        self.eof_out = False  # the endpoint's EOF
        self.closed = False
        port.flows.add(self)
        port.connections += 1

    # --- the connection to an endpoint ---------------------------------------------------

    def connect_next(self) -> None:
        """Start connecting to the next candidate; none left: close the client."""
        while not self.closed and self.tried < len(self.candidates):
            endpoint = self.candidates[self.tried]
            self.tried += 1
            family, address = self.port.sockaddr(endpoint)
            try:
                sock = socket.socket(family, NONBLOCKING_STREAM)
            except OSError as exc:  # EMFILE and friends
                connect_failed(endpoint, exc.strerror)
                continue
            try:
                err = sock.connect_ex(address)
            except OSError as exc:
                sock.close()
                connect_failed(endpoint, exc.strerror)
                continue
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                connect_failed(endpoint, os.strerror(err))
                continue
            self.usock, self.ufd, self.target = sock, sock.fileno(), endpoint
            if err == errno.EINPROGRESS:
                # An endpoint on this host is usually connected by the time connect()
                # returns (the handshake runs in the same call); then there is no
                # reason to wait for the loop to say so.
                try:
                    sock.getpeername()
                except OSError:
                    self.connecting = True
                    self._watch_upstream(OUT)
                    self.proxy.timeouts.add(self, self.tried)
                    return
            self._connected()
            return
        if not self.closed:
            log.info(
                "userspace_no_endpoint_answered",
                service=str(self.port.table.name),
                client=self.client,
            )
            self.abort()

    def _drop_attempt(self, error: str | None) -> None:
        """The connect under way failed: close its socket, say why."""
        self.connecting = False
        self.proxy.reactor.forget(self.ufd)
        self.umask = 0
        assert self.usock is not None and self.target is not None
        self.usock.close()  # which takes it out of the reactor's set
        self.usock, self.ufd = None, -1
        connect_failed(self.target, error)

    def _connect_done(self) -> None:
        if not self.connecting or self.usock is None:
            return
        err = self.usock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop_attempt(os.strerror(err))
            self.connect_next()
            return
        self._connected()

    def connect_timed_out(self, attempt: int) -> None:
        """Called by :class:`ConnectTimeouts` when attempt number ``attempt``'s deadline
        has passed: if that attempt is still connecting, try the next endpoint."""
        if self.connecting and self.tried == attempt and not self.closed:
            self._drop_attempt("timed out")
            self.connect_next()

    def _connected(self) -> None:
        """The endpoint answered: relay."""
        usock = self.usock
        assert usock is not None and self.target is not None
        proxy, port = self.proxy, self.port
        loop = proxy.loop
        self.endpoint = endpoint = self.target
        port.chosen(self.frontend, self.client, endpoint, loop.time())
        if endpoint not in port.live:  # removed while connecting
            proxy.schedule_hard_stop(self)
        # small writes leave at once, as the client's socket has from its listener
        # (Nagle's algorithm on a relay holds back what follows a small write until
        # the peer's possibly delayed ACK)
        with contextlib.suppress(OSError):  # reset already: its first read says so
            usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connecting = False
        self._watch_upstream(IN)
        self._watch_client(IN)
        # most clients speak first, and have by now: relay it without waiting for the loop
        self._move(self.csock, usock, True)

    # --- relaying ------------------------------------------------------------------------

    def _watch_client(self, mask: int) -> None:
        if mask != self.cmask:
            self.proxy.reactor.watch(self.cfd, self.cmask, mask, self._client_event)
            self.cmask = mask

    def _watch_upstream(self, mask: int) -> None:
        if mask != self.umask:
            self.proxy.reactor.watch(self.ufd, self.umask, mask, self._upstream_event)
            self.umask = mask

    def _client_event(self, events: int) -> None:
        if events & FAILED:  # the read or write that follows says what failed
            events |= IN | OUT
        if events & self.cmask & IN:
            assert self.usock is not None
            self._move(self.csock, self.usock, True)
        if events & self.cmask & OUT and not self.closed:
            self._flush(False)

    def _upstream_event(self, events: int) -> None:
        if self.connecting:
            self._connect_done()
            return
        if events & FAILED:
            events |= IN | OUT
        if events & self.umask & IN:
            assert self.usock is not None
            self._move(self.usock, self.csock, False)
        if events & self.umask & OUT and not self.closed:
            self._flush(True)

    def _move(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        """``src`` is readable: read what is there and write it to ``dst``."""
        proxy = self.proxy
        try:
            n = src.recv_into(proxy.buffer, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer
            self.abort()
            return
        if n == 0:
            self._eof(up)
            return
        if up:
            self.port.bytes_in += n
        else:
            self.port.bytes_out += n
        view = proxy.view
        try:
            sent = dst.send(view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < n:  # keep the rest; read src again once it has been written out
            rest = memoryview(bytes(view[sent:n]))
            if up:
                self.to_up = rest
                self._watch_client(self.cmask & ~IN)
                self._watch_upstream(self.umask | OUT)
            else:
                self.to_client = rest
                self._watch_upstream(self.umask & ~IN)
                self._watch_client(self.cmask | OUT)

    def _flush(self, up: bool) -> None:
        """Write out what is kept for one direction; then read its source again, or
        pass its EOF on."""
        src: socket.socket | None
        dst: socket.socket | None
        if up:
            src, dst, kept, ended = self.csock, self.usock, self.to_up, self.eof_in
        else:
            src, dst, kept, ended = self.usock, self.csock, self.to_client, self.eof_out
        if kept is None or dst is None or src is None:
            return
        try:
            sent = dst.send(kept)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if sent < len(kept):
            kept = kept[sent:]
            if up:
                self.to_up = kept
            else:
                self.to_client = kept
            return
        if up:
            self.to_up = None
        else:
            self.to_client = None
        if up:
            self._watch_upstream(self.umask & ~OUT)
            if not ended:
                self._watch_client(self.cmask | IN)
                return
        else:
            self._watch_client(self.cmask & ~OUT)
            if not ended:
                self._watch_upstream(self.umask | IN)
                return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self._maybe_close()

    def _eof(self, up: bool) -> None:
        """One side ended: stop reading it, and pass the EOF on unless data for the
        other side is still kept (then :meth:`_flush` passes it on)."""
        src: socket.socket | None
        dst: socket.socket | None
        if up:
            self.eof_in = True
            src, dst, kept = self.csock, self.usock, self.to_up
        else:
            self.eof_out = True
            src, dst, kept = self.usock, self.csock, self.to_client
        assert src is not None and dst is not None
        if self.eof_in and self.eof_out and self.to_up is None and self.to_client is None:
            # both ways have ended and dst has been read to its EOF: its close sends
            # the FIN a write shutdown would
            self._finish(False)
            return
        if up:
            self._watch_client(self.cmask & ~IN)
        else:
            self._watch_upstream(self.umask & ~IN)
        if kept is None:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                self.abort()
                return
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.eof_in and self.eof_out and self.to_up is None and self.to_client is None:
            self._finish(False)

    def abort(self) -> None:
        self._finish(True)

    def _finish(self, error: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.connecting = False
        if self.hard_stop is not None:
            self.hard_stop.cancel()
        reactor = self.proxy.reactor
        if self.cmask:
            reactor.forget(self.cfd)
        if self.umask:
            reactor.forget(self.ufd)
        self.cmask = self.umask = 0
        # closing the sockets takes them out of the reactor's set
        self.csock.close()
        if self.usock is not None:
            self.usock.close()
        self.port.flows.discard(self)


def connect_failed(endpoint: Endpoint, error: str | None) -> None:
    log.debug("userspace_connect_failed", endpoint=str(endpoint), error=error)


class ConnectTimeouts:
    """The connect deadlines of every relay on one loop. All share one timeout, so they
    expire in the order they were set: a queue and one timer for the earliest, instead
    of a timer per connection (most connects finish long before their deadline; their
    entries are dropped when it passes)."""

    __slots__ = ("loop", "queue", "timeout", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.queue: deque[tuple[float, Relay, int]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, relay: Relay, attempt: int) -> None:
        deadline = self.loop.time() + self.timeout
        self.queue.append((deadline, relay, attempt))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self.timer = None
        queue = self.queue
        now = self.loop.time() + 0.001  # the loop runs a timer up to its clock resolution early
        while queue and queue[0][0] <= now:
            _, relay, attempt = queue.popleft()
            relay.connect_timed_out(attempt)  # may add a deadline (and arm the timer)
        if queue and self.timer is None:
            self.timer = self.loop.call_at(queue[0][0], self._expire)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
