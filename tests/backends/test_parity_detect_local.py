"""--detect-local-mode through every backend's rendered rules: the traces agree with
the model over every mode, Service kind and packet origin, and the rules carry the
match upstream's LocalTrafficDetector would (``-s``/``saddr``, ``-i``/``iifname``)."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from kpy_iptables import trace as ipt
from kpy_ipvs import trace as ipvs
from kpy_nftables import render as nft_render
from kpy_nftables import trace as nft

from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Endpoint
from kpy.testing import builders as b

NODE = b.node(addresses=("192.168.50.2", "fd00:50::2"), pod_cidrs=("10.244.1.0/24",))
CIDR = (ipaddress.ip_network("10.244.0.0/16"),)
LOCAL = b.endpoint("10.244.1.5")
REMOTE = b.endpoint("10.244.2.5", node="node-b")
TRACERS: dict[str, ex.Tracer] = {"nftables": nft.trace, "iptables": ipt.trace, "ipvs": ipvs.trace}

MODES: dict[str, ex.Options] = {
    "cluster-cidr": ex.Options(cluster_cidrs=CIDR),
    "no-cluster-cidr": ex.Options(),
    "node-cidr": ex.Options(cluster_cidrs=CIDR, detect_local_mode="NodeCIDR"),
    "bridge": ex.Options(detect_local_mode="BridgeInterface", pod_bridge_interface="cni0"),
    "prefix": ex.Options(detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="cali"),
}
SERVICES: dict[str, tuple[dict[str, Any], tuple[Endpoint, ...]]] = {
    "cluster-ip": ({}, (LOCAL, REMOTE)),
    "nodeport-local": (dict(type="NodePort", node_port=30080, etp_local=True), (LOCAL, REMOTE)),
    "nodeport-local-remote-only": (
        dict(type="NodePort", node_port=30080, etp_local=True),
        (REMOTE,),
    ),
    "lb-local": (
        dict(type="LoadBalancer", node_port=30080, lb_ips=("172.18.0.10",), etp_local=True),
        (LOCAL, REMOTE),
    ),
}
SOURCES = [
    ("10.244.1.7", "pod"),  # a pod on this node
    ("10.244.2.9", "pod"),  # a pod of another node, routed here
    ("192.168.50.2", "node"),
    ("203.0.113.7", "external"),
]
DESTINATIONS = [("10.96.0.10", 80), ("192.168.50.2", 30080), ("172.18.0.10", 80)]


@pytest.mark.parametrize("backend", sorted(TRACERS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_traces_agree_with_the_model(backend: str, mode: str) -> None:
    options = MODES[mode]
    config = ex.options_config(NODE.name, options)
    checked = 0
    for (svc_id, (svc, eps)), (src, origin), (dst, port) in itertools.product(
        SERVICES.items(), SOURCES, DESTINATIONS
    ):
        plan = b.plan([b.state(b.service(**svc), eps, NODE)], node_info=NODE)
        packet = ex.Packet(
            src=ipaddress.ip_address(src),
            dst=ipaddress.ip_address(dst),
            port=port,
            origin=ex.Origin(origin),
        )
        model = ex.explain(plan, packet, options)
        traced = TRACERS[backend](plan, packet, model.origin, config)
        got = (traced.verdict, traced.endpoints, traced.masquerade)
        want = (model.verdict, model.endpoints, model.masquerade)
        assert got == want, (svc_id, src, origin, dst, model.reasons, traced.kernel)
        checked += 1
    assert checked == 48


@pytest.mark.parametrize(
    ("mode", "src", "origin", "masquerade", "short_circuit"),
    [
        ("cluster-cidr", "10.244.2.9", "pod", False, True),  # any pod of the cluster
        ("node-cidr", "10.244.2.9", "pod", True, False),  # only this node's pod CIDR
        ("node-cidr", "10.244.1.7", "pod", False, True),
        ("no-cluster-cidr", "203.0.113.7", "external", False, False),  # no-op detector
        ("no-cluster-cidr", "10.244.1.7", "pod", False, False),
        ("bridge", "10.244.1.7", "pod", False, True),
        ("bridge", "203.0.113.7", "external", True, False),
        ("bridge", "192.168.50.2", "node", True, False),
        ("prefix", "10.244.2.9", "pod", False, True),  # by interface, whatever the address
    ],
)
def test_the_model_follows_the_detector(
    mode: str, src: str, origin: str, masquerade: bool, short_circuit: bool
) -> None:
    options = MODES[mode]
    plan = b.plan([b.state(b.service(), (LOCAL, REMOTE), NODE)], node_info=NODE)

    def packet(dst: str, port: int) -> ex.Packet:
        return ex.Packet(
            src=ipaddress.ip_address(src),
            dst=ipaddress.ip_address(dst),
            port=port,
            origin=ex.Origin(origin),
        )

    assert ex.explain(plan, packet("10.96.0.10", 80), options).masquerade is masquerade
    svc, eps = SERVICES["nodeport-local-remote-only"]
    plan = b.plan([b.state(b.service(**svc), eps, NODE)], node_info=NODE)
    model = ex.explain(plan, packet("192.168.50.2", 30080), options)
    assert ("pod_to_external_short_circuit" in model.reasons) is short_circuit


@pytest.mark.parametrize(
    ("mode", "masq", "local"),
    [
        ("cluster-cidr", "ip saddr != 10.244.0.0/16", "ip saddr 10.244.0.0/16"),
        ("node-cidr", "ip saddr != 10.244.1.0/24", "ip saddr 10.244.1.0/24"),
        ("bridge", 'iifname != "cni0"', 'iifname "cni0"'),
        ("prefix", 'iifname != "cali*"', 'iifname "cali*"'),
        ("no-cluster-cidr", None, None),
    ],
)
def test_nftables_rules_carry_upstreams_matches(
    mode: str, masq: str | None, local: str | None
) -> None:
    svc, eps = SERVICES["nodeport-local"]
    plan = b.plan([b.state(b.service(**svc), eps, NODE)], node_info=NODE)
    objs = nft.objects(plan, ex.options_config(NODE.name, MODES[mode]))
    chains = {
        o.name.split("-")[0]: o.rules
        for o in objs.values()
        if isinstance(o, nft_render.Chain) and o.family == "ip" and o.table != nft_render.TABLE
        and o.name.startswith(("service-", "external-"))
    }  # fmt: skip
    masq_rules = [r for r in chains["service"] if "meta mark set" in r]
    short = [r for r in chains["external"] if r.endswith(f"goto {_service_chain(chains)}")]
    if masq is None:
        assert masq_rules == []
        assert [r for r in short if not r.startswith("fib ")] == []
    else:
        assert len(masq_rules) == 1 and f" {masq} meta mark set" in masq_rules[0]
        assert short[0] == f"{local} goto {_service_chain(chains)}"


def _service_chain(chains: Mapping[str, tuple[str, ...]]) -> str:
    name = nft_render.service_chain(b.port_name())
    return name


def test_a_bad_interface_never_reaches_rule_text() -> None:
    for bad in ('br0" drop', "br 0", "x" * 16, "", "br*", "eth+"):
        with pytest.raises(ValueError, match="interface name"):
            BackendConfig(detect_local_mode="BridgeInterface", pod_bridge_interface=bad)
