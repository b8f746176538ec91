"""Benchmark of the userspace proxy against socat, haproxy, kernel DNAT and no relay.

In the namespaces of :mod:`kpy.testing.netns` (never the machine's own): a client
namespace talks through the node namespace to servers in pod-a. Each run measures every
target, one after another:

* ``direct``: to the pod's address (the node only routes) — the physical floor;
* ``nftables``: a ClusterIP DNATed by kpy's nftables backend (kernel relay);
* ``userspace``: a ClusterIP served by kpy's userspace proxy, in a process of its own
  as in the agent (``--userspace-in-process`` runs it on a thread of this process
  instead, sharing the interpreter lock with the clients and servers, as the first
  versions of this script did);
* ``socat``: ``socat TCP-LISTEN:…,fork`` on the node address (a process per connection);
* ``haproxy``: ``haproxy`` in TCP mode on the node address.

Measured per target: one-stream bulk throughput (MB/s, 256 MiB client → server, as
five streams of 51 MiB), connection rate (connect, 64-byte request, 64-byte reply,
close; 32 concurrent clients for 3 s in total), with the relay's CPU time per
connection where the relay is a process, and p50 latency of one fresh connection's
request/reply (500 in a row), with the added latency over ``direct``; connections that
fail in either are counted as ``failed`` (e.g. when the node runs out of ephemeral
ports). Each measurement is taken in five slices, taking turns between the targets.
The 1-minute load average is recorded at the start of each run, and the ratios the
userspace targets are judged by are computed within each run.

``--baseline-backends DIR`` adds a target ``baseline``: the ``kpy_userspace`` in DIR
(e.g. ``git archive <commit> backends/kpy_userspace | tar -x -C DIR``, then
DIR/backends) on a second ClusterIP, so two versions of the proxy are compared within
the same turns.

Usage: ``sudo python bench/bench_userspace.py [--runs 3] [--bulk-mib 256] [--seconds 3]
[--baseline-backends DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

from kpy_nftables import NftablesBackend
from kpy_userspace import UserspaceBackend

from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.kernel.netns import run_in_netns
from kpy.testing import builders as b
from kpy.testing.netns import NODE_IP, POD_A, Topology, topology
from kpy.testing.packets import config_for

SINK, RR = 9000, 9001
Row = dict[str, float]
USERSPACE_VIP, BASELINE_VIP, HAPROXY_IP = "10.96.0.10", "10.96.0.11", "192.168.50.3"
NODE = b.node("node-a", addresses=[NODE_IP])


class Servers:
    """A sink (counts bytes until EOF, answers the count) and a request/reply server
    (64 bytes in, 64 bytes out) in pod-a, on an asyncio loop of their own thread."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=run_in_netns, args=(netns, self._main))
        self.thread.start()
        self.ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
            writer.write(total.to_bytes(8, "big"))
            await writer.drain()
            writer.close()

        async def rr(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    writer.write(await reader.readexactly(64))
                    await writer.drain()
            writer.close()

        async def start() -> list[asyncio.Server]:
            return [
                await asyncio.start_server(sink, "0.0.0.0", SINK, backlog=1024),
                await asyncio.start_server(rr, "0.0.0.0", RR, backlog=1024),
            ]

        servers = self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()
        for server in servers:
            server.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def bulk(host: str, port: int, mib: int) -> float:
    chunk = os.urandom(1 << 20)
    sock = socket.create_connection((host, port), timeout=30)
    with sock:
        started = time.perf_counter()
        for _ in range(mib):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            more = sock.recv(8 - len(got))
            if not more:
                break
            got += more
        elapsed = time.perf_counter() - started
    assert int.from_bytes(got, "big") == mib << 20, "bytes lost on the way"
    return mib * 1.048576 / elapsed


def request(host: str, port: int) -> float:
    """Seconds for one fresh connection's 64-byte request and reply; OSError if it fails."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"x" * 64)
        got = 0
        while got < 64:
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("closed before the reply")
            got += len(chunk)
    return time.perf_counter() - started


def latency(host: str, port: int, count: int) -> tuple[list[float], int]:
    """``count`` fresh connections in a row: the successful ones' times, and how many
    failed."""
    samples, failed = [], 0
    for _ in range(count):
        try:
            samples.append(request(host, port))
        except OSError:
            failed += 1
    return samples, failed


def rate(host: str, port: int, seconds: float, concurrency: int = 32) -> tuple[int, float, int]:
    """Connections completed by ``concurrency`` clients in ``seconds``, the time taken,
    and how many failed (refused, reset, or closed before the reply; counted, not
    retried, so one target's failure neither ends the run nor passes unseen)."""
    done = failed = 0

    async def worker(deadline: float) -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"x" * 64)
                await reader.readexactly(64)
                writer.close()
                await writer.wait_closed()
            except (OSError, asyncio.IncompleteReadError):
                failed += 1
                if writer is not None:
                    writer.close()
                continue
            done += 1

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(main())
    return done, time.perf_counter() - started, failed


class Target(NamedTuple):
    host: str
    pids: tuple[int, ...]  # the relay's processes (CPU time is read from them), or none


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """CPU time of ``pids``: every thread's run time from the scheduler (nanoseconds,
    /proc/PID/task/TID/schedstat), plus the user + system time of reaped children
    (socat's forks; clock ticks)."""
    total = 0.0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime cstime
    return total


def measure_run(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, Row]:
    """One run over every target, from the client namespace's thread. Bulk transfer,
    connection rate and latency samples are each taken in ``--slices`` slices, taking
    turns between the targets, so a change in the machine's load during the run falls
    on every target alike."""
    rows: dict[str, Row] = {name: {} for name in targets}
    mib = max(1, args.bulk_mib // args.slices)
    bulk_s = dict.fromkeys(targets, 0.0)
    for _ in range(args.slices):
        for name, (host, _) in targets.items():
            bulk_s[name] += mib * 1.048576 / bulk(host, SINK, mib)
    for name in targets:
        rows[name]["mb_s"] = round(args.slices * mib * 1.048576 / bulk_s[name], 1)
    done = dict.fromkeys(targets, 0)
    failed = dict.fromkeys(targets, 0)
    took = dict.fromkeys(targets, 0.0)
    cpu = dict.fromkeys(targets, 0.0)
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.slices):
        for name, (host, pids) in targets.items():
            before = cpu_seconds(pids)
            n, elapsed, errors = rate(host, RR, args.seconds / args.slices)
            cpu[name] += cpu_seconds(pids) - before
            done[name] += n
            failed[name] += errors
            took[name] += elapsed
            taken, errors = latency(host, RR, max(1, args.latency_count // args.slices))
            samples[name] += taken
            failed[name] += errors
    for name, (_, pids) in targets.items():
        rows[name]["conn_s"] = round(done[name] / took[name])
        p50 = statistics.median(samples[name]) if samples[name] else float("nan")
        rows[name]["p50_us"] = round(p50 * 1e6, 1)
        if failed[name]:
            rows[name]["failed"] = failed[name]
        if pids:  # the relay's CPU time per relayed connection, whatever the load
            rows[name]["cpu_us_per_conn"] = round(cpu[name] / done[name] * 1e6, 1)
    return rows


def userspace_states(vip: str = USERSPACE_VIP) -> list[ServicePortState]:
    return [
        b.state(
            b.service("bench", cluster_ip=vip, port=port, port_name_=name),
            [b.endpoint(POD_A, port)],
            NODE,
        )
        for name, port in (("sink", SINK), ("rr", RR))
    ]


def userspace_config(netns: str, options: tuple[tuple[str, str], ...] = ()) -> BackendConfig:
    return BackendConfig(
        node_name="node-a", node_ips=(ipaddress.ip_address(NODE_IP),), netns=netns, options=options
    )


def serve_userspace(netns: str, options: tuple[tuple[str, str], ...], vip: str) -> None:
    """The child process relaying: program the proxy, say so on stdout, relay until
    stdin closes, clean up."""
    backend = UserspaceBackend(userspace_config(netns, options))
    try:
        asyncio.run(backend.apply(b.plan(userspace_states(vip), node_info=NODE)))
        print("ready", flush=True)
        sys.stdin.read()
    finally:
        asyncio.run(backend.cleanup())


@contextlib.contextmanager
def userspace_relay(
    topo: Topology,
    *,
    in_process: bool,
    options: tuple[tuple[str, str], ...],
    vip: str = USERSPACE_VIP,
    backends: str | None = None,
) -> Iterator[tuple[int, ...]]:
    """kpy's userspace proxy for the node namespace; yields the relay's process (none
    when it runs in this one). ``backends``: import ``kpy_userspace`` from that
    directory instead (another version of the proxy, for ``--baseline-backends``)."""
    if in_process:
        backend = UserspaceBackend(userspace_config(topo.node, options))
        try:
            asyncio.run(backend.apply(b.plan(userspace_states(), node_info=NODE)))
            yield ()
        finally:
            asyncio.run(backend.cleanup())
        return
    argv = [sys.executable, __file__, "--serve-userspace", topo.node, "--serve-vip", vip]
    for key, value in options:
        argv += ["--userspace-option", f"{key}={value}"]
    env = dict(os.environ)
    if backends is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [backends, env.get("PYTHONPATH")]))
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdin is not None
        for line in child.stdout:  # the backend's log lines, then "ready"
            if line.strip() == b"ready":
                break
        else:
            raise RuntimeError("the userspace relay process did not start")
        yield (child.pid,)
    finally:
        if child.stdin is not None:
            child.stdin.close()  # the child cleans up and exits
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def relays(
    topo: Topology,
    *,
    in_process: bool,
    options: tuple[tuple[str, str], ...],
    baseline: str | None = None,
    haproxy_threads: int | None = None,
) -> Iterator[dict[str, Target]]:
    """Start every relay; yield target name → where to connect and who relays.

    With ``baseline`` (a directory holding another ``kpy_userspace``), that version
    serves a second ClusterIP in a process of its own as target ``baseline``, measured
    in the same turns as the others. Two proxies in one namespace would each remove the
    other's addresses as strays on their first full sync, so both VIPs are then put on
    ``lo`` beforehand, unmarked: each proxy uses them and adds or removes none."""
    procs: list[subprocess.Popen[bytes]] = []
    kernel_states = [
        b.state(
            b.service("kernel", cluster_ip="10.96.0.30", port=port, port_name_=name),
            [b.endpoint(POD_A, port)],
            NODE,
        )
        for name, port in (("sink", SINK), ("rr", RR))
    ]
    nftables = NftablesBackend(config_for(topo))
    tmp = tempfile.mkdtemp(prefix="kpy-bench-haproxy-")
    try:
        asyncio.run(nftables.apply(b.plan(kernel_states, node_info=NODE)))
        subprocess.run(
            ["ip", "-n", topo.node, "addr", "add", f"{HAPROXY_IP}/24", "dev", "vc"], check=True
        )
        for port in (SINK, RR):
            procs.append(
                subprocess.Popen(
                    [
                        "ip", "netns", "exec", topo.node, "socat",
                        f"TCP-LISTEN:{port},bind={NODE_IP},fork,reuseaddr,backlog=1024",
                        f"TCP:{POD_A}:{port}",
                    ]
                )
            )  # fmt: skip
        cfg = os.path.join(tmp, "haproxy.cfg")
        # haproxy's default is a thread per CPU; the userspace proxy relays on one thread
        nbthread = "" if haproxy_threads is None else f"  nbthread {haproxy_threads}\n"
        with open(cfg, "w") as f:
            f.write(
                f"global\n  maxconn 8000\n{nbthread}"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 60s\n  timeout server 60s\n"
            )
            for port in (SINK, RR):
                f.write(f"listen l{port}\n  bind {HAPROXY_IP}:{port}\n  server s {POD_A}:{port}\n")
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", topo.node, "haproxy", "-f", cfg, "-db"])
        )
        stack = contextlib.ExitStack()
        with stack:
            targets = {"direct": Target(POD_A, ()), "nftables": Target("10.96.0.30", ())}
            if baseline is not None:
                for vip in (USERSPACE_VIP, BASELINE_VIP):
                    subprocess.run(
                        ["ip", "-n", topo.node, "addr", "add", f"{vip}/32", "dev", "lo"],
                        check=True,
                    )
                targets["baseline"] = Target(
                    BASELINE_VIP,
                    stack.enter_context(
                        userspace_relay(
                            topo,
                            in_process=False,
                            options=options,
                            vip=BASELINE_VIP,
                            backends=baseline,
                        )
                    ),
                )
            pids = stack.enter_context(
                userspace_relay(topo, in_process=in_process, options=options)
            )
            print(f"userspace relay: pid {pids}", flush=True)
            targets["userspace"] = Target(USERSPACE_VIP, pids)
            targets["socat"] = Target(NODE_IP, (procs[1].pid,))  # the RR port's
            targets["haproxy"] = Target(HAPROXY_IP, (procs[2].pid,))
            for host, _ in targets.values():  # every relay answers before the first run
                run_in_netns(topo.client, functools.partial(wait_answering, host, RR))
            yield targets
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        asyncio.run(nftables.cleanup())
        shutil.rmtree(tmp, ignore_errors=True)


