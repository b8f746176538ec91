"""Packets traced through the iptables backend's own rendered rules.

The cross-check: for every case of the ``kpy explain`` table, the verdict, endpoints and
masquerade the rules produce (:mod:`kpy_iptables.trace`) agree with the model's
:func:`kpy.core.trace.explain`. Then the kernel objects a trace reports, the interpreter's
refusal of syntax it does not know, and ``kpy explain --backend iptables``.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from typing import Any

import pytest
from click.testing import CliRunner
from kpy_iptables import IptablesBackend, render
from kpy_iptables import trace as tr

from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Endpoint, Plan
from kpy.testing import builders as b
from kpy.testing import packets
from tests.unit.test_explain import (
    CASES,
    CIDRS,
    CLIENT,
    DEFAULT_OPTIONS,
    EXAMPLES_AS_NODE_1,
    LB,
    LOCAL_A,
    NODE,
    NODEPORT,
    POD,
    REMOTE,
    REMOTE_POD,
    TERMINATING_LOCAL,
    TERMINATING_REMOTE,
    Case,
    assert_traced_as_modelled,
    example_cluster_ip_target,
    st,
    traced,
)


def _inputs(case: Case) -> tuple[Plan, ex.Packet, ex.Explanation]:
    plan, packet = case.plan(), case.packet()
    return plan, packet, ex.explain(plan, packet, case.options)


def _trace(case: Case) -> tuple[ex.Trace, ex.Explanation]:
    trace, model, _ = traced(case, tr.trace)
    return trace, model


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_trace_agrees_with_model(case: Case) -> None:
    traced = assert_traced_as_modelled(case, tr.trace)
    if case.verdict != "accept":
        assert traced.kernel, "a Service packet must traverse kernel objects"


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


SVC = render.chain_name("SVC", "default/web:http/TCP")
EXT = render.chain_name("EXT", "default/web:http/TCP")
FW = render.chain_name("FW", "default/web:http/TCP")


def _chains(kernel: tuple[str, ...]) -> list[str]:
    """``table CHAIN`` of each traversed rule, in order."""
    return [f"{k.split()[2]} {k.split()[4]}" for k in kernel if k.startswith("ip")]


def test_kernel_objects_of_a_cluster_ip_from_a_pod() -> None:
    traced, _ = _trace(_case("clusterip-from-pod"))
    chains = _chains(traced.kernel)
    assert chains[:3] == ["nat PREROUTING", "nat KPY-SERVICES", f"nat {SVC}"]
    seps = [k for k in traced.kernel if "-j DNAT --to-destination" in k]
    assert [k.rsplit(" ", 1)[1] for k in seps] == ["10.244.1.5:8080", "10.244.2.5:8080"]
    assert any(
        k.startswith("iptables -t nat -A KPY-POSTROUTING -m mark ! --mark") for k in traced.kernel
    )
    assert "nat KPY-MARK-MASQ" not in chains  # a pod in the cluster CIDR keeps its address


def test_kernel_objects_from_the_node_go_through_output() -> None:
    traced, _ = _trace(_case("clusterip-from-node-is-masqueraded"))
    chains = _chains(traced.kernel)
    assert chains[0] == "nat OUTPUT" and "nat PREROUTING" not in chains
    assert "nat KPY-MARK-MASQ" in chains
    assert any(k.endswith("-j MASQUERADE --random-fully") for k in traced.kernel)


def test_kernel_objects_of_a_denied_source_range() -> None:
    traced, _ = _trace(_case("lb-source-range-denied"))
    assert any(k.endswith(f"-j {FW}") for k in traced.kernel)  # entered, no range matched
    assert not any(EXT in k for k in traced.kernel)
    assert traced.kernel[-1].startswith("iptables -t filter -A KPY-SERVICES -d 172.18.0.10/32")
    assert traced.kernel[-1].endswith("-j DROP")


def test_kernel_objects_of_no_endpoints_reject_in_filter_forward() -> None:
    traced, _ = _trace(_case("no-endpoints-rejects"))
    assert _chains(traced.kernel) == [
        "nat PREROUTING",  # into nat KPY-SERVICES, where nothing matches
        "filter FORWARD",
        "filter KPY-SERVICES",
    ]
    assert traced.kernel[-1].endswith("-j REJECT --reject-with tcp-reset")


def test_ipv6_is_traced_through_ip6tables() -> None:
    traced, _ = _trace(_case("ipv6-dual-stack"))
    assert traced.kernel and all(k.startswith("ip6tables ") for k in traced.kernel)


def test_affinity_rcheck_does_not_match_a_new_client() -> None:
    traced, _ = _trace(_case("session-affinity"))
    assert not any("--rcheck" in k for k in traced.kernel)
    assert sum("--set --name" in k for k in traced.kernel) == 2


def test_a_render_bug_shows_up_in_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace follows render: a wrong rule changes the traced answer."""
    original = render._spread

    def only_first(*args: object, **kwargs: object) -> render.Rules:
        rules = original(*args, **kwargs)  # type: ignore[arg-type]
        return tuple(r for r in rules if "statistic" not in r)

    monkeypatch.setattr(render, "_spread", only_first)
    traced, model = _trace(_case("clusterip-from-pod"))
    assert traced.endpoints == ("10.244.2.5:8080",) != model.endpoints


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("-m string --string x -j ACCEPT", "unknown match module 'string'"),
        ("-m tcp --sport 80 -j ACCEPT", "unknown option '--sport' of -m tcp"),
        ("-o eth0 -j ACCEPT", "unknown rule option '-o'"),
        ("-j DNAT --to-source 1.2.3.4", "unknown option '--to-source' of target DNAT"),
        ("-s 10.0.0.0/8", "rule without a target"),
    ],
)
def test_unknown_syntax_is_refused(rule: str, message: str) -> None:
    with pytest.raises(tr.TraceError, match=message):
        tr.parse_rule(rule)


