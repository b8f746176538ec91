"""Tracing packets through the IPVS backend's rendered objects (:mod:`kpy_ipvs.trace`).

Every case of the explain table is traced through the virtual services, real servers
and companion ipset/iptables layer that :mod:`kpy_ipvs.render` produces, and the traced
verdict, endpoints and masquerade must equal the model's (:func:`kpy.core.trace.explain`).
Where they part ways the rendered objects are wrong (the model is upstream's semantics,
which the other backends' traces agree with); those cases are strict xfails with the
reason, so fixing render makes them fail until the mark goes. Then the kernel objects
a trace reports, the interpreter's refusal of syntax it does not know, the backend's
``trace`` method (which must touch no kernel) and ``kpy explain --backend ipvs``.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from kpy_ipvs import render
from kpy_ipvs import trace as tr

from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Plan, ServicePortState
from kpy.testing import builders as b
from tests.unit.test_explain import (
    CASES,
    CIDRS,
    CLIENT,
    EXAMPLES_AS_NODE_1,
    LB,
    NODE,
    POD,
    REMOTE,
    Case,
    assert_traced_as_modelled,
    case_by_id,
    case_params,
    example_cluster_ip_target,
    st,
    traced,
)

RENDER_BUGS: dict[str, str] = {
    # case id → why the rendered IPVS objects and the model disagree
}


def _packet(case: Case) -> ex.Packet:
    return case.packet()


def _trace(case: Case) -> tuple[ex.Trace, ex.Explanation, Plan]:
    return traced(case, tr.trace)


_case = case_by_id


@pytest.mark.parametrize("case", case_params(RENDER_BUGS))
def test_trace_agrees_with_model(case: Case) -> None:
    traced = assert_traced_as_modelled(case, tr.trace)
    if case.verdict in ("forward", "reject"):
        assert any(k.startswith("ipvsadm -A ") for k in traced.kernel), traced.kernel


def test_every_known_divergence_is_a_case() -> None:
    assert set(RENDER_BUGS) <= {c.id for c in CASES}


# --- kernel objects -----------------------------------------------------------------------


def test_kernel_objects_of_a_cluster_ip_from_a_pod() -> None:
    traced, _, _ = _trace(_case("clusterip-from-pod"))
    assert traced.kernel[:5] == (
        "iptables -t mangle -A PREROUTING -j KPY-IPVS-PREROUTING",
        "iptables -t nat -A PREROUTING -j KPY-IPVS-MARK",
        "iptables -t nat -A KPY-IPVS-MARK -s 10.244.0.0/16 -m set --match-set KPY-IPVS-CLUSTER "
        "dst,dst -j RETURN",
        "ipset KPY-IPVS-CLUSTER 10.96.0.10,tcp:80",
        "iptables -t filter -A INPUT -j KPY-IPVS-FILTER",
    )
    assert "ipvsadm -A -t 10.96.0.10:80 -s rr" in traced.kernel
    assert [k for k in traced.kernel if k.startswith("ipvsadm -a ")] == [
        "ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
        "ipvsadm -a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1",
    ]
    # a pod inside the cluster CIDR returns before the MARK rule: not masqueraded
    assert not any(k.endswith("-j MARK --or-mark 0x4000") for k in traced.kernel)
    assert not traced.masquerade


def test_kernel_objects_from_the_node_skip_filter_input() -> None:
    """IPVS schedules the node's own connections at LOCAL_OUT: mangle OUTPUT, then nat
    OUTPUT marks them (outside the cluster CIDR), filter INPUT is never reached,
    POSTROUTING masquerades."""
    traced, _, _ = _trace(_case("clusterip-from-node-is-masqueraded"))
    assert traced.kernel[:2] == (
        "iptables -t mangle -A OUTPUT -j KPY-IPVS-OUTPUT",
        "iptables -t nat -A OUTPUT -j KPY-IPVS-MARK",
    )
    assert not any("filter" in k for k in traced.kernel)
    assert "ipset KPY-IPVS-CLUSTER 10.96.0.10,tcp:80" in traced.kernel
    assert any(k.endswith("-j MASQUERADE") for k in traced.kernel)
    assert traced.masquerade


def test_kernel_objects_of_a_nodeport_under_policy_cluster() -> None:
    traced, _, _ = _trace(_case("nodeport-external-cluster-policy-masquerades"))
    assert "ipset KPY-IPVS-MASQ 192.168.50.2,tcp:30080" in traced.kernel
    assert "ipvsadm -A -t 192.168.50.2:30080 -s rr" in traced.kernel


def test_kernel_objects_of_a_denied_source_range() -> None:
    traced, _, _ = _trace(_case("lb-source-range-denied"))
    assert traced.verdict is ex.Verdict.DROP
    assert traced.kernel[-2].startswith(
        "iptables -t filter -A KPY-IPVS-FILTER -m set --match-set KPY-IPVS-RANGED dst,dst"
    )
    assert traced.kernel[-1] == "ipset KPY-IPVS-RANGED 172.18.0.10,tcp:80"
    assert not any(k.startswith("ipvsadm") for k in traced.kernel)  # dropped before IPVS


def test_kernel_objects_of_an_allowed_source_range_name_no_allowed_element_as_a_hit() -> None:
    """The ALLOWED set is read negated: an allowed source passes the rule unmatched."""
    traced, _, _ = _trace(_case("lb-source-range-allowed"))
    assert traced.verdict is ex.Verdict.FORWARD
    assert not any("KPY-IPVS-RANGED" in k for k in traced.kernel)


def test_no_real_server_rejects() -> None:
    traced, _, _ = _trace(_case("no-endpoints-rejects"))
    assert traced.kernel[-2:] == ("ipvsadm -A -t 10.96.0.10:80 -s rr", "ipvs: no real server")


def test_affinity_is_persistence() -> None:
    traced, _, _ = _trace(_case("session-affinity"))
    assert any(k.startswith("ipvsadm -A -t 10.96.0.10:80 -s rr -p ") for k in traced.kernel)


def test_ipv6_uses_ip6tables_and_the_v6_sets() -> None:
    traced, _, _ = _trace(_case("ipv6-dual-stack"))
    assert "ip6tables -t nat -A PREROUTING -j KPY-IPVS-MARK" in traced.kernel
    assert "ipvsadm -A -t [fd00:96::10]:80 -s rr" in traced.kernel
    assert not any(k.startswith("iptables ") for k in traced.kernel)


def test_udp_service_flag() -> None:
    traced, _, _ = _trace(_case("udp-service"))
    assert "ipvsadm -A -u 10.96.0.10:53 -s rr" in traced.kernel


def test_weight_zero_real_servers_take_no_new_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints are the real servers with weight > 0 (a draining one is listed, not used)."""
    original = render.render_port

    def drain_remote(state: object, ctx: render.Context, mark: int = 0) -> render.PortObjects:
        objs = original(state, ctx, mark)  # type: ignore[arg-type]
        weights = {
            d: (0 if str(d.address) == "10.244.2.5" else w) for d, w in objs.destinations.items()
        }
        return render.PortObjects(
            services=objs.services,
            destinations=weights,
            addresses=objs.addresses,
            elements=objs.elements,
            node_ports=objs.node_ports,
        )

    monkeypatch.setattr(render, "render_port", drain_remote)
    traced, model, _ = _trace(_case("clusterip-from-pod"))
    assert traced.endpoints == ("10.244.1.5:8080",) != model.endpoints
    assert "ipvsadm -a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 0" in traced.kernel


