"""``kpy explain`` over a table of (cluster state, node options, packet) → explanation."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kpy.cli import _offline_plan
from kpy.core import trace as ex
from kpy.core.model import Endpoint, Plan, Protocol, ServicePortState
from kpy.testing import builders as b
from kpy.tools import explain as explain_cmd
from tests.agents import manifest, on_node_a

NODE = b.node(addresses=("192.168.50.2", "fd00:50::2"))
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/32"))
POD = "10.244.1.7"  # a pod on this node
REMOTE_POD = "10.244.2.9"
CLIENT = "203.0.113.7"  # outside the cluster

LOCAL_A = b.endpoint("10.244.1.5")
LOCAL_B = b.endpoint("10.244.1.6")
REMOTE = b.endpoint("10.244.2.5", node="node-b")
NOT_READY = b.endpoint("10.244.1.8", ready=False)
TERMINATING_LOCAL = b.endpoint("10.244.1.9", ready=False, serving=True, terminating=True)
TERMINATING_REMOTE = b.endpoint(
    "10.244.2.9", node="node-b", ready=False, serving=True, terminating=True
)


def st(endpoints: tuple[Endpoint, ...] = (LOCAL_A, REMOTE), **service: Any) -> ServicePortState:
    return b.state(b.service(**service), endpoints, NODE)


DEFAULT_OPTIONS = ex.Options(cluster_cidrs=CIDRS)


@dataclass(frozen=True)
class Case:
    id: str
    state: ServicePortState
    src: str
    dst: str
    port: int
    verdict: str
    endpoints: tuple[str, ...] = ()
    masquerade: bool = False
    reasons: tuple[str, ...] = ()  # must all be present
    excluded: dict[str, str] = field(default_factory=dict)
    origin: str | None = None
    protocol: str = "TCP"
    options: ex.Options = DEFAULT_OPTIONS

    def packet(self) -> ex.Packet:
        return ex.Packet(
            src=ipaddress.ip_address(self.src),
            dst=ipaddress.ip_address(self.dst),
            port=self.port,
            protocol=Protocol(self.protocol),
            origin=ex.Origin(self.origin) if self.origin else None,
        )

    def plan(self) -> Plan:
        return b.plan([self.state], node_info=NODE)


def traced(case: Case, tracer: ex.Tracer) -> tuple[ex.Trace, ex.Explanation, Plan]:
    """A backend's trace of the case's packet, the model's explanation, and the plan
    (the backends' trace tests cross-check the two over CASES)."""
    plan, packet = case.plan(), case.packet()
    model = ex.explain(plan, packet, case.options)
    config = ex.options_config(plan.node.name, case.options)
    return tracer(plan, packet, model.origin, config), model, plan


def assert_traced_as_modelled(case: Case, tracer: ex.Tracer) -> ex.Trace:
    """A backend's trace of ``case`` agrees with the model and with the case's own
    expectations (each backend's trace tests run this over CASES)."""
    trace, model, _ = traced(case, tracer)
    assert ex.outcome(trace) == ex.outcome(model), trace.kernel
    assert str(trace.verdict) == case.verdict
    assert trace.endpoints == case.endpoints
    return trace


def example_cluster_ip_target() -> str:
    """``ip:port/TCP`` of a ClusterIP Service port with endpoints among examples/, as
    node-1 sees them (for ``kpy explain --to``)."""
    from kpy.cli import _offline_plan

    plan = _offline_plan(("examples",), "node-1", ("192.168.100.11",))
    for state in sorted(plan.services.values(), key=lambda s: s.name):
        svc = state.service
        if svc.cluster_ips and state.internal and svc.protocol is Protocol.TCP:
            ip = next(ip for ip in svc.cluster_ips if ip.version == 4)
            return f"{ip}:{svc.port}/TCP"
    raise AssertionError("examples/ hold no ClusterIP Service with endpoints")


def case_by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def case_params(render_bugs: Mapping[str, str]) -> list[object]:
    """CASES as pytest params; a case a backend's render gets wrong is a strict xfail."""
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(reason=render_bugs[case.id], strict=True)]
            if case.id in render_bugs
            else [],
        )
        for case in CASES
    ]


