"""``kpy check``: connectivity checks the way people run them from a netshoot pod.

The catalog is derived from the manifests, not written per example: every Service is
converted and selected for every node exactly as the agents do it (source → convert →
tracker), and each semantic the resulting per-node Plans promise becomes a check —

========================  ============================================================
check                     expectation
========================  ============================================================
cluster-ip                from a pod on every node and from every node itself, each
                          cluster IP (each family) answers from one of the endpoints
                          that node's Plan uses (internalTrafficPolicy Local: only
                          local pods)
udp                       the same for UDP Services (``nc -u``)
no-endpoints              refused at once (TCP reset / ICMP), not left to time out
load-spread               many new connections reach every endpoint
session-affinity          every connection from one client reaches the same pod
node-port                 from outside, every node's address answers on the NodePort;
                          a node without a local endpoint under externalTrafficPolicy
                          Local does not answer (dropped)
source-ip-kept            externalTrafficPolicy Local: the pod sees the client's address
load-balancer             the LoadBalancer ingress IP answers from outside
source-ranges             an address outside loadBalancerSourceRanges is dropped
external-ip               an externalIP answers from outside
headless                  no virtual IP is programmed; DNS would list the endpoints
external-name             no virtual IP is programmed; DNS would answer the CNAME
========================  ============================================================

Every check is shown as the command it corresponds to (``curl``, ``nc -u``, ``dig``)
and run inside the right lab namespace — from this process through sockets opened in
that namespace, which is what the command would do. The result is a matrix
(Service x check x source) with pass/fail and the reason; ``-o json`` gives
``{"results": [{"service", "check", "source", "status", "reason"}]}``.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from kpy.agent.agent import Agent
from kpy.core import backend as backends
from kpy.core.model import IPAddress, IPFamily, NodeInfo, Plan, ServicePortState
from kpy.core.model import Protocol as L4
from kpy.sources import Event, EventType, Kind
from kpy.sources.manifests import ManifestSource
from kpy.tools.lab import topology as topo

DROP_TIMEOUT = 1.0  # seconds without an answer that count as "dropped"
REFUSE_FAST = 1.0  # a reject must come back sooner than this
SPREAD_REQUESTS = 60
STICKY_REQUESTS = 20

ReplyKind = Literal["answer", "refused", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class Reply:
    kind: ReplyKind
    pod: str = ""
    client: str = ""
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One request a netshoot user would type; ``count`` new connections in a row."""

    source: str  # where it runs: a pod name, a node name, or "client"
    protocol: Literal["http", "udp"]
    host: str
    port: int
    bind: str | None = None  # source address to use
    count: int = 1
    timeout: float = 2.0

    def command(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.protocol == "udp":
            bind = f"-s {self.bind} " if self.bind else ""
            cmd = f"echo hi | nc -u -W1 -w1 {bind}{self.host} {self.port}"
        else:
            bind = f"--interface {self.bind} " if self.bind else ""
            cmd = f"curl -s -m {self.timeout:g} {bind}http://{host}:{self.port}/"
        if self.count > 1:
            return f"for i in $(seq {self.count}); do {cmd}; done"
        return cmd


@dataclass(frozen=True, slots=True)
class Expect:
    """What the replies of a probe must look like."""

    kind: Literal["answer", "refused", "dropped"]
    pods: frozenset[str] | None = None  # answers only from these (None: any)
    every_pod: bool = False  # ... and from every one of them (load spread)
    one_pod: bool = False  # ... and always the same one (session affinity)
    client: str | None = None  # the pod must see this client address


@dataclass(frozen=True, slots=True)
class Check:
    service: str
    check: str
    source: str
    command: str
    probe: Probe | None = None
    expect: Expect | None = None
    verify: Callable[[], tuple[bool, str]] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Result:
    service: str
    check: str
    source: str
    status: Literal["pass", "fail"]
    reason: str
    command: str = ""

    def as_json(self) -> dict[str, str]:
        return {
            "service": self.service,
            "check": self.check,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
        }


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    node: str
    ips: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Who can send and who answers: the lab's pods, nodes and external client."""

    nodes: Mapping[str, tuple[IPAddress, ...]]  # node name → its addresses
    pods: tuple[PodInfo, ...]
    client_ips: tuple[IPAddress, ...]  # the external client's addresses on the underlay
    outside_ip: IPAddress | None = None  # a client address in no source range

    def pod_by_ip(self) -> dict[IPAddress, str]:
        return {ip: pod.name for pod in self.pods for ip in pod.ips}

    def first_pod(self, node: str) -> PodInfo | None:
        return next((p for p in self.pods if p.node == node), None)

    @staticmethod
    def of(cluster: topo.Cluster) -> ClusterView:
        return ClusterView(
            nodes={n.name: (n.ip, n.ip6) for n in cluster.nodes},
            pods=tuple(PodInfo(p.name, p.node, (p.ip, p.ip6)) for p in cluster.pods),
            client_ips=(cluster.client_ip, cluster.client_ip6),
            outside_ip=cluster.client_outside_ip,
        )


class _NoBackend:
    name = "none"

    def probe(self) -> str | None:
        return None

    async def apply(self, plan: Plan) -> backends.ApplyResult:
        raise backends.BackendError("offline")

    async def observe(self) -> backends.Programmed:
        return backends.Programmed(backend=self.name)

    async def cleanup(self) -> None:
        return None


def plans(manifests: Sequence[Path], view: ClusterView) -> dict[str, Plan]:
    """Node name → the Plan that node's agent computes from ``manifests``."""
    result = {}
    for node, ips in view.nodes.items():

        def override(info: NodeInfo, ips: tuple[IPAddress, ...] = ips) -> NodeInfo:
            return replace(info, addresses=info.addresses or ips)

        agent = Agent(
            node_name=node, source=ManifestSource(list(manifests)), backend=_NoBackend(),
            node_override=override,
        )  # fmt: skip
        ManifestSource(list(manifests)).scan(agent)
        result[node] = agent.tracker.checkout()
    return result


def plans_from_objects(objects: Iterable[dict[str, Any]], nodes: Iterable[str]) -> dict[str, Plan]:
    """Node name → its Plan, from API objects (Service, EndpointSlice, Node JSON)."""
    objects = list(objects)
    result = {}
    for node in nodes:
        agent = Agent(node_name=node, source=ManifestSource([]), backend=_NoBackend())
        for obj in objects:
            meta = obj.get("metadata") or {}
            agent.event(
                Event(
                    kind=Kind(obj["kind"]),
                    type=EventType.UPSERT,
                    namespace=str(meta.get("namespace") or ""),
                    name=str(meta.get("name") or ""),
                    obj=obj,
                )
            )
        result[node] = agent.tracker.checkout()
    return result


# --------------------------------------------------------------------------- the catalog


def _names(endpoints: Iterable[Any], pods: Mapping[IPAddress, str]) -> frozenset[str] | None:
    """Pod names of the endpoints; None when one of them is not a known pod."""
    names = set()
    for ep in endpoints:
        if ep.ip not in pods:
            return None
        names.add(pods[ep.ip])
    return frozenset(names)


def _same_family(ip: IPAddress, candidates: Iterable[IPAddress]) -> IPAddress | None:
    return next((c for c in candidates if c.version == ip.version), None)


def catalog(
    node_plans: Mapping[str, Plan],
    view: ClusterView,
    *,
    observed: Callable[[str, str], bool] | None = None,
    lb_node: str | None = None,
) -> list[Check]:
    """Every check the Plans imply. ``observed(node, service_port)`` says whether that
    node's backend programmed a frontend for the service port (headless/ExternalName);
    ``lb_node`` is the node the client routes Service, external and LoadBalancer IPs to."""
    checks: list[Check] = []
    pods = view.pod_by_ip()
    node_names = list(node_plans)
    entry = lb_node or node_names[0]
    keys = sorted({k for plan in node_plans.values() for k in plan.services})
    for key in keys:
        states = {n: p.services[key] for n, p in node_plans.items() if key in p.services}
        any_state = next(iter(states.values()))
        svc = any_state.service
        name = str(key)
        if svc.external_name is not None or svc.headless or not svc.has_vip:
            checks.extend(_no_vip_checks(name, any_state, states, observed))
            continue
        if svc.protocol not in (L4.TCP, L4.UDP):
            continue
        proto: Literal["http", "udp"] = "udp" if svc.protocol is L4.UDP else "http"
        # from a pod on every node and from every node itself, to every cluster IP
        for node, state in states.items():
            senders: list[tuple[str, str, tuple[IPAddress, ...]]] = []
            pod = view.first_pod(node)
            if pod is not None:
                senders.append((pod.name, f"{pod.name} ({node})", pod.ips))
            if node in view.nodes:
                senders.append((node, node, view.nodes[node]))
            for sender, label, own_ips in senders:
                for vip in svc.cluster_ips:
                    family = IPFamily.of(vip)
                    if _same_family(vip, own_ips) is None:
                        continue
                    targets = state.internal_for(family)
                    probe = Probe(sender, proto, str(vip), svc.port)
                    if not targets:
                        kind: Literal["answer", "refused", "dropped"] = (
                            "refused" if not state.has_endpoints else "dropped"
                        )
                        if kind == "dropped":
                            probe = replace(probe, timeout=DROP_TIMEOUT)
                        check = "no-endpoints" if kind == "refused" else _cip(proto)
                        checks.append(_probe(name, check, label, probe, Expect(kind)))
                        continue
                    expect = Expect("answer", pods=_names(targets, pods))
                    checks.append(_probe(name, _cip(proto), label, probe, expect))
        # behaviour over many connections, from the first node's pod
        node = node_names[0]
        first = states.get(node)
        pod = view.first_pod(node)
        if first is not None and pod is not None and svc.cluster_ips:
            vip = svc.cluster_ips[0]
            targets = first.internal_for(IPFamily.of(vip))
            source = f"{pod.name} ({node})"
            if svc.session_affinity == "ClientIP" and targets:
                probe = Probe(pod.name, proto, str(vip), svc.port, count=STICKY_REQUESTS)
                expect = Expect("answer", pods=_names(targets, pods), one_pod=True)
                checks.append(_probe(name, "session-affinity", source, probe, expect))
            elif len(targets) > 1:
                probe = Probe(pod.name, proto, str(vip), svc.port, count=SPREAD_REQUESTS)
                expect = Expect("answer", pods=_names(targets, pods), every_pod=True)
                checks.append(_probe(name, "load-spread", source, probe, expect))
        checks.extend(_external_checks(name, proto, states, view, pods, entry))
    return checks


def _cip(proto: str) -> str:
    return "udp" if proto == "udp" else "cluster-ip"


def _probe(service: str, check: str, source: str, probe: Probe, expect: Expect) -> Check:
    return Check(service, check, source, probe.command(), probe=probe, expect=expect)


def _external_checks(
    name: str,
    proto: Literal["http", "udp"],
    states: Mapping[str, ServicePortState],
    view: ClusterView,
    pods: Mapping[IPAddress, str],
    entry: str,
) -> list[Check]:
    checks: list[Check] = []
    svc = next(iter(states.values())).service
    client_v4 = next((ip for ip in view.client_ips if ip.version == 4), None)

    def expectation(state: ServicePortState, family: IPFamily) -> tuple[Expect, float]:
        targets = state.external_for(family)
        if targets:
            client = None
            if svc.external_policy_local and client_v4 is not None:
                client = str(client_v4)
            return Expect("answer", pods=_names(targets, pods), client=client), 2.0
        if state.has_endpoints:
            return Expect("dropped"), DROP_TIMEOUT
        return Expect("refused"), 2.0

    if svc.node_port is not None:
        for node, state in states.items():
            for ip in view.nodes.get(node, ()):
                if ip.version != 4 and not any(v.version == ip.version for v in svc.cluster_ips):
                    continue
                expect, timeout = expectation(state, IPFamily.of(ip))
                probe = Probe("client", proto, str(ip), svc.node_port, timeout=timeout)
                source = f"client → {node}"
                answer = replace(expect, client=None)
                checks.append(_probe(name, "node-port", source, probe, answer))
                if expect.client is not None and ip.version == 4:
                    checks.append(_probe(name, "source-ip-kept", source, probe, expect))
    entry_state = states.get(entry)
    if entry_state is None:
        return checks
    for check, addresses in (
        ("load-balancer", svc.load_balancer_ips),
        ("external-ip", svc.external_ips),
    ):
        for ip in addresses:
            expect, timeout = expectation(entry_state, IPFamily.of(ip))
            probe = Probe("client", proto, str(ip), svc.port, timeout=timeout)
            if check == "load-balancer" and svc.load_balancer_source_ranges:
                allowed = _in_ranges(client_v4, svc.load_balancer_source_ranges)
                if not allowed:
                    expect, probe = Expect("dropped"), replace(probe, timeout=DROP_TIMEOUT)
            checks.append(_probe(name, check, f"client → {entry}", probe, expect))
            outside = view.outside_ip
            if (
                check == "load-balancer"
                and svc.load_balancer_source_ranges
                and outside is not None
                and outside.version == ip.version
                and not _in_ranges(outside, svc.load_balancer_source_ranges)
            ):
                blocked = replace(probe, bind=str(outside), timeout=DROP_TIMEOUT)
                checks.append(
                    _probe(name, "source-ranges", f"client {outside} → {entry}", blocked,
                           Expect("dropped"))
                )  # fmt: skip
    return checks


def _in_ranges(
    ip: IPAddress | None, ranges: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    return ip is not None and any(ip.version == r.version and ip in r for r in ranges)


def _no_vip_checks(
    name: str,
    state: ServicePortState,
    states: Mapping[str, ServicePortState],
    observed: Callable[[str, str], bool] | None,
) -> list[Check]:
    svc = state.service
    short = f"{svc.name.name}.{svc.name.namespace}.svc.cluster.local"

    def nothing_programmed() -> list[str]:
        if observed is None:
            return []
        return [node for node in states if observed(node, name)]

    if svc.external_name is not None:
        target = svc.external_name

        def verify_cname() -> tuple[bool, str]:
            nodes = nothing_programmed()
            if nodes:
                return False, f"a virtual IP is programmed on {', '.join(nodes)}"
            return True, f"CNAME {target}; no virtual IP programmed on any node"

        return [
            Check(name, "external-name", "dns", f"dig +short CNAME {short}", verify=verify_cname)
        ]
    addresses = sorted({str(ep.ip) for ep in state.endpoints})

    def verify_headless() -> tuple[bool, str]:
        nodes = nothing_programmed()
        if nodes:
            return False, f"a virtual IP is programmed on {', '.join(nodes)}"
        if not addresses:
            return False, "no endpoints to list"
        return True, f"lists {', '.join(addresses)}; no virtual IP programmed on any node"

    return [Check(name, "headless", "dns", f"dig +short {short}", verify=verify_headless)]


# --------------------------------------------------------------------------- running


class Executor(Protocol):
    """Runs probes from named sources: the lab's namespaces, or a netshoot pod."""

    def run(self, probe: Probe) -> list[Reply]: ...


Shell = Callable[[str, str, float], tuple[int, str]]  # (source, command, timeout) → rc, stdout


class ShellExecutor:
    """Runs each probe as the very command shown (``curl``, ``nc -u``) through ``shell``.

    In the lab ``shell`` is ``ip netns exec <source> sh -c <command>``
    (:func:`lab_shell`); against a cluster it would be an exec into the netshoot pod.
    The outcome comes from the command: curl's exit status (0 answer, 7 refused,
    28 timed out) or nc's output (a reply, or none).
    """

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def run(self, probe: Probe) -> list[Reply]:
        single = replace(probe, count=1).command()
        replies = []
        for _ in range(probe.count):
            started = time.monotonic()
            rc, out = self.shell(probe.source, single, probe.timeout + 5)
            replies.append(parse_output(probe, rc, out, time.monotonic() - started))
        return replies


def parse_output(probe: Probe, rc: int, out: str, seconds: float) -> Reply:
    """The outcome of one netshoot command from its exit status and output."""
    text = out.strip()
    if probe.protocol == "udp":
        if text:
            pod, _, client = text.partition(" ")
            return Reply("answer", pod, client, seconds=seconds)
        return Reply("refused" if rc != 0 else "timeout", seconds=seconds)
    if rc == 0:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            return Reply(
                "answer", str(body.get("pod", "")), str(body.get("client", "")), seconds=seconds
            )
        return Reply("answer", seconds=seconds)  # a server that does not say who it is
    if rc == 7:
        return Reply("refused", seconds=seconds)
    if rc == 28:
        return Reply("timeout", seconds=seconds)
    return Reply("error", detail=f"curl exit status {rc}", seconds=seconds)


def lab_shell(cluster: topo.Cluster) -> Shell:
    """Run a command inside the lab namespace named by a source (pod, node, ``client``)."""
    names = {"client": cluster.client.name}
    for node in cluster.nodes:
        names[node.name] = node.netns.name
        names.update({pod.name: pod.netns.name for pod in node.pods})

    def shell(source: str, command: str, timeout: float) -> tuple[int, str]:
        argv = ["ip", "netns", "exec", names[source], "sh", "-c", command]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return 28, ""
        return done.returncode, done.stdout

    return shell


class LabExecutor:
    """Probes from sockets opened inside the lab's namespaces by this process."""

    def __init__(self, cluster: topo.Cluster) -> None:
        self.sources: dict[str, topo.Netns] = {"client": cluster.client}
        for node in cluster.nodes:
            self.sources[node.name] = node.netns
            for pod in node.pods:
                self.sources[pod.name] = pod.netns

    def run(self, probe: Probe) -> list[Reply]:
        netns = self.sources[probe.source]
        return [self._once(netns, probe) for _ in range(probe.count)]

    @staticmethod
    def _once(netns: topo.Netns, probe: Probe) -> Reply:
        started = time.monotonic()
        try:
            if probe.protocol == "udp":
                text = topo.udp(
                    netns, probe.host, probe.port, timeout=probe.timeout, source=probe.bind
                )
                pod, _, client = text.partition(" ")
            else:
                answer = topo.http(
                    netns, probe.host, probe.port, timeout=probe.timeout, source=probe.bind
                )
                pod, client = str(answer.get("pod", "")), str(answer.get("client", ""))
            return Reply("answer", pod, client, seconds=time.monotonic() - started)
        except ConnectionRefusedError:
            return Reply("refused", seconds=time.monotonic() - started)
        except TimeoutError:
            return Reply("timeout", seconds=time.monotonic() - started)
        except (OSError, ValueError) as exc:
            return Reply("error", detail=str(exc), seconds=time.monotonic() - started)


def evaluate(expect: Expect, replies: Sequence[Reply], timeout: float) -> tuple[bool, str]:
    """Pass or fail, and why, for the replies of one probe."""
    kinds = Counter(r.kind for r in replies)
    if expect.kind == "refused":
        slow = [r for r in replies if r.kind == "refused" and r.seconds >= REFUSE_FAST]
        if kinds["refused"] == len(replies) and not slow:
            return True, f"refused in {max(r.seconds for r in replies) * 1000:.0f} ms"
        return False, f"expected a fast refusal, got {_describe(replies, timeout)}"
    if expect.kind == "dropped":
        if kinds["timeout"] == len(replies):
            return True, f"no answer within {timeout:g}s (dropped)"
        return False, f"expected no answer (dropped), got {_describe(replies, timeout)}"
    if kinds["answer"] != len(replies):
        return False, f"expected an answer, got {_describe(replies, timeout)}"
    seen = Counter(r.pod for r in replies)
    if expect.pods is not None and not set(seen) <= expect.pods:
        wrong = sorted(set(seen) - expect.pods)
        return (
            False,
            f"answered by {', '.join(wrong)}, expected only {', '.join(sorted(expect.pods))}",
        )
    if expect.every_pod and expect.pods is not None and set(seen) != expect.pods:
        missing = sorted(expect.pods - set(seen))
        return (
            False,
            f"{len(replies)} connections never reached {', '.join(missing)} ({_spread(seen)})",
        )
    if expect.one_pod and len(seen) != 1:
        return False, f"not sticky: {_spread(seen)}"
    if expect.client is not None:
        clients = sorted({r.client for r in replies})
        if clients != [expect.client]:
            return False, f"pod saw client {', '.join(clients)}, expected {expect.client}"
        return True, f"{replies[0].pod} saw the client's own address {expect.client}"
    if expect.one_pod:
        return True, f"all {len(replies)} connections to {next(iter(seen))}"
    if expect.every_pod:
        return True, f"{len(replies)} connections spread: {_spread(seen)}"
    return True, f"answered by {', '.join(sorted(seen))}"


def _spread(seen: Counter[str]) -> str:
    return ", ".join(f"{pod} {n}" for pod, n in sorted(seen.items()))


def _describe(replies: Sequence[Reply], timeout: float) -> str:
    parts = []
    for kind, n in sorted(Counter(r.kind for r in replies).items()):
        text = {"timeout": f"no answer within {timeout:g}s", "refused": "refused"}.get(kind, kind)
        if kind == "answer":
            text = "answer from " + ", ".join(sorted({r.pod for r in replies if r.pod}))
        if kind == "error":
            text = "error: " + "; ".join(sorted({r.detail for r in replies if r.detail}))
        parts.append(text if len(replies) == 1 else f"{n}x {text}")
    return ", ".join(parts)


def run_checks(
    checks: Iterable[Check], executor: Executor, on_result: Callable[[Result], None] | None = None
) -> list[Result]:
    results = []
    for check in checks:
        if check.verify is not None:
            ok, reason = check.verify()
        elif check.probe is not None and check.expect is not None:
            ok, reason = evaluate(check.expect, executor.run(check.probe), check.probe.timeout)
        else:  # pragma: no cover - catalog never builds these
            ok, reason = False, "nothing to run"
        result = Result(
            check.service,
            check.check,
            check.source,
            "pass" if ok else "fail",
            reason,
            check.command,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# --------------------------------------------------------------------------- output


def table(results: Sequence[Result]) -> str:
    """The matrix: one row per Service x check x source, the command under it."""
    rows = [("SERVICE", "CHECK", "SOURCE", "RESULT", "REASON")]
    rows += [(r.service, r.check, r.source, r.status.upper(), r.reason) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
        )
        if index and results[index - 1].command:
            lines.append(" " * (widths[0] + 2) + "$ " + results[index - 1].command)
    passed = sum(r.status == "pass" for r in results)
    lines.append(
        f"\n{passed}/{len(results)} checks passed"
        + ("" if passed == len(results) else f", {len(results) - passed} FAILED")
    )
    return "\n".join(lines)


def to_json(results: Sequence[Result]) -> str:
    return json.dumps({"results": [r.as_json() for r in results]}, indent=2)


# --------------------------------------------------------------------------- the lab


def lab_observer(state: Any) -> Callable[[str, str], bool]:
    """``observed(node, service_port)`` from each lab node's backend (read from the kernel)."""
    cache: dict[str, backends.Programmed] = {}
    cluster = state.cluster()

    def observed(node: str, key: str) -> bool:
        if node not in cache:
            info = cluster.node(node)
            config = backends.BackendConfig(
                node_name=node, node_ips=(info.ip, info.ip6), netns=info.netns.name
            )
            cache[node] = asyncio.run(backends.create(state.backend, config).observe())
        view = cache[node].services.get(key)
        return view is not None and bool(view.frontends)

    return observed


def check_lab(
    manifests: Sequence[Path] | None = None,
    *,
    on_result: Callable[[Result], None] | None = None,
    only: Sequence[str] = (),
    state_dir: Path | None = None,
    run_commands: bool = False,
) -> list[Result]:
    """Run the whole catalog against the running lab (``kpy lab up``).

    ``run_commands`` runs the shown commands themselves (curl, nc) in the namespaces
    instead of opening the same connections from this process: slower, and proof that
    the commands a reader would copy do what the checks say.
    """
    from kpy.tools.lab import lab  # the lab module pulls in process management only when used

    state = lab.load(state_dir or lab.STATE_DIR)
    if state is None:
        raise lab.LabError("no lab is up (kpy lab up)")
    cluster = state.cluster()
    view = ClusterView.of(cluster)
    if state.real and not manifests:  # the objects as the real API server has them now
        node_plans = plans_from_objects(lab.api_objects(state), view.nodes)
    else:
        node_plans = plans(list(manifests) if manifests else [Path(state.manifests)], view)
    checks = catalog(node_plans, view, observed=lab_observer(state))
    if only:
        checks = [c for c in checks if any(o in c.service for o in only)]
    executor: Executor = ShellExecutor(lab_shell(cluster)) if run_commands else LabExecutor(cluster)
    return run_checks(checks, executor, on_result)


# --------------------------------------------------------------------------- a real cluster

NETSHOOT_POD: dict[str, Any] = {  # the same as deploy/netshoot.yaml (a test keeps them equal)
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "kpy-netshoot",
        "namespace": "default",
        "labels": {"app.kubernetes.io/name": "kpy-netshoot", "app.kubernetes.io/part-of": "kpy"},
    },
    "spec": {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "netshoot",
                "image": "nicolaka/netshoot:v0.13",
                "command": ["sleep", "3600"],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "32Mi"},
                    "limits": {"memory": "128Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "runAsNonRoot": True,
                    "runAsUser": 65534,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    },
}

CLUSTER_CHECKS = {"cluster-ip", "udp", "no-endpoints", "headless", "external-name"}


def cluster_catalog(
    objects: Iterable[dict[str, Any]],
    netshoot: PodInfo,
    shell: Shell,
    *,
    cluster_domain: str = "cluster.local",
) -> list[Check]:
    """The checks one pod (netshoot) can make in a real cluster.

    Real backends do not say who they are, so only what a client can see is checked:
    answered, refused at once, or dropped — per the Plan of the pod's own node — and
    what DNS answers for headless and ExternalName Services (``dig``). Load spread,
    affinity, traffic policies seen from outside and source ranges need the lab.
    """
    node_plans = plans_from_objects(objects, [netshoot.node])
    view = ClusterView(nodes={}, pods=(netshoot,), client_ips=())
    checks = []
    for c in catalog(node_plans, view):
        if c.check not in CLUSTER_CHECKS:
            continue
        if c.probe is not None and c.expect is not None:
            checks.append(replace(c, expect=replace(c.expect, pods=None), source=netshoot.name))
        else:
            checks.append(_dns_check(c, node_plans[netshoot.node], shell, netshoot, cluster_domain))
    return checks


def _dns_check(c: Check, plan: Plan, shell: Shell, netshoot: PodInfo, cluster_domain: str) -> Check:
    state = next(st for key, st in plan.services.items() if str(key) == c.service)
    fqdn = f"{state.service.name.name}.{state.service.name.namespace}.svc.{cluster_domain}"
    if c.check == "external-name":
        command = f"dig +short CNAME {fqdn}"
        want = {str(state.service.external_name).rstrip(".")}
    else:
        command = f"dig +short {fqdn}"
        want = {str(ep.ip) for ep in state.endpoints if ep.ready}

    def verify() -> tuple[bool, str]:
        rc, out = shell(netshoot.name, command, 10.0)
        got = {line.strip().rstrip(".") for line in out.splitlines() if line.strip()}
        if rc != 0:
            return False, f"dig failed (exit status {rc})"
        if got != want:
            answered = ", ".join(sorted(got)) or "nothing"
            return False, f"DNS answered {answered}, expected {', '.join(sorted(want))}"
        return True, f"DNS answered {', '.join(sorted(got))}"

    return replace(c, command=command, source=netshoot.name, verify=verify)


def kube_client(kubeconfig: str | None, master: str | None = None) -> Any:
    """A kubernetes ApiClient from a kubeconfig (``None``: the default one)."""
    import importlib

    kubernetes: Any = importlib.import_module("kubernetes")
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    if master:
        configuration.host = master
    return kubernetes.client.ApiClient(configuration)


def list_objects(api_client: Any) -> list[dict[str, Any]]:
    """Every Service, EndpointSlice and Node, as raw JSON (each item with its kind)."""
    import importlib

    k8s: Any = importlib.import_module("kubernetes.client")
    core, discovery = k8s.CoreV1Api(api_client), k8s.DiscoveryV1Api(api_client)
    objects = []
    for kind, call in (
        ("Node", core.list_node),
        ("Service", core.list_service_for_all_namespaces),
        ("EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces),
    ):
        data = json.loads(call(_preload_content=False).data)
        for item in data.get("items") or ():
            item["kind"] = kind
            objects.append(item)
    return objects


class Netshoot:
    """The netshoot pod: created through the API, commands run through ``exec``, deleted."""

    def __init__(self, api_client: Any, namespace: str = "default", timeout: float = 120.0) -> None:
        import importlib

        self.k8s: Any = importlib.import_module("kubernetes")
        self.api = self.k8s.client.CoreV1Api(api_client)
        # exec upgrades the connection: it gets its own client (the stream helper patches it)
        self.exec_api = self.k8s.client.CoreV1Api(
            self.k8s.client.ApiClient(api_client.configuration)
        )
        self.namespace = namespace
        self.name = str(NETSHOOT_POD["metadata"]["name"])
        self.timeout = timeout
        self.info: PodInfo | None = None

    def __enter__(self) -> Netshoot:
        body = copy.deepcopy(NETSHOOT_POD)
        body["metadata"]["namespace"] = self.namespace
        self.api.create_namespaced_pod(self.namespace, body)
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                pod = self.api.read_namespaced_pod(self.name, self.namespace)
                if pod.status.phase == "Running" and pod.status.pod_ip:
                    break
                if pod.status.phase in ("Failed", "Succeeded") or time.monotonic() > deadline:
                    raise RuntimeError(f"pod {self.name} is {pod.status.phase}, not Running")
                time.sleep(1)
            ips = tuple(ipaddress.ip_address(p.ip) for p in pod.status.pod_i_ps or ()) or (
                ipaddress.ip_address(pod.status.pod_ip),
            )
            self.info = PodInfo(self.name, str(pod.spec.node_name), ips)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.api.delete_namespaced_pod(self.name, self.namespace, grace_period_seconds=0)
        except self.k8s.client.ApiException as error:
            if error.status != 404:
                raise

    def shell(self, source: str, command: str, timeout: float) -> tuple[int, str]:
        ws = self.k8s.stream.stream(
            self.exec_api.connect_get_namespaced_pod_exec, self.name, self.namespace,
            command=["sh", "-c", command], stdin=False, stdout=True, stderr=True, tty=False,
            _preload_content=False,
        )  # fmt: skip
        try:
            ws.run_forever(timeout=timeout)
            out = ws.read_stdout() or ""
            rc = ws.returncode
        finally:
            ws.close()
        return (28 if rc is None else int(rc)), out


def check_cluster(
    kubeconfig: str | None,
    *,
    namespace: str = "default",
    master: str | None = None,
    only: Sequence[str] = (),
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Start the netshoot pod, run the cluster catalog in it, delete it."""
    api_client = kube_client(kubeconfig, master)
    objects = list_objects(api_client)
    with Netshoot(api_client, namespace) as pod:
        assert pod.info is not None
        checks = cluster_catalog(objects, pod.info, pod.shell)
        if only:
            checks = [c for c in checks if any(o in c.service for o in only)]
        return run_checks(checks, ShellExecutor(pod.shell), on_result)


def _cluster_or_fail(kubeconfig: str, namespace: str, only: Sequence[str]) -> list[Result]:
    import click
    from kubernetes.client import ApiException

    try:
        return check_cluster(kubeconfig, namespace=namespace, only=only)
    except ApiException as exc:
        reason = f"{exc.status} {exc.reason}"
        raise click.ClickException(f"the API server refused a request: {reason}") from None
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"cluster check failed: {exc}") from None


def command() -> Any:
    """The ``kpy check`` click command (added to the CLI by kpy.cli)."""
    import sys

    import click

    @click.command("check")
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
    @click.option(
        "--service",
        "only",
        multiple=True,
        help="Only Services whose name contains this (repeatable).",
    )
    @click.option(
        "--manifests",
        multiple=True,
        type=click.Path(path_type=Path, exists=True),
        help="Derive the checks from these manifests (default: the lab's).",
    )
    @click.option(
        "--run-commands",
        is_flag=True,
        help="Run the shown curl/nc commands in the namespaces (slower) instead of sockets.",
    )
    @click.option(
        "--lab-state-dir",
        envvar="KPY_LAB_STATE_DIR",
        type=click.Path(path_type=Path),
        default=None,
        help="The lab to check (default /run/kpy-lab).",
    )
    @click.option(
        "--kubeconfig",
        default=None,
        help="Check a real cluster instead: run the commands in a netshoot pod through the API.",
    )
    @click.option(
        "--namespace",
        default="default",
        show_default=True,
        help="With --kubeconfig: where the netshoot pod runs (it is deleted afterwards).",
    )
    def check(
        output: str,
        only: tuple[str, ...],
        manifests: tuple[Path, ...],
        run_commands: bool,
        lab_state_dir: Path | None,
        kubeconfig: str | None,
        namespace: str,
    ) -> None:
        """Connectivity checks per Service (curl / nc -u / dig) in the lab's namespaces,
        or with --kubeconfig from a netshoot pod in a real cluster.

        Exit status 1 when any check fails.
        """
        from kpy.tools.lab import lab

        try:
            if kubeconfig is not None:
                results = _cluster_or_fail(kubeconfig, namespace, only)
            else:
                results = check_lab(
                    list(manifests), only=only, state_dir=lab_state_dir, run_commands=run_commands
                )
        except lab.LabError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(to_json(results) if output == "json" else table(results))
        if any(r.status == "fail" for r in results):
            sys.exit(1)

    return check


__all__ = [
    "NETSHOOT_POD",
    "Check",
    "ClusterView",
    "Expect",
    "LabExecutor",
    "Netshoot",
    "Probe",
    "Reply",
    "Result",
    "ShellExecutor",
    "catalog",
    "check_cluster",
    "check_lab",
    "cluster_catalog",
    "command",
    "evaluate",
    "lab_shell",
    "list_objects",
    "parse_output",
    "plans",
    "run_checks",
    "table",
    "to_json",
]