def wait_answering(host: str, port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            request(host, port)
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def judge(run: dict[str, Row]) -> dict[str, float]:
    """The issue's ratios within one run."""
    us, socat, haproxy = run["userspace"], run["socat"], run["haproxy"]
    return {
        "conn_vs_socat": round(us["conn_s"] / socat["conn_s"], 2),
        "conn_vs_haproxy": round(us["conn_s"] / haproxy["conn_s"], 2),
        "added_p50_minus_haproxy_us": round(us["added_p50_us"] - haproxy["added_p50_us"], 1),
        "mb_s_vs_socat": round(us["mb_s"] / socat["mb_s"], 2),
        "mb_s_vs_haproxy": round(us["mb_s"] / haproxy["mb_s"], 2),
    } | (compare(us, run["baseline"]) if "baseline" in run else {})


def compare(us: Row, baseline: Row) -> dict[str, float]:
    """This version of the proxy against the baseline version, in the same run."""
    out = {
        "conn_vs_baseline": round(us["conn_s"] / baseline["conn_s"], 2),
        "added_p50_minus_baseline_us": round(us["added_p50_us"] - baseline["added_p50_us"], 1),
        "mb_s_vs_baseline": round(us["mb_s"] / baseline["mb_s"], 2),
    }
    if "cpu_us_per_conn" in us and "cpu_us_per_conn" in baseline:
        out["cpu_vs_baseline"] = round(us["cpu_us_per_conn"] / baseline["cpu_us_per_conn"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument("--slices", type=int, default=5, help="turns per target and run")
    parser.add_argument("--only", action="append", help="measure only these targets")
    parser.add_argument("--userspace-in-process", action="store_true")
    parser.add_argument(
        "--userspace-option", action="append", default=[], help="KEY=VALUE backend option"
    )
    parser.add_argument(
        "--baseline-backends",
        metavar="DIR",
        help="also measure the kpy_userspace found in DIR (e.g. an older commit's backends/)",
    )
    parser.add_argument(
        "--haproxy-threads", type=int, help="haproxy's nbthread (default: one per CPU)"
    )
    parser.add_argument("--serve-userspace", metavar="NETNS", help=argparse.SUPPRESS)
    parser.add_argument("--serve-vip", default=USERSPACE_VIP, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write every run's results to this file")
    args = parser.parse_args()
    options = tuple((k, v) for k, _, v in (o.partition("=") for o in args.userspace_option))
    # SIGTERM (e.g. from `timeout`) unwinds like an error: relays stopped, namespaces removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.serve_userspace:
        serve_userspace(args.serve_userspace, options, args.serve_vip)
        return
    runs: list[dict[str, object]] = []
    with topology("kpy-bench-us") as topo:
        servers = Servers(topo.pods["pod-a"])
        try:
            with relays(
                topo,
                in_process=args.userspace_in_process,
                options=options,
                baseline=args.baseline_backends,
                haproxy_threads=args.haproxy_threads,
            ) as targets:
                for number in range(1, args.runs + 1):
                    load = load_average()
                    print(f"run {number}: load average {load}", flush=True)
                    chosen = {n: h for n, h in targets.items() if not args.only or n in args.only}
                    results = run_in_netns(
                        topo.client, functools.partial(measure_run, chosen, args)
                    )
                    for name, row in results.items():
                        print(f"  {name} {row}", flush=True)
                    if "direct" in results:
                        for row in results.values():
                            row["added_p50_us"] = round(
                                row["p50_us"] - results["direct"]["p50_us"], 1
                            )
                    verdict = (
                        judge(results)
                        if {"direct", "userspace", "socat", "haproxy"} <= set(results)
                        else {}
                    )
                    if verdict:
                        print(f"  ratios {verdict}", flush=True)
                    runs.append({"load_average": load, "results": results, "ratios": verdict})
        finally:
            servers.stop()
    print(json.dumps(runs, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