def test_unmodelled_match_value_is_refused() -> None:
    chains = tr.load("*nat\n-A PREROUTING -m addrtype --dst-type BROADCAST -j ACCEPT\nCOMMIT\n")
    walker = tr._Walker(chains, 4, frozenset())
    flow = tr.Flow(
        src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address(POD), port=80, protocol="tcp"
    )
    with pytest.raises(tr.TraceError, match="address type 'BROADCAST'"):
        walker.run("nat", "PREROUTING", flow)


def test_backend_method_touches_no_kernel() -> None:
    from kpy_iptables import IptablesBackend

    backend = IptablesBackend(BackendConfig(node_name="node-a", cluster_cidrs=CIDRS))
    plan = b.plan([st()], node_info=NODE)
    packet = ex.Packet(
        src=ipaddress.ip_address(POD), dst=ipaddress.ip_address("10.96.0.10"), port=80
    )
    traced = backend.trace(plan, packet, ex.Origin.POD)
    assert traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080")
    assert backend._kernel._mode is None  # no flavour detection ran


def test_cli_explain_backend_iptables() -> None:
    args = [
        "explain",
        *EXAMPLES_AS_NODE_1,
        "--backend",
        "iptables",
        "-o",
        "json",
    ]
    result = CliRunner().invoke(main, [*args, "--from", POD, "--to", example_cluster_ip_target()])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "forward"
    assert data["endpoints"]
    assert "traced_by_iptables" in data["reasons"]
    assert "trace_disagrees_with_model" not in data["reasons"]
    assert any(k.startswith("iptables -t nat -A KPY-SERVICES ") for k in data["kernel"])
    assert any("-j DNAT --to-destination" in k for k in data["kernel"])


# --- beyond the table ---------------------------------------------------------------------

GRID_ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {
    "local-and-remote": (LOCAL_A, REMOTE),
    "remote-only": (REMOTE,),
    "none": (),
    "terminating": (TERMINATING_LOCAL, TERMINATING_REMOTE),
    "dual-stack": (LOCAL_A, b.endpoint("fd00:244:1::5"), REMOTE),
}
GRID_SERVICES: dict[str, dict[str, Any]] = {
    "cluster-ip": {},
    "nodeport": dict(NODEPORT),
    "nodeport-etp-local": dict(NODEPORT, etp_local=True),
    "nodeport-itp-local": dict(NODEPORT, itp_local=True),
    "lb": dict(LB),
    "lb-etp-local": dict(LB, etp_local=True),
    "lb-ranges": dict(LB, source_ranges=("203.0.113.0/24",)),
    "lb-ranges-etp-local": dict(LB, etp_local=True, source_ranges=("203.0.113.0/24",)),
    "external-ip": dict(external_ips=("198.51.100.20",)),
    "external-ip-etp-local": dict(external_ips=("198.51.100.20",), etp_local=True),
    "affinity": dict(affinity=True, affinity_timeout=60),
}
GRID_SOURCES = (POD, REMOTE_POD, "192.168.50.2", CLIENT, "198.51.100.1", "10.244.1.5")
GRID_DESTINATIONS = (
    ("10.96.0.10", 80),
    ("192.168.50.2", 30080),
    ("172.18.0.10", 80),
    ("198.51.100.20", 80),
)
GRID_OPTIONS = (
    DEFAULT_OPTIONS,
    ex.Options(cluster_cidrs=CIDRS, nodeport_addresses=(ipaddress.ip_network("192.168.50.0/24"),)),
    ex.Options(),  # no --cluster-cidr: pods are told by the Node's podCIDR
)


def test_trace_agrees_with_model_over_a_grid() -> None:
    """Every Service kind, endpoint set, source and frontend (both families where the
    Service is dual-stack), with and without cluster CIDRs: the rules and the model
    agree."""
    disagreements = []
    checked = 0
    for i, ((eps_id, eps), (svc_id, svc), src, (dst, port)) in enumerate(
        itertools.product(
            GRID_ENDPOINTS.items(), GRID_SERVICES.items(), GRID_SOURCES, GRID_DESTINATIONS
        )
    ):
        if eps_id == "dual-stack":
            svc = dict(svc, cluster_ip=("10.96.0.10", "fd00:96::10"))
        state = b.state(b.service(**svc), eps, NODE)
        plan = b.plan([state], node_info=NODE)
        options = GRID_OPTIONS[i % len(GRID_OPTIONS)]
        packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
        model = ex.explain(plan, packet, options)
        traced = tr.trace(plan, packet, model.origin, ex.options_config(NODE.name, options))
        checked += 1
        got = (traced.verdict, traced.endpoints, traced.masquerade)
        if got != (model.verdict, model.endpoints, model.masquerade):
            disagreements.append((eps_id, svc_id, src, dst, port, got, model))
    assert checked > 1000
    assert not disagreements, disagreements[:5]


