"""Benchmark of the pure core: convert + select + plan over a synthetic cluster.

A synthetic cluster as Kubernetes JSON: N Services (a mix of ClusterIP, NodePort and
LoadBalancer) with one EndpointSlice of 5 endpoints each. Measured:

* full plan: convert every object, feed the tracker, first ``checkout()``;
* one-change plan: convert one changed EndpointSlice and ``checkout()`` (median of many);
* peak RSS of the process (ru_maxrss), for the largest size.

Usage: ``python bench/bench_core.py [--sizes 10,1000,10000,100000] [--json]``. Each size
runs in its own process so peak RSS belongs to that size alone; the full plan's CPU time
(robust to a busy machine) and the 1-minute load average before and after are reported
beside the wall time. At 100,000 Services the NodePorts run out (2,768 of them): the
Services past that are ClusterIP.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from kpy.agent.agent import tune_gc
from kpy.core import convert
from kpy.core.model import ServiceName
from kpy.core.tracker import Tracker


def cluster(n: int, endpoints: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    services, slices = [], []
    for svc, endpoint_slice in cluster_objects(n, endpoints):
        services.append(svc)
        slices.append(endpoint_slice)
    return services, slices


def cluster_objects(n: int, endpoints: int = 5) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The Services of :func:`cluster` with their EndpointSlices, one pair at a time (no
    list of the whole cluster's JSON held)."""
    node_port = 30000
    for i in range(n):
        kind = ("ClusterIP", "NodePort", "LoadBalancer")[i % 3]
        if kind != "ClusterIP" and node_port > 32767:
            kind = "ClusterIP"
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
        svc: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": f"svc-{i}",
                "namespace": f"ns-{i % 50}",
                "resourceVersion": str(i),
            },
            "spec": {"type": kind, "clusterIP": ip, "clusterIPs": [ip], "ports": [port]},
        }
        if kind != "ClusterIP":
            port["nodePort"] = node_port
            node_port += 1
        if kind == "LoadBalancer":
            svc["status"] = {
                "loadBalancer": {"ingress": [{"ip": f"172.18.{i // 256 % 256}.{i % 256}"}]}
            }
        yield svc, slice_of(i, endpoints)


def pod_ip(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def slice_of(i: int, endpoints: int, extra: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-abcde",
            "namespace": f"ns-{i % 50}",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [pod_ip(i * 8 + j)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": ("node-a", "node-b", "node-c")[j % 3],
                "zone": "z1",
            }
            for j in range(endpoints + extra)
        ],
    }


def feed_service(t: Tracker, obj: dict[str, Any]) -> None:
    svc, _ = convert.service(obj)
    assert svc is not None
    t.set_service(
        ServiceName(namespace=obj["metadata"]["namespace"], name=obj["metadata"]["name"]), svc
    )


def feed_slice(t: Tracker, obj: dict[str, Any]) -> None:
    eps, _ = convert.endpoint_slice(obj)
    t.set_slice(obj["metadata"]["namespace"], obj["metadata"]["name"], eps)


def deep_size(*roots: object, exclude: set[int] | None = None) -> int:
    """Bytes of everything reachable from ``roots`` (``sys.getsizeof`` of each object
    once), through containers, ``__dict__`` and ``__slots__``; classes, modules,
    functions and the objects in ``exclude`` (ids) are not counted nor entered. Pass
    the same ``exclude`` set to several calls to count what they share only once (the
    ids seen are added to it)."""
    seen = exclude if exclude is not None else set()
    total = 0
    stack = list(roots)
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, enum.Enum)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip) or obj is None:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, (str, bytes, int, float, bool)):
            continue
        else:
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if slot != "__weakref__" and hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    return total


def measure(n: int) -> dict[str, float]:
    tune_gc()  # as `kpy run` does
    services, slices = cluster(n)
    t = Tracker("node-a")
    start, cpu = time.perf_counter(), time.process_time()
    for s in services:
        feed_service(t, s)
    for s in slices:
        feed_slice(t, s)
    plan = t.checkout()
    full = time.perf_counter() - start
    full_cpu = time.process_time() - cpu
    assert len(plan.services) == n
    samples = []
    extra: dict[int, int] = {}
    for k in range(200):
        i = (k * 7919) % n
        extra[i] = 0 if extra.get(i) else 1  # add or remove one endpoint
        changed = slice_of(i, 5, extra=extra[i])
        start = time.perf_counter()
        feed_slice(t, changed)
        p = t.checkout()
        samples.append(time.perf_counter() - start)
        assert len(p.changed) == 1
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "services": n,
        "full_plan_s": round(full, 3),
        "full_plan_cpu_s": round(full_cpu, 3),
        "one_change_p50_ms": round(statistics.median(samples) * 1000, 3),
        "one_change_p90_ms": round(statistics.quantiles(samples, n=10)[8] * 1000, 3),
        "peak_rss_mb": round(rss_mb, 1),
    }


def per_size(
    script: str, measure_one: Callable[[int], dict[str, Any]], default_sizes: str
) -> list[dict[str, Any]] | None:
    """The command line every benchmark shares: each size measured in its own process
    (``--one N``, so peak RSS belongs to that size alone); ``--json`` prints the results
    and returns None, otherwise they are returned for the caller's table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=default_sizes)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        load_before = os.getloadavg()[0]
        result = measure_one(args.one)
        result["load"] = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        print(json.dumps(result))
        return None
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [sys.executable, script, "--one", str(n)], check=True, capture_output=True, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
        return None
    return results


def main() -> None:
    results = per_size(__file__, measure, "10,1000,10000")
    if results is None:
        return
    print(
        "| services | full plan (s) | its CPU (s) | one-change plan p50 (ms) | p90 (ms) "
        "| peak RSS (MB) | load average |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['services']} | {r['full_plan_s']} | {r['full_plan_cpu_s']} "
            f"| {r['one_change_p50_ms']} | {r['one_change_p90_ms']} | {r['peak_rss_mb']} "
            f"| {r['load']} |"
        )


if __name__ == "__main__":
    main()
