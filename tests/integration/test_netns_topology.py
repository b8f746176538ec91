"""The multi-node namespace cluster (kpy.tools.lab.topology) carries real traffic, and goes away.

No kpy rules are programmed here: this is the plain network every lab and backend
test stands on — pods on a node's bridge, nodes on an underlay routing each other's
pod CIDRs, an external client — checked with real connections to the echo servers.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpy.tools.lab import topology as c
from kpy.tools.lab.topology import Cluster
from tests.conftest import require_root

pytestmark = pytest.mark.root


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_root()
    with Cluster(nodes=2, pods_per_node=2) as built:
        yield built


def test_addressing_follows_the_documented_plan(cluster: Cluster) -> None:
    assert [n.name for n in cluster.nodes] == ["node-1", "node-2"]
    assert [str(n.ip) for n in cluster.nodes] == ["192.168.100.11", "192.168.100.12"]
    assert [str(p.ip) for p in cluster.pods] == [
        "10.244.1.2",
        "10.244.1.3",
        "10.244.2.2",
        "10.244.2.3",
    ]
    assert str(cluster.pod("pod-2b").ip6) == "fd00:244:2::3"
    assert cluster.pod("pod-2b").node == "node-2"
    assert all(ns.name.startswith(cluster.prefix + "-") for ns in cluster.namespaces())


@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_pod_to_pod_on_the_same_node_keeps_the_source(cluster: Cluster, family: str) -> None:
    a, b = cluster.pod("pod-1a"), cluster.pod("pod-1b")
    assert cluster.tcp(a.netns, getattr(b, family), 8080) == f"pod-1b {getattr(a, family)}"


@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_pod_to_pod_across_nodes_is_routed_over_the_underlay(cluster: Cluster, family: str) -> None:
    a, b = cluster.pod("pod-1a"), cluster.pod("pod-2b")
    assert cluster.tcp(a.netns, getattr(b, family), 8080) == f"pod-2b {getattr(a, family)}"
    assert cluster.udp(b.netns, getattr(a, family), 5353) == f"pod-1a {getattr(b, family)}"
    assert cluster.http(a.netns, getattr(b, family), 80) == {
        "pod": "pod-2b",
        "client": str(getattr(a, family)),
    }


def test_the_client_reaches_nodes_and_nodes_reach_pods(cluster: Cluster) -> None:
    # nothing listens on the node: a refusal proves the packet arrived and came back
    for node in cluster.nodes:
        with pytest.raises(ConnectionRefusedError):
            cluster.tcp(cluster.client, node.ip, 8080)
        with pytest.raises(ConnectionRefusedError):
            cluster.tcp(cluster.client, node.ip6, 8080)
    node2 = cluster.node("node-2")
    assert cluster.tcp(node2.netns, cluster.pod("pod-1b").ip, 8080) == f"pod-1b {node2.ip}"


def test_the_client_routes_service_ranges_via_the_chosen_node(cluster: Cluster) -> None:
    def via() -> str:
        out = cluster.client.run("ip", "route", "get", "10.96.0.10").stdout
        return out.split(" via ")[1].split()[0]

    assert via() == "192.168.100.11"
    cluster.route_services_via(cluster.node("node-2"))
    try:
        assert via() == "192.168.100.12"
    finally:
        cluster.route_services_via(cluster.nodes[0])


def test_echo_tcp_echoes_a_large_transfer_until_half_close(cluster: Cluster) -> None:
    a, b = cluster.pod("pod-2a"), cluster.pod("pod-1a")
    assert cluster.tcp(a.netns, b.ip, 8080, send=b"hello\n") == f"pod-1a {a.ip}\nhello\n"
    payload = bytes(range(256)) * 4096  # 1 MiB
    with a.netns.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((str(b.ip), 8080))
        with sock.makefile("rb") as reader:
            assert reader.readline() == f"pod-1a {a.ip}\n".encode()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert reader.read() == payload


def test_many_connections_are_cheap(cluster: Cluster) -> None:
    a, b = cluster.pod("pod-1a"), cluster.pod("pod-2a")
    replies = {cluster.tcp(a.netns, b.ip, 8080) for _ in range(300)}
    assert replies == {f"pod-2a {a.ip}"}


def test_a_closed_port_is_refused_and_a_dropped_one_times_out(cluster: Cluster) -> None:
    a = cluster.pod("pod-1a")
    with pytest.raises(ConnectionRefusedError):
        cluster.tcp(a.netns, cluster.pod("pod-2a").ip, 9)
    with pytest.raises(TimeoutError):  # nobody has 10.244.9.9: the node's default goes nowhere
        cluster.tcp(a.netns, "10.244.9.9", 80, timeout=0.5)


def test_teardown_leaves_nothing_and_stale_leftovers_are_removed(tmp_path: Path) -> None:
    require_root()
    prefix = f"kpy-t{time.monotonic_ns() % 10**6}x"
    with Cluster(nodes=1, pods_per_node=1, prefix=prefix) as small:
        made = {ns.name for ns in small.namespaces()}
        assert made <= namespaces()
        echo_pids = [p.pid for p in small.echo_processes.values()]
    assert not (made & namespaces())
    assert not any(Path(f"/proc/{pid}").exists() for pid in echo_pids)
    # a crashed run: namespaces (with a process inside) left behind
    leftover = Cluster(nodes=1, pods_per_node=1, prefix=prefix, echo=None)
    leftover.build()
    leftover.start_echo(c.EchoPorts(), log_dir=tmp_path)
    assert {ns.name for ns in leftover.namespaces()} <= namespaces()
    removed = c.remove_stale(prefix)
    assert set(removed) == {ns.name for ns in leftover.namespaces()}
    assert not any(name.startswith(prefix + "-") for name in namespaces())


def test_a_failed_build_removes_what_it_made() -> None:
    require_root()
    prefix = f"kpy-t{time.monotonic_ns() % 10**6}f"
    broken = Cluster(nodes=1, pods_per_node=1, prefix=prefix, echo=c.EchoPorts(tcp=(-1,)))
    with pytest.raises(RuntimeError), broken:
        pass
    assert not any(name.startswith(prefix + "-") for name in namespaces())
