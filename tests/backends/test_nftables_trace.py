"""Packets traced through the nftables backend's own rendered objects.

The cross-check: for every case of the ``kpy explain`` table, the verdict, endpoints and
masquerade that :mod:`kpy_nftables.trace` finds by interpreting the rendered chains, maps
and sets agree with the model's :func:`kpy.core.trace.explain`. Cases where they do not are
render bugs (the trace reads what the kernel would be given) and are marked xfail with
the reason, strictly, so fixing render makes them fail until the mark goes. Then the
kernel objects a trace reports, the interpreter's refusal of syntax it does not know,
and ``kpy explain --backend nftables``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from kpy_nftables import NftablesBackend, render
from kpy_nftables import trace as tr

from kpy.cli import _offline_plan, main
from kpy.core import trace as ex
from kpy.core.model import Plan
from kpy.testing import builders as b
from kpy.testing import packets
from tests.unit.test_explain import (
    CASES,
    CIDRS,
    CLIENT,
    EXAMPLES_AS_NODE_1,
    LB,
    NODE,
    NODEPORT,
    POD,
    REMOTE,
    Case,
    assert_traced_as_modelled,
    case_by_id,
    case_params,
    st,
    traced,
)

RENDER_BUGS: dict[str, str] = {}  # case id → why render and the model disagree


def _packet(case: Case) -> ex.Packet:
    return case.packet()


def _trace(case: Case) -> tuple[ex.Trace, ex.Explanation, Plan]:
    return traced(case, tr.trace)


_case = case_by_id


@pytest.mark.parametrize("case", case_params(RENDER_BUGS))
def test_trace_agrees_with_model(case: Case) -> None:
    assert_traced_as_modelled(nftables_case(case), tr.trace)


# Upstream's nftables mode rejects a port no Service serves on a ClusterIP (the model
# does with clusterip_checks, as `kpy explain` sets it for this backend).
CLUSTER_IP_REJECTS = frozenset({"clusterip-wrong-port-is-not-a-service", "wrong-protocol"})


def nftables_case(case: Case) -> Case:
    """``case`` as the nftables backend's model has it (its ClusterIP checks on)."""
    options = replace(case.options, clusterip_checks=True)
    verdict = "reject" if case.id in CLUSTER_IP_REJECTS else case.verdict
    return replace(case, options=options, verdict=verdict)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_names_only_rendered_objects(case: Case) -> None:
    """Every chain or element a trace names is one render produced, under its key."""
    traced, _, plan = _trace(case)
    objs = tr.objects(plan, ex.options_config(plan.node.name, case.options))
    keys = [k for k in traced.kernel if " chain " in k or " element " in k]
    assert keys, traced.kernel
    assert [k for k in keys if k not in objs] == []
    # every packet passes a filter hook of its family; one not dropped, its nat hooks
    family = "ip6" if ":" in case.dst else "ip"
    assert any(k.startswith(f"{family} chain filter-") for k in keys)
    if traced.verdict in (ex.Verdict.FORWARD, ex.Verdict.ACCEPT):
        assert f"{family} chain masquerading" in keys or f"{family} chain filter-input" in keys


def test_clusterip_from_pod_kernel_path() -> None:
    traced, _, plan = _trace(_case("clusterip-from-pod"))
    name = next(iter(plan.services))
    chain = render.service_chain(name)
    shard = render.shard_table(name)
    assert traced.kernel == (
        "ip chain filter-prerouting",
        "ip chain firewall-check",
        "ip chain nat-prerouting",  # the base table's: masquerade marks only
        "ip chain services",
        f"ip {shard} chain nat-prerouting",  # the port's shard (the others show nothing)
        f"ip {shard} chain services",
        f"ip {shard} element service-ips 10.96.0.10 . tcp . 80",
        f"ip {shard} chain {chain}",
        "dnat 10.244.1.5:8080",
        "dnat 10.244.2.5:8080",
        "ip chain filter-forward",
        "ip chain service-endpoints-check",
        "ip chain cluster-ips-check",  # DNATed: no longer addressed to a ClusterIP
        "ip chain nat-postrouting",
        "ip chain masquerading",
    )


def test_nodeport_cluster_policy_goes_through_the_masquerade_set() -> None:
    traced, _, plan = _trace(_case("nodeport-external-cluster-policy-masquerades"))
    k = traced.kernel
    shard = render.shard_table(next(iter(plan.services)))
    assert "ip element masquerade-nodeports tcp . 30080" in k
    assert "ip chain mark-for-masquerade" in k
    assert f"ip {shard} element service-nodeports tcp . 30080" in k
    assert k.index("mark 0x00004000") < k.index("dnat 10.244.1.5:8080")
    assert k[-1] == "masquerade"