def test_a_render_bug_shows_up_in_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace reads render's companion rules: losing the MASQ rule changes the answer."""
    original = render.rules

    def without_masq(ctx: render.Context, version: int) -> str:
        text = original(ctx, version)
        return "\n".join(line for line in text.splitlines() if "KPY-IPVS-MASQ" not in line) + "\n"

    monkeypatch.setattr(render, "rules", without_masq)
    traced, model, _ = _trace(_case("nodeport-external-cluster-policy-masquerades"))
    assert model.masquerade and not traced.masquerade


# --- traffic policy Local -----------------------------------------------------------------


def _node_trace(state: object, dst: str, port: int, **options: object) -> ex.Trace:
    plan = b.plan([state], node_info=NODE)  # type: ignore[list-item]
    opts = ex.Options(cluster_cidrs=CIDRS, **options)  # type: ignore[arg-type]
    packet = ex.Packet(
        src=ipaddress.ip_address("192.168.50.2"), dst=ipaddress.ip_address(dst), port=port
    )
    model = ex.explain(plan, packet, opts)
    assert model.origin is ex.Origin.NODE
    traced = tr.trace(plan, packet, model.origin, ex.options_config(NODE.name, opts))
    assert ex.outcome(traced) == ex.outcome(model), traced.kernel
    return traced


def test_internal_policy_local_without_local_endpoint_drops_pods_in_filter_input() -> None:
    traced, _, _ = _trace(_case("internal-policy-local-without-local-drops"))
    assert traced.kernel[-2:] == (
        "iptables -t filter -A KPY-IPVS-FILTER -m set --match-set KPY-IPVS-NOLOCAL dst,dst -j DROP",
        "ipset KPY-IPVS-NOLOCAL 10.96.0.10,tcp:80",
    )


