"""kpy side by side with upstream kube-proxy, on the same real API server.

One control plane (etcd, kube-apiserver, kube-controller-manager: ``kpy.tools.lab.control_plane``)
in its namespace ``kpy-vs-cp``; for every run a fresh node namespace ``kpy-vs-node``
(veth to the control plane, 192.168.200.2) and pod namespace ``kpy-vs-pod`` behind it.
The workload: N Services (80% ClusterIP / 15% NodePort / 5% LoadBalancer, ingress IPs
written to their status), one 5-endpoint EndpointSlice each (written by the benchmark as
an EndpointSlice controller would; the addresses of all but the probe Service are never
contacted), the Node. Each proxy runs alone in the node namespace, with the same admin
kubeconfig and its own defaults (both have a 1 s minimum sync period), and is measured
from outside identically:

* *cold start*: process start → the probe Service (created last) answers from the node,
  i.e. the first full sync is in the kernel;
* *one change*: the probe Service's slice is rewritten to five new endpoints (clock
  read just before the PATCH) → the first TCP connection from the node to its ClusterIP
  answered by a new endpoint (the pod's echo server answers with the address it was
  reached at). Trials are spaced 1.2 s apart so neither proxy's minimum sync period
  delays a change. Measured twice: from the API write (PATCH sent), and from the watch
  event — the benchmark's own watch on the probe slice, opened like a proxy's, records
  when the API server delivers the new endpoints; from there on it is the proxy's
  work alone (event → rules → first packet), without the API server's write;
* RSS after the trials and peak RSS (VmRSS, VmHWM), rule count (``nft list ruleset`` or
  ``iptables-save`` + ``ip6tables-save`` lines); in iptables mode, the *commit floor*:
  one scratch chain with one rule added by ``iptables-restore --noflush`` into the
  programmed table (median of five), what any change costs before the proxy's work;
* the 1-minute load average at the start of each run.

Runs are alternated (kube-proxy nftables, kpy nftables, kube-proxy iptables, kpy
iptables) at each N, ``--rounds`` times. ``--baseline TREE`` adds ``kpy-baseline/<mode>``
runs: kpy from another source tree (e.g. ``git archive`` of an earlier commit), alternated
with the others on the same API server, for before/after comparisons. Usage (root;
``scripts/build-upstream.sh kube-proxy`` first)::

    python bench/vs_kube_proxy.py [--n 1000,10000] [--trials 30] [--rounds 1] \
        [--baseline TREE] [--json out.json] [--png docs/vs-kube-proxy.png]

The PNG needs matplotlib (``pip install matplotlib``), imported only when asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kpy.kernel.netns import run_in_netns
from kpy.testing.netns import ip
from kpy.tools.lab import api_client as client_
from kpy.tools.lab import control_plane as rc

CP_NS, NODE_NS, POD_NS = "kpy-vs-cp", "kpy-vs-node", "kpy-vs-pod"
CP_IP, NODE_IP = "192.168.200.1", "192.168.200.2"
NODE = "node-1"
NS = "bench"
PROBE = "probe"
ENDPOINT_SETS = (
    [f"10.244.0.{10 + i}" for i in range(5)],
    [f"10.244.0.{20 + i}" for i in range(5)],
)
PROXIES = ("kube-proxy/nftables", "kpy/nftables", "kube-proxy/iptables", "kpy/iptables")


# --------------------------------------------------------------------------- workload


def service(i: int) -> dict[str, Any]:
    kind = "ClusterIP" if i % 20 < 16 else ("NodePort" if i % 20 < 19 else "LoadBalancer")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"s{i}", "namespace": NS},
        "spec": {
            "type": kind,
            "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
        },
    }


def endpoint_slice(name: str, addresses: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-x",
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "kpy-bench",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, "nodeName": NODE} for a in addresses
        ],
    }


def populate(plane: rc.ControlPlane, start: int, stop: int) -> None:
    """Services start..stop-1 with their slices (and LoadBalancer status), 4 writers."""

    def write(indexes: range) -> None:
        client = client_.Client(plane.netns, "127.0.0.1", rc.API_PORT, plane.context())
        try:
            for i in indexes:
                svc = service(i)
                client.create(svc)
                if svc["spec"]["type"] == "LoadBalancer":
                    ingress = {"ip": f"172.18.{i // 250}.{i % 250 + 1}"}
                    client.patch_status(svc, {"loadBalancer": {"ingress": [ingress]}})
                n = i * 5
                fake = [f"10.245.{(n + k) // 250 % 250}.{(n + k) % 250 + 1}" for k in range(5)]
                client.create(endpoint_slice(f"s{i}", fake))
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, [range(start + w, stop, 4) for w in range(4)]))


def probe_service(plane: rc.ControlPlane) -> str:
    """Create (again) the probe Service with the first endpoint set; its ClusterIP."""
    api = plane.admin()
    with contextlib.suppress(client_.ApiError):
        api.delete(endpoint_slice(PROBE, []))
        api.delete(service(0) | {"metadata": {"name": PROBE, "namespace": NS}})
    svc = service(0) | {"metadata": {"name": PROBE, "namespace": NS}}
    for _ in range(100):  # a deleted object may linger for a moment
        try:
            created = api.create(svc)
            break
        except client_.ApiError as exc:
            if exc.status != 409:
                raise
            time.sleep(0.05)
    api.create(endpoint_slice(PROBE, ENDPOINT_SETS[0]))
    return str(created["spec"]["clusterIP"])


# --------------------------------------------------------------------------- the node


class Echo:
    """In the pod namespace: port 80 on every address answers with the address reached."""

    def __init__(self) -> None:
        self.sock = run_in_netns(POD_NS, lambda: socket.create_server(("0.0.0.0", 80), backlog=512))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.sendall(conn.getsockname()[0].encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=2)


@contextlib.contextmanager
def node() -> Iterator[Echo]:
    """Fresh node and pod namespaces (no rules from an earlier run), removed on exit."""
    try:
        for ns in (NODE_NS, POD_NS):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", CP_NS, "link", "add", "vn", "type", "veth", "peer", "name", "eth0", "netns",
           NODE_NS)  # fmt: skip
        ip("-n", CP_NS, "addr", "add", f"{CP_IP}/24", "dev", "vn")
        ip("-n", CP_NS, "link", "set", "vn", "up")
        ip("-n", NODE_NS, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        ip("-n", NODE_NS, "link", "set", "eth0", "up")
        # routed, so the node's own connections to Service IPs reach the output hook
        ip("-n", NODE_NS, "route", "add", "default", "via", CP_IP)
        ip("-n", NODE_NS, "link", "add", "vp", "type", "veth", "peer", "name", "eth0", "netns",
           POD_NS)  # fmt: skip
        ip("-n", NODE_NS, "addr", "add", "10.244.0.1/24", "dev", "vp")
        ip("-n", NODE_NS, "link", "set", "vp", "up")
        for address in [a for s in ENDPOINT_SETS for a in s]:
            ip("-n", POD_NS, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", POD_NS, "link", "set", "eth0", "up")
        ip("-n", POD_NS, "route", "add", "default", "via", "10.244.0.1")
        run_in_netns(NODE_NS, lambda: Path("/proc/sys/net/ipv4/ip_forward").write_text("1"))
        echo = Echo()
        try:
            yield echo
        finally:
            echo.close()
    finally:
        # the control plane's end first: a veth left to the namespace's asynchronous
        # teardown may still hold the name ``vn`` when the next run adds it
        subprocess.run(["ip", "-n", CP_NS, "link", "del", "vn"], check=False, capture_output=True)
        for ns in (NODE_NS, POD_NS):
            rc.kill_in_netns(ns)
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


class SliceWatch:
    """A watch on the probe's EndpointSlice, from the control plane's namespace: when
    each endpoint set was delivered (the same stream a proxy gets, at the same time)."""

    def __init__(self, plane: rc.ControlPlane, resource_version: str) -> None:
        self.conn = http.client.HTTPSConnection(
            "127.0.0.1", rc.API_PORT, context=plane.context(), timeout=600
        )
        run_in_netns(plane.netns, self.conn.connect)
        path = (f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?watch=1"
                f"&fieldSelector=metadata.name%3D{endpoint_slice(PROBE, [])['metadata']['name']}"
                f"&resourceVersion={resource_version}"
                "&timeoutSeconds=3600")  # fmt: skip
        self.conn.request("GET", path, headers={"Accept": "application/json"})
        self.response = self.conn.getresponse()
        self.events: list[tuple[float, frozenset[str]]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError, http.client.HTTPException):
            pending = b""
            while chunk := self.response.read1(65536):
                seen = time.monotonic()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._event(seen, line)

    def _event(self, seen: float, line: bytes) -> None:
        if not line.strip():
            return
        obj = json.loads(line).get("object", {})
        addresses = frozenset(a for e in obj.get("endpoints") or [] for a in e.get("addresses", []))
        with self.cond:
            self.events.append((seen, addresses))
            self.cond.notify_all()

    def delivered(self, addresses: set[str], after: float, timeout: float = 60) -> float:
        """When the event holding exactly ``addresses`` arrived (the first after ``after``)."""
        want = frozenset(addresses)

        def found() -> float | None:
            return next((t for t, a in self.events if t >= after and a == want), None)

        with self.cond:
            if not self.cond.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError("the watch did not deliver the change")
            return found() or 0.0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            sock = self.conn.sock
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.thread.join(timeout=5)


def reach(vip: str, want: set[str] | None, deadline: float) -> float:
    """From the node: connect to vip:80 until answered (by an address in ``want``); when."""

    def loop() -> float:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((vip, 80), timeout=0.05) as s:
                    s.settimeout(0.5)
                    answer = s.recv(64).decode()
                if want is None or answer in want:
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.0005)  # resolution: a connection and this pause
        raise TimeoutError(f"{vip}:80 not answered as wanted")

    return run_in_netns(NODE_NS, loop)


def argv(proxy: str, kubeconfig: Path) -> list[str]:
    name, mode = proxy.split("/")
    if name == "kube-proxy":  # else kpy or kpy-baseline (the same command)
        return [
            str(rc.bindir() / "kube-proxy"),
            "--kubeconfig", str(kubeconfig),
            "--hostname-override", NODE,
            "--proxy-mode", mode,
            "--cluster-cidr", "10.244.0.0/16",
            "--conntrack-max-per-core", "0",  # nf_conntrack_max is not per namespace
            "--conntrack-tcp-timeout-established", "0",
            "--conntrack-tcp-timeout-close-wait", "0",
            "--metrics-bind-address", "127.0.0.1:10249",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--v", "1",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "kpy", "run", "--source", "kube",
        "--kubeconfig", str(kubeconfig), "--backend", mode, "--node", NODE,
        "--node-ip", NODE_IP, "--cluster-cidr", "10.244.0.0/16",
        "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "127.0.0.1:10249", "--log-format", "json",
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its children it has reaped (``nft``,
    ``iptables-restore``): a cold start's work, less sensitive to the load than its time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def rule_count(mode: str) -> int:
    cmds = [["nft", "list", "ruleset"]] if mode == "nftables" else [
        ["iptables-save"], ["ip6tables-save"]]  # fmt: skip
    lines = 0
    for cmd in cmds:
        out = subprocess.run(["ip", "netns", "exec", NODE_NS, *cmd], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        lines += len([line for line in out.splitlines() if line.strip()])
    return lines


def commit_floor() -> float:
    """Median of five ``iptables-restore --noflush`` runs into the node's programmed nat
    table, each adding a scratch chain with one ``-j RETURN`` rule (removed again,
    untimed): what any iptables change costs at this size before the proxy's own work
    (the tool reads the table's cache, the kernel validates the table at commit)."""
    argv = ["ip", "netns", "exec", NODE_NS, "iptables-restore", "--noflush"]
    add = "*nat\n:KPY-BENCH-PROBE - [0:0]\n-A KPY-BENCH-PROBE -j RETURN\nCOMMIT\n"
    undo = "*nat\n-F KPY-BENCH-PROBE\n-X KPY-BENCH-PROBE\nCOMMIT\n"
    runs = []
    for _ in range(5):
        started = time.monotonic()
        subprocess.run(argv, input=add, text=True, check=True)
        runs.append(time.monotonic() - started)
        subprocess.run(argv, input=undo, text=True, check=True)
    return statistics.median(runs) * 1000


def compile_tree(root: Path) -> None:
    """Bytecode for a kpy source tree, as ``pip install`` leaves it: a cold start measures
    kpy, not the compiler (``PYTHONDONTWRITEBYTECODE`` would compile every module anew)."""
    for part in ("kpy", "backends"):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / part)], check=True)