def test_no_endpoints_rejects_in_the_filter_hook_after_nat() -> None:
    traced, _, _ = _trace(_case("no-endpoints-rejects"))
    assert traced.kernel[-4:] == (
        "ip chain service-endpoints-check",
        "ip element no-endpoint-services 10.96.0.10 . tcp . 80",
        "ip chain reject-chain",
        "reject",
    )
    assert "ip chain filter-forward" in traced.kernel  # 10.96.0.10 is not a node address
    assert not any(k.startswith("dnat") for k in traced.kernel)


def test_source_range_drop_happens_before_dnat() -> None:
    traced, _, plan = _trace(_case("lb-source-range-denied"))
    fw = render.firewall_chain(next(iter(plan.services)))
    assert traced.kernel == (
        "ip chain filter-prerouting",
        "ip chain firewall-check",
        "ip element firewall-ips 172.18.0.10 . tcp . 80",
        f"ip chain {fw}",
        "drop",
    )


def test_hairpin_masquerades_only_the_path_back_to_the_client() -> None:
    case = _case("hairpin-is-masqueraded")
    plan = b.plan([case.state], node_info=NODE)
    config = ex.options_config(NODE.name, case.options)
    packet = _packet(case)
    traced = tr.trace(plan, packet, ex.Origin.POD, config)
    assert traced.masquerade and traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080")
    # with only the other endpoint, the same client is not masqueraded
    other = b.plan([st((REMOTE,))], node_info=NODE)
    assert not tr.trace(other, packet, ex.Origin.POD, config).masquerade


def test_affinity_sets_start_empty() -> None:
    """A fresh client is in no affinity set: every endpoint is reachable, and the
    trace reads the affinity set before the draw."""
    traced, _, _ = _trace(_case("session-affinity"))
    assert traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080")


def test_nodeport_never_answers_on_loopback() -> None:
    plan = b.plan([st(**NODEPORT)], node_info=NODE)
    config = ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS))
    loop = ex.Packet(
        src=ipaddress.ip_address("127.0.0.1"), dst=ipaddress.ip_address("127.0.0.1"), port=30080
    )
    traced = tr.trace(plan, loop, ex.Origin.NODE, config)
    assert traced.verdict is ex.Verdict.ACCEPT and not traced.endpoints
    # and answers on the node's address
    own = replace(
        loop, src=ipaddress.ip_address("192.168.50.2"), dst=ipaddress.ip_address("192.168.50.2")
    )
    assert tr.trace(plan, own, ex.Origin.NODE, config).verdict is ex.Verdict.FORWARD


def test_contested_frontend_goes_to_the_first_port_in_name_order() -> None:
    first = b.state(b.service(name="a-web"), (b.endpoint("10.244.1.5"),), NODE)
    second = b.state(b.service(name="b-web"), (b.endpoint("10.244.2.5", node="node-b"),), NODE)
    plan = b.plan([second, first], node_info=NODE)
    packet = ex.Packet(
        src=ipaddress.ip_address(POD), dst=ipaddress.ip_address("10.96.0.10"), port=80
    )
    config = ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS))
    assert tr.trace(plan, packet, ex.Origin.POD, config).endpoints == ("10.244.1.5:8080",)


# --- render bugs the tracer finds beyond the table --------------------------------------


def test_source_ranges_from_the_node_itself() -> None:
    """The node's own connection to a LoadBalancer IP outside its source ranges is
    dropped (filter-output jumps firewall-check, as upstream's does)."""
    state = st(**LB, source_ranges=("198.51.100.0/24",))
    plan = b.plan([state], node_info=NODE)
    packet = ex.Packet(
        src=ipaddress.ip_address("192.168.50.2"), dst=ipaddress.ip_address("172.18.0.10"), port=80
    )
    options = ex.Options(cluster_cidrs=CIDRS)
    model = ex.explain(plan, packet, options)
    traced = tr.trace(plan, packet, model.origin, ex.options_config(NODE.name, options))
    assert model.verdict is ex.Verdict.DROP
    assert traced.verdict is ex.Verdict.DROP
    assert "ip chain firewall-check" in traced.kernel


# --- the interpreter refuses what it does not know ---------------------------------------


def _tampered(case_id: str, edit: dict[str, tuple[str, ...]]) -> ex.Trace:
    case = _case(case_id)
    plan = b.plan([case.state], node_info=NODE)
    config = ex.options_config(NODE.name, case.options)
    objs = tr.objects(plan, config)
    for name, rules in edit.items():
        # the base table's chain of that name, else the (one) shard chain of that name
        chains = [o for o in objs.values() if isinstance(o, render.Chain) and o.name == name]
        chain = min(chains, key=lambda c: c.table != render.TABLE)
        # the interpreter reads a rule's text: rules of text render never writes
        objs[chain.key] = replace(chain, rules=tuple(render.Rule(r) for r in rules))
    return tr.trace_objects(objs, _packet(case), ex.Origin.POD, NODE.addresses)


