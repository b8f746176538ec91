"""Reading kpy's tables back at N Services: ``nft -j list`` JSON versus netlink.

In a namespace (never the machine's own) holding kpy's tables for N synthetic Services
with 5 endpoints each (programmed by the nftables backend, as the agent does), the
state is read back into :class:`kpy_nftables.observe.Observed` two ways:
``Nft.list_tables()`` (three ``nft -j list`` processes, parsed by
:func:`kpy_nftables.observe.parse`; the backend with ``nftables_writer=nft``) and
:meth:`kpy_nftables.netlink_read.NetlinkReader.observe` (netlink messages decoded
straight into it). Each read runs in a fresh Python
process, so its peak RSS is its own: printed are the wall time of read + parse, the
growth of its peak RSS (VmHWM) over its RSS after imports, and the tracemalloc
peak of a separate run (Python allocations only).

Usage: ``sudo python bench/bench_nftables_read.py [--services 10000] [--runs 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kpy_nftables import observe as observe_


def read(netns: str, how: str) -> observe_.Observed:
    from kpy_nftables import observe
    from kpy_nftables.apply import Nft
    from kpy_nftables.netlink_read import NetlinkReader

    if how == "nft":
        return observe.parse(asyncio.run(Nft(netns).list_tables()))
    reader = NetlinkReader(netns)
    try:
        return reader.observe()
    finally:
        reader.close()


def _status(field: str) -> int:
    """A kB figure of /proc/self/status. VmHWM, not ru_maxrss: a child's ru_maxrss
    starts from its parent's peak (it survives exec), VmHWM from its own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(netns: str, how: str, traced: bool) -> None:
    """One read in this process; prints a JSON line."""
    import kpy_nftables.apply
    import kpy_nftables.netlink_read
    import kpy_nftables.observe

    del kpy_nftables  # imported before the baseline, used in read()
    base = _status("VmRSS")
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    observed = read(netns, how)
    wall = time.perf_counter() - started
    kept, peak = tracemalloc.get_traced_memory() if traced else (0, 0)
    values = len(observed.values)
    grown = _status("VmHWM") - base
    print(json.dumps({"values": values, "s": wall, "rss_kb": grown, "traced": peak, "kept": kept}))


def run_child(netns: str, how: str, traced: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", how, "--netns", netns]
    if traced:
        cmd.append("--traced")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def program(netns: str, services: int) -> float:
    from kpy_nftables import NftablesBackend

    from kpy.core.backend import BackendConfig
    from kpy.testing import builders as b

    backend = NftablesBackend(BackendConfig(netns=netns))
    started = time.perf_counter()
    try:
        asyncio.run(backend.apply(b.plan(b.synthetic_states(services))))
    finally:
        backend.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=("nft", "netlink"))
    parser.add_argument("--netns")
    parser.add_argument("--traced", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.netns, args.child, args.traced)
        return

    netns = f"kpy-bench-read-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        took = program(netns, args.services)
        print(f"{args.services} Services programmed in {took:.1f} s (namespace {netns})")
        for how in ("nft", "netlink"):
            runs = [run_child(netns, how, False) for _ in range(args.runs)]
            traced = run_child(netns, how, True)
            values = {int(r["values"]) for r in runs}
            wall = statistics.median(r["s"] for r in runs)
            rss = statistics.median(r["rss_kb"] for r in runs) / 1024
            print(
                f"{how:8s} read+parse {wall:6.2f} s (median of {args.runs})  "
                f"peak RSS +{rss:6.1f} MB  tracemalloc peak {traced['traced'] / 2**20:6.1f} MB "
                f"(the parsed result itself {traced['kept'] / 2**20:5.1f} MB)  "
                f"keys {sorted(values)}"
            )
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