def _traced_and_model(
    svc: dict[str, Any],
    eps: tuple[Endpoint, ...],
    src: str,
    dst: str,
    port: int,
    options: ex.Options,
) -> tuple[ex.Trace, ex.Explanation]:
    plan = b.plan([b.state(b.service(**svc), eps, NODE)], node_info=NODE)
    packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
    model = ex.explain(plan, packet, options)
    return tr.trace(plan, packet, model.origin, ex.options_config(NODE.name, options)), model


def _agree(traced: ex.Trace, model: ex.Explanation) -> None:
    assert ex.outcome(traced) == ex.outcome(model)


@pytest.mark.parametrize(("src", "verdict"), [("198.51.100.1", "drop"), ("203.0.113.9", "reject")])
def test_source_ranges_without_endpoints_drop_outside_and_reject_inside(
    src: str, verdict: str
) -> None:
    lb = dict(LB, source_ranges=("203.0.113.0/24",))
    traced, model = _traced_and_model(lb, (), src, "172.18.0.10", 80, DEFAULT_OPTIONS)
    _agree(traced, model)
    assert str(traced.verdict) == verdict
    assert any(f"-A {FW}" in k for k in traced.kernel)  # the filter table's firewall chain


def test_masquerade_all_with_local_policy() -> None:
    options = ex.Options(cluster_cidrs=CIDRS, masquerade_all=True)
    np_local = dict(NODEPORT, etp_local=True)
    traced, model = _traced_and_model(np_local, (LOCAL_A,), CLIENT, "192.168.50.2", 30080, options)
    _agree(traced, model)


def test_pod_short_circuit_by_the_nodes_pod_cidr_in_node_cidr_mode() -> None:
    np_local = dict(NODEPORT, etp_local=True)
    traced, model = _traced_and_model(
        np_local,
        (LOCAL_A, REMOTE),
        POD,
        "192.168.50.2",
        30080,
        ex.Options(detect_local_mode="NodeCIDR"),
    )
    assert model.origin is ex.Origin.POD
    _agree(traced, model)
    assert traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080")  # cluster-wide
    assert any(f"-A {EXT} -s 10.244.1.0/24 -j {SVC}" in k for k in traced.kernel)


def test_no_short_circuit_without_cluster_cidr_in_cluster_cidr_mode() -> None:
    """Upstream's no-op detector: a pod is an outside client like any other."""
    np_local = dict(NODEPORT, etp_local=True)
    traced, model = _traced_and_model(
        np_local, (LOCAL_A, REMOTE), POD, "192.168.50.2", 30080, ex.Options()
    )
    _agree(traced, model)
    assert traced.endpoints == ("10.244.1.5:8080",)  # the local endpoint only
    assert not traced.masquerade


def test_tables_keep_the_kernel_order_of_the_first_sync() -> None:
    """Rules added with ``-I … 1`` end up in front: VIP rules before the NodePort jump."""
    plan = b.plan([st(**LB, external_ips=("198.51.100.20",))], node_info=NODE)
    config = ex.options_config(NODE.name, DEFAULT_OPTIONS)
    services = [r.text for r in tr.tables(plan, config, 4)[("nat", "KPY-SERVICES")]]
    assert services[-1] == "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    assert len(services) == 4  # cluster IP, external IP, LoadBalancer IP, NodePorts
    assert tr.tables(plan, config, 6)[("nat", "KPY-SERVICES")][-1].target == "KPY-NODEPORTS"


def test_load_applies_deletes_and_chain_removal() -> None:
    chains = tr.load(
        "*nat\n:KPY-X - [0:0]\n-A KPY-X -j RETURN\n-A PREROUTING -j KPY-X\n"
        "-I PREROUTING 1 -j ACCEPT\n-D PREROUTING -j KPY-X\n-X KPY-X\nCOMMIT\n"
    )
    assert [r.text for r in chains[("nat", "PREROUTING")]] == ["-j ACCEPT"]
    assert ("nat", "KPY-X") not in chains
    with pytest.raises(tr.TraceError, match="does not exist"):
        tr.load("*nat\n-A KPY-NOPE -j ACCEPT\nCOMMIT\n")


# --- real packets: where connections go is within what the trace says ---------------------


@pytest.mark.root
class TestRealPacketsFollowTheTrace(packets.TraceAgreement):
    @pytest.fixture
    def make_backend(self) -> packets.MakeBackend:
        return IptablesBackend

    @pytest.fixture
    def tracer(self) -> ex.Tracer:
        return tr.trace
