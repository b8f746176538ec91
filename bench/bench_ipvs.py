"""IPVS backend benchmark, run inside a User-Mode Linux guest (the host has no IPVS).

On the host, ``python bench/bench_ipvs.py`` boots the guest through
:mod:`kpy.testing.uml` and runs this same file there with ``--in-guest``; the guest
writes JSON into the run's result directory and the host prints a Markdown table (paste
it into docs/benchmarks.md, section "IPVS backend").

Per size (N Services x 5 endpoints, a third each ClusterIP, NodePort, LoadBalancer):
*cold sync* is the first full apply into an empty kernel; *one-endpoint change* is a
partial apply after one endpoint was added or removed (``SAMPLES`` samples), timed from
the call to its return (the netlink acks are in); *messages* are the write messages
that change sent (ApplyResult.ops); *restart adoption* is a new backend's first full
sync against what the kernel holds after the changes (time, and messages it sent);
*floor* is one empty call on the backend's kernel
thread (what every apply costs before any kernel work). After the table, the parts of
an adoption timed one by one (render, each kind of kernel read). All samples run in one event
loop, as in the kpy daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import ipaddress
import json
import logging
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SIZES = (1000, 10000)
SAMPLES = 100


def guest(sizes: tuple[int, ...], profile: bool = False) -> dict[str, object]:
    import structlog
    from kpy_ipvs import IpvsBackend

    from kpy.agent.agent import tune_gc
    from kpy.core.backend import BackendConfig
    from kpy.testing import builders as b

    # as kpy runs (info): the per-apply debug line would be console output in the timing
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    tune_gc()  # as kpy runs: the agent's garbage collection thresholds
    results = []
    node = b.node(addresses=["192.168.50.1"])
    for size in sizes:
        backend = IpvsBackend(
            BackendConfig(node_name=node.name, node_ips=(ipaddress.ip_address("192.168.50.1"),))
        )
        states = b.synthetic_states(size)
        # one event loop for the whole run, as the kpy daemon keeps one
        cold, cold_s, times, messages, floor = asyncio.run(_samples(backend, states, node))
        backend.close()
        # a restarted agent: a new backend's first full sync adopts what the kernel holds
        backend = IpvsBackend(
            BackendConfig(node_name=node.name, node_ips=(ipaddress.ip_address("192.168.50.1"),))
        )
        # the sync runs on the backend's kernel thread: that is the thread profiled
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            backend._kernel._executor.submit(profiler.enable).result()
        started = time.perf_counter()
        adopted = asyncio.run(backend.apply(b.plan(states, node_info=node)))
        adopt_s = time.perf_counter() - started
        if profiler is not None:
            backend._kernel._executor.submit(profiler.disable).result()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            Path(os.environ["KPY_RESULT_DIR"], f"adopt-{size}.prof.txt").write_text(out.getvalue())
        reads = _reads(backend, b.plan(states, node_info=node))
        q = statistics.quantiles(times, n=10)
        results.append(
            {
                "services": size,
                "cold_s": round(cold_s, 2),
                "cold_ops": cold.ops,
                "adopt_s": round(adopt_s, 2),
                "adopt_ops": adopted.ops,
                "p50_ms": round(statistics.median(times), 2),
                "p90_ms": round(q[8], 2),
                # even samples removed an endpoint (graceful: reads first), odd added one
                "remove_p50_ms": round(statistics.median(times[0::2]), 2),
                "add_p50_ms": round(statistics.median(times[1::2]), 2),
                "floor_p50_ms": round(statistics.median(floor), 2),
                "messages": sorted(set(messages)),
                "reads": reads,
            }
        )
        asyncio.run(backend.cleanup())
        backend.close()
    return {"results": results}


def _reads(backend: Any, plan: Any) -> dict[str, float]:
    """Each part of what a restart adoption reads and renders, timed on its own on the
    backend's kernel thread (seconds)."""
    from kpy_ipvs import render

    kernel = backend._kernel
    parts: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        value = kernel._executor.submit(fn).result()
        parts[name] = round(time.perf_counter() - started, 2)
        return value

    ctx = render.context(backend.config, plan.node)
    timed("render", lambda: [render.render_port(s, ctx, 0) for s in plan.services.values()])
    services = timed("virtual services", kernel.dump_services)
    timed("real servers", lambda: [kernel.dump_destinations(k) for k in services])
    timed("companion sets and rules", kernel.dump_companion)
    timed("addresses", kernel.dump_addresses)
    return parts