# The options that explain the lab's examples/ as node-1 sees them.
EXAMPLES_AS_NODE_1 = [
    "--manifests",
    "examples",
    "--node",
    "node-1",
    "--node-ip",
    "192.168.100.11",
    "--cluster-cidr",
    "10.244.0.0/16",
]


NODEPORT: dict[str, Any] = dict(type="NodePort", node_port=30080)
LB: dict[str, Any] = dict(type="LoadBalancer", node_port=30080, lb_ips=("172.18.0.10",))

CASES = [
    Case(
        "clusterip-from-pod",
        st(),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        reasons=("cluster_ip", "internal_traffic_policy_cluster"),
    ),
    Case(
        "clusterip-from-node-is-masqueraded",
        st(),
        "192.168.50.2",
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        reasons=("masquerade_source_outside_cluster_cidr",),
        origin="node",
    ),
    Case(
        "clusterip-from-outside-is-masqueraded",
        st(),
        CLIENT,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        origin="external",
    ),
    Case(
        "clusterip-wrong-port-is-not-a-service",
        st(),
        POD,
        "10.96.0.10",
        81,
        "accept",
        reasons=("service_port_not_matched",),
    ),
    Case("unknown-address", st(), POD, "10.1.2.3", 80, "accept", reasons=("no_service",)),
    Case(
        "wrong-protocol",
        st(),
        POD,
        "10.96.0.10",
        80,
        "accept",
        protocol="UDP",
        reasons=("service_port_not_matched",),
    ),
    Case(
        "no-endpoints-rejects",
        st(()),
        POD,
        "10.96.0.10",
        80,
        "reject",
        reasons=("no_endpoints",),
    ),
    Case(
        "not-ready-endpoints-excluded",
        st((LOCAL_A, NOT_READY)),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080",),
        excluded={"10.244.1.8:8080": "not_ready"},
    ),
    Case(
        "only-not-ready-rejects",
        st((NOT_READY,)),
        POD,
        "10.96.0.10",
        80,
        "reject",
        excluded={"10.244.1.8:8080": "not_ready"},
    ),
    Case(
        "terminating-excluded-while-ready-exist",
        st((LOCAL_A, TERMINATING_LOCAL)),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080",),
        excluded={"10.244.1.9:8080": "terminating"},
    ),
    Case(
        "terminating-fallback",
        st((TERMINATING_LOCAL, TERMINATING_REMOTE, NOT_READY)),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.9:8080", "10.244.2.9:8080"),
        reasons=("terminating_fallback",),
        excluded={"10.244.1.8:8080": "not_ready"},
    ),
    Case(
        "internal-policy-local",
        st(itp_local=True),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080",),
        reasons=("internal_traffic_policy_local",),
        excluded={"10.244.2.5:8080": "other_node"},
    ),
    Case(
        "internal-policy-local-without-local-drops",
        st((REMOTE,), itp_local=True),
        POD,
        "10.96.0.10",
        80,
        "drop",
        reasons=("no_local_endpoints",),
        excluded={"10.244.2.5:8080": "other_node"},
    ),
    Case(
        "nodeport-external-cluster-policy-masquerades",
        st(**NODEPORT),
        CLIENT,
        "192.168.50.2",
        30080,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        reasons=("node_port", "masquerade_external_traffic_policy_cluster"),
    ),
    Case(
        "nodeport-on-address-outside-nodeport-addresses",
        st(**NODEPORT),
        CLIENT,
        "192.168.50.2",
        30080,
        "accept",
        options=ex.Options(
            cluster_cidrs=CIDRS, nodeport_addresses=(ipaddress.ip_network("10.0.0.0/8"),)
        ),
        reasons=("no_service",),
    ),
    Case(
        "nodeport-local-policy-keeps-client-ip",
        st(**NODEPORT, etp_local=True, health_check_node_port=32000),
        CLIENT,
        "192.168.50.2",
        30080,
        "forward",
        ("10.244.1.5:8080",),
        reasons=("external_traffic_policy_local", "client_ip_preserved"),
        excluded={"10.244.2.5:8080": "other_node"},
    ),
    Case(
        "nodeport-local-policy-no-local-endpoint-drops",
        st((REMOTE,), **NODEPORT, etp_local=True),
        CLIENT,
        "192.168.50.2",
        30080,
        "drop",
        reasons=("no_local_endpoints",),
    ),
    Case(
        "nodeport-local-policy-from-node-uses-cluster-and-masquerades",
        st((REMOTE,), **NODEPORT, etp_local=True),
        "192.168.50.2",
        "192.168.50.2",
        30080,
        "forward",
        ("10.244.2.5:8080",),
        masquerade=True,
        reasons=("node_to_external_uses_cluster_endpoints", "masquerade_from_node"),
    ),
    Case(
        "lb-local-policy-from-pod-short-circuits",
        st((REMOTE,), **LB, etp_local=True),
        REMOTE_POD,
        "172.18.0.10",
        80,
        "forward",
        ("10.244.2.5:8080",),
        reasons=("load_balancer_ip", "pod_to_external_short_circuit"),
    ),
    Case(
        "lb-source-range-allowed",
        st(**LB, source_ranges=("203.0.113.0/24",)),
        CLIENT,
        "172.18.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        reasons=("source_range_allowed",),
    ),
    Case(
        "lb-source-range-denied",
        st(**LB, source_ranges=("198.51.100.0/24",)),
        CLIENT,
        "172.18.0.10",
        80,
        "drop",
        reasons=("load_balancer_ip", "source_range_denied"),
    ),
    Case(
        "external-ip",
        st(external_ips=("198.51.100.20",)),
        CLIENT,
        "198.51.100.20",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        reasons=("external_ip", "external_traffic_policy_cluster"),
    ),
    Case(
        "session-affinity",
        st(affinity=True, affinity_timeout=600),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        reasons=("session_affinity_client_ip",),
    ),
    Case(
        "hairpin-is-masqueraded",
        st(),
        "10.244.1.5",
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        reasons=("masquerade_hairpin",),
    ),
    Case(
        "masquerade-all",
        st(),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        masquerade=True,
        options=ex.Options(cluster_cidrs=CIDRS, masquerade_all=True),
        reasons=("masquerade_all",),
    ),
    Case(
        "topology-hints-keep-zone",
        b.state(
            b.service(traffic_distribution="PreferClose"),
            (
                b.endpoint("10.244.1.5", zone="a", hints=("a",)),
                b.endpoint("10.244.2.5", node="node-b", zone="b", hints=("b",)),
            ),
            b.node(addresses=("192.168.50.2",), zone="a"),
        ),
        POD,
        "10.96.0.10",
        80,
        "forward",
        ("10.244.1.5:8080",),
        reasons=("topology_hints",),
        excluded={"10.244.2.5:8080": "topology"},
    ),
    Case(
        "ipv6-dual-stack",
        st(
            (LOCAL_A, b.endpoint("fd00:244:1::5"), REMOTE),
            cluster_ip=("10.96.0.10", "fd00:96::10"),
        ),
        "fd00:244:1::7",
        "fd00:96::10",
        80,
        "forward",
        ("[fd00:244:1::5]:8080",),
        excluded={"10.244.1.5:8080": "other_family", "10.244.2.5:8080": "other_family"},
    ),
    Case(
        "udp-service",
        st(protocol="UDP", port=53, port_name_="dns"),
        POD,
        "10.96.0.10",
        53,
        "forward",
        ("10.244.1.5:8080", "10.244.2.5:8080"),
        protocol="UDP",
    ),
    Case(
        "headless-has-no-frontend",
        st(cluster_ip=None),
        POD,
        "10.96.0.10",
        80,
        "accept",
        reasons=("no_service",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain_table(case: Case) -> None:
    plan = b.plan([case.state], node_info=NODE)
    packet = ex.Packet(
        src=ipaddress.ip_address(case.src),
        dst=ipaddress.ip_address(case.dst),
        port=case.port,
        protocol=Protocol(case.protocol),
        origin=ex.Origin(case.origin) if case.origin else None,
    )
    result = ex.explain(plan, packet, case.options)
    assert str(result.verdict) == case.verdict, result
    assert result.endpoints == case.endpoints
    assert result.masquerade is case.masquerade, result.reasons
    missing = set(case.reasons) - set(result.reasons)
    assert not missing, result.reasons
    for endpoint, reason in case.excluded.items():
        assert ex.Excluded(endpoint=endpoint, reason=reason) in result.excluded, result.excluded
    if case.verdict == "forward":
        assert result.service == str(case.state.name)
    data = result.to_json()
    assert set(data) >= {"verdict", "service", "endpoints", "masquerade", "reasons", "kernel"}
    assert data["endpoints"] == sorted(data["endpoints"], key=lambda e: (":" in e.split("]")[0], e))


def test_explain_endpoints_match_select_for_every_case() -> None:
    """Under plain conditions (pod, cluster CIDR, no ranges) explain forwards to exactly
    the endpoints select chose for internal traffic."""
    for case in CASES:
        if case.src != POD or case.dst != "10.96.0.10" or case.verdict != "forward":
            continue
        plan = b.plan([case.state], node_info=NODE)
        packet = ex.Packet(
            src=ipaddress.ip_address(POD),
            dst=ipaddress.ip_address("10.96.0.10"),
            port=case.port,
            protocol=Protocol(case.protocol),
        )
        result = ex.explain(plan, packet, ex.Options(cluster_cidrs=CIDRS))
        assert result.endpoints == tuple(
            str(e) for e in case.state.internal if e.ip.version == 4
        ), case.id


@pytest.mark.parametrize(
    ("src", "origin"),
    [("192.168.50.2", "node"), ("10.244.3.3", "pod"), ("8.8.8.8", "external")],
)
def test_origin_is_inferred(src: str, origin: str) -> None:
    assert ex.infer_origin(ipaddress.ip_address(src), NODE, ex.Options(cluster_cidrs=CIDRS)) == (
        ex.Origin(origin)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.96.0.10:80/TCP", ("10.96.0.10", 80, "TCP")),
        ("10.96.0.10:53/udp", ("10.96.0.10", 53, "UDP")),
        ("[fd00::10]:443", ("fd00::10", 443, "TCP")),
    ],
)
def test_parse_destination(text: str, expected: tuple[str, int, str]) -> None:
    ip, port, proto = ex.parse_destination(text)
    assert (str(ip), port, str(proto)) == expected


@pytest.mark.parametrize("text", ["10.96.0.10", "10.96.0.10:http", "10.96.0.10:80/ICMP"])
def test_parse_destination_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected|protocol"):
        ex.parse_destination(text)


def test_command_offline_from_manifests(tmp_path: Path) -> None:
    endpoints = (*on_node_a("10.244.1.5"), "{addresses: [10.244.2.5], nodeName: node-b}")
    (tmp_path / "web.yaml").write_text(manifest(*endpoints, node_port=30080, local=True))
    cmd = explain_cmd.command(_offline_plan)
    base = ["--manifests", str(tmp_path), "--node", "node-b", "--node-ip", "192.168.50.3"]
    result = CliRunner().invoke(
        cmd, [*base, "--from", CLIENT, "--to", "192.168.50.3:30080/TCP", "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "forward"
    assert data["service"] == "default/web:http/TCP"
    assert data["endpoints"] == ["10.244.2.5:8080"]  # node-b's own endpoint under Local
    assert data["masquerade"] is False
    assert data["excluded"] == [{"endpoint": "10.244.1.5:8080", "reason": "other_node"}]
    text = CliRunner().invoke(cmd, [*base, "--from", CLIENT, "--to", "10.96.0.10:80"])
    assert text.exit_code == 0 and "candidate 10.244.1.5:8080" in text.output
    bad = CliRunner().invoke(cmd, [*base, "--from", CLIENT, "--to", "nonsense"])
    assert bad.exit_code == 2 and "expected IP:PORT" in bad.output
