"""Benchmark of the ``kube`` source against the fake API server over loopback HTTP.

The fake API server runs in its own process holding N Services (a mix of ClusterIP,
NodePort and LoadBalancer) and N EndpointSlices of 5 endpoints each, plus the Node; the
measuring process is the agent side: :class:`kpy.sources.kube.KubeSource` feeding the
real :class:`kpy.agent.agent.Agent` handlers (convert, tracker). Measured:

* *first plan*: from starting the source to the first complete Plan (every list
  read, decoded, converted and tracked; ``tracker.checkout()`` done);
* *event → plan*: one EndpointSlice updated in the server (clock read just before the
  write) until the agent process has a Plan containing that change — the write, the
  watch event on the wire, JSON decoding, convert and checkout (p50/p90 of 200,
  one at a time; CLOCK_MONOTONIC is system-wide, so both processes read the same clock);
* the agent process's CPU time until that first Plan (user + system: what the agent
  itself spent, independent of how busy the machine's other processes kept the cores);
* peak RSS of the agent process (ru_maxrss).

Usage: ``python bench/bench_kube.py [--n 10000] [--page-sizes 500,0] [--json]`` (``--n``
up to 100000: past 8,100 Services they are ClusterIP, NodePorts run out). Each
page size runs in its own agent process so peak RSS belongs to that run alone
(page size 0: the whole list in one response).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_core import slice_of

from kpy.agent import log as logsetup
from kpy.agent.agent import Agent, tune_gc
from kpy.core.model import Plan
from kpy.sources import Event, Kind
from kpy.sources.kube import ApiTarget, KubeSource
from kpy.testing.apiserver import FakeApiServer
from kpy.testing.fake_backend import FakeBackend

NODE = "node-a"
ENDPOINTS = 5


def service(i: int) -> dict[str, Any]:
    kind = ("ClusterIP", "NodePort", "LoadBalancer")[i % 3] if i < 2700 * 3 else "ClusterIP"
    ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    if kind != "ClusterIP":
        port["nodePort"] = 30000 + i // 3
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 50}"},
        "spec": {"type": kind, "clusterIP": ip, "clusterIPs": [ip], "ports": [port]},
    }
    if kind == "LoadBalancer":
        svc["status"] = {
            "loadBalancer": {"ingress": [{"ip": f"172.18.{i // 256 % 256}.{i % 256}"}]}
        }
    return svc


def endpoint_slice(i: int, extra: int = 0) -> dict[str, Any]:
    return slice_of(i, ENDPOINTS, extra)


# --------------------------------------------------------------------------- server process


async def serve(n: int) -> None:
    """Hold the cluster; on stdin ``change I``: update slice I, print the write's time."""
    api = FakeApiServer(history_size=10_000, bookmark_interval=3600)
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    api.load(service(i) for i in range(n))
    api.load(endpoint_slice(i) for i in range(n))
    extra: dict[int, int] = {}
    async with api:
        print(api.url, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            i = int(line.split()[1])
            extra[i] = 0 if extra.get(i) else 1  # add or remove one endpoint
            changed = endpoint_slice(i, extra[i])
            start = time.monotonic()
            api.update(changed)
            print(f"{start!r} {api.resource_version}", flush=True)


# --------------------------------------------------------------------------- agent process


class MeasuringSink:
    """Forwards to the agent's handlers; checks out a Plan when the measured moment comes."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.first_plan: Plan | None = None
        self.first_plan_at = 0.0
        self.synced_event = asyncio.Event()
        # After the first plan: resourceVersion of each slice change → (Plan ready, changes).
        self.ready: dict[str, tuple[float, int]] = {}
        self.arrived = asyncio.Event()

    def event(self, event: Event) -> None:
        self.agent.event(event)
        if self.first_plan is not None and event.kind is Kind.ENDPOINT_SLICE:
            plan = self.agent.tracker.checkout()
            rv = event.obj["metadata"]["resourceVersion"]
            self.ready[rv] = (time.monotonic(), len(plan.changed))
            self.arrived.set()

    def synced(self) -> None:
        self.agent.synced()
        self.first_plan = self.agent.tracker.checkout()
        self.first_plan_at = time.monotonic()
        self.synced_event.set()

    def connection(self, healthy: bool, reason: str = "") -> None:
        self.agent.connection(healthy, reason)


async def measure(n: int, page_size: int, samples: int) -> dict[str, Any]:
    tune_gc()  # as `kpy run` does
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        url = (await server.stdout.readline()).decode().strip()
        source = KubeSource(ApiTarget.from_url(url), NODE, page_size=page_size, node_grace=0)
        agent = Agent(node_name=NODE, source=source, backend=FakeBackend())
        sink = MeasuringSink(agent)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu_start = time.process_time()
        start = time.monotonic()
        task = asyncio.create_task(source.run(sink))
        await sink.synced_event.wait()
        first = sink.first_plan_at - start
        first_cpu = time.process_time() - cpu_start
        assert sink.first_plan is not None and len(sink.first_plan.services) == n
        gc.freeze()  # as the agent does after its first list
        latencies = []
        for k in range(samples):
            i = (k * 7919) % n
            server.stdin.write(f"change {i}\n".encode())
            await server.stdin.drain()
            written, rv = (await server.stdout.readline()).decode().split()
            while rv not in sink.ready:
                sink.arrived.clear()
                await sink.arrived.wait()
            ready, changed = sink.ready.pop(rv)
            assert changed == 1
            latencies.append(ready - float(written))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        server.kill()
        await server.wait()
    return {
        "services": n,
        "endpoint_slices": n,
        "page_size": page_size,
        "first_plan_s": round(first, 3),
        "first_plan_agent_cpu_s": round(first_cpu, 3),
        "event_to_plan_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "event_to_plan_p90_ms": round(statistics.quantiles(latencies, n=10)[8] * 1000, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(rss_before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--page-sizes", default="500,0")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logsetup.configure("json", "info")  # to stderr, as `kpy run` logs
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    if args.one is not None:
        load_before = os.getloadavg()[0]
        result = asyncio.run(measure(args.n, args.one, args.samples))
        result["load"] = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        print(json.dumps(result))
        return
    rows = []
    for page_size in (int(p) for p in args.page_sizes.split(",")):
        one = ["--n", str(args.n), "--one", str(page_size), "--samples", str(args.samples)]
        out = subprocess.run(
            [sys.executable, __file__, *one],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| services + slices | page size | first plan (s) | agent CPU (s) "
        "| event → plan p50 (ms) | p90 (ms) | peak RSS (MB) | load average |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['services']:,} + {r['endpoint_slices']:,} | {r['page_size'] or 'none'} "
            f"| {r['first_plan_s']} | {r['first_plan_agent_cpu_s']} "
            f"| {r['event_to_plan_p50_ms']} "
            f"| {r['event_to_plan_p90_ms']} | {r['peak_rss_mb']} | {r['load']} |"
        )


if __name__ == "__main__":
    main()
