"""Where the agent's memory goes, per Service: the kube source's cache, the tracker, and
(in ``bench_nftables.py``) the nftables backend's record.

For N Services of the synthetic cluster of ``bench_core`` (one EndpointSlice of 5
endpoints each), in one process:

* *source cache*: the kube source kept every listed object as decoded from the API
  server's JSON (``kpy.sources.kube``: ``known``, to tell a relist's changes from what
  it has), measured as ``json.loads`` of the objects' JSON — the bytes of the decoded
  dicts (``deep_size``) and what ``tracemalloc`` saw allocated for them; it now keeps
  each object's resourceVersion by (namespace, name), measured likewise;
* *tracker*: every attribute of a ``Tracker`` fed with all objects and checked out,
  ``deep_size`` of each in turn (what an earlier attribute already holds is not counted
  again: Services are counted under ``_services``, the port states' shared Service
  ports under the first attribute that reaches them), and ``tracemalloc``'s total;
* peak RSS of the process (the JSON text and the cache included).

Usage: ``python bench/bench_memory.py [--sizes 10000,100000] [--json]``.
"""

from __future__ import annotations

import gc
import json
import resource
import time
import tracemalloc
from typing import Any

from bench_core import cluster, deep_size, feed_service, feed_slice, per_size

from kpy.agent.agent import tune_gc
from kpy.core.tracker import Tracker


def measure(n: int) -> dict[str, Any]:
    tune_gc()
    services, slices = cluster(n)
    text = [json.dumps(o) for o in services + slices]
    del services, slices
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = [json.loads(t) for t in text]
    cache_traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    cache_size = deep_size(cache)
    # What the kube source keeps now: each object's resourceVersion by (namespace, name).
    versions = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): str(i) for i, o in enumerate(cache)
    }
    versions_size = deep_size(versions)
    del versions

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.process_time()
    tracker = Tracker("node-a")
    for obj in cache[:n]:
        feed_service(tracker, obj)
    for obj in cache[n:]:
        feed_slice(tracker, obj)
    tracker.checkout()
    gc.collect()
    tracker_traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    cpu = time.process_time() - start

    seen: set[int] = {id(tracker._node)}
    parts = {
        name: deep_size(getattr(tracker, name), exclude=seen)
        for name in (
            "_services",
            "_slices",
            "_slice_owner",
            "_raw",
            "_state",
            "_ports_of",
            "_claims_of",
            "_holders",
            "_conflicts",
            "_dirty",
        )
    }
    tracker_size = sum(parts.values())
    return {
        "services": n,
        "source_cache_mb": round(cache_size / 2**20, 1),
        "source_cache_per_service_b": round(cache_size / n),
        "source_cache_traced_mb": round(cache_traced / 2**20, 1),
        "source_versions_mb": round(versions_size / 2**20, 1),
        "source_versions_per_service_b": round(versions_size / n),
        "tracker_mb": round(tracker_size / 2**20, 1),
        "tracker_per_service_b": round(tracker_size / n),
        "tracker_traced_mb": round(tracker_traced / 2**20, 1),
        "tracker_parts_per_service_b": {k: round(v / n) for k, v in parts.items()},
        "tracker_cpu_s_traced": round(cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    results = per_size(__file__, measure, "10000,100000")
    if results is None:
        return
    print(
        "| services | decoded JSON (MB) | per Service + its slice (B) | traced (MB) "
        "| versions kept (MB) | per Service + its slice (B) | tracker (MB) | per Service (B) "
        "| traced (MB) | peak RSS (MB) | load average |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['services']} | {r['source_cache_mb']} | {r['source_cache_per_service_b']} "
            f"| {r['source_cache_traced_mb']} | {r['source_versions_mb']} "
            f"| {r['source_versions_per_service_b']} | {r['tracker_mb']} "
            f"| {r['tracker_per_service_b']} "
            f"| {r['tracker_traced_mb']} | {r['peak_rss_mb']} | {r['load']} |"
        )
    for r in results:
        parts = ", ".join(f"{k} {v}" for k, v in r["tracker_parts_per_service_b"].items())
        print(f"\n{r['services']}: tracker bytes per Service: {parts}")


if __name__ == "__main__":
    main()