def test_internal_policy_local_without_local_endpoint_drops_the_node_before_ipvs() -> None:
    """The node's connection is scheduled at LOCAL_OUT, past filter INPUT: mangle OUTPUT
    (before IPVS) drops it."""
    traced = _node_trace(st((REMOTE,), itp_local=True), "10.96.0.10", 80)
    assert traced.verdict is ex.Verdict.DROP
    assert traced.kernel[-2:] == (
        "iptables -t mangle -A KPY-IPVS-OUTPUT -m set --match-set KPY-IPVS-NOLOCAL dst,dst -j DROP",
        "ipset KPY-IPVS-NOLOCAL 10.96.0.10,tcp:80",
    )


def test_internal_policy_local_without_any_endpoint_rejects() -> None:
    plan = b.plan([st((), itp_local=True)], node_info=NODE)
    objs = render.render(plan, render.context(BackendConfig(node_name=NODE.name), NODE))
    assert not any(e.set.startswith("KPY-IPVS-NOLOCAL") for o in objs.values() for e in o.elements)
    assert _node_trace(st((), itp_local=True), "10.96.0.10", 80).verdict is ex.Verdict.REJECT


def _mark(case: Case) -> int:
    return render.allocate_marks([case.state.name])[case.state.name] << render.SHORT_MARK_SHIFT


def test_node_to_a_local_nodeport_without_local_endpoint_uses_the_cluster_masqueraded() -> None:
    """mangle OUTPUT gives the node's packet the port's short-circuit mark (from the
    SHORT element), IPVS picks the firewall-mark virtual service (cluster-wide real
    servers), POSTROUTING masquerades a marked packet from a local address."""
    case = _case("nodeport-local-policy-from-node-uses-cluster-and-masquerades")
    traced, _, _ = _trace(case)
    mark = _mark(case)
    assert (
        f"ipset KPY-IPVS-SHORT 192.168.50.2,tcp:30080 skbmark {mark:#x}/0xffff0000"
    ) in traced.kernel
    assert f"ipvsadm -A -f {mark} -s rr" in traced.kernel
    assert f"ipvsadm -a -f {mark} -r 10.244.2.5:8080 -m -w 1" in traced.kernel
    assert traced.kernel[-1] == (
        "iptables -t nat -A KPY-IPVS-POSTROUTING -m mark ! --mark 0x0/0xffff0000 "
        "-m addrtype --src-type LOCAL -j MASQUERADE"
    )


def test_outside_clients_of_a_local_frontend_without_local_endpoint_are_dropped() -> None:
    """The same virtual service holds the cluster-wide endpoints; filter INPUT keeps
    outside clients off it."""
    traced, _, _ = _trace(_case("nodeport-local-policy-no-local-endpoint-drops"))
    assert traced.verdict is ex.Verdict.DROP
    assert traced.kernel[-1] == "ipset KPY-IPVS-DROP 192.168.50.2,tcp:30080"
    assert not any(k.startswith("ipvsadm") for k in traced.kernel)


def test_pods_reach_a_local_lb_without_local_endpoint_through_the_cluster() -> None:
    case = _case("lb-local-policy-from-pod-short-circuits")
    traced, _, _ = _trace(case)
    mark = _mark(case)
    assert traced.kernel[:2] == (
        "iptables -t mangle -A PREROUTING -j KPY-IPVS-PREROUTING",
        "iptables -t mangle -A KPY-IPVS-PREROUTING -s 10.244.0.0/16 -m set --match-set "
        "KPY-IPVS-SHORT dst,dst -j SET --map-set KPY-IPVS-SHORT dst,dst --map-mark",
    )
    assert (
        "iptables -t filter -A KPY-IPVS-FILTER -s 10.244.0.0/16 -m set --match-set "
        "KPY-IPVS-DROP dst,dst -j RETURN"
    ) in traced.kernel
    assert f"ipvsadm -a -f {mark} -r 10.244.2.5:8080 -m -w 1" in traced.kernel
    assert not traced.masquerade


