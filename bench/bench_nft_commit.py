"""What one nf_tables commit costs against the number of chains in the namespace.

``sudo python bench/bench_nft_commit.py [--chains 0,25000,50000,100000,200000]`` prints a
Markdown table for docs/benchmarks.md ("Second round at 100,000"). In a network
namespace of its own (created and deleted here): a small table with a nat base chain,
and N empty chains in another table that no rule reaches; each sample is one netlink
batch from kpy's writer (no ``nft`` process, no cache) flushing a chain of the small
table and adding one rule to it — the kernel's commit of a change that touches nothing
of the N chains. Median of 30 samples per N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from kpy_nftables import netlink, render

STEP = 20_000  # chains created per nft command


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script.encode(), check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chains", default="0,25000,50000,100000,200000")
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    ns = f"kpy-bench-commit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft(
            ns,
            "add table ip small\n"
            "add chain ip small prerouting { type nat hook prerouting priority dstnat; }\n"
            "add chain ip small target\n"
            "add rule ip small prerouting jump target\n",
        )
        writer = netlink.NetlinkWriter(ns)
        made = 0
        print("| empty chains elsewhere | one-rule commit p50 (ms) | p90 (ms) | load average |")
        print("|---:|---:|---:|---|")
        for n in (int(x) for x in args.chains.split(",")):
            for i in range(made, n, STEP):
                names = (f"add chain ip big c{j}" for j in range(i, min(n, i + STEP)))
                nft(ns, "add table ip big\n" + "\n".join(names) + "\n")
            made = max(made, n)
            ops: list[render.Op] = [
                render.FlushChain("ip", "small", "target"),
                render.AddRule("ip", "small", "target", render.rule(render.SET_MASQ)),
            ]
            samples = []
            for _ in range(args.samples):
                batch = netlink.encode(ops, {})
                start = time.perf_counter()
                writer.send(batch)
                samples.append(time.perf_counter() - start)
            p50 = statistics.median(samples) * 1000
            p90 = statistics.quantiles(samples, n=10)[8] * 1000
            print(f"| {n} | {p50:.3f} | {p90:.3f} | {os.getloadavg()[0]:.1f} |", flush=True)
        writer.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
