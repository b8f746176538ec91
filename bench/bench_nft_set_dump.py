"""What reading one nf_tables set back costs against its number of elements.

``sudo python bench/bench_nft_set_dump.py [--sizes 100000,250000,500000]`` prints a
Markdown table for docs/benchmarks.md ("Second round at 100,000"). In a network namespace
of its own (created and deleted here): one set of ``ipv4_addr . ipv4_addr`` elements (the
shape of kpy's ``hairpin`` set), dumped with kpy's netlink reader; the time is the
dump alone (nothing decoded), split into the process's user and system CPU — the kernel
answers ~32 KiB at a time and walks the set from its first element for every part.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import time

from kpy_nftables import netlink_read

GROUP = 1000  # elements per nft command


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script.encode(), check=True)


def address(j: int) -> str:
    return f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,250000,500000")
    args = parser.parse_args()
    print("| elements | parts | bytes | dump wall (s) | user (s) | system (s) | load average |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        ns = f"kpy-bench-setdump-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            lines = ["add table ip kpy", "add set ip kpy hairpin { type ipv4_addr . ipv4_addr; }"]
            for i in range(0, n, GROUP):
                pairs = (f"{address(j)} . {address(j)}" for j in range(i, min(n, i + GROUP)))
                lines.append(f"add element ip kpy hairpin {{ {', '.join(pairs)} }}")
            nft(ns, "\n".join(lines) + "\n")
            reader = netlink_read.NetlinkReader(ns)
            try:
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                parts = reader.element_parts("ip", "kpy", "hairpin")
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                reader.close()
            print(
                f"| {n} | {len(parts)} | {sum(map(len, parts))} | {wall:.2f} "
                f"| {after.ru_utime - before.ru_utime:.2f} "
                f"| {after.ru_stime - before.ru_stime:.2f} | {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