@pytest.mark.parametrize("origin", [ex.Origin.POD, ex.Origin.NODE])
def test_pods_and_the_node_use_the_cluster_even_with_local_endpoints(origin: ex.Origin) -> None:
    """The frontend's own virtual service holds the local real server only (outside
    clients); the firewall-mark one, which pods and the node reach, holds both."""
    state = st(**LB, etp_local=True)
    plan = b.plan([state], node_info=NODE)
    src = POD if origin is ex.Origin.POD else "192.168.50.2"
    packet = ex.Packet(
        src=ipaddress.ip_address(src), dst=ipaddress.ip_address("172.18.0.10"), port=80
    )
    config = ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS))
    traced = tr.trace(plan, packet, origin, config)
    assert traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080")
    assert traced.masquerade is (origin is ex.Origin.NODE)
    outside = tr.trace(
        plan, replace(packet, src=ipaddress.ip_address(CLIENT)), ex.Origin.EXTERNAL, config
    )
    assert outside.endpoints == ("10.244.1.5:8080",) and not outside.masquerade
    assert "ipvsadm -A -t 172.18.0.10:80 -s rr" in outside.kernel


def test_short_circuit_marks_are_stable_and_distinct() -> None:
    names = [b.service(f"svc-{i}").name for i in range(50)]
    marks = render.allocate_marks(names)
    assert sorted(marks) == sorted(names) and len(set(marks.values())) == 50
    assert all(0 < m <= render.SHORT_MARKS for m in marks.values())
    assert render.allocate_marks(reversed(names)) == marks  # by name, not by order given
    # a taken mark is kept; a newcomer whose preferred mark is taken probes onwards
    taken = {names[0]: marks[names[1]]}
    again = render.allocate_marks(names[:2], taken)
    assert again[names[0]] == marks[names[1]]
    assert again[names[1]] == marks[names[1]] % render.SHORT_MARKS + 1
    # the mark lives in the upper 16 bits, clear of the masquerade bit
    assert render.SHORT_MARK_MASK & render.MASQUERADE_MARK == 0


def test_pods_are_told_by_the_node_pod_cidr_in_node_cidr_mode() -> None:
    node = b.node(addresses=("192.168.50.2",), pod_cidrs=("10.244.1.0/24",))
    config = BackendConfig(node_name=node.name, detect_local_mode="NodeCIDR")
    text = render.rules(render.context(config, node), 4)
    assert (
        "-A KPY-IPVS-FILTER -s 10.244.1.0/24 -m set --match-set KPY-IPVS-DROP dst,dst -j RETURN"
    ) in text.splitlines()
    # ClusterCIDR mode without a cluster CIDR: no detector (upstream's no-op), no pod rule
    text = render.rules(render.context(BackendConfig(node_name=node.name), node), 4)
    assert not [line for line in text.splitlines() if " -s 10.244." in line]


def test_pods_are_told_by_their_interface_in_interface_modes() -> None:
    node = b.node(addresses=("192.168.50.2",))
    for config, match in (
        (BackendConfig(detect_local_mode="BridgeInterface", pod_bridge_interface="cni0"), "cni0"),
        (
            BackendConfig(
                detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="cali"
            ),
            "cali+",
        ),
    ):
        lines = render.rules(render.context(config, node), 4).splitlines()
        assert (
            f"-A KPY-IPVS-FILTER -i {match} -m set --match-set KPY-IPVS-DROP dst,dst -j RETURN"
            in lines
        )
        assert any(line.startswith(f"-A KPY-IPVS-MARK -i {match} ") for line in lines)


def test_local_frontend_without_any_endpoint_rejects() -> None:
    state = st((), **LB, etp_local=True)
    plan = b.plan([state], node_info=NODE)
    for dst, port in (("172.18.0.10", 80), ("192.168.50.2", 30080)):
        packet = ex.Packet(
            src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address(dst), port=port
        )
        config = ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS))
        traced = tr.trace(plan, packet, ex.Origin.EXTERNAL, config)
        assert traced.verdict is ex.Verdict.REJECT, traced.kernel
        assert traced.kernel[-1] == "ipvs: no real server"


def test_source_ranges_apply_to_the_node_before_ipvs() -> None:
    denied = _node_trace(st(**LB, source_ranges=("198.51.100.0/24",)), "172.18.0.10", 80)
    assert denied.verdict is ex.Verdict.DROP
    assert denied.kernel[-2].startswith(
        "iptables -t mangle -A KPY-IPVS-OUTPUT -m set --match-set KPY-IPVS-RANGED dst,dst"
    )
    allowed = _node_trace(st(**LB, source_ranges=("192.168.50.0/24",)), "172.18.0.10", 80)
    assert allowed.verdict is ex.Verdict.FORWARD


def test_several_cluster_cidrs_of_a_family_are_a_return_each() -> None:
    """iptables refuses ``! -s`` with several networks: one RETURN per CIDR instead."""
    cidrs = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("10.245.0.0/16"))
    text = render.rules(render.Context(cluster_cidrs=cidrs), 4)
    returns = [line for line in text.splitlines() if line.endswith("-j RETURN")]
    assert len(returns) == 4  # CLUSTER and DROP, per CIDR
    assert not any("! -s" in line for line in text.splitlines())
    tr.load(text + tr.hooks())  # the tracer reads every rule


