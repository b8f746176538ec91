"""A small topology of network namespaces for real-packet tests of any backend.

Created by :func:`topology`, deleted on exit (also on failure); nothing is done in the
machine's own namespace:

* ``node``: the node whose rules a backend programs. A bridge ``br0`` (10.244.1.1/24,
  fd00:244:1::1/64) for its pods, ``vc`` (192.168.50.2/24, the node address) towards
  the client; forwarding and bridge netfilter on.
* ``pod-a`` (10.244.1.5, fd00:244:1::5) and ``pod-b`` (10.244.1.6, fd00:244:1::6) on the
  bridge. Each runs echo servers (TCP and UDP, port 8080, both families) that answer
  ``"<pod-name> <client-ip>"`` and then echo what they receive.
* the node holds the LoadBalancer IP 172.18.0.50 on ``lo`` with its own echo server on
  port 80, so traffic that escapes a source-range filter gets an answer.
* ``client``: outside the cluster, 192.168.50.10/24 and 203.0.113.7/24, routing Service
  addresses through the node.

Clients (:func:`tcp`, :func:`udp`) open their sockets inside a namespace from this
process (no process per connection), so tests can make hundreds of connections.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kpy.kernel.netns import run_in_netns

NODE_IP = "192.168.50.2"
CLIENT_IP = "192.168.50.10"
OUTSIDE_IP = "203.0.113.7"
POD_A, POD_B = "10.244.1.5", "10.244.1.6"
POD_A6, POD_B6 = "fd00:244:1::5", "fd00:244:1::6"


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def nft(netns: str, *args: str, script: str | None = None) -> str:
    """``nft args`` inside ``netns`` (``script`` on its input); its output. A refusal
    raises AssertionError with nft's message."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"nft {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def ns_sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
        check=True,
        capture_output=True,
    )


