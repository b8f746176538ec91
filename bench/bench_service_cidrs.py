"""Benchmark: what a change of the cluster's ServiceCIDRs costs the nftables backend.

For N Services with 5 endpoints each (the synthetic cluster of ``bench_core``), in a
network namespace (never the machine's own): the cold sync, then 50 times a ServiceCIDR
object added and 50 times deleted, each through the tracker (``set_service_cidr`` →
``checkout`` → ``apply``), as the agent does on a watch event: p50/p90 of those syncs,
their kernel operations and bytes, and — for comparison — the periodic full sync of the
same tables (everything read back; what a change would cost if it needed a full sync,
as the Node's addresses do).

Usage: ``sudo python bench/bench_service_cidrs.py [--sizes 1,1000,10000]`` (root: it
creates and removes a ``kpy-bench…`` namespace). Each size runs in its own process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import statistics
import subprocess
import time
from typing import Any

from bench_core import cluster, feed_service, feed_slice, per_size
from kpy_nftables import NftablesBackend

from kpy.agent.agent import tune_gc
from kpy.core.backend import BackendConfig, parse_networks
from kpy.core.tracker import Tracker

EXTRA = (ipaddress.ip_network("10.200.0.0/24"),)
DEFAULT = (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:96::/108"))


def measure(n: int) -> dict[str, Any]:
    tune_gc()
    services, slices = cluster(n)
    node = f"kpy-bench{os.getpid()}-cidr"
    subprocess.run(["ip", "netns", "add", node], check=True)
    try:
        config = BackendConfig(
            node_name="node-a", netns=node, cluster_cidrs=parse_networks(["10.0.0.0/8"])
        )
        backend = NftablesBackend(config)
        tracker = Tracker("node-a")
        for s in services:
            feed_service(tracker, s)
        for s in slices:
            feed_slice(tracker, s)
        del services, slices
        tracker.set_service_cidr("kubernetes", DEFAULT)
        asyncio.run(backend.apply(tracker.checkout()))
        asyncio.run(backend._settle())  # the cold sync's read-back, not measured here

        samples, ops, sizes = [], [], []
        for _ in range(50):
            for cidrs in (EXTRA, None):
                start = time.perf_counter()
                tracker.set_service_cidr("extra", cidrs)
                plan = tracker.checkout()
                result = asyncio.run(backend.apply(plan))
                samples.append(time.perf_counter() - start)
                assert not result.full_sync and not plan.changed, result
                ops.append(result.ops)
                sizes.append(result.size)

        tracker.request_full_sync()
        full_plan = tracker.checkout()
        start = time.perf_counter()
        resynced = asyncio.run(backend.apply(full_plan))
        full = time.perf_counter() - start
        assert resynced.ops == 0, resynced
    finally:
        subprocess.run(["ip", "netns", "del", node], check=False, capture_output=True)
    return {
        "services": n,
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p90_ms": round(statistics.quantiles(samples, n=10)[8] * 1000, 2),
        "ops": sorted(set(ops)),
        "bytes_p50": int(statistics.median(sizes)),
        "full_sync_s": round(full, 3),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    results = per_size(__file__, measure, "1,1000,10000")
    if results is None:
        return
    print(
        "| services | ServiceCIDR change p50 (ms) | p90 (ms) | kernel ops | bytes "
        "| full sync instead (s) | load (1 min) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['services']} | {r['p50_ms']} | {r['p90_ms']} "
            f"| {'/'.join(str(o) for o in r['ops'])} | {r['bytes_p50']} "
            f"| {r['full_sync_s']} | {r['load']:.2f} |"
        )


if __name__ == "__main__":
    main()
