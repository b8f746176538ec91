"""What is checked: the per-node Plans of the manifests and the catalog of checks they
promise (Service x check x source), with the probe and the expectation of each."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kpy.agent.agent import Agent
from kpy.core.model import IPAddress, IPFamily, NodeInfo, Plan, ServicePortState
from kpy.core.model import Protocol as L4
from kpy.sources import Event, EventType, Kind
from kpy.sources.manifests import ManifestSource
from kpy.tools import offline
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


def plans(manifests: Sequence[Path], view: ClusterView) -> dict[str, Plan]:
    """Node name → the Plan that node's agent computes from ``manifests``."""
    result = {}
    for node, ips in view.nodes.items():

        def override(info: NodeInfo, ips: tuple[IPAddress, ...] = ips) -> NodeInfo:
            return replace(info, addresses=info.addresses or ips)

        result[node] = offline.manifest_plan(manifests, node, override)
    return result


def plans_from_objects(objects: Iterable[dict[str, Any]], nodes: Iterable[str]) -> dict[str, Plan]:
    """Node name → its Plan, from API objects (Service, EndpointSlice, Node JSON)."""
    objects = list(objects)
    result = {}
    for node in nodes:
        agent = Agent(node_name=node, source=ManifestSource([]), backend=offline.NoBackend())
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
            if check == "load-balancer" and svc.firewalled(ip.version):
                allowed = _in_ranges(client_v4, svc.load_balancer_source_ranges)
                if not allowed:
                    expect, probe = Expect("dropped"), replace(probe, timeout=DROP_TIMEOUT)
            checks.append(_probe(name, check, f"client → {entry}", probe, expect))
            outside = view.outside_ip
            if (
                check == "load-balancer"
                and svc.firewalled(ip.version)
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
