"""A small node-and-pods topology inside the UML guest, with echo servers and clients.

The guest's root namespace is the node (the backend programs it: the guest kernel is
thrown away after the run). Each pod is a network namespace behind a veth pair with a
/24 of its own and a default route via the node; a ``client`` namespace plays a host
outside the cluster. Echo servers (one Python process per pod) answer every line with
``<pod name> <peer address>``; clients connect from any namespace through a thread
that enters it (``setns`` affects only the calling thread). :func:`running` is the IPVS
backend under test, removed with what it programmed afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from kpy_ipvs import IpvsBackend

from kpy.core.backend import BackendConfig
from kpy.core.model import Plan

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NODE_IP = "192.168.50.1"
CLIENT_IP = "192.168.50.2"

SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
host = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(128)
print("ready", flush=True)
def serve(conn, peer):
    with conn, conn.makefile("rwb") as f:
        for line in f:
            f.write(f"{name} {peer[0]}\n".encode()); f.flush()
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread inside namespace ``name`` (None: the node's)."""
    if name is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def ask(address: str, port: int, *, netns: str | None = None, timeout: float = 3.0) -> str:
    """One connection, one line: the answering pod's ``name peer``."""

    def go() -> str:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.sendall(b"hi\n")
            return s.makefile().readline().strip()

    return in_netns(netns, go)


def connect(address: str, port: int, *, netns: str | None = None) -> socket.socket:
    return in_netns(netns, lambda: socket.create_connection((address, port), timeout=3.0))


def talk(sock: socket.socket) -> str:
    sock.sendall(b"hi\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


@contextmanager
def running(config: BackendConfig, plan: Plan | None = None) -> Iterator[IpvsBackend]:
    """An IPVS backend for ``config`` (with ``plan`` applied); everything it programmed
    is removed afterwards."""
    backend = IpvsBackend(config)
    try:
        if plan is not None:
            asyncio.run(backend.apply(plan))
        yield backend
    finally:
        asyncio.run(backend.cleanup())
        backend.close()


def restart_ops(config: BackendConfig, plan: Plan) -> int:
    """The operations a restarted backend's first sync of ``plan`` sends (0: it adopts
    the kernel's state as it is)."""
    restarted = IpvsBackend(config)
    try:
        return asyncio.run(restarted.apply(plan)).ops
    finally:
        restarted.close()


def dropped(address: str, port: int, netns: str | None = None, *, wait: float = 1.0) -> bool:
    """True when the connection attempt gets no answer within ``wait`` seconds (a drop),
    False when it is answered; a refusal (reject) raises."""
    try:
        ask(address, port, netns=netns, timeout=wait)
    except TimeoutError:
        return True
    return False


@dataclass
class Lab:
    pods: dict[str, str] = field(default_factory=dict)  # name → IP
    pods6: dict[str, str] = field(default_factory=dict)  # name → IPv6 address
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _attach(self, name: str, node_side: str, address: str, gateway: str) -> None:
        """Namespace ``name`` behind the veth ``veth-<name>``: the node holds ``node_side``
        on it, the namespace ``address`` on its ``eth0`` with a default route via
        ``gateway``."""
        veth = f"veth-{name}"
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "addr", "add", node_side, "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", name, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "route", "add", "default", "via", gateway)

    def _serve(self, name: str, port: int, *host: str) -> None:
        """An echo server in pod ``name`` on ``port`` (of ``host``, else every IPv4
        address), answering once it listens."""
        cmd = [sys.executable, "-c", SERVER, name, str(port), *host]
        proc = subprocess.Popen(["ip", "netns", "exec", name, *cmd], stdout=subprocess.PIPE)
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"

    def add_pod(self, name: str, index: int, port: int = 8080) -> str:
        ip = f"10.244.{index}.2"
        self._attach(name, f"10.244.{index}.1/24", f"{ip}/24", f"10.244.{index}.1")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        self._serve(name, port)
        self.pods[name] = ip
        return ip

    def add_ipv6(self, name: str, index: int, port: int = 8086) -> str:
        """Give pod ``name`` an IPv6 address and a server for it on ``port``."""
        ip = f"fd00:244:{index}::2"
        with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
            f.write("1")
        sh("ip", "addr", "add", f"fd00:244:{index}::1/64", "dev", f"veth-{name}", "nodad")
        sh("ip", "-n", name, "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", name, "-6", "route", "add", "default", "via", f"fd00:244:{index}::1")
        self._serve(name, port, "::")
        self.pods6[name] = ip
        return ip

    def add_client(self) -> None:
        self._attach("client", f"{NODE_IP}/24", f"{CLIENT_IP}/24", NODE_IP)

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for name in [*self.pods, "client"]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", f"veth-{name}"], capture_output=True, check=False)
        time.sleep(0.1)
