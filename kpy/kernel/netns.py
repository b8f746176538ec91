"""Listening sockets created inside a named network namespace.

A socket belongs to the namespace it was created in, for its whole life, whichever
thread later uses it. So a server for a node whose rules live in a namespace
(``BackendConfig.netns``) creates its socket there and hands it to asyncio.

Python 3.11 has no ``os.setns``; libc's ``setns(2)`` is called through ctypes. The
call changes the namespace of the calling *thread* only, so it runs on a fresh thread
that does nothing else and ends afterwards — never on the event loop's thread and
never on a pooled worker (``asyncio.to_thread``) that would stay in the namespace and
later run unrelated work there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


class NetnsError(OSError):
    """The namespace does not exist or could not be entered."""


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter(netns: str) -> None:
    """Move the calling thread into the named namespace, for the rest of its life.

    Only for a thread that does nothing else (as :func:`run_in_netns` makes): a pooled or
    the event loop's thread would run unrelated work in the namespace afterwards.
    """
    _setns(NETNS_DIR / netns)


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a dedicated thread inside the named namespace; blocking.

    With ``netns`` None ``fn`` runs on the calling thread, in the current namespace.
    """
    if netns is None:
        return fn()
    path = NETNS_DIR / netns
    if not path.exists():
        raise NetnsError(2, f"network namespace {netns!r} not found ({path})")
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _setns(path)
            box.append(fn())
        except BaseException as exc:  # handed back to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def listening_socket(host: str, port: int, *, backlog: int = 128) -> socket.socket:
    """A non-blocking TCP listening socket on ``host:port``.

    ``host`` "" or "::" binds every address of both families when the host has IPv6
    (IPv4 only otherwise); "0.0.0.0" every IPv4 address; anything else that address.
    """
    if host in ("", "::") and socket.has_dualstack_ipv6():
        try:
            sock = socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=backlog
            )
        except OSError:
            if host == "::":
                raise
            sock = socket.create_server(("0.0.0.0", port), backlog=backlog)
    elif host == "":
        sock = socket.create_server(("0.0.0.0", port), backlog=backlog)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    try:
        sock.setblocking(False)
    except OSError:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return sock


async def listen(netns: str | None, host: str, port: int) -> socket.socket:
    """A listening socket created inside ``netns`` (None: here), without blocking the loop.

    The pooled worker of ``asyncio.to_thread`` only waits; ``setns`` happens on the
    dedicated thread :func:`run_in_netns` starts.
    """
    if netns is None:
        return listening_socket(host, port)
    return await asyncio.to_thread(run_in_netns, netns, lambda: listening_socket(host, port))


__all__ = ["NetnsError", "listen", "listening_socket", "run_in_netns"]
