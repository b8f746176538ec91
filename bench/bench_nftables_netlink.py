"""One-endpoint change at N Services: ``nsenter nft -f -`` versus the netlink writer.

In a namespace (never the machine's own) holding kpy's tables for N synthetic Services
with 5 endpoints each, the same kind of transaction — one endpoint added to a Service,
then removed again — is applied alternately by ``nft -f`` (as :mod:`kpy_nftables.apply`
runs it) and by :func:`kpy_nftables.netlink.encode` + :class:`NetlinkWriter.send`.
Prints p50/p90 wall time of each, the split between encoding (render's operations
into netlink messages) and sending, and the transaction's size.

Usage: ``sudo python bench/bench_nftables_netlink.py [--services 10000] [--changes 40]``
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import time

from kpy_nftables import netlink, render

from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b


def objects(states: list[ServicePortState], config: BackendConfig) -> dict[str, render.Obj]:
    want: dict[str, render.Obj] = {}
    for state in states:
        want.update(render.port_objects(state, config))
    return want


def nft_f(netns: str, script: str) -> None:
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "--", "nft", "-f", "-"],
        input=script.encode(),
        check=True,
        capture_output=True,
    )


def ms(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=10)
    return f"p50 {statistics.median(samples):7.2f} ms  p90 {qs[8]:7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=40)
    args = parser.parse_args()

    config = BackendConfig(cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),))
    states = b.synthetic_states(args.services)
    base = render.base_objects(config)
    programmed = {**base, **objects(states, config)}
    sets = netlink.set_types(programmed.values())
    have = {key: obj.value for key, obj in programmed.items()}

    netns = f"kpy-bench-nl-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    writer = None
    try:
        t0 = time.perf_counter()
        nft_f(netns, render.transaction(programmed, {}, programmed).script)
        print(f"{args.services} services programmed by nft -f in {time.perf_counter() - t0:.1f} s")
        writer = netlink.NetlinkWriter(netns)
        nft_times: list[float] = []
        netlink_times: list[float] = []
        encode_times: list[float] = []
        lines = size = 0
        for i in range(args.changes):
            state = states[(i * 7919) % len(states)]
            grown = b.state(state.service, [*state.endpoints, b.endpoint("10.250.0.1")])
            for target in (grown, state):  # add the endpoint, then take it away again
                want = objects([target], config)
                before = objects([state if target is grown else grown], config)
                keys = {*want, *before}
                txn = render.transaction(want, have, keys)
                script = txn.script if i % 2 else ""  # nft's text, made before timing
                t0 = time.perf_counter()
                if i % 2:
                    nft_f(netns, script)
                    nft_times.append((time.perf_counter() - t0) * 1000)
                else:
                    batch = netlink.encode(txn.iter_ops(), sets)
                    t1 = time.perf_counter()
                    writer.send(batch)
                    t2 = time.perf_counter()
                    encode_times.append((t1 - t0) * 1000)
                    netlink_times.append((t2 - t0) * 1000)
                    lines, size = len(batch), batch.size
                for key in keys:
                    obj = want.get(key)
                    if obj is None:
                        have.pop(key, None)
                    else:
                        have[key] = obj.value
        print(f"transaction: {lines} messages, {size} bytes of netlink")
        print(f"nft -f (nsenter)      {ms(nft_times)}")
        print(f"netlink encode+send   {ms(netlink_times)}")
        print(f"  of which encode     {ms(encode_times)}")
    finally:
        if writer is not None:
            writer.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
