"""Offline tools at scale: ``kpy dump`` and ``kpy plan`` over N manifest files, and
``kpy dump --backend nftables`` against a live node (a namespace holding N Services).

Each Service is one file (a ClusterIP Service and its 5-endpoint EndpointSlice), as a
directory of exported objects would be. Every command runs as its own process, timed
from outside: wall time and the CPU it used (user + system), the load average beside.

    sudo .venv/bin/python bench/bench_offline.py --sizes 1000,10000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kpy_nftables import NftablesBackend

from kpy.core.backend import BackendConfig
from kpy.sources import manifests
from kpy.testing.netns import scratch
from kpy.tools.check.checks import plans_from_objects

KPY = [sys.executable, "-m", "kpy"]


def write_manifests(folder: Path, n: int) -> None:
    for i in range(n):
        ip = f"10.{96 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
        endpoints = "".join(
            f"- {{addresses: [10.{244 + j}.{i // 250 % 250}.{i % 250 + 1}], "
            f"nodeName: node-{j % 2 + 1}, conditions: {{ready: true}}}}\n"
            for j in range(5)
        )
        (folder / f"svc-{i:05d}.yaml").write_text(
            f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}-a, namespace: default, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"""
        )


def timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s, stdout lines) of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=True, cwd="/")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout.count(b"\n")


def program(folder: Path, netns: str) -> None:
    """Program the manifests' Services for node-1 with the nftables backend in ``netns``."""

    objects, errors = manifests.load([folder])
    assert not errors, errors
    plan = plans_from_objects(objects.values(), ["node-1"])["node-1"]
    backend = NftablesBackend(BackendConfig(node_name="node-1", netns=netns))
    asyncio.run(backend.apply(plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-live", action="store_true", help="skip the live-node dump")
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="kpy-bench-offline-") as tmp:
            folder = Path(tmp)
            write_manifests(folder, n)
            base = ["--manifests", str(folder), "--node", "node-1"]
            commands = {
                "dump": [*KPY, "dump", *base],
                "plan nftables": [*KPY, "plan", *base, "--backend", "nftables"],
            }
            with contextlib.ExitStack() as stack:
                if not args.no_live and os.geteuid() == 0:
                    netns = stack.enter_context(scratch("kpy-bo"))
                    program(folder, netns)
                    commands["dump, live nftables node"] = [
                        *KPY, "dump", *base, "--backend", "nftables", "--netns", netns,
                    ]  # fmt: skip
                for what, argv in commands.items():
                    for _ in range(args.runs):
                        load = os.getloadavg()[0]
                        wall, cpu, lines = timed(argv)
                        rows.append(
                            {
                                "services": n,
                                "command": what,
                                "wall_s": round(wall, 2),
                                "cpu_s": round(cpu, 2),
                                "lines": lines,
                                "load": round(load, 1),
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
    print("| services | command | wall (s) | CPU (s) | output lines | load |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['services']} | {r['command']} | {r['wall_s']} | {r['cpu_s']} "
            f"| {r['lines']} | {r['load']} |"
        )


if __name__ == "__main__":
    main()