async def _samples(
    backend: Any, states: list[Any], node: Any
) -> tuple[Any, float, list[float], list[int], list[float]]:
    from kpy.testing import builders as b

    started = time.perf_counter()
    cold = await backend.apply(b.plan(states, node_info=node))
    cold_s = time.perf_counter() - started
    times: list[float] = []
    messages: list[int] = []
    for i in range(SAMPLES):
        first = states[i % len(states)]
        if i % 2 == 0:
            new = b.state(first.service, first.endpoints[1:], node)
        else:
            extra = b.endpoint(str(ipaddress.ip_address("10.250.0.1") + i))
            new = b.state(first.service, (*first.endpoints, extra), node)
        states[i % len(states)] = new
        plan = b.plan(states, node_info=node, full_sync=False, changed=[new.name])
        started = time.perf_counter()
        result = await backend.apply(plan)
        times.append((time.perf_counter() - started) * 1000)
        messages.append(result.ops)
    floor = []  # one hop to the backend's kernel thread and back, no kernel work
    for _ in range(SAMPLES):
        started = time.perf_counter()
        await backend._kernel.call(int)
        floor.append((time.perf_counter() - started) * 1000)
    return cold, cold_s, times, messages, floor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-guest", action="store_true")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the restart adoption (cProfile of the backend's kernel thread); "
        "the top functions are printed after the table",
    )
    parser.add_argument("--mem", default="2048M", help="the guest's memory (100,000: 8192M)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the guest run")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.in_guest:
        out = guest(sizes, args.profile)
        Path(os.environ["KPY_RESULT_DIR"], "bench.json").write_text(json.dumps(out))
        return
    from kpy.testing import uml

    command = [uml.python(), "bench/bench_ipvs.py", "--in-guest", "--sizes", args.sizes]
    # the guest imports the code this host process runs (a checkout's own PYTHONPATH)
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    run = uml.run(
        [*command, *(["--profile"] if args.profile else [])],
        timeout=args.timeout,
        mem=args.mem,
        env=env,
    )
    try:
        report = run.result_dir / "bench.json"
        if not report.exists():
            print(run.output[-3000:] or run.console[-3000:], file=sys.stderr)
            raise SystemExit("the guest wrote no result")
        print(f"guest run: {run.seconds:.0f} s (boot included)")
        print(
            "| services | cold sync (s) | cold messages | restart adoption (s) "
            "| adoption messages | one change p50 (ms) | p90 (ms) "
            "| messages per change | p50 add / remove (ms) | floor p50 (ms) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
        for r in json.loads(report.read_text())["results"]:
            msgs = ", ".join(str(m) for m in r["messages"])
            print(
                f"| {r['services']} | {r['cold_s']} | {r['cold_ops']} | {r['adopt_s']} "
                f"| {r['adopt_ops']} | {r['p50_ms']} "
                f"| {r['p90_ms']} | {msgs} | {r['add_p50_ms']} / {r['remove_p50_ms']} "
                f"| {r['floor_p50_ms']} |"
            )
        for r in json.loads(report.read_text())["results"]:
            parts = ", ".join(f"{name} {sec} s" for name, sec in r["reads"].items())
            print(f"{r['services']} Services, adoption's parts: {parts}")
        for profile in sorted(run.result_dir.glob("adopt-*.prof.txt")):
            print(f"\n--- {profile.name}\n{profile.read_text()}")
    finally:
        uml.remove(run)


if __name__ == "__main__":
    main()