# --- refusing what is not modelled --------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("-m string --string x -j ACCEPT", "unknown match module 'string'"),
        ("-m set --match-set KPY-IPVS-MASQ src -j ACCEPT", "set flags 'src' are not modelled"),
        ("-m mark --mark 0x1 -j MARK --set-xmark 0x1", "--or-mark only"),
        ("-o eth0 -j ACCEPT", "unknown rule option '-o'"),
        ("-j REJECT", "unknown target 'REJECT'"),
        ("-j MASQUERADE --random-fully", "unknown option '--random-fully' of target"),
        ("-s 10.0.0.0/8", "rule without a target"),
    ],
)
def test_unknown_syntax_is_refused(rule: str, message: str) -> None:
    with pytest.raises(tr.TraceError, match=message):
        tr.parse_rule(rule)


def test_unknown_companion_syntax_fails_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    original = render.rules

    def extra(ctx: render.Context, version: int) -> str:
        return (
            original(ctx, version)
            + "*filter\n-A KPY-IPVS-FILTER -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n"
        )

    monkeypatch.setattr(render, "rules", extra)
    with pytest.raises(tr.TraceError, match="unknown match module 'conntrack'"):
        _trace(_case("clusterip-from-pod"))


@pytest.mark.parametrize(
    ("value", "message"),
    [("10.96.0.10,icmp:0", "bad proto:port"), ("10.96.0.10", "cannot read element")],
)
def test_unreadable_set_elements_are_refused(value: str, message: str) -> None:
    with pytest.raises(tr.TraceError, match=message):
        tr.parse_element("KPY-IPVS-MASQ", value)


def test_load_refuses_unknown_commands_and_chains() -> None:
    with pytest.raises(tr.TraceError, match="unknown restore command"):
        tr.load("*nat\n-D PREROUTING -j ACCEPT\nCOMMIT\n")
    with pytest.raises(tr.TraceError, match="does not exist"):
        tr.load("*nat\n-A KPY-NOPE -j ACCEPT\nCOMMIT\n")
    with pytest.raises(tr.TraceError, match="table 'raw'"):
        tr.load("*raw\nCOMMIT\n")
    with pytest.raises(tr.TraceError, match="mangle POSTROUTING is not modelled"):
        tr.load("*mangle\n-A POSTROUTING -j ACCEPT\nCOMMIT\n")


# --- the backend method and the CLI -------------------------------------------------------


def test_backend_trace_touches_no_kernel() -> None:
    from kpy_ipvs import IpvsBackend

    backend = IpvsBackend(BackendConfig(node_name="node-a", cluster_cidrs=CIDRS))
    plan = b.plan([st()], node_info=NODE)
    packet = ex.Packet(
        src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address("10.96.0.10"), port=80
    )
    traced = backend.trace(plan, packet, ex.Origin.EXTERNAL)
    assert traced.endpoints == ("10.244.1.5:8080", "10.244.2.5:8080") and traced.masquerade
    kernel = backend._kernel
    # no netlink socket opened, no worker thread (so no namespace entered, no command run)
    assert kernel._ipvs is None and kernel._ipr is None
    assert not kernel._executor._threads


def test_trace_of_a_load_balancer_with_both_frontends() -> None:
    plan = b.plan([st(**LB)], node_info=NODE)
    config = ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS))
    lb = ex.Packet(
        src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address("172.18.0.10"), port=80
    )
    np = ex.Packet(
        src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address("192.168.50.2"), port=30080
    )
    for packet in (lb, np):
        traced = tr.trace(plan, packet, ex.Origin.EXTERNAL, config)
        assert traced.verdict is ex.Verdict.FORWARD and traced.masquerade
    wrong_port = ex.Packet(
        src=ipaddress.ip_address(POD), dst=ipaddress.ip_address("172.18.0.10"), port=30080
    )
    assert tr.trace(plan, wrong_port, ex.Origin.POD, config).verdict is ex.Verdict.ACCEPT


