"""The IPVS backend against upstream's IPVS proxier on source ranges and detect-local.

* Without a local-traffic detector (no cluster CIDR), upstream masquerades cluster-IP
  traffic whose *source* is the cluster IP (``--match-set KUBE-CLUSTER-IP src,dst``):
  the node's own connections, which leave from the VIP bound on the dummy interface.
  Nothing else is masqueraded for being from outside.
* A zero-masked source range allows any source (upstream drops the firewall; ipset
  cannot hold a /0 in a ``hash:ip,port,net`` set).
* Host networks in the ``ALLOWED`` set are written as ``ipset save`` lists them (the
  bare address), so adoption compares them equal instead of deleting them.

The real-packet side of these is tests/uml/guest/test_parity_ipvs.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from kpy_ipvs import apply, render
from kpy_ipvs import trace as tr
from kpy_ipvs.render import Element

from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import IPNetwork, Plan
from kpy.testing import builders as b

NODE = b.node(addresses=("192.168.50.2", "fd00:50::2"), pod_cidrs=("10.244.1.0/24",))
CIDRS = (ipaddress.ip_network("10.244.0.0/16"),)
LB_IP = "172.18.0.10"


def _cluster_ip(cluster_ip: str = "10.96.0.10") -> Plan:
    svc = b.service("web", cluster_ip=cluster_ip)
    return b.plan([b.state(svc, [b.endpoint("10.244.2.5", node="node-b")], NODE)], node_info=NODE)


def _trace(
    plan: Plan,
    src: str,
    dst: str,
    port: int,
    origin: ex.Origin,
    cluster_cidrs: tuple[IPNetwork, ...] = (),
) -> tuple[ex.Trace, ex.Explanation]:
    packet = ex.Packet(
        src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port, origin=origin
    )
    opts = ex.Options(cluster_cidrs=cluster_cidrs)
    traced = tr.trace(plan, packet, origin, ex.options_config(NODE.name, opts))
    return traced, ex.explain(plan, packet, opts)


@pytest.mark.parametrize(
    ("src", "origin", "masquerade"),
    [
        ("10.96.0.10", ex.Origin.NODE, True),  # the VIP as the node's source
        ("192.168.50.2", ex.Origin.NODE, False),
        ("203.0.113.7", ex.Origin.EXTERNAL, False),  # not masqueraded for being outside
        ("10.244.1.7", ex.Origin.POD, False),
    ],
)
def test_without_a_detector_only_the_vip_as_source_is_masqueraded(
    src: str, origin: ex.Origin, masquerade: bool
) -> None:
    traced, model = _trace(_cluster_ip(), src, "10.96.0.10", 80, origin)
    assert traced.verdict is ex.Verdict.FORWARD
    assert traced.masquerade is masquerade, traced.kernel
    if src != "10.96.0.10":  # the model leaves the node's source address out of account
        assert traced.masquerade is model.masquerade
    if masquerade:
        assert any("--match-set KPY-IPVS-CLUSTER src,dst -j MARK" in k for k in traced.kernel), (
            traced.kernel
        )
        assert "ipset KPY-IPVS-CLUSTER 10.96.0.10,tcp:80" in traced.kernel


def test_without_a_detector_the_ipv6_vip_as_source_is_masqueraded() -> None:
    plan = b.plan(
        [b.state(b.service("v6", cluster_ip="fd00:96::10"), [b.endpoint("fd00:244:2::5")], NODE)],
        node_info=NODE,
    )
    traced, _ = _trace(plan, "fd00:96::10", "fd00:96::10", 80, ex.Origin.NODE)
    assert traced.masquerade
    assert any(k.startswith("ip6tables -t nat -A KPY-IPVS-MARK") for k in traced.kernel)


def test_with_a_detector_outside_clients_are_masqueraded_not_by_source_address() -> None:
    traced, model = _trace(
        _cluster_ip(), "203.0.113.7", "10.96.0.10", 80, ex.Origin.EXTERNAL, cluster_cidrs=CIDRS
    )
    assert traced.masquerade and model.masquerade
    rules = render.rules(render.context(BackendConfig(cluster_cidrs=CIDRS), NODE), 4)
    assert " src,dst " not in rules
    assert "-s 10.244.0.0/16 -m set --match-set KPY-IPVS-CLUSTER dst,dst -j RETURN" in rules


def test_every_context_puts_its_cluster_ips_in_a_set_but_masquerade_all() -> None:
    for config, expected in [
        (BackendConfig(), "KPY-IPVS-CLUSTER"),
        (BackendConfig(cluster_cidrs=CIDRS), "KPY-IPVS-CLUSTER"),
        (BackendConfig(masquerade_all=True), "KPY-IPVS-MASQ"),
    ]:
        ctx = render.context(config, NODE)
        (objs,) = render.render(_cluster_ip(), ctx).values()
        assert {e.set for e in objs.elements if e.value == "10.96.0.10,tcp:80"} == {expected}


CONTEXTS = {
    "none": BackendConfig(),
    "v4-cidr": BackendConfig(cluster_cidrs=CIDRS),
    "dual-cidr": BackendConfig(cluster_cidrs=(*CIDRS, ipaddress.ip_network("fd00:244::/32"))),
    "masquerade-all": BackendConfig(masquerade_all=True),
    "node-cidr": BackendConfig(detect_local_mode="NodeCIDR"),
    "bridge": BackendConfig(detect_local_mode="BridgeInterface", pod_bridge_interface="cni0"),
    "prefix": BackendConfig(
        detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="cali"
    ),
}


def test_contexts_with_different_rules_have_different_identities() -> None:
    """Adoption keeps the kernel's rules when the identity matches: rules that differ
    must never share one (the identity is the mark chain's first comment)."""
    seen: dict[str, str] = {}
    for name, config in CONTEXTS.items():
        ctx = render.context(config, NODE)
        ident = render.skeleton_id(ctx)
        text = "".join(render.rules(ctx, v) for v in (4, 6)).replace(ident, "ID")
        assert seen.setdefault(ident, text) == text, name
    assert len(seen) == len(CONTEXTS)  # (each of these renders rules of its own)


def _lb(ranges: tuple[str, ...]) -> Plan:
    svc = b.service(
        "lb", type="LoadBalancer", node_port=30080, lb_ips=(LB_IP,), source_ranges=ranges
    )
    return b.plan([b.state(svc, [b.endpoint("10.244.1.5")], NODE)], node_info=NODE)


def _elements(plan: Plan) -> set[str]:
    (objs,) = render.render(plan, render.context(BackendConfig(), NODE)).values()
    return {str(e) for e in objs.elements if "RANGED" in e.set or "ALLOWED" in e.set}


@pytest.mark.parametrize("ranges", [("0.0.0.0/0",), ("0.0.0.0/0", "203.0.113.0/24")])
def test_a_zero_masked_range_allows_any_source(ranges: tuple[str, ...]) -> None:
    assert _elements(_lb(ranges)) == set()
    for src, origin in (("198.51.100.1", ex.Origin.EXTERNAL), (LB_IP, ex.Origin.NODE)):
        traced, model = _trace(_lb(ranges), src, LB_IP, 80, origin)
        assert traced.verdict is model.verdict is ex.Verdict.FORWARD


def test_a_zero_masked_range_of_the_other_family_restricts_nothing_more() -> None:
    assert _elements(_lb(("::/0", "203.0.113.0/24"))) == {
        f"KPY-IPVS-RANGED {LB_IP},tcp:80",
        f"KPY-IPVS-ALLOWED {LB_IP},tcp:80,203.0.113.0/24",
    }


def test_host_ranges_are_written_as_ipset_lists_them() -> None:
    assert _elements(_lb(("203.0.113.7/32", "192.168.50.2/32"))) == {
        f"KPY-IPVS-RANGED {LB_IP},tcp:80",
        f"KPY-IPVS-ALLOWED {LB_IP},tcp:80,203.0.113.7",
        f"KPY-IPVS-ALLOWED {LB_IP},tcp:80,192.168.50.2",
        f"KPY-IPVS-ALLOWED {LB_IP},tcp:80,{LB_IP}",  # the node is allowed: the LB IP too
    }
    for src, verdict in (("203.0.113.7", ex.Verdict.FORWARD), ("203.0.113.8", ex.Verdict.DROP)):
        traced, model = _trace(_lb(("203.0.113.7/32",)), src, LB_IP, 80, ex.Origin.EXTERNAL)
        assert traced.verdict is model.verdict is verdict


@pytest.mark.parametrize(
    ("bare", "prefixed"),
    [
        (f"{LB_IP},tcp:80,{LB_IP}", f"{LB_IP},tcp:80,{LB_IP}/32"),
        ("fd00:18::10,tcp:80,fd00:18::10", "fd00:18::10,tcp:80,fd00:18::10/128"),
    ],
)
def test_a_bare_host_network_is_sent_to_the_kernel_as_a_host_prefix(
    bare: str, prefixed: str
) -> None:
    name = render.set_name("ALLOWED", 6 if ":" in bare else 4)
    encoded = apply.encode_element(Element(set=name, value=bare))
    assert encoded == apply.encode_element(Element(set=name, value=prefixed))


def test_net_text() -> None:
    nets = ["10.0.0.1/32", "10.0.0.0/8", "fd00::1/128", "fd00::/64"]
    assert [render.net_text(ipaddress.ip_network(n)) for n in nets] == [
        "10.0.0.1",
        "10.0.0.0/8",
        "fd00::1",
        "fd00::/64",
    ]