def kpy_tree() -> Path:
    """The source tree of the kpy this script imports: what ``kpy/<mode>`` runs."""
    return Path(importlib.import_module("kpy").__file__ or "").parent.parent


def environment(proxy: str, baseline: Path | None) -> dict[str, str] | None:
    """kpy runs import kpy from our tree, kpy-baseline runs from the baseline tree (the
    runs start in ``/``: ``python -m`` puts the working directory first on the path)."""
    if proxy.startswith("kube-proxy/"):
        return None
    tree = kpy_tree()
    if proxy.startswith("kpy-baseline/"):
        if baseline is None:
            raise SystemExit(f"{proxy} needs --baseline")
        tree = baseline
    return os.environ | {"PYTHONPATH": f"{tree}{os.pathsep}{tree / 'backends'}"}


def run_one(
    plane: rc.ControlPlane,
    proxy: str,
    n: int,
    trials: int,
    log: Path,
    cold_limit: float,
    baseline: Path | None = None,
) -> dict[str, Any]:
    api = plane.admin()
    vip = probe_service(plane)
    load = os.getloadavg()[0]
    with node():
        started = time.monotonic()
        with log.open("wb") as out:
            proc = rc.on_spawner(lambda: subprocess.Popen(
                ["ip", "netns", "exec", NODE_NS, *argv(proxy, plane.dir / "bench.kubeconfig")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment(proxy, baseline), cwd="/",
                start_new_session=True, preexec_fn=rc.die_with_parent,
            ))  # fmt: skip
        try:
            try:
                cold = reach(vip, None, started + cold_limit) - started
                cold_cpu = cpu_seconds(proc.pid)
            except TimeoutError:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                print("\n".join([f"{proxy}: no first sync in {cold_limit:.0f} s; log:", *tail]),
                      file=sys.stderr)  # fmt: skip
                rss, peak = memory(proc.pid)
                return {"proxy": proxy, "n": n, "cold_start_s": None,
                        "cold_limit_s": cold_limit, "rss_mib": round(rss / 1024, 1),
                        "peak_rss_mib": round(peak / 1024, 1), "load1": round(load, 2)}  # fmt: skip
            rules = rule_count(proxy.split("/")[1])
            latencies = []
            from_event = []
            current = 0
            last = time.monotonic()
            probe = api.get(client_.object_path(endpoint_slice(PROBE, [])))
            rv = probe["metadata"]["resourceVersion"]
            watch = SliceWatch(plane, rv)
            for _ in range(trials):
                time.sleep(max(0.0, last + 1.2 - time.monotonic()))  # past the min sync
                current ^= 1
                body = endpoint_slice(PROBE, ENDPOINT_SETS[current])
                sent = time.monotonic()
                api.request(
                    "PATCH",
                    client_.object_path(body),
                    {"endpoints": body["endpoints"]},
                    content_type="application/merge-patch+json",
                )
                last = reach(vip, set(ENDPOINT_SETS[current]), sent + 60)
                latencies.append(last - sent)
                from_event.append(last - watch.delivered(set(ENDPOINT_SETS[current]), sent))
            watch.close()
            floor = commit_floor() if proxy.endswith("/iptables") else None
            rss, peak = memory(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    lat = sorted(latencies)
    ev = sorted(from_event)
    return {
        "proxy": proxy,
        "n": n,
        "cold_start_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 2),
        "change_p50_ms": round(statistics.median(lat) * 1000, 1),
        "change_p90_ms": round(lat[int(0.9 * (len(lat) - 1))] * 1000, 1),
        "event_p50_ms": round(statistics.median(ev) * 1000, 1),
        "event_p90_ms": round(ev[int(0.9 * (len(ev) - 1))] * 1000, 1),
        "commit_floor_ms": None if floor is None else round(floor, 1),
        "trials": len(lat),
        "rss_mib": round(rss / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "rules": rules,
        "load1": round(load, 2),
    }


# --------------------------------------------------------------------------- report


def order(proxy: str) -> int:
    name, mode = proxy.split("/")
    return PROXIES.index(f"{name.removesuffix('-baseline')}/{mode}") * 2 + name.endswith(
        "-baseline"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = ("| N | proxy | cold start | one change p50 / p90, from the write | from the "
            "watch event | RSS / peak | rule lines | commit floor | load |\n"
            "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for r in results:
        if r["cold_start_s"] is None:
            rows.append(
                f"| {r['n']:,} | {r['proxy']} | no first sync in {r['cold_limit_s']:.0f} s "
                "| — | — | "
                f"{r['rss_mib']:.0f} / {r['peak_rss_mib']:.0f} MiB | — | — | {r['load1']:.1f} |"
            )
            continue
        rows.append(
            f"| {r['n']:,} | {r['proxy']} | {r['cold_start_s']:.2f} s | "
            f"{r['change_p50_ms']:.1f} / {r['change_p90_ms']:.1f} ms | "
            + (
                f"{r['event_p50_ms']:.1f} / {r['event_p90_ms']:.1f} ms | "
                if "event_p50_ms" in r
                else "— | "
            )
            + f"{r['rss_mib']:.0f} / {r['peak_rss_mib']:.0f} MiB | {r['rules']:,} | "
            + (f"{r['commit_floor_ms']:.1f} ms | " if r.get("commit_floor_ms") else "— | ")
            + f"{r['load1']:.1f} |"
        )
    return "\n".join([head, *rows])


def summary(results: list[dict[str, Any]]) -> str:
    """Medians per size and proxy over the rounds (cold start, its CPU, one change)."""
    head = ("| N | proxy | runs | cold start, median (range) | CPU to first sync, median | "
            "one change p50, median (from the write / the event) | load |\n"
            "|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for n in sorted({r["n"] for r in results}):
        for proxy in sorted({r["proxy"] for r in results if r["n"] == n}, key=order):
            runs = [r for r in results if r["n"] == n and r["proxy"] == proxy]
            cold = [r["cold_start_s"] for r in runs if r["cold_start_s"] is not None]
            cpu = [r["cold_cpu_s"] for r in runs if r.get("cold_cpu_s") is not None]
            change = [r["change_p50_ms"] for r in runs if r.get("change_p50_ms") is not None]
            event = [r["event_p50_ms"] for r in runs if r.get("event_p50_ms") is not None]
            loads = [r["load1"] for r in runs]
            if not cold:
                continue
            rows.append(
                f"| {n:,} | {proxy} | {len(runs)} | {statistics.median(cold):.2f} s "
                f"({min(cold):.2f} to {max(cold):.2f}) | "
                + (f"{statistics.median(cpu):.2f} s" if cpu else "—")
                + f" | {statistics.median(change):.1f} / "
                + (f"{statistics.median(event):.1f} ms" if event else "—")
                + f" | {min(loads):.1f} to {max(loads):.1f} |"
            )
    return "\n".join([head, *rows])


def plot(results: list[dict[str, Any]], path: Path) -> None:
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    sizes = sorted({r["n"] for r in results})
    metrics = (
        ("cold_start_s", "cold start (s)"),
        ("change_p50_ms", "one change from the API write, p50 (ms)"),
        ("event_p50_ms", "one change from the watch event, p50 (ms)"),
        ("peak_rss_mib", "peak RSS (MiB)"),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(20, 4.5))
    width = 0.8 / len(PROXIES)
    colors = ("#9ecae1", "#08519c", "#fdae6b", "#a63603")
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for k, proxy in enumerate(PROXIES):
            values = [
                next((r.get(key) or 0 for r in results if r["proxy"] == proxy and r["n"] == n), 0)
                for n in sizes
            ]
            xs = [i + (k - 1.5) * width for i in range(len(sizes))]
            ax.bar(xs, values, width, label=proxy, color=colors[k])
            for x, n in zip(xs, sizes, strict=True):
                run = next((r for r in results if r["proxy"] == proxy and r["n"] == n), None)
                if run is not None and run["cold_start_s"] is None and key != "peak_rss_mib":
                    label_ = f"no first sync\nin {run['cold_limit_s']:.0f} s"
                    ax.annotate(label_, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                                textcoords="offset points", ha="center", va="bottom",
                                rotation=90, fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(sizes)), [f"N = {n:,}" for n in sizes])
        ax.set_title(label)
        if key in ("change_p50_ms", "event_p50_ms"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("kpy vs kube-proxy v1.36.5, same kube-apiserver, one node namespace (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="1000,10000")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument(
        "--cold-limit", type=float, default=900.0, help="seconds to wait for a first sync"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--proxies", default=",".join(PROXIES))
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a kpy source tree; adds kpy-baseline/<mode> runs after each kpy/<mode>",
    )
    parser.add_argument(
        "--report", nargs="+", type=Path, help="only the table (and --png) from JSON results"
    )
    args = parser.parse_args()
    if args.report:
        merged = [r for path in args.report for r in json.loads(path.read_text())]
        merged.sort(key=lambda r: (r["n"], order(r["proxy"])))
        print(table(merged))
        print()
        print(summary(merged))
        if args.png:
            plot(merged, args.png)
        return
    missing = rc.missing_binaries(("etcd", "kube-apiserver", "kube-controller-manager",
                                   "kube-proxy"))  # fmt: skip
    if missing:
        sys.exit(f"not built: {', '.join(missing)} (scripts/build-upstream.sh kube-proxy)")
    proxies = args.proxies.split(",")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        proxies = [q for p in proxies for q in (
            [p, f"kpy-baseline/{p.split('/')[1]}"] if p.startswith("kpy/") else [p])]  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # clean up on the way out
    compile_tree(kpy_tree())
    if args.baseline is not None:
        compile_tree(args.baseline)
    results: list[dict[str, Any]] = []
    # The advertise address (on the namespace's lo) is where the node reaches the API
    # server over its veth.
    plane = rc.ControlPlane(CP_NS, advertise_address=CP_IP)
    try:
        plane.start()
        api = plane.admin()
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        api.patch_status(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
            {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
        )
        pki = plane.pki
        client_.kubeconfig(plane.dir / "bench.kubeconfig", f"https://{CP_IP}:6443", pki.ca,
                      cert=pki.cert("admin"), key=pki.key("admin"))  # fmt: skip
        have = 1  # s0's name is taken by the probe's shape only; start at 1
        for n in [int(x) for x in args.n.split(",")]:
            t = time.monotonic()
            populate(plane, have, n)
            have = n
            print(f"N={n}: objects written in {time.monotonic() - t:.0f} s", file=sys.stderr)
            for proxy in [p for _ in range(args.rounds) for p in proxies]:
                log = plane.dir / f"{proxy.replace('/', '-')}-{n}.log"
                result = run_one(plane, proxy, n, args.trials, log, args.cold_limit, args.baseline)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
                if args.json:  # after every run: a later failure keeps what was measured
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        plane.stop()
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