@dataclass
class EchoServers:
    """TCP and UDP echo servers in one pod namespace, served by threads of this process."""

    name: str
    netns: str
    port: int = 8080
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        def make() -> list[socket.socket]:
            tcp = socket.create_server(
                ("::", self.port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=256
            )
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            udp.bind(("::", self.port))
            return [tcp, udp]

        self.sockets = run_in_netns(self.netns, make)
        for target in (self._tcp, self._udp):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _peer(address: str) -> str:
        return address.removeprefix("::ffff:")

    def _tcp(self) -> None:
        server = self.sockets[0]
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with contextlib.suppress(OSError), conn:
            conn.sendall(f"{self.name} {self._peer(peer[0])}\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)

    def _udp(self) -> None:
        server = self.sockets[1]
        while True:
            try:
                _, peer = server.recvfrom(4096)
                if not peer:  # shut down
                    return
                server.sendto(f"{self.name} {self._peer(peer[0])}\n".encode(), peer)
            except OSError:
                return

    def stop(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=2)


@dataclass
class Topology:
    node: str
    client: str
    pods: dict[str, str]


_counter = iter(range(1_000_000))


def _settle(pod: str, deadline: float = 5.0) -> None:
    """Wait until ``pod`` reaches the node over both families. A pod's first IPv6
    packets right after its link comes up can vanish (a connection then times out);
    one answered connection to the node's echo server settles neighbour discovery."""
    end = time.monotonic() + deadline
    for host in ("10.244.1.1", "fd00:244:1::1"):
        while True:
            try:
                tcp(pod, host, 80, timeout=0.2)
                break
            except OSError:
                if time.monotonic() > end:
                    raise


@contextlib.contextmanager
def topology(prefix: str = "kpy-t") -> Iterator[Topology]:
    """Build the topology; remove every namespace it made on exit (also on failure)."""
    tag = f"{os.getpid()}-{next(_counter)}"
    names = {role: f"{prefix}-{role}-{tag}" for role in ("node", "client", "pod-a", "pod-b")}
    servers: list[EchoServers] = []
    created: list[str] = []
    try:
        for netns in names.values():
            ip("netns", "add", netns)
            created.append(netns)
            ip("-n", netns, "link", "set", "lo", "up")
        node, client = names["node"], names["client"]
        ip("-n", node, "link", "add", "br0", "type", "bridge")
        ip("-n", node, "addr", "add", "10.244.1.1/24", "dev", "br0")
        ip("-n", node, "addr", "add", "fd00:244:1::1/64", "dev", "br0", "nodad")
        ip("-n", node, "link", "set", "br0", "up")
        for pod, v4, v6 in (("pod-a", POD_A, POD_A6), ("pod-b", POD_B, POD_B6)):
            pns = names[pod]
            veth = f"v{pod[-1]}"
            ip(
                "-n",
                node,
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pns,
            )
            ip("-n", node, "link", "set", veth, "master", "br0", "up")
            # a pod reaching itself through a Service leaves the port it came in by
            ip("-n", node, "link", "set", veth, "type", "bridge_slave", "hairpin", "on")
            ip("-n", pns, "addr", "add", f"{v4}/24", "dev", "eth0")
            ip("-n", pns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            ip("-n", pns, "link", "set", "eth0", "up")
            ip("-n", pns, "route", "add", "default", "via", "10.244.1.1")
            ip("-n", pns, "-6", "route", "add", "default", "via", "fd00:244:1::1")
        ip("-n", node, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", client)
        ip("-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "vc")
        ip("-n", node, "link", "set", "vc", "up")
        ip("-n", node, "route", "add", "203.0.113.0/24", "via", CLIENT_IP)
        ip("-n", node, "route", "add", "default", "via", CLIENT_IP)
        ip("-n", node, "-6", "route", "add", "fd00:96::/64", "dev", "br0")
        ip("-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        ip("-n", client, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        ip("-n", client, "link", "set", "eth0", "up")
        ip("-n", client, "route", "add", "default", "via", NODE_IP)
        ns_sysctl(node, "net.ipv4.ip_forward", "1")
        ns_sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        ns_sysctl(node, "net.bridge.bridge-nf-call-iptables", "1")
        ns_sysctl(node, "net.bridge.bridge-nf-call-ip6tables", "1")
        # Something answers on the LoadBalancer IP if a packet reaches the node undNATed
        # and is not dropped: a source-range test then fails instead of timing out.
        ip("-n", node, "addr", "add", "172.18.0.50/32", "dev", "lo")
        bystander = EchoServers("node", node, port=80)
        bystander.start()
        servers.append(bystander)
        for pod in ("pod-a", "pod-b"):
            server = EchoServers(pod, names[pod])
            server.start()
            servers.append(server)
        for pod in ("pod-a", "pod-b"):
            _settle(names[pod])
        yield Topology(
            node=node, client=client, pods={"pod-a": names["pod-a"], "pod-b": names["pod-b"]}
        )
    finally:
        for server in servers:
            server.stop()
        for netns in created:
            subprocess.run(["ip", "netns", "del", netns], check=False)


def socket_in(netns: str, family: int, kind: int, source: str | None) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family, kind)
        if source is not None:
            sock.bind((source, 0))
        return sock

    return run_in_netns(netns, make)


def tcp(
    netns: str, host: str, port: int, *, source: str | None = None, timeout: float = 2.0
) -> str:
    """The greeting of a TCP server reached from ``netns``; raises OSError on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket_in(netns, family, socket.SOCK_STREAM, source) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        return sock.makefile().readline().strip()


def udp(netns: str, host: str, port: int, *, timeout: float = 2.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket_in(netns, family, socket.SOCK_DGRAM, None) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello", (host, port))
        return sock.recv(4096).decode().strip()


_scratch_counter = iter(range(1_000_000))


@contextlib.contextmanager
def scratch(prefix: str = "kpy-s") -> Iterator[str]:
    """A fresh, empty network namespace with ``lo`` up; deleted on exit (also on failure)."""
    name = f"{prefix}{os.getpid()}-{next(_scratch_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
