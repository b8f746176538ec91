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
both families back (nft: over netlink, only kpy's chains; legacy: ``iptables-save``)
and diffs. *restart* is the first full sync of a new backend on the programmed
namespace (what a restarted agent does: read everything back and adopt, writing
nothing). *save* is the old way of reading back, ``iptables-<flavour>-save -c -t
filter`` and ``-t nat``, timed once (``--save-timeout``, default 300 s; "crash" when it died);
*netlink read* is the new one, all of kpy's chains of both families fingerprinted
(*decoded*: also the summaries a restart and ``kpy dump`` use). *cleanup* removes
everything at the end.

*10 changes in one sync*: ten service ports changed together (as the runner
batches events that arrive within its minimum sync period), 20 samples. Where a
change's time goes: *restore p50* is the part of each sample spent in the
``iptables-restore`` process (exec, cache, kernel commit; the rest, *agent p50*, is
select, render, diff and the restore text). Two probes then commit into the programmed
nat table (best of five each): an *empty commit* (``*nat`` / ``COMMIT``) and a
*one-rule commit* (a scratch chain with one ``-j RETURN`` rule, removed again untimed).
Their difference is what adding any rule costs the kernel: in the nft flavour the
nf_tables commit validates every chain reachable from each nat base chain; in the
legacy flavour both probes replace the whole table.

At 100,000 Services a case takes many minutes: ``--skip`` leaves out phases
(resync, restart, batch, cleanup; ``--save-timeout 0`` the save), ``--samples`` and
``--probe-runs`` take fewer samples. The child's progress (each phase's result and the
1-minute load average) goes to stderr. A cold sync that fails (the legacy flavour's
nat table over x_tables' 512 MiB limit) is reported as such, with the time it took.
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
from kpy_iptables import IptablesBackend, held

from kpy.core.backend import BackendConfig, BackendError
from kpy.core.model import Plan
from kpy.testing import builders as b

SIZES = (1000, 10000)
SAVE_TIMEOUT = 300.0
MODES = ("nft", "legacy")
SAMPLES = 100
BATCH = 10  # service ports changed together in one sync
BATCH_SAMPLES = 20


def _netns() -> str:
    name = f"kpy-bench-ipt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def _save(netns: str, mode: str, timeout: float) -> tuple[str, str]:
    """(seconds or what went wrong, the text) of the old read-back: ``iptables-<mode>-save
    -c -t filter`` and ``-t nat`` in ``netns``."""
    started = time.perf_counter()
    text = ""
    for table in ("filter", "nat"):
        left = timeout - (time.perf_counter() - started)
        try:
            done = subprocess.run(
                [
                    "nsenter",
                    f"--net=/run/netns/{netns}",
                    f"iptables-{mode}-save",
                    "-c",
                    "-t",
                    table,
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=max(left, 1.0),
            )
        except subprocess.TimeoutExpired:
            return f">{timeout:.0f}", ""
        if done.returncode != 0:
            return f"failed ({done.returncode})", ""
        text += done.stdout
    return f"{time.perf_counter() - started:.1f}", text


def _netlink_read(backend: IptablesBackend, *, decode_all: bool) -> float:
    started = time.perf_counter()
    for family in (4, 6):
        held.read(backend._kernel.reader, family, decode_all=decode_all)
    return time.perf_counter() - started


PHASES = ("resync", "restart", "batch", "cleanup")  # what --skip may leave out


def _progress(what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)


def run(
    mode: str,
    size: int,
    samples: int = SAMPLES,
    save_timeout: float = SAVE_TIMEOUT,
    skip: frozenset[str] = frozenset(),
    probe_runs: int = 5,
) -> dict[str, object]:
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
        restore = backend._kernel.restore
        in_tool = [0.0]

        async def timed(family: int, text: str, mode: str | None = None) -> None:
            started = time.perf_counter()
            try:
                await restore(family, text, mode)
            finally:
                in_tool[0] += time.perf_counter() - started

        backend._kernel.restore = timed  # type: ignore[method-assign]
        _progress(f"{mode} {size}: cold sync")
        started = time.perf_counter()
        try:
            cold = asyncio.run(backend.apply(b.plan(states, node_info=node)))
        except BackendError as exc:  # e.g. x_tables' 512 MiB limit on one table
            _progress(f"cold sync failed after {time.perf_counter() - started:.1f} s: {exc}")
            return {
                "mode": mode,
                "services": size,
                "failed": str(exc),
                "cold_s": f"failed after {time.perf_counter() - started:.0f} s",
                "cold_restore_s": round(in_tool[0], 2),
                "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "load": round(os.getloadavg()[0], 1),
            }
        cold_s = time.perf_counter() - started
        cold_restore_s = in_tool[0]
        _progress(f"cold sync {cold_s:.1f} s, of which restore {cold_restore_s:.1f} s")
        save_s, save = _save(netns, mode, save_timeout) if save_timeout > 0 else ("-", "")
        read_s = read_all_s = None
        if mode == "nft":
            read_s = round(_netlink_read(backend, decode_all=False), 2)
            read_all_s = round(_netlink_read(backend, decode_all=True), 2)
        resync_s = restart_s = None
        if "resync" not in skip:
            _progress("full resync")
            started = time.perf_counter()
            resync = asyncio.run(backend.apply(b.plan(states, node_info=node)))
            resync_s = time.perf_counter() - started
            assert resync.ops == 0
        if "restart" not in skip:
            _progress(f"full resync {resync_s} s; restart")
            restarted = IptablesBackend(config)
            started = time.perf_counter()
            adopted = asyncio.run(restarted.apply(b.plan(states, node_info=node)))
            restart_s = time.perf_counter() - started
            assert adopted.ops == 0, restarted.last_drift[:5]
        _progress(f"save {save_s} s, netlink read {read_s}/{read_all_s} s, restart {restart_s} s")
        times, tool, lines, sizes = [], [], [], []
        for i in range(samples):
            index = (i * 7919) % len(states)
            old = states[index]
            if i % 2 == 0:
                new_eps = old.endpoints[1:]
            else:
                extra = b.endpoint(str(ipaddress.ip_address("10.250.0.1") + i))
                new_eps = (*old.endpoints, extra)
            services = {s.name: s for s in states}
            in_tool[0] = 0.0
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
            tool.append(in_tool[0] * 1000)
            states[index] = new
            lines.append(result.size)
            sizes.append(int(result.detail["bytes"]))
        q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        batched = []
        for i in range(0 if "batch" in skip else BATCH_SAMPLES):
            services = {s.name: s for s in states}
            started = time.perf_counter()
            changed = []
            for j in range(BATCH):
                index = (i * BATCH + j) * 104729 % len(states)
                old = states[index]
                if i % 2 == 0:
                    new_eps = old.endpoints[1:]
                else:
                    extra = b.endpoint(str(ipaddress.ip_address("10.251.0.1") + i * BATCH + j))
                    new_eps = (*old.endpoints, extra)
                new = b.state(old.service, new_eps, node)
                services[new.name] = new
                states[index] = new
                changed.append(new.name)
            plan = Plan(node=node, services=services, changed=frozenset(changed))
            asyncio.run(backend.apply(plan))
            batched.append((time.perf_counter() - started) * 1000)
        _progress(f"one change p50 {statistics.median(times):.0f} ms; probes")
        empty_ms, rule_ms = _probe(netns, mode, probe_runs)
        cleanup_s = None
        if "cleanup" not in skip:
            _progress(f"empty commit {empty_ms:.0f} ms, one rule {rule_ms:.0f} ms; cleanup")
            started = time.perf_counter()
            asyncio.run(backend.cleanup())
            cleanup_s = time.perf_counter() - started
        _progress("done")

        def maybe(value: float | None, digits: int = 2) -> object:
            return "-" if value is None else round(value, digits)

        return {
            "mode": mode,
            "services": size,
            "cold_s": round(cold_s, 2),
            "cold_restore_s": round(cold_restore_s, 2),
            "cold_lines": cold.size,
            "save_lines": save.count("\n") if save else "-",
            "save_s": save_s,
            "read_s": read_s if read_s is not None else "-",
            "read_all_s": read_all_s if read_all_s is not None else "-",
            "resync_s": maybe(resync_s),
            "restart_s": maybe(restart_s),
            "cleanup_s": maybe(cleanup_s),
            "p50_ms": round(statistics.median(times), 1),
            "p90_ms": round(q[8], 1),
            "batch_ms": round(statistics.median(batched), 1) if batched else "-",
            "restore_ms": round(statistics.median(tool), 1),
            "agent_ms": round(
                statistics.median(t - u for t, u in zip(times, tool, strict=True)), 1
            ),
            "empty_ms": round(empty_ms, 1),
            "rule_ms": round(rule_ms, 1),
            "lines": f"{min(lines)}-{max(lines)}",
            "bytes": f"{min(sizes)}-{max(sizes)}",
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load": round(os.getloadavg()[0], 1),
        }
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


PROBE_CHAIN = "KPY-BENCH-PROBE"


def _probe(netns: str, mode: str, repeat: int = 5) -> tuple[float, float]:
    """Best of ``repeat``: an empty nat commit, and one adding a rule (then removed,
    untimed)."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", f"iptables-{mode}-restore", "--noflush"]
    inputs = {
        "empty": "*nat\nCOMMIT\n",
        "rule": f"*nat\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} -j RETURN\nCOMMIT\n",
    }
    undo = f"*nat\n-F {PROBE_CHAIN}\n-X {PROBE_CHAIN}\nCOMMIT\n"
    best = {}
    for name, text in inputs.items():
        runs = []
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run(argv, input=text, text=True, check=True)
            runs.append((time.perf_counter() - started) * 1000)
            if name == "rule":
                subprocess.run(argv, input=undo, text=True, check=True)
        best[name] = min(runs)
    return best["empty"], best["rule"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument(
        "--save-timeout", type=float, default=SAVE_TIMEOUT, help="0: do not time iptables-save"
    )
    parser.add_argument(
        "--skip", default="", help=f"phases not run (comma-separated): {','.join(PHASES)}"
    )
    parser.add_argument("--probe-runs", type=int, default=5, help="runs of each commit probe")
    parser.add_argument("--one", help="MODE:SIZE — run one case, print JSON (internal)")
    args = parser.parse_args()
    skip = frozenset(filter(None, args.skip.split(",")))
    if skip - set(PHASES):
        parser.error(f"--skip: unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    if args.one:
        mode, size = args.one.split(":")
        result = run(mode, int(size), args.samples, args.save_timeout, skip, args.probe_runs)
        print(json.dumps(result))
        return
    print(
        "| flavour | services | cold sync (s) | cold restore lines | iptables-save lines "
        "| iptables-save (s) | netlink read (s) | netlink read, decoded (s) "
        "| full resync, no change (s) | restart, adopting (s) | cleanup (s) "
        "| one change p50 (ms) | p90 (ms) | of which restore p50 (ms) | agent p50 (ms) "
        f"| {BATCH} changes in one sync p50 (ms) | empty commit (ms) | one-rule commit (ms) "
        "| restore lines per change | bytes per change | peak RSS (MB) | load (1 min) |"
    )
    print(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"
    )
    for mode in args.modes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            # each case in a process of its own, so peak RSS is that case's
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{mode}:{size}",
                    "--samples",
                    str(args.samples),
                    "--save-timeout",
                    str(args.save_timeout),
                    "--skip",
                    args.skip,
                    "--probe-runs",
                    str(args.probe_runs),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if "failed" in r:
                print(f"| {r['mode']} | {r['services']} | {r['cold_s']}: {r['failed']} |")
                continue
            print(
                f"| {r['mode']} | {r['services']} | {r['cold_s']} | {r['cold_lines']} "
                f"| {r['save_lines']} | {r['save_s']} | {r['read_s']} | {r['read_all_s']} "
                f"| {r['resync_s']} | {r['restart_s']} | {r['cleanup_s']} "
                f"| {r['p50_ms']} | {r['p90_ms']} "
                f"| {r['restore_ms']} | {r['agent_ms']} | {r['batch_ms']} "
                f"| {r['empty_ms']} | {r['rule_ms']} "
                f"| {r['lines']} "
                f"| {r['bytes']} | {r['rss_mb']} | {r['load']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
