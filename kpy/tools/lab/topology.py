"""A multi-node cluster in network namespaces, for real-packet tests and for ``kpy lab``.

Nothing is created in the machine's own namespace: every interface, address, route and
sysctl lives in a namespace made here, and :meth:`Cluster.__exit__` removes them all,
also when building failed half-way. Names start with a prefix (``kpy-t<pid>`` by
default, so parallel test processes never collide); :func:`remove_stale` deletes what
a crashed run left behind.

Addressing (``i`` is the node number, 1-based; ``k`` the pod number on its node)::

    <prefix>-net       underlay: bridge br0 joining every node and the client
                       192.168.100.0/24, fd00:100::/64
    <prefix>-node-i    eth0 192.168.100.1i, fd00:100::1i (on the underlay)
                       cbr0 10.244.i.1/24, fd00:244:i::1/64 (the pods' bridge, gateway)
                       routes: 10.244.j.0/24 and fd00:244:j::/64 via node j's underlay
                       address; default via the client (the "outside world")
                       ip_forward on, bridge netfilter on (hairpin through Services)
    <prefix>-pod-ix    pod k of node i (x = a, b, …): eth0 10.244.i.(k+1), fd00:244:i::(k+1)
                       default route via the node's cbr0
    <prefix>-client    an external client: 192.168.100.100 and fd00:100::100 on the
                       underlay, plus 203.0.113.100/24 as an address outside any
                       loadBalancerSourceRanges; routes the Service range 10.96.0.0/12
                       and fd00:96::/108 and the external/LoadBalancer test ranges
                       192.0.2.0/24, 172.18.0.0/16 and 2001:db8::/64 via node 1
                       (:meth:`Cluster.route_services_via` picks another node)

With ``echo`` ports given, every pod runs :mod:`kpy.tools.lab.echo` (answering with its
pod name and the client address it saw) in its namespace until the cluster is removed.

Connections are made from sockets created inside a namespace by this process
(:func:`kpy.kernel.netns.run_in_netns`): no process per connection, so a test can make
hundreds of them quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import string
import subprocess
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Any

from kpy.kernel.netns import NETNS_DIR, run_in_netns
from kpy.kernel.proc import in_netns

UNDERLAY = IPv4Network("192.168.100.0/24")
UNDERLAY6 = IPv6Network("fd00:100::/64")
CLIENT_IP = IPv4Address("192.168.100.100")
CLIENT_IP6 = IPv6Address("fd00:100::100")
CLIENT_OUTSIDE_IP = IPv4Address("203.0.113.100")
SERVICE_RANGES = ("10.96.0.0/12", "192.0.2.0/24", "172.18.0.0/16")
SERVICE_RANGES6 = ("fd00:96::/108", "2001:db8::/64")
CLUSTER_CIDR = IPv4Network("10.244.0.0/16")
CLUSTER_CIDR6 = IPv6Network("fd00:244::/48")

Address = IPv4Address | IPv6Address | str


def node_ip(i: int) -> IPv4Address:
    return IPv4Address(f"192.168.100.{10 + i}")


def node_ip6(i: int) -> IPv6Address:
    return IPv6Address(f"fd00:100::{10 + i}")


def pod_cidr(i: int) -> IPv4Network:
    return IPv4Network(f"10.244.{i}.0/24")


def pod_cidr6(i: int) -> IPv6Network:
    return IPv6Network(f"fd00:244:{i}::/64")


def default_prefix() -> str:
    return f"kpy-t{os.getpid()}"


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


class Netns:
    """A named network namespace (``/run/netns/<name>``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def run(
        self, *cmd: str, input: str | None = None, timeout: float = 10, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside this namespace (``nsenter``) and capture its output."""
        return subprocess.run(
            in_netns(self.name, cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl of this namespace (``/proc/sys/net`` is per namespace)."""
        path = Path("/proc/sys") / key.replace(".", "/")
        run_in_netns(self.name, lambda: path.write_text(value))

    def socket(self, family: int, kind: int, source: Address | None = None) -> socket.socket:
        """A socket that belongs to this namespace, usable from any thread of this process."""

        def make() -> socket.socket:
            sock = socket.socket(family, kind)
            if source is not None:
                sock.bind((str(source), 0))
            return sock

        return run_in_netns(self.name, make)

    def pids(self) -> list[int]:
        result = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(p) for p in result.stdout.split()]


@dataclass
class Pod:
    name: str
    netns: Netns
    ip: IPv4Address
    ip6: IPv6Address
    node: str


@dataclass
class Node:
    name: str
    index: int
    netns: Netns
    ip: IPv4Address
    ip6: IPv6Address
    pod_cidr: IPv4Network
    pod_cidr6: IPv6Network
    pods: list[Pod] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EchoPorts:
    """The ports every pod's echo server listens on (both families)."""

    tcp: tuple[int, ...] = (8080,)
    udp: tuple[int, ...] = (5353,)
    http: tuple[int, ...] = (80,)

    def argv(self) -> list[str]:
        out: list[str] = []
        for flag, ports in (("--tcp", self.tcp), ("--udp", self.udp), ("--http", self.http)):
            for port in ports:
                out += [flag, str(port)]
        return out


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp(
    src: Netns,
    ip: Address,
    port: int,
    *,
    timeout: float = 2.0,
    send: bytes = b"",
    source: Address | None = None,
) -> str:
    """Connect from ``src``; the echo greeting ``"<pod> <client-ip>"`` (plus the echo of
    ``send``, after a half-close, when given). ``ConnectionRefusedError`` on a reject,
    ``TimeoutError`` when the packets are dropped."""
    host = str(ip)
    with src.socket(_family(host), socket.SOCK_STREAM, source) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        with sock.makefile("rb") as reader:
            line = reader.readline()
            if not line:
                raise ConnectionResetError(f"{host}:{port} closed without a greeting")
            if not send:
                return line.decode().strip()
            sock.sendall(send)
            sock.shutdown(socket.SHUT_WR)
            echoed = reader.read()
        return line.decode().strip() + "\n" + echoed.decode()


def udp(
    src: Netns, ip: Address, port: int, *, timeout: float = 1.0, source: Address | None = None
) -> str:
    """One datagram from ``src``; the reply ``"<pod> <client-ip>"``; ``TimeoutError`` when
    nothing answers, ``ConnectionRefusedError`` when an ICMP unreachable comes back."""
    host = str(ip)
    with src.socket(_family(host), socket.SOCK_DGRAM, source) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(b"hello\n")
        return sock.recv(4096).decode().strip()


def http(
    src: Netns, ip: Address, port: int, *, timeout: float = 2.0, source: Address | None = None
) -> dict[str, Any]:
    """``curl http://ip:port/`` from ``src``: the echo server's JSON ``{"pod", "client"}``."""
    host = str(ip)
    with src.socket(_family(host), socket.SOCK_STREAM, source) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionResetError(f"{host}:{port}: unexpected answer {head[:40]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def remove_stale(prefix: str) -> list[str]:
    """Delete every namespace named ``<prefix>-…`` (killing processes still inside);
    returns the names removed. For leftovers of a crashed run."""
    removed: list[str] = []
    if not NETNS_DIR.exists():
        return removed
    for path in sorted(NETNS_DIR.iterdir()):
        if not path.name.startswith(prefix + "-"):
            continue
        netns = Netns(path.name)
        for pid in netns.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", path.name], capture_output=True, check=False)
        removed.append(path.name)
    return removed


class Cluster:
    """Nodes, pods and a client in namespaces; a context manager (see the module docs)."""

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 2,
        *,
        prefix: str | None = None,
        ipv6: bool = True,
        echo: EchoPorts | None = EchoPorts(),
    ) -> None:
        if not 1 <= nodes <= 50 or not 1 <= pods_per_node <= 26:
            raise ValueError("1..50 nodes with 1..26 pods each")
        self.prefix = prefix or default_prefix()
        self.ipv6 = ipv6
        self.echo = echo
        self.underlay = Netns(f"{self.prefix}-net")
        self.client = Netns(f"{self.prefix}-client")
        self.client_ip = CLIENT_IP
        self.client_ip6 = CLIENT_IP6
        self.client_outside_ip = CLIENT_OUTSIDE_IP
        self.nodes: list[Node] = []
        for i in range(1, nodes + 1):
            node = Node(
                name=f"node-{i}",
                index=i,
                netns=Netns(f"{self.prefix}-node-{i}"),
                ip=node_ip(i),
                ip6=node_ip6(i),
                pod_cidr=pod_cidr(i),
                pod_cidr6=pod_cidr6(i),
            )
            for k in range(pods_per_node):
                name = f"pod-{i}{string.ascii_lowercase[k]}"
                node.pods.append(
                    Pod(
                        name=name,
                        netns=Netns(f"{self.prefix}-{name}"),
                        ip=node.pod_cidr[k + 2],
                        ip6=node.pod_cidr6[k + 2],
                        node=node.name,
                    )
                )
            self.nodes.append(node)
        self.echo_processes: dict[str, subprocess.Popen[bytes]] = {}
        self._made: list[Netns] = []

    # ------------------------------------------------------------------ lookup

    @property
    def pods(self) -> list[Pod]:
        return [pod for node in self.nodes for pod in node.pods]

    def pod(self, name: str) -> Pod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def namespaces(self) -> list[Netns]:
        return [
            self.underlay,
            self.client,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods),
        ]

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Cluster:
        try:
            self.build()
            if self.echo is not None:
                self.start_echo(self.echo)
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def _add(self, netns: Netns) -> None:
        _ip("netns", "add", netns.name)
        self._made.append(netns)
        _ip("-n", netns.name, "link", "set", "lo", "up")
        # no duplicate address detection: link-local addresses (used by neighbour
        # discovery) are usable at once instead of after a second or two
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")

    def build(self) -> None:
        """Create every namespace, link, address and route."""
        v6 = self.ipv6
        net = self.underlay.name
        self._add(self.underlay)
        _ip("-n", net, "link", "add", "br0", "type", "bridge")
        _ip("-n", net, "link", "set", "br0", "up")
        self._add(self.client)
        for node in self.nodes:
            ns = node.netns.name
            self._add(node.netns)
            _ip("-n", net, "link", "add", f"n{node.index}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)  # fmt: skip
            _ip("-n", net, "link", "set", f"n{node.index}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            if v6:
                _ip("-n", ns, "addr", "add", f"{node.ip6}/64", "dev", "eth0", "nodad")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "add", "cbr0", "type", "bridge")
            _ip("-n", ns, "addr", "add", f"{node.pod_cidr[1]}/24", "dev", "cbr0")
            if v6:
                _ip("-n", ns, "addr", "add", f"{node.pod_cidr6[1]}/64", "dev", "cbr0", "nodad")
            _ip("-n", ns, "link", "set", "cbr0", "up")
            for k, pod in enumerate(node.pods):
                self._add(pod.netns)
                veth = f"vp{k}"
                _ip("-n", ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", pod.netns.name)  # fmt: skip
                _ip("-n", ns, "link", "set", veth, "master", "cbr0", "up")
                # a pod reaching itself through a Service leaves by the port it came in by
                _ip("-n", ns, "link", "set", veth, "type", "bridge_slave", "hairpin", "on")
                pns = pod.netns.name
                _ip("-n", pns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
                if v6:
                    _ip("-n", pns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
                _ip("-n", pns, "link", "set", "eth0", "up")
                _ip("-n", pns, "route", "add", "default", "via", str(node.pod_cidr[1]))
                if v6:
                    _ip("-n", pns, "-6", "route", "add", "default", "via", str(node.pod_cidr6[1]))
            for other in self.nodes:
                if other is node:
                    continue
                _ip("-n", ns, "route", "add", str(other.pod_cidr), "via", str(other.ip))
                if v6:
                    _ip("-n", ns, "-6", "route", "add", str(other.pod_cidr6), "via",
                        str(other.ip6))  # fmt: skip
            _ip("-n", ns, "route", "add", "default", "via", str(CLIENT_IP))
            if v6:
                _ip("-n", ns, "-6", "route", "add", "default", "via", str(CLIENT_IP6))
            node.netns.sysctl("net.ipv4.ip_forward", "1")
            node.netns.sysctl("net.ipv6.conf.all.forwarding", "1")
            with contextlib.suppress(FileNotFoundError):  # br_netfilter not loaded
                node.netns.sysctl("net.bridge.bridge-nf-call-iptables", "1")
                node.netns.sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
        cl = self.client.name
        _ip("-n", net, "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", cl)
        _ip("-n", net, "link", "set", "cl", "master", "br0", "up")
        _ip("-n", cl, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        _ip("-n", cl, "addr", "add", f"{CLIENT_OUTSIDE_IP}/24", "dev", "eth0")
        if v6:
            _ip("-n", cl, "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
        _ip("-n", cl, "link", "set", "eth0", "up")
        self.route_services_via(self.nodes[0])

    def route_services_via(self, node: Node) -> None:
        """Send the client's Service, external-IP and LoadBalancer traffic to ``node``."""
        cl = self.client.name
        for cidr in SERVICE_RANGES:
            _ip("-n", cl, "route", "replace", cidr, "via", str(node.ip))
        if self.ipv6:
            for cidr in SERVICE_RANGES6:
                _ip("-n", cl, "-6", "route", "replace", cidr, "via", str(node.ip6))

    def start_echo(self, ports: EchoPorts, *, log_dir: Path | None = None) -> None:
        """Start every pod's echo server and wait until each says it is ready.

        With ``log_dir`` the servers are detached (own session, stderr to
        ``<log_dir>/<pod>.log``) so they outlive this process — the lab's way.
        """
        started: dict[str, subprocess.Popen[bytes]] = {}
        for pod in self.pods:
            echo = [sys.executable, "-m", "kpy.tools.lab.echo", "--name", pod.name]
            argv = in_netns(pod.netns.name, [*echo, *ports.argv()])
            if log_dir is None:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            else:
                # setsid -f: the server runs in its own session and outlives us; the
                # pipe still carries its "ready" line
                log_dir.mkdir(parents=True, exist_ok=True)
                with (log_dir / f"{pod.name}.log").open("ab") as log:
                    proc = subprocess.Popen(
                        ["setsid", "-f", *argv],
                        stdout=subprocess.PIPE,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                    )
            started[pod.name] = proc
            if log_dir is None:
                self.echo_processes[pod.name] = proc  # stopped by destroy()
        failed = []
        for name, proc in started.items():
            assert proc.stdout is not None
            if proc.stdout.readline().decode().strip() != "ready":
                failed.append(name)
            if log_dir is not None:  # only the setsid parent, which has exited
                proc.stdout.close()
                proc.wait()
        if failed:
            raise RuntimeError(f"echo servers did not start: {', '.join(failed)}")

    def destroy(self) -> None:
        """Stop the echo servers and delete every namespace made (idempotent)."""
        for proc in self.echo_processes.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.echo_processes.values():
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.echo_processes.clear()
        for netns in reversed(self._made):
            for pid in netns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", netns.name], capture_output=True, check=False)
        self._made.clear()

    # ------------------------------------------------------------------ traffic
    # the module's clients, for callers that hold the cluster

    tcp = staticmethod(tcp)
    udp = staticmethod(udp)
    http = staticmethod(http)


__all__ = [
    "CLIENT_IP",
    "CLIENT_IP6",
    "CLIENT_OUTSIDE_IP",
    "CLUSTER_CIDR",
    "CLUSTER_CIDR6",
    "Cluster",
    "EchoPorts",
    "Netns",
    "Node",
    "Pod",
    "http",
    "node_ip",
    "node_ip6",
    "pod_cidr",
    "pod_cidr6",
    "remove_stale",
    "tcp",
    "udp",
]
