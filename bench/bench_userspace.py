"""Benchmark of the userspace proxy against socat, haproxy, kernel DNAT and no relay.

In the namespaces of :mod:`kpy.testing.netns` (never the machine's own): a client
namespace talks through the node namespace to servers in pod-a, one run, side by side:

* ``direct``: to the pod's address (the node only routes) — the physical floor;
* ``nftables``: a ClusterIP DNATed by kpy's nftables backend (kernel relay);
* ``userspace``: a ClusterIP served by kpy's userspace proxy;
* ``socat``: ``socat TCP-LISTEN:…,fork`` on the node address (a process per connection);
* ``haproxy``: ``haproxy`` in TCP mode on the node address.

Measured per target: one-stream bulk throughput (MB/s, 256 MiB client → server),
connection rate (connect, 64-byte request, 64-byte reply, close; 32 concurrent clients
for 3 s), and p50 latency of one fresh connection's request/reply (500 in a row), with
the added latency over ``direct``.

Usage: ``sudo python bench/bench_userspace.py [--bulk-mib 256] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

from kpy_nftables import NftablesBackend
from kpy_userspace import UserspaceBackend

from kpy.netns_socket import run_in_netns
from kpy.testing import builders as b
from kpy.testing.netns import NODE_IP, POD_A, Topology, topology
from kpy.testing.packets import config_for

SINK, RR = 9000, 9001
NODE = b.node("node-a", addresses=[NODE_IP])


class Servers:
    """A sink (counts bytes until EOF, answers the count) and a request/reply server
    (64 bytes in, 64 bytes out) in pod-a, on an asyncio loop of their own thread."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=run_in_netns, args=(netns, self._main))
        self.thread.start()
        self.ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
            writer.write(total.to_bytes(8, "big"))
            await writer.drain()
            writer.close()

        async def rr(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    writer.write(await reader.readexactly(64))
                    await writer.drain()
            writer.close()

        async def start() -> list[asyncio.Server]:
            return [
                await asyncio.start_server(sink, "0.0.0.0", SINK, backlog=1024),
                await asyncio.start_server(rr, "0.0.0.0", RR, backlog=1024),
            ]

        servers = self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()
        for server in servers:
            server.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def bulk(host: str, port: int, mib: int) -> float:
    chunk = os.urandom(1 << 20)
    sock = socket.create_connection((host, port), timeout=30)
    with sock:
        started = time.perf_counter()
        for _ in range(mib):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            more = sock.recv(8 - len(got))
            if not more:
                break
            got += more
        elapsed = time.perf_counter() - started
    assert int.from_bytes(got, "big") == mib << 20, "bytes lost on the way"
    return mib * 1.048576 / elapsed


def latency(host: str, port: int, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64))
        samples.append(time.perf_counter() - started)
    return samples


def rate(host: str, port: int, seconds: float, concurrency: int = 32) -> float:
    done = 0

    async def worker(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"x" * 64)
            await reader.readexactly(64)
            writer.close()
            await writer.wait_closed()
            done += 1

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(main())
    return done / (time.perf_counter() - started)


@contextlib.contextmanager
def relays(topo: Topology) -> Iterator[dict[str, tuple[str, int]]]:
    """Start every relay; yield target name → (host, port offset base)."""
    procs: list[subprocess.Popen[bytes]] = []
    states = [
        b.state(
            b.service("bench", cluster_ip="10.96.0.10", port=SINK, port_name_="sink"),
            [b.endpoint(POD_A, SINK)],
            NODE,
        ),
        b.state(
            b.service("bench", cluster_ip="10.96.0.10", port=RR, port_name_="rr"),
            [b.endpoint(POD_A, RR)],
            NODE,
        ),
    ]
    kernel_states = [
        b.state(
            b.service("kernel", cluster_ip="10.96.0.30", port=port, port_name_=name),
            [b.endpoint(POD_A, port)],
            NODE,
        )
        for name, port in (("sink", SINK), ("rr", RR))
    ]
    config = config_for(topo)
    userspace = UserspaceBackend(config)
    nftables = NftablesBackend(config)
    tmp = tempfile.mkdtemp(prefix="kpy-bench-haproxy-")
    try:
        asyncio.run(userspace.apply(b.plan(states, node_info=NODE)))
        asyncio.run(nftables.apply(b.plan(kernel_states, node_info=NODE)))
        targets = {
            "direct": POD_A,
            "nftables": "10.96.0.30",
            "userspace": "10.96.0.10",
            "socat": NODE_IP,
            "haproxy": "192.168.50.3",
        }
        subprocess.run(
            ["ip", "-n", topo.node, "addr", "add", "192.168.50.3/24", "dev", "vc"], check=True
        )
        for port in (SINK, RR):
            procs.append(
                subprocess.Popen(
                    [
                        "ip", "netns", "exec", topo.node, "socat",
                        f"TCP-LISTEN:{port},bind={NODE_IP},fork,reuseaddr,backlog=1024",
                        f"TCP:{POD_A}:{port}",
                    ]
                )
            )  # fmt: skip
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                "global\n  maxconn 8000\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 60s\n  timeout server 60s\n"
            )
            for port in (SINK, RR):
                f.write(f"listen l{port}\n  bind 192.168.50.3:{port}\n  server s {POD_A}:{port}\n")
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", topo.node, "haproxy", "-f", cfg, "-db"])
        )
        time.sleep(1.0)
        yield {name: (host, 0) for name, host in targets.items()}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        asyncio.run(userspace.cleanup())
        asyncio.run(nftables.cleanup())
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--latency-count", type=int, default=500)
    args = parser.parse_args()
    ipaddress.ip_address(NODE_IP)
    results: dict[str, dict[str, float]] = {}
    with topology("kpy-bench-us") as topo:
        servers = Servers(topo.pods["pod-a"])
        try:
            with relays(topo) as targets:
                for name, (host, _) in targets.items():

                    def measure(host: str = host) -> dict[str, float]:
                        lat = latency(host, RR, args.latency_count)
                        return {
                            "mb_s": round(bulk(host, SINK, args.bulk_mib), 1),
                            "conn_s": round(rate(host, RR, args.seconds)),
                            "p50_us": round(statistics.median(lat) * 1e6, 1),
                        }

                    results[name] = run_in_netns(topo.client, measure)
                    print(name, results[name], flush=True)
        finally:
            servers.stop()
    direct = results["direct"]["p50_us"]
    for row in results.values():
        row["added_p50_us"] = round(row["p50_us"] - direct, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