def test_unknown_statement_is_an_error() -> None:
    with pytest.raises(tr.TraceError, match="unknown selector"):
        _tampered("clusterip-from-pod", {"services": ("counter",)})


def test_unknown_selector_is_an_error() -> None:
    rule = "ip daddr . meta l4proto . th sport vmap @service-ips"
    with pytest.raises(tr.TraceError, match="unknown selector"):
        _tampered("clusterip-from-pod", {"services": (rule,)})


def test_reference_to_a_missing_chain_or_set_is_an_error() -> None:
    with pytest.raises(tr.TraceError, match="not rendered"):
        _tampered("clusterip-from-pod", {"services": ("jump nowhere",)})
    with pytest.raises(tr.TraceError, match="no ip set or map"):
        _tampered(
            "clusterip-from-pod", {"services": ("ip daddr . meta l4proto . th dport vmap @gone",)}
        )


def test_a_render_bug_shows_up_in_the_trace() -> None:
    """Drop the last endpoint's rule from the service chain: the trace no longer
    reaches that endpoint, so it disagrees with the model."""
    case = _case("clusterip-from-pod")
    plan = b.plan([case.state], node_info=NODE)
    chain = render.service_chain(next(iter(plan.services)))
    config = ex.options_config(NODE.name, case.options)
    shard = render.shard_table(next(iter(plan.services)))
    rules = tr.objects(plan, config)[f"ip {shard} chain {chain}"]
    assert isinstance(rules, render.Chain)
    traced = _tampered(case.id, {chain: rules.rules[:-1]})
    assert traced.endpoints == ("10.244.1.5:8080",)


def test_every_example_frontend_agrees_with_the_model() -> None:
    """Every frontend of every Service in examples/, from a pod, the node and outside."""
    plan = _offline_plan(("examples",), "node-1", ("192.168.100.11",))
    node_ip = ipaddress.ip_address("192.168.100.11")
    options = ex.Options(
        cluster_cidrs=(
            ipaddress.ip_network("10.244.0.0/16"),
            ipaddress.ip_network("fd00:10:244::/48"),
        ),
        node_ips=(node_ip,),
    )
    config = ex.options_config("node-1", options)
    sources = {
        4: {"pod": "10.244.1.9", "node": "192.168.100.11", "external": CLIENT},
        6: {"pod": "fd00:10:244:1::9", "node": "fd00:100::11", "external": "2001:db8::7"},
    }
    disagree, traced_count = [], 0
    for state in plan.services.values():
        svc = state.service
        frontends = [(ip, svc.port) for ip in (*svc.cluster_ips, *svc.external_ips)]
        frontends += [(ip, svc.port) for ip in svc.load_balancer_ips]
        if svc.node_port is not None:
            frontends.append((node_ip, svc.node_port))
        for dst, port in frontends:
            for origin, src in sources[dst.version].items():
                packet = ex.Packet(
                    src=ipaddress.ip_address(src),
                    dst=dst,
                    port=port,
                    protocol=svc.protocol,
                    origin=ex.Origin(origin),
                )
                model = ex.explain(plan, packet, options)
                traced = tr.trace(plan, packet, model.origin, config)
                traced_count += 1
                if (traced.verdict, traced.endpoints, traced.masquerade) != (
                    model.verdict,
                    model.endpoints,
                    model.masquerade,
                ):
                    disagree.append((str(state.name), origin, str(dst), port, traced))
    assert traced_count > 30
    assert disagree == []


# --- the CLI --------------------------------------------------------------------------


def test_cli_explain_backend_nftables() -> None:
    args = [
        "explain",
        "--backend",
        "nftables",
        "-o",
        "json",
        *EXAMPLES_AS_NODE_1,
        "--from",
        POD,
        "--to",
        "10.96.0.10:80/TCP",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "forward"
    assert "traced_by_nftables" in data["reasons"]
    assert "trace_disagrees_with_model" not in data["reasons"]
    assert data["endpoints"] and all(f"dnat {e}" in data["kernel"] for e in data["endpoints"])
    assert any(
        k.startswith("ip kpy-") and k.endswith(" element service-ips 10.96.0.10 . tcp . 80")
        for k in data["kernel"]
    )
    assert data["masquerade"] is False
    # from outside the cluster CIDR the ClusterIP is masqueraded
    outside = CliRunner().invoke(main, [*args[:-4], "--from", CLIENT, "--to", "10.96.0.10:80/TCP"])
    assert outside.exit_code == 0, outside.output
    assert json.loads(outside.output)["masquerade"] is True


# --- real packets: where connections go is within what the trace says ---------------------


@pytest.mark.root
class TestRealPacketsFollowTheTrace(packets.TraceAgreement):
    @pytest.fixture
    def make_backend(self) -> packets.MakeBackend:
        return NftablesBackend

    @pytest.fixture
    def tracer(self) -> ex.Tracer:
        return tr.trace
