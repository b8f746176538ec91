"""iptables backend benchmark, in a network namespace of its own (never the host's).

``python bench/bench_iptables.py [--sizes 1000,10000] [--modes nft,legacy]`` prints a
Markdown table for docs/benchmarks.md, section "iptables backend".

Per flavour and size (N Services x 5 endpoints, a third each ClusterIP, NodePort,
LoadBalancer): *cold sync* is the first full apply into an empty namespace (render,
``iptables-save`` read-back, restore); *one-endpoint change* is timed from the endpoint
event (the service port re-selected) to the return of the partial apply, i.e. when the
restore has been committed and the kernel holds the rule (``SAMPLES`` samples, every
other one removing or adding an endpoint); *restore lines/bytes* are the size of that
change's ``iptables-restore`` input; *save lines* is the size of ``iptables-save`` after
the cold sync; *RSS* is the peak resident set of the process that ran the case (one
process per case: the rendered and held objects, the Plan and the synthetic input).
A third timing, *full resync*, is a second full apply with nothing to change: it reads
both families back with ``iptables-save`` and diffs.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

import structlog
from kpy_iptables import IptablesBackend

from kpy.backend import BackendConfig
from kpy.model import Plan
from kpy.testing import builders as b

SIZES = (1000, 10000)
MODES = ("nft", "legacy")
SAMPLES = 100


def _netns() -> str:
    name = f"kpy-bench-ipt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def run(mode: str, size: int) -> dict[str, object]:
    netns = _netns()
    try:
        node = b.node()
        config = BackendConfig(
            node_name=node.name,
            cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),),
            netns=netns,
            options=(("iptables_mode", mode),),
        )
        backend = IptablesBackend(config)
        states = b.synthetic_states(size)
        started = time.perf_counter()
        cold = asyncio.run(backend.apply(b.plan(states, node_info=node)))
        cold_s = time.perf_counter() - started
        save = subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", f"iptables-{mode}-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        started = time.perf_counter()
        resync = asyncio.run(backend.apply(b.plan(states, node_info=node)))
        resync_s = time.perf_counter() - started
        assert resync.ops == 0
        times, lines, sizes = [], [], []
        for i in range(SAMPLES):
            index = (i * 7919) % len(states)
            old = states[index]
            if i % 2 == 0:
                new_eps = old.endpoints[1:]
            else:
                extra = b.endpoint(str(ipaddress.ip_address("10.250.0.1") + i))
                new_eps = (*old.endpoints, extra)
            services = {s.name: s for s in states}
            started = time.perf_counter()
            new = b.state(old.service, new_eps, node)  # the event, selected for this node
            services[new.name] = new
            plan = Plan(
                node=node,
                services=services,
                changed=frozenset([new.name]),
                full_sync=False,
            )
            result = asyncio.run(backend.apply(plan))
            times.append((time.perf_counter() - started) * 1000)
            states[index] = new
            lines.append(result.size)
            sizes.append(int(result.detail["bytes"]))
        q = statistics.quantiles(times, n=10)
        asyncio.run(backend.cleanup())
        return {
            "mode": mode,
            "services": size,
            "cold_s": round(cold_s, 2),
            "cold_lines": cold.size,
            "save_lines": save.count("\n"),
            "resync_s": round(resync_s, 2),
            "p50_ms": round(statistics.median(times), 1),
            "p90_ms": round(q[8], 1),
            "lines": f"{min(lines)}-{max(lines)}",
            "bytes": f"{min(sizes)}-{max(sizes)}",
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", help="MODE:SIZE — run one case, print JSON (internal)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    if args.one:
        mode, size = args.one.split(":")
        print(json.dumps(run(mode, int(size))))
        return
    print(
        "| flavour | services | cold sync (s) | cold restore lines | iptables-save lines "
        "| full resync, no change (s) "
        "| one change p50 (ms) | p90 (ms) | restore lines per change | bytes per change "
        "| peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for mode in args.modes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            # each case in a process of its own, so peak RSS is that case's
            out = subprocess.run(
                [sys.executable, __file__, "--one", f"{mode}:{size}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {r['mode']} | {r['services']} | {r['cold_s']} | {r['cold_lines']} "
                f"| {r['save_lines']} | {r['resync_s']} | {r['p50_ms']} | {r['p90_ms']} "
                f"| {r['lines']} "
                f"| {r['bytes']} | {r['rss_mb']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
