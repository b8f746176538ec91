"""Real traffic through the userspace proxy in the shared namespace topology.

The node namespace of :mod:`kpy.testing.netns` already runs a server on every address
at port 80 (and holds 172.18.0.50 on ``lo``), so these Services use other ports: a
proxy that binds VIPs cannot share a port with a wildcard listener it does not own
(README.md beside the backend says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kpy_userspace import UserspaceBackend
from kpy_userspace.proxy import ACCEPT_BATCH

from kpy.core.model import ServicePortState
from kpy.kernel.netns import run_in_netns
from kpy.testing import builders as b
from kpy.testing.netns import (
    NODE_IP,
    OUTSIDE_IP,
    POD_A,
    POD_B,
    Topology,
    socket_in,
    tcp,
    topology,
    udp,
)
from kpy.testing.packets import NODE, config_for, local_and_remote

pytestmark = pytest.mark.root
BR0 = "10.244.1.1"  # the node's address towards the pods: what endpoints see as the client


def svc(name: str, ip: str, **kw: object) -> ServicePortState:
    eps = kw.pop("endpoints", None)
    return b.state(
        b.service(name, cluster_ip=ip, port=8000, **kw),  # type: ignore[arg-type]
        local_and_remote() if eps is None else eps,  # type: ignore[arg-type]
        NODE,
    )


def states() -> list[ServicePortState]:
    return [
        svc("web", "10.96.0.10"),
        svc("np", "10.96.0.11", type="NodePort", node_port=30080),
        svc(
            "lb",
            "10.96.0.12",
            type="LoadBalancer",
            node_port=30081,
            lb_ips=["172.18.0.50"],
            source_ranges=["192.168.50.0/24"],
            endpoints=[b.endpoint(POD_A)],
        ),
        svc(
            "remote",
            "10.96.0.20",
            type="NodePort",
            node_port=30083,
            etp_local=True,
            endpoints=[b.endpoint(POD_B, node="node-b")],
        ),
        svc("empty", "10.96.0.16", type="NodePort", node_port=30084, endpoints=[]),
        svc("sticky", "10.96.0.15", affinity=True, affinity_timeout=60),
        svc(
            "fallback",
            "10.96.0.21",
            endpoints=[
                b.endpoint(POD_A, 9),  # nothing listens: refused
                b.endpoint("10.244.1.77"),  # nobody there: the connect times out
                b.endpoint(POD_B),
            ],
        ),
        svc("dns", "10.96.0.17", protocol="UDP", port_name_="dns"),
        svc(
            "dnp", "10.96.0.18", protocol="UDP", port_name_="dns", type="NodePort", node_port=30090
        ),
        svc("v6", "fd00:96::18", endpoints=local_and_remote(ipv6=True)),
    ]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with topology("kpy-us") as t:
        yield t


def make(topo: Topology, connect_timeout: str = "0.3") -> UserspaceBackend:
    config = dataclasses.replace(
        config_for(topo),
        options=(
            ("grace_period", "1"),
            ("connect_timeout", connect_timeout),
            ("udp_idle_timeout", "0.5"),
        ),
    )
    return UserspaceBackend(config)


@pytest.fixture
def proxy(topo: Topology) -> Iterator[UserspaceBackend]:
    backend = make(topo)
    asyncio.run(backend.apply(b.plan(states(), node_info=NODE)))
    try:
        yield backend
    finally:
        asyncio.run(backend.cleanup())


def extra(backend: UserspaceBackend, service: str) -> dict[str, str]:
    programmed = asyncio.run(backend.observe())
    for key, view in programmed.services.items():
        if f"/{service}:" in key:
            return dict(view.extra)
    raise KeyError(service)


def who(replies: list[str]) -> set[str]:
    return {r.split()[0] for r in replies}


def test_cluster_ip_from_a_pod_and_from_the_node(topo: Topology, proxy: UserspaceBackend) -> None:
    from_pod = [tcp(topo.pods["pod-a"], "10.96.0.10", 8000) for _ in range(10)]
    assert who(from_pod) == {"pod-a", "pod-b"}
    # a proxy opens its own connection: endpoints see the node, not the client
    assert {r.split()[1] for r in from_pod} == {BR0}
    assert who([tcp(topo.node, "10.96.0.10", 8000) for _ in range(10)]) == {"pod-a", "pod-b"}


def test_nodeport_and_external_addresses(topo: Topology, proxy: UserspaceBackend) -> None:
    assert who([tcp(topo.client, NODE_IP, 30080) for _ in range(10)]) == {"pod-a", "pod-b"}
    assert tcp(topo.client, NODE_IP, 30081).startswith("pod-a ")


def test_load_balancer_source_ranges_drop(topo: Topology, proxy: UserspaceBackend) -> None:
    assert tcp(topo.client, "172.18.0.50", 8000).startswith("pod-a ")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        tcp(topo.client, "172.18.0.50", 8000, source=OUTSIDE_IP, timeout=1.0)
    assert time.monotonic() - started >= 0.9  # dropped by the socket filter, not reset


def test_no_endpoints_is_refused_at_once(topo: Topology, proxy: UserspaceBackend) -> None:
    for netns, host, port in (
        (topo.pods["pod-a"], "10.96.0.16", 8000),
        (topo.node, "10.96.0.16", 8000),
        (topo.client, NODE_IP, 30084),
    ):
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            tcp(netns, host, port)
        assert time.monotonic() - started < 0.5


def test_external_policy_local_drops_without_a_local_endpoint(
    topo: Topology, proxy: UserspaceBackend
) -> None:
    with pytest.raises(TimeoutError):
        tcp(topo.client, NODE_IP, 30083, timeout=1.0)
    assert tcp(topo.pods["pod-a"], "10.96.0.20", 8000).startswith("pod-b ")


def test_session_affinity_sticks(topo: Topology, proxy: UserspaceBackend) -> None:
    assert len(who([tcp(topo.node, "10.96.0.15", 8000) for _ in range(20)])) == 1
    assert who([tcp(topo.node, "10.96.0.10", 8000) for _ in range(20)]) == {"pod-a", "pod-b"}


def test_connect_failure_falls_back_to_the_next_endpoint(
    topo: Topology, proxy: UserspaceBackend
) -> None:
    replies = [tcp(topo.node, "10.96.0.21", 8000, timeout=3.0) for _ in range(6)]
    assert who(replies) == {"pod-b"}


def test_ipv6_cluster_ip(topo: Topology, proxy: UserspaceBackend) -> None:
    replies = [tcp(topo.pods["pod-a"], "fd00:96::18", 8000) for _ in range(10)]
    assert who(replies) == {"pod-a", "pod-b"}


def _connect(netns: str, host: str, port: int) -> tuple[socket.socket, str]:
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM, None)
    sock.settimeout(5)
    sock.connect((host, port))
    greeting = b""
    while not greeting.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "closed before the greeting"
        greeting += chunk
    return sock, greeting.decode().strip()


def test_large_transfer_both_ways_keeps_every_byte(topo: Topology, proxy: UserspaceBackend) -> None:
    payload = os.urandom(24 * 1024 * 1024)
    sock, _ = _connect(topo.client, NODE_IP, 30080)
    received = hashlib.sha256()
    count = 0
    with sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := sock.recv(1 << 16):
            received.update(chunk)
            count += len(chunk)
        sender.join()
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    stats = extra(proxy, "np")
    assert int(stats["bytes_in"]) >= len(payload)
    assert int(stats["bytes_out"]) >= len(payload)


def test_half_close_is_passed_on(topo: Topology, proxy: UserspaceBackend) -> None:
    sock, _ = _connect(topo.node, "10.96.0.10", 8000)
    with sock:
        sock.sendall(b"last words\n")
        sock.shutdown(socket.SHUT_WR)  # the server sees EOF only if the proxy passes it on
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data == b"last words\n"  # and its own close comes back as our EOF


@pytest.fixture
def patient_proxy(topo: Topology) -> Iterator[UserspaceBackend]:
    """A burst of 1,000 connects overflows the pods' accept queues; dropped SYNs are
    retried after a second, so the proxy must wait longer than that before moving on."""
    backend = make(topo, connect_timeout="5")
    asyncio.run(backend.apply(b.plan(states(), node_info=NODE)))
    try:
        yield backend
    finally:
        asyncio.run(backend.cleanup())


def test_a_thousand_concurrent_connections(topo: Topology, patient_proxy: UserspaceBackend) -> None:
    n = 1000
    held = threading.Event()
    release = threading.Event()
    greetings: list[str] = []
    errors: list[BaseException] = []

    async def one(i: int) -> tuple[str, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(NODE_IP, 30080)
        greeting = await reader.readline()
        writer.write(b"ping %d\n" % i)
        echo = await reader.readline()
        assert echo == b"ping %d\n" % i, (greeting, echo)
        return greeting.decode(), writer

    async def many() -> None:
        opened = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        for item in opened:
            if isinstance(item, BaseException):
                errors.append(item)
            else:
                greetings.append(item[0])
        held.set()
        await asyncio.to_thread(release.wait)
        for item in opened:
            if not isinstance(item, BaseException):
                item[1].close()
                await item[1].wait_closed()

    def worker_main() -> None:
        try:
            asyncio.run(many())
        except BaseException as exc:
            errors.append(exc)
        finally:
            held.set()

    worker = threading.Thread(target=run_in_netns, args=(topo.client, worker_main))
    worker.start()
    try:
        assert held.wait(60), "the connections did not all open"
        assert not errors, errors[:3]
        assert int(extra(patient_proxy, "np")["active"]) == n
    finally:
        release.set()
        worker.join(30)
    assert len(greetings) == n
    assert who(greetings) == {"pod-a", "pod-b"}


def test_endpoint_removal_lets_open_connections_finish_within_the_grace_period(
    topo: Topology, proxy: UserspaceBackend
) -> None:
    sock, greeting = _connect(topo.node, "10.96.0.10", 8000)
    with sock:
        pod = greeting.split()[0]
        survivor = POD_B if pod == "pod-a" else POD_A
        web = states()[0]
        fewer = b.state(web.service, [e for e in web.endpoints if str(e.ip) == survivor], NODE)
        asyncio.run(
            proxy.apply(b.plan([fewer, *states()[1:]], full_sync=False, changed=[web.name]))
        )
        new = {tcp(topo.node, "10.96.0.10", 8000).split()[0] for _ in range(6)}
        assert pod not in new
        sock.sendall(b"still here\n")
        assert sock.recv(4096) == b"still here\n"  # the old connection keeps working
        time.sleep(1.5)  # past grace_period=1
        assert ended(sock)


def ended(sock: socket.socket) -> bool:
    """True when the connection has been reset or closed by the other side."""
    try:
        sock.sendall(b"too late\n")
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_udp_sessions_reply_from_the_service_address_and_expire(
    topo: Topology, proxy: UserspaceBackend
) -> None:
    # a connected client socket accepts replies only from the address it sent to
    for netns, host, port in (
        (topo.pods["pod-a"], "10.96.0.17", 8000),
        (topo.client, NODE_IP, 30090),
    ):
        sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM, None)
        with sock:
            sock.settimeout(2)
            sock.connect((host, port))
            replies = set()
            for _ in range(5):
                sock.send(b"hello")
                replies.add(sock.recv(4096).decode().split()[0])
            assert len(replies) == 1  # one session: one endpoint
    assert int(extra(proxy, "dns")["active"]) == 1
    time.sleep(1.2)  # udp_idle_timeout=0.5
    assert int(extra(proxy, "dns")["active"]) == 0
    spread = {udp(topo.pods["pod-a"], "10.96.0.17", 8000).split()[0] for _ in range(10)}
    assert spread == {"pod-a", "pod-b"}  # new clients are spread again


def test_cleanup_leaves_the_node_as_it_was(topo: Topology) -> None:
    backend = make(topo)
    asyncio.run(backend.apply(b.plan(states(), node_info=NODE)))
    assert tcp(topo.node, "10.96.0.10", 8000)
    asyncio.run(backend.cleanup())
    assert unreachable(topo.node, "10.96.0.10", 8000)
    # the LoadBalancer IP was on lo before the backend came: it stays
    assert tcp(topo.client, "172.18.0.50", 80).startswith("node ")


def unreachable(netns: str, host: str, port: int) -> bool:
    try:
        tcp(netns, host, port, timeout=0.5)
    except OSError:  # refused, unreachable or timed out: nothing answers
        return True
    return False


def test_connections_queued_while_the_proxy_is_busy_are_all_served(
    topo: Topology, proxy: UserspaceBackend
) -> None:
    """Three times as many connections as one wake-up of the accept callback takes are
    queued on the listener while the proxy's loop is held up; once it runs again every
    one is relayed, with what its client sent meanwhile."""
    n = 3 * ACCEPT_BATCH
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(30)

    proxy._proxy.loop.call_soon_threadsafe(hold)
    assert held.wait(10)
    socks: list[socket.socket] = []
    try:
        for i in range(n):  # the kernel completes each handshake; nobody accepts yet
            sock = socket_in(topo.client, socket.AF_INET, socket.SOCK_STREAM, None)
            socks.append(sock)
            sock.settimeout(10)
            sock.connect((NODE_IP, 30080))
            sock.sendall(b"ping %d\n" % i)
        release.set()
        for i, sock in enumerate(socks):
            with sock.makefile("rb") as replies:
                greeting, echo = replies.readline(), replies.readline()
            assert greeting and echo == b"ping %d\n" % i, (greeting, echo)
        assert int(extra(proxy, "np")["connections"]) == n
    finally:
        release.set()
        for sock in socks:
            sock.close()