def test_cli_explain_backend_ipvs() -> None:
    target = example_cluster_ip_target()
    args = [
        "explain",
        *EXAMPLES_AS_NODE_1,
        "--backend",
        "ipvs",
        "-o",
        "json",
        "--from",
        "10.244.1.7",
        "--to",
        target,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "forward" and data["endpoints"]
    assert "traced_by_ipvs" in data["reasons"]
    assert "trace_disagrees_with_model" not in data["reasons"]
    vip = target.removesuffix("/TCP")
    assert any(k.startswith(f"ipvsadm -A -t {vip} ") for k in data["kernel"])
    reals = [k for k in data["kernel"] if k.startswith(f"ipvsadm -a -t {vip} -r ")]
    assert sorted(k.split(" -r ")[1].split()[0] for k in reals) == sorted(data["endpoints"])


# --- beyond the table ---------------------------------------------------------------------

# Without short-circuit marks (all taken) the fallback parts ways with the model over the
# grid for this cause only; it must be seen, and nothing else may.
FALLBACK_DIVERGENCES = {
    "external_local_not_short_circuited": (
        "with a local endpoint, the virtual service of an external frontend under policy "
        "Local holds only the local real servers, for pods and the node too; upstream "
        "sends them to the cluster-wide endpoints. The verdict agrees; the endpoint set "
        "differs, and with it masquerade where the source is one of the cluster-wide "
        "endpoints only (hairpin)"
    ),
}


def _divergence(
    svc: dict[str, object], model: ex.Explanation, traced: ex.Trace, packet: ex.Packet
) -> str | None:
    if ex.outcome(traced) == ex.outcome(model):
        return None
    external = model.frontend not in (None, ex.Frontend.CLUSTER_IP)
    hairpin_elsewhere = "masquerade_hairpin" in model.reasons and str(packet.src) not in {
        e.rpartition(":")[0].strip("[]") for e in traced.endpoints
    }
    if (
        svc.get("etp_local")
        and external
        and model.origin in (ex.Origin.POD, ex.Origin.NODE)
        and traced.verdict is model.verdict is ex.Verdict.FORWARD
        and (traced.masquerade == model.masquerade or hairpin_elsewhere)
    ):
        return "external_local_not_short_circuited"
    return "unexplained"


def _grid_divergences(mask: int | None = None) -> dict[str, int]:
    from tests.backends.test_iptables_trace import (
        GRID_DESTINATIONS,
        GRID_ENDPOINTS,
        GRID_OPTIONS,
        GRID_SERVICES,
        GRID_SOURCES,
    )

    seen: dict[str, int] = {}
    unexplained = []
    checked = 0
    combos = itertools.product(
        GRID_ENDPOINTS.items(), GRID_SERVICES.items(), GRID_SOURCES, GRID_DESTINATIONS
    )
    for i, ((eps_id, eps), (svc_id, svc), src, (dst, port)) in enumerate(combos):
        if eps_id == "dual-stack":
            svc = dict(svc, cluster_ip=("10.96.0.10", "fd00:96::10"))
        plan = b.plan([b.state(b.service(**svc), eps, NODE)], node_info=NODE)
        options = GRID_OPTIONS[i % len(GRID_OPTIONS)]
        packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
        model = ex.explain(plan, packet, options)
        config = ex.options_config(NODE.name, options)
        if mask is not None:
            config = _masked(config, mask)
        traced = tr.trace(plan, packet, model.origin, config)
        checked += 1
        cause = _divergence(svc, model, traced, packet)
        if cause == "unexplained":
            unexplained.append((eps_id, svc_id, src, dst, port, traced, model))
        elif cause is not None:
            seen[cause] = seen.get(cause, 0) + 1
    assert checked > 1000
    assert not unexplained, unexplained[:3]
    return seen


def test_trace_agrees_with_model_over_a_grid() -> None:
    """Every Service kind, endpoint set, source and frontend of the iptables trace's grid:
    the rendered IPVS objects agree with the model."""
    assert _grid_divergences() == {}


def test_without_short_circuit_marks_only_the_documented_cause_diverges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When every mark is taken a port falls back to its frontends' own virtual
    services: the grid then parts ways with the model for the documented cause only."""
    monkeypatch.setattr(render, "allocate_marks", lambda names, taken=None, count=0: {})
    assert set(_grid_divergences()) == set(FALLBACK_DIVERGENCES)


# --- the short-circuit mark mask (option ipvs_mark_mask) ----------------------------------

MASK = 0x00FF0000  # a non-default mask: bits 16-23


def _masked(config: BackendConfig, mask: int | str = MASK) -> BackendConfig:
    text = mask if isinstance(mask, str) else f"{mask:#x}"
    return replace(config, options=(*config.options, (render.MARK_MASK_OPTION, text)))


@pytest.mark.parametrize(
    ("text", "mask", "count"),
    [
        (None, 0xFFFF0000, 0xFFFF),
        ("", 0xFFFF0000, 0xFFFF),
        ("0x00FF0000", 0x00FF0000, 0xFF),
        ("16711680", 0x00FF0000, 0xFF),  # decimal
        ("0x3fff", 0x3FFF, 0x3FFF),  # low 14 bits, clear of the masquerade bit
        ("0xF0000", 0xF0000, 15),  # the smallest: 4 bits
        ("0xff000000", 0xFF000000, 0xFF),
    ],
)
def test_valid_mark_masks(text: str | None, mask: int, count: int) -> None:
    assert render.mark_mask(text) == mask
    ctx = render.Context(mark_mask=mask)
    assert ctx.mark_count == count
    assert (count << ctx.mark_shift) == mask


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ffff", "not a number"),
        ("0x", "not a number"),
        ("0", "non-zero 32-bit"),
        ("-65536", "non-zero 32-bit"),
        ("0x1ffff0000", "non-zero 32-bit"),
        ("0x00F0F000", "contiguous"),
        ("0xFFFF0001", "contiguous"),
        ("0x70000", "at least 4 bits"),
        ("0x4000", "at least 4 bits"),
        ("0xFFFF", "masquerade mark"),  # upstream's 0x4000 inside
        ("0x7C00", "masquerade mark"),
        ("0xFFFFFFFF", "masquerade mark"),
    ],
)
def test_invalid_mark_masks_are_refused_naming_the_option(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="ipvs_mark_mask") as raised:
        render.mark_mask(text)
    assert reason in str(raised.value)


def test_the_backend_refuses_an_invalid_mask_when_constructed() -> None:
    from kpy_ipvs import IpvsBackend

    config = _masked(BackendConfig(node_name="node-a"), "0xFFFF")
    with pytest.raises(ValueError, match=r"ipvs_mark_mask=0xffff: overlaps 0x4000"):
        IpvsBackend(config)
    with pytest.raises(ValueError, match="ipvs_mark_mask"):
        render.context(config, NODE)  # trace and render read it the same way


def test_a_non_default_mask_in_the_rendered_objects() -> None:
    """The SHORT element's skbmark, the firewall-mark virtual service and the
    POSTROUTING rule all use the configured mask."""
    state = st((REMOTE,), **LB, etp_local=True)
    plan = b.plan([state], node_info=NODE)
    ctx = render.context(_masked(BackendConfig(node_name=NODE.name, cluster_cidrs=CIDRS)), NODE)
    assert (ctx.mark_mask, ctx.mark_shift, ctx.mark_count) == (MASK, 16, 0xFF)
    number = render.allocate_marks([state.name], count=0xFF)[state.name]
    assert 0 < number <= 0xFF
    mark = number << 16
    objs = render.render(plan, ctx)[state.name]
    short = sorted(e.value for e in objs.elements if e.set == "KPY-IPVS-SHORT")
    assert short == [
        f"172.18.0.10,tcp:80 skbmark {mark:#x}/0xff0000",
        f"192.168.50.2,tcp:30080 skbmark {mark:#x}/0xff0000",
    ]
    fwmarks = [k for k in objs.services if k.fwmark]
    assert render.fwmark_key(mark, 4) in fwmarks and {k.fwmark for k in fwmarks} == {mark}
    assert mark & ~MASK == 0
    text = render.rules(ctx, 4)
    assert (
        "-A KPY-IPVS-POSTROUTING -m mark ! --mark 0x0/0xff0000 -m addrtype --src-type LOCAL "
        "-j MASQUERADE"
    ) in text.splitlines()
    assert "0xffff0000" not in text
    # a mask change rewrites the companion rules (their identity names the mask)
    assert render.skeleton_id(ctx) != render.skeleton_id(replace(ctx, mark_mask=0xFFFF0000))


def test_node_to_a_local_nodeport_under_a_non_default_mask() -> None:
    case = _case("nodeport-local-policy-from-node-uses-cluster-and-masquerades")
    plan, packet = case.plan(), case.packet()
    model = ex.explain(plan, packet, case.options)
    config = _masked(ex.options_config(plan.node.name, case.options))
    traced = tr.trace(plan, packet, model.origin, config)
    mark = render.allocate_marks([case.state.name], count=0xFF)[case.state.name] << 16
    assert ex.outcome(traced) == ex.outcome(model)
    assert f"ipset KPY-IPVS-SHORT 192.168.50.2,tcp:30080 skbmark {mark:#x}/0xff0000" in (
        traced.kernel
    )
    assert f"ipvsadm -a -f {mark} -r 10.244.2.5:8080 -m -w 1" in traced.kernel
    assert traced.kernel[-1] == (
        "iptables -t nat -A KPY-IPVS-POSTROUTING -m mark ! --mark 0x0/0xff0000 "
        "-m addrtype --src-type LOCAL -j MASQUERADE"
    )


def test_firewall_mark_services_are_ours_only_inside_the_mask() -> None:
    from kpy_ipvs import IpvsBackend

    inside, outside = render.fwmark_key(0x10000, 4), render.fwmark_key(0x1000000, 4)
    low = render.fwmark_key(0x1, 6)
    assert render.is_short_circuit(inside) and render.is_short_circuit(outside)
    assert not render.is_short_circuit(low)  # the default mask: upper 16 bits
    assert render.is_short_circuit(inside, MASK) and not render.is_short_circuit(outside, MASK)
    assert render.is_short_circuit(low, 0x3FFF)
    assert not render.is_short_circuit(render.fwmark_key(0x14000, 4), MASK)  # straddles it
    # the backend's ownership (what sync adopts and cleanup removes) follows its option
    settings = render.VirtualService()
    services = dict.fromkeys((inside, outside, low), settings)
    backend = IpvsBackend(_masked(BackendConfig(node_name="node-a")))
    try:
        assert backend._owned(services, frozenset()) == {inside}
    finally:
        backend.close()
    backend = IpvsBackend(BackendConfig(node_name="node-a"))
    try:
        assert backend._owned(services, frozenset()) == {inside, outside}
    finally:
        backend.close()


def _lb_local(i: int) -> ServicePortState:
    return st(
        (REMOTE,),
        etp_local=True,
        name=f"lb-{i}",
        cluster_ip=f"10.96.1.{i}",
        type="LoadBalancer",
        node_port=31000 + i,
        lb_ips=(f"172.18.1.{i}",),
    )


def test_a_tiny_mask_runs_out_of_marks_into_the_documented_fallback() -> None:
    """0xF0000 has 15 marks: of 16 Local ports one has none, and takes the fallback
    (README.md): its frontends go into LOCAL, its virtual services hold the cluster-wide
    endpoints (none is local), there is no firewall-mark service for it; the node still
    reaches the endpoint, masqueraded."""
    states = [_lb_local(i) for i in range(1, 17)]
    plan = b.plan(states, node_info=NODE)
    config = _masked(ex.options_config(NODE.name, ex.Options(cluster_cidrs=CIDRS)), 0xF0000)
    ctx = render.context(config, NODE)
    assert ctx.mark_count == 15
    objs = render.render(plan, ctx)
    per_port = [{k.fwmark for k in o.services if k.fwmark} for o in objs.values()]
    fwmarks = [m for marks in per_port for m in marks]  # one mark a port (both families)
    assert len(fwmarks) == len(set(fwmarks)) == 15
    assert {m >> 16 for m in fwmarks} == set(range(1, 16))
    assert all(m & ~0xF0000 == 0 for m in fwmarks)
    unmarked = [s for s in states if not any(k.fwmark for k in objs[s.name].services)]
    assert len(unmarked) == 1
    state = unmarked[0]
    elements = objs[state.name].elements
    assert not any(e.set == "KPY-IPVS-SHORT" for e in elements)
    assert {e.set for e in elements} >= {"KPY-IPVS-LOCAL", "KPY-IPVS-DROP"}
    lb_ip = state.service.load_balancer_ips[0]
    packet = ex.Packet(src=ipaddress.ip_address("192.168.50.2"), dst=lb_ip, port=80)
    traced = tr.trace(plan, packet, ex.Origin.NODE, config)
    assert traced.verdict is ex.Verdict.FORWARD and traced.masquerade
    assert traced.endpoints == ("10.244.2.5:8080",)
    assert f"ipset KPY-IPVS-LOCAL {lb_ip},tcp:80" in traced.kernel
    outside = tr.trace(
        plan, replace(packet, src=ipaddress.ip_address(CLIENT)), ex.Origin.EXTERNAL, config
    )
    assert outside.verdict is ex.Verdict.DROP


@pytest.mark.parametrize("case", case_params(RENDER_BUGS))
def test_trace_agrees_with_model_under_a_non_default_mask(case: Case) -> None:
    plan, packet = case.plan(), case.packet()
    model = ex.explain(plan, packet, case.options)
    traced = tr.trace(
        plan, packet, model.origin, _masked(ex.options_config(NODE.name, case.options))
    )
    assert ex.outcome(traced) == ex.outcome(model)


@pytest.mark.parametrize("mask", [MASK, 0x3FFF])
def test_trace_agrees_with_model_over_a_grid_under_a_non_default_mask(mask: int) -> None:
    assert _grid_divergences(mask) == {}
