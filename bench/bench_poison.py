"""What one refused service port costs: finding it and programming everything else.

``python bench/bench_poison.py [--sizes 1000,10000] [--backends nftables,iptables]``
prints a Markdown table for docs/reliability.md, section "Poison pills".

Per backend and size (N service ports x 5 endpoints, a third each ClusterIP, NodePort,
LoadBalancer), in a network namespace of its own (never the host's): the N ports are
programmed, then one of them is replaced by a state the kernel tools refuse (a
session-affinity timeout of 2^62 s) and a full sync is attempted, as the periodic
resync would. Measured: the refused apply; the search for the port to blame
(:func:`kpy.agent.quarantine.find_refused` over the backend's dry run — ``nft --check`` or
``iptables-restore --test``, which change nothing) with the number of dry runs and the
service ports they held in all; and the apply of the plan with the refused port held at
its last programmed state. One process per case.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from kpy_iptables import IptablesBackend
from kpy_nftables import NftablesBackend

from kpy.agent import quarantine
from kpy.core.backend import Backend, BackendConfig, BackendError
from kpy.core.model import Plan, SessionAffinity
from kpy.testing import builders as b

SIZES = (1000, 10000)
BACKENDS = ("nftables", "iptables")


def _backend(kind: str, netns: str) -> Backend:
    config = BackendConfig(node_name=b.NODE, netns=netns)
    if kind == "nftables":
        return NftablesBackend(config)
    return IptablesBackend(dataclasses.replace(config, options=(("iptables_mode", "nft"),)))


def measure(kind: str, n: int) -> dict[str, Any]:
    netns = f"kpy-bench-poison-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        backend = _backend(kind, netns)
        states = b.synthetic_states(n)
        good = b.plan(states, full_sync=True)
        asyncio.run(backend.apply(good))
        victim = states[n // 3]
        svc = dataclasses.replace(
            victim.service, session_affinity=SessionAffinity.CLIENT_IP, affinity_timeout=2**62
        )
        bad_states = [dataclasses.replace(s, service=svc) if s is victim else s for s in states]
        bad = b.plan(bad_states, full_sync=True)
        start = time.perf_counter()
        try:
            asyncio.run(backend.apply(bad))
            raise SystemExit("the poisoned full sync was accepted: nothing to measure")
        except BackendError:
            refused_s = time.perf_counter() - start
        sizes: list[int] = []
        check = getattr(backend, "check")  # noqa: B009

        async def attempt(plan: Plan) -> str | None:
            sizes.append(len(plan.services))
            result: str | None = await check(plan)
            return result

        start = time.perf_counter()
        found = asyncio.run(quarantine.find_refused(bad, sorted(bad.services), attempt))
        search_s = time.perf_counter() - start
        assert found is not None and set(found) == {victim.name}, found
        held = quarantine.Quarantine(good=dict(good.services))
        held.hold(bad, found)
        start = time.perf_counter()
        asyncio.run(backend.apply(dataclasses.replace(held.effective(bad), full_sync=True)))
        rest_s = time.perf_counter() - start
        return {
            "backend": kind,
            "services": n,
            "refused_apply_s": round(refused_s, 2),
            "search_s": round(search_s, 2),
            "dry_runs": len(sizes),
            "ports_dry_run": sum(sizes),
            "apply_rest_s": round(rest_s, 2),
        }
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, n = args.one.split(":")
        print(json.dumps(measure(kind, int(n))))
        return
    rows = []
    for kind in args.backends.split(","):
        for n in map(int, args.sizes.split(",")):
            out = subprocess.run(
                [sys.executable, __file__, "--one", f"{kind}:{n}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.append(json.loads(out.splitlines()[-1]))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"load average {' '.join(load)}\n")
    print(
        "| backend | service ports | refused full sync (s) | search (s) | dry runs |"
        " ports in dry runs | apply without it (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['services']} | {r['refused_apply_s']} | {r['search_s']} |"
            f" {r['dry_runs']} | {r['ports_dry_run']} | {r['apply_rest_s']} |"
        )


if __name__ == "__main__":
    main()
