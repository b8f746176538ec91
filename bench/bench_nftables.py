"""Benchmark of the nftables backend in a network namespace (never the machine's own).

For N Services with 5 endpoints each (the synthetic cluster of ``bench_core``), from Kubernetes
JSON through the tracker to the kernel:

* cold sync: the first full plan applied to an empty namespace (render + ``nft -f``),
  and the read-back of its rules that a thread does after ``apply`` returned (waited
  for before anything else);
* one-endpoint change: an EndpointSlice event → tracker → plan → transaction applied
  (p50/p90 of 100 changes) and the bytes of that transaction;
* restart adoption: a new backend's first full sync against the programmed tables
  (reads chains, maps, fingerprints and every chain's rules back; sends nothing);
* periodic full sync: the running backend's full sync after the changes below (reads
  everything back and compares every chain's rules with what it wrote; sends nothing);
* first-connection latency to a ClusterIP: new TCP connections from the node namespace
  to Service 0, answered by a server in a pod namespace (median of 300), with all N
  Services programmed and with Service 0 alone — three turns each in the same process
  and namespace, the median of the turns (one turn from 100,000 Services: each is two
  full syncs);
* peak RSS of the process before that comparison (it re-syncs the table six times; the
  cluster's JSON is made one object at a time, never held whole), and the peak so far
  when the tracker is filled, after the cold sync and after the adoption, and
  the bytes of the backend's record of what it programmed (``deep_size``), per Service.

Usage: ``sudo python bench/bench_nftables.py [--sizes 1,1000,10000]`` (root: it creates
and removes ``kpy-bench…`` namespaces). Each size runs in its own process.
``KPY_BENCH_SHARDS=N`` renders with N shard tables per family instead of kpy's count
(``render.SHARDS``), to compare shard counts; the table's ``shards`` column says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench_core import (
    cluster_objects,
    deep_size,
    feed_service,
    feed_slice,
    per_size,
    pod_ip,
    slice_of,
)
from kpy_nftables import NftablesBackend, render

from kpy.agent.agent import tune_gc
from kpy.core.backend import BackendConfig, parse_networks
from kpy.core.tracker import Tracker
from kpy.kernel import netns as netns_socket


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(tag: str, endpoint_ips: list[str]) -> Iterator[tuple[str, str]]:
    """A node namespace and a pod namespace holding ``endpoint_ips``, joined by a veth."""
    node, pod = f"kpy-bench{tag}-node", f"kpy-bench{tag}-pod"
    try:
        sh("ip", "netns", "add", node)
        sh("ip", "netns", "add", pod)
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "-n", pod, "link", "set", "lo", "up")
        sh("ip", "-n", node, "link", "add", "veth0", "type", "veth", "peer", "veth0", "netns", pod)
        sh("ip", "-n", node, "addr", "add", "192.168.77.1/24", "dev", "veth0")
        sh("ip", "-n", pod, "addr", "add", "192.168.77.2/24", "dev", "veth0")
        for ns in (node, pod):
            sh("ip", "-n", ns, "link", "set", "veth0", "up")
        for ip in endpoint_ips:
            sh("ip", "-n", pod, "addr", "add", f"{ip}/32", "dev", "veth0")
            sh("ip", "-n", node, "route", "add", f"{ip}/32", "via", "192.168.77.2")
        sh("ip", "-n", pod, "route", "add", "default", "via", "192.168.77.1")
        # The node needs a route towards Service IPs for its own connections to be
        # routed at all before the output hook rewrites them.
        sh("ip", "-n", node, "route", "add", "default", "via", "192.168.77.2")
        yield node, pod
    finally:
        for ns in (node, pod):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def serve(pod: str) -> socket.socket:
    server = netns_socket.run_in_netns(pod, lambda: socket.create_server(("0.0.0.0", 8080)))

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"ok\n")

    threading.Thread(target=loop, daemon=True).start()
    return server


def connection_latency(node: str, vip: str, count: int = 300) -> float:
    def measure() -> list[float]:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            with socket.create_connection((vip, 80), timeout=2) as s:
                s.recv(16)
            samples.append(time.perf_counter() - start)
        return samples

    return statistics.median(netns_socket.run_in_netns(node, measure)) * 1000


def measure(n: int) -> dict[str, Any]:
    tune_gc()
    shards = int(os.environ.get("KPY_BENCH_SHARDS", render.SHARDS))
    render.SHARDS, render.SHARDS_WITH_BASE = shards, shards * 7 // 16
    first_eps = [pod_ip(j) for j in range(6)]  # Service 0's endpoints (and one spare)
    with namespaces(str(os.getpid()), first_eps) as (node, pod):
        config = BackendConfig(
            node_name="node-a", netns=node, cluster_cidrs=parse_networks(["10.0.0.0/8"])
        )
        backend = NftablesBackend(config)
        tracker = Tracker("node-a")
        alone = Tracker("node-a")  # the same node with Service 0 only, for the A/B below
        # The agent keeps the decoded model, not the API's JSON: the objects are made
        # and fed one at a time, so peak RSS is the agent side's.
        vip = ""
        for svc, endpoint_slice in cluster_objects(n):
            feed_service(tracker, svc)
            feed_slice(tracker, endpoint_slice)
            if not vip:
                vip = str(svc["spec"]["clusterIP"])
                feed_service(alone, svc)
                feed_slice(alone, endpoint_slice)
        rss_tracked = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start, cpu = time.perf_counter(), time.process_time()
        plan = tracker.checkout()
        result = asyncio.run(backend.apply(plan))
        del plan
        cold = time.perf_counter() - start
        cold_cpu = time.process_time() - cpu
        rss_cold = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cold_bytes = result.size
        # the first sync's rules are read back by a thread once apply has returned
        start = time.perf_counter()
        asyncio.run(backend._settle())
        read_back = time.perf_counter() - start

        # A restarted agent: a new backend adopts what the old one programmed, and
        # serves the changes below (the old one is gone, as after a restart).
        del backend
        tracker.request_full_sync()
        full_plan = tracker.checkout()
        backend = NftablesBackend(config)
        start, cpu = time.perf_counter(), time.process_time()
        adopted = asyncio.run(backend.apply(full_plan))
        adopt = time.perf_counter() - start
        adopt_cpu = time.process_time() - cpu
        rss_adopt = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert adopted.ops == 0, adopted
        del full_plan
        # What the backend keeps between syncs (its mirror of the kernel), the tracker's
        # own objects (the states the record refers to) and the configuration not counted.
        shared = {id(config), id(backend.config)}
        for name, (state, _config, _dropped) in backend._record.items():
            shared.update((id(name), id(state)))
        record = deep_size(
            backend._base_have,
            backend._record,
            backend._owner,
            backend._shares,
            backend._digests,
            exclude=shared,
        )

        samples, sizes = [], []
        extra: dict[int, int] = {}
        for k in range(100):
            i = (k * 7919) % n
            extra[i] = 0 if extra.get(i) else 1
            changed = slice_of(i, 5, extra=extra[i])
            start = time.perf_counter()
            feed_slice(tracker, changed)
            r = asyncio.run(backend.apply(tracker.checkout()))
            samples.append(time.perf_counter() - start)
            sizes.append(r.size)

        # The periodic full sync of the running agent: everything read back and
        # compared, every chain's rules with the digest recorded when it was written.
        tracker.request_full_sync()
        full_plan = tracker.checkout()
        start = time.perf_counter()
        resynced = asyncio.run(backend.apply(full_plan))
        resync = time.perf_counter() - start
        assert resynced.ops == 0, resynced
        del full_plan

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # First-connection latency with all N Services and with Service 0 alone, in
        # turns in this process and namespace (run-to-run noise between processes is
        # larger than the difference being measured).
        latency: dict[int, list[float]] = {n: [], 1: []}
        server = serve(pod)
        try:
            for _ in range(3 if 1 < n < 100_000 else 1):
                for size, source in ((n, tracker), (1, alone)):
                    source.request_full_sync()
                    asyncio.run(backend.apply(source.checkout()))
                    # the read-back of a large write runs on a thread of this process
                    # after apply returns: measured after it, the datapath alone
                    asyncio.run(backend._settle())
                    latency[size].append(connection_latency(node, vip))
        finally:
            server.close()
    return {
        "services": n,
        "shards": shards,
        "cold_sync_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 3),
        "adopt_cpu_s": round(adopt_cpu, 3),
        "record_mb": round(record / 2**20, 1),
        "record_bytes_per_service": round(record / n),
        "cold_bytes": cold_bytes,
        "read_back_s": round(read_back, 3),
        "adopt_s": round(adopt, 3),
        "resync_s": round(resync, 3),
        "change_p50_ms": round(statistics.median(samples) * 1000, 2),
        "change_p90_ms": round(statistics.quantiles(samples, n=10)[8] * 1000, 2),
        "change_bytes_p50": int(statistics.median(sizes)),
        "connect_ms": round(statistics.median(latency[n]), 3),
        "connect_1_ms": round(statistics.median(latency[1]), 3),
        "peak_rss_mb": round(rss, 1),
        "peak_rss_before_cold_mb": round(rss_tracked, 1),
        "peak_rss_after_cold_mb": round(rss_cold, 1),
        "peak_rss_after_adoption_mb": round(rss_adopt, 1),
    }


def main() -> None:
    results = per_size(__file__, measure, "1,1000,10000")
    if results is None:
        return
    print(
        "| services | shards | cold sync (s) | its CPU (s) | its read-back (s) | cold bytes "
        "| restart adoption (s) | its CPU (s) | periodic full sync (s) "
        "| one change p50 (ms) | p90 (ms) | change bytes | first connection (ms) "
        "| same, Service 0 alone (ms) | peak RSS (MB) | backend record (MB) "
        "| record per Service (B) | load average |"
    )
    print(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for r in results:
        print(
            f"| {r['services']} | {r['shards']} | {r['cold_sync_s']} | {r['cold_cpu_s']} "
            f"| {r['read_back_s']} "
            f"| {r['cold_bytes']} | {r['adopt_s']} | {r['adopt_cpu_s']} | {r['resync_s']} "
            f"| {r['change_p50_ms']} | {r['change_p90_ms']} | {r['change_bytes_p50']} "
            f"| {r['connect_ms']} | {r['connect_1_ms']} | {r['peak_rss_mb']} "
            f"| {r['record_mb']} | {r['record_bytes_per_service']} | {r['load']} |"
        )


if __name__ == "__main__":
    main()
