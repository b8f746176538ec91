"""LoadBalancer source ranges and the LB's own address (kube-proxy parity).

When a range of ``loadBalancerSourceRanges`` holds the node's primary IP, upstream's
firewall rules also accept the Service's own load-balancer IPs as a source: the node
reaching a VIP bound locally (its source is then the VIP), or a load balancer that
SNATs hairpin traffic to its IP. Each backend's rendered rules, traced, agree with the
model; the rules carry the LB IP as an allowed source only under that condition.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from click.testing import CliRunner
from kpy_iptables import render as ipt_render
from kpy_iptables import trace as ipt
from kpy_ipvs import render as ipvs_render
from kpy_ipvs import trace as ipvs
from kpy_nftables import render as nft_render
from kpy_nftables import trace as nft

from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Plan
from kpy.testing import builders as b
from tests.unit.test_explain import EXAMPLES_AS_NODE_1

NODE = b.node(addresses=("192.168.50.2", "fd00:50::2"))
CIDRS = (ipaddress.ip_network("10.244.0.0/16"),)
LB_IP = "172.18.0.10"
TRACERS: dict[str, ex.Tracer] = {"nftables": nft.trace, "iptables": ipt.trace, "ipvs": ipvs.trace}


def _plan(ranges: tuple[str, ...], endpoints: bool = True) -> Plan:
    svc = b.service(
        "lb",
        type="LoadBalancer",
        node_port=30080,
        lb_ips=(LB_IP,),
        source_ranges=ranges,
    )
    eps = [b.endpoint("10.244.1.5")] if endpoints else []
    return b.plan([b.state(svc, eps, NODE)], node_info=NODE)


def _run(
    tracer: ex.Tracer, plan: Plan, src: str, origin: ex.Origin
) -> tuple[ex.Trace, ex.Explanation]:
    packet = ex.Packet(
        src=ipaddress.ip_address(src),
        dst=ipaddress.ip_address(LB_IP),
        port=80,
        origin=origin,
    )
    options = ex.Options(cluster_cidrs=CIDRS)
    model = ex.explain(plan, packet, options)
    traced = tracer(plan, packet, origin, ex.options_config(NODE.name, options))
    return traced, model


ROWS = [
    # (ranges, source, origin, verdict, model reason)
    (("192.168.50.0/24",), LB_IP, "node", "forward", "source_is_load_balancer_ip"),
    (("192.168.50.0/24",), LB_IP, "external", "forward", "source_is_load_balancer_ip"),
    (("192.168.50.0/24",), "192.168.50.7", "external", "forward", "source_range_allowed"),
    (("192.168.50.0/24",), "203.0.113.7", "external", "drop", "source_range_denied"),
    # no range holds the node's primary IP: the LB IP is a source like any other
    (("198.51.100.0/24",), LB_IP, "node", "drop", "source_range_denied"),
    (("198.51.100.0/24",), LB_IP, "external", "drop", "source_range_denied"),
    # a range that already holds the LB IP
    (("172.18.0.0/16", "192.168.50.2/32"), LB_IP, "external", "forward", "source_range_allowed"),
]


@pytest.mark.parametrize("backend", sorted(TRACERS))
@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0][0]}-{r[1]}-{r[2]}" for r in ROWS])
def test_lb_ip_as_source_traced_as_modelled(
    backend: str, row: tuple[tuple[str, ...], str, str, str, str]
) -> None:
    ranges, src, origin, verdict, reason = row
    traced, model = _run(TRACERS[backend], _plan(ranges), src, ex.Origin(origin))
    assert str(model.verdict) == verdict, model.reasons
    assert reason in model.reasons
    assert ex.outcome(traced) == ex.outcome(model), traced.kernel


@pytest.mark.parametrize("backend", sorted(TRACERS))
def test_lb_ip_as_source_without_endpoints_is_rejected_not_dropped(backend: str) -> None:
    traced, model = _run(
        TRACERS[backend], _plan(("192.168.50.0/24",), endpoints=False), LB_IP, ex.Origin.EXTERNAL
    )
    assert model.verdict is ex.Verdict.REJECT
    assert traced.verdict is model.verdict, traced.kernel


def test_nftables_firewall_chain_lists_the_lb_ip_only_when_the_node_is_allowed() -> None:
    config = BackendConfig(node_name=NODE.name)
    allowed = nft.objects(_plan(("192.168.50.0/24",)), config)
    denied = nft.objects(_plan(("198.51.100.0/24",)), config)

    def rules(objs: dict[str, nft_render.Obj]) -> tuple[str, ...]:
        (chain,) = [
            o for k, o in objs.items() if " chain firewall-" in k and "firewall-check" not in k
        ]
        assert isinstance(chain, nft_render.Chain)
        return chain.rules

    assert rules(allowed) == ("ip saddr != { 172.18.0.10/32, 192.168.50.0/24 } drop",)
    assert rules(denied) == ("ip saddr != 198.51.100.0/24 drop",)


def test_iptables_firewall_chain_jumps_for_the_lb_ip_only_when_the_node_is_allowed() -> None:
    def fw(ranges: tuple[str, ...]) -> tuple[str, ...]:
        ctx = ipt_render.context(BackendConfig(), NODE)
        objs = ipt_render.render(_plan(ranges), ctx)
        (rules,) = [r for o in objs.values() for k, r in o.items() if k.chain.startswith("KPY-FW-")]
        return rules

    allowed = fw(("192.168.50.0/24",))
    assert [r.split(" -j ")[0] for r in allowed] == ["-s 192.168.50.0/24", "-s 172.18.0.10/32"]
    assert [r.split(" -j ")[0] for r in fw(("198.51.100.0/24",))] == ["-s 198.51.100.0/24"]


def test_ipvs_allowed_set_holds_the_lb_ip_only_when_the_node_is_allowed() -> None:
    def allowed(ranges: tuple[str, ...]) -> set[str]:
        plan = _plan(ranges)
        ctx = ipvs_render.context(BackendConfig(), NODE)
        (objs,) = ipvs_render.render(plan, ctx).values()
        return {e.value for e in objs.elements if "ALLOWED" in e.set}

    assert allowed(("192.168.50.0/24",)) == {
        "172.18.0.10,tcp:80,192.168.50.0/24",
        "172.18.0.10,tcp:80,172.18.0.10",  # a host network as ipset writes it back
    }
    assert allowed(("198.51.100.0/24",)) == {"172.18.0.10,tcp:80,198.51.100.0/24"}


@pytest.mark.parametrize(
    ("node_ips", "expected"),
    [((), "192.168.50.2"), (("10.0.0.9", "192.168.50.2"), "10.0.0.9")],
)
def test_the_primary_ip_is_the_first_configured_else_the_nodes(
    node_ips: tuple[str, ...], expected: str
) -> None:
    config = BackendConfig(node_ips=tuple(ipaddress.ip_address(i) for i in node_ips))
    assert str(config.for_node(NODE).primary_ip(4)) == expected
    assert str(config.for_node(NODE).primary_ip(6)) == "fd00:50::2"


@pytest.mark.parametrize("backend", ["nftables", "iptables", "ipvs"])
def test_explain_cli_reports_the_lb_ip_source(backend: str) -> None:
    """examples/: web-lb (172.18.0.50) is open to 192.168.100.0/24, which holds node-1."""
    args = [*EXAMPLES_AS_NODE_1, "--backend", backend, "-o", "json"]
    result = CliRunner().invoke(
        main,
        ["explain", *args, "--from", "172.18.0.50", "--to", "172.18.0.50:80", "--origin", "node"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "forward"
    assert "source_is_load_balancer_ip" in data["reasons"]
    assert "trace_disagrees_with_model" not in data["reasons"]
    denied = CliRunner().invoke(
        main, ["explain", *args, "--from", "203.0.113.100", "--to", "172.18.0.50:80"]
    )
    assert json.loads(denied.output)["verdict"] == "drop"


@pytest.mark.parametrize("backend", sorted(TRACERS))
@pytest.mark.parametrize(
    "ranges", [("fd00:99::/64",), ("0.0.0.0/0",), ("0.0.0.0/0", "192.168.50.0/24")]
)
def test_no_firewall_for_a_family_without_ranges_or_with_a_zero_masked_one(
    backend: str, ranges: tuple[str, ...]
) -> None:
    """Upstream takes loadBalancerSourceRanges per IP family: an IPv4 LB IP whose ranges
    are all IPv6 has no firewall, and a zero-masked range means "allow any"."""
    plan = _plan(ranges)
    assert not next(iter(plan.services.values())).service.firewalled(4)
    traced, model = _run(TRACERS[backend], plan, "203.0.113.7", ex.Origin.EXTERNAL)
    assert model.verdict is ex.Verdict.FORWARD, model.reasons
    assert "source_range_denied" not in model.reasons
    assert traced.verdict is model.verdict, traced.kernel


def test_firewalled_per_family() -> None:
    svc = b.service("lb", type="LoadBalancer", lb_ips=(LB_IP,), source_ranges=("10.0.0.0/8",))
    assert svc.firewalled(4) and not svc.firewalled(6)
    assert not b.service("x", source_ranges=()).firewalled(4)
