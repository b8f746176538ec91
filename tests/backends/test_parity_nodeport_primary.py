"""nodePortAddresses ``primary`` (upstream's special value): NodePorts answer on the
node's primary IP of each family only — the first configured node IP of the family,
else the Node's first address — in every backend's rules, its traces and the model."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kpy_iptables import render as ipt_render
from kpy_iptables import trace as ipt
from kpy_ipvs import render as ipvs_render
from kpy_ipvs import trace as ipvs
from kpy_nftables import render as nft_render
from kpy_nftables import trace as nft

from kpy.agent import config
from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Plan
from kpy.testing import builders as b

NODE = b.node(addresses=("192.168.50.2", "10.0.0.2", "fd00:50::2", "fd00:60::2"))
TRACERS: dict[str, ex.Tracer] = {"nftables": nft.trace, "iptables": ipt.trace, "ipvs": ipvs.trace}
PRIMARY = ex.Options(cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),), nodeport_primary=True)


def _plan() -> Plan:
    svc = b.service(cluster_ip=("10.96.0.10", "fd00:96::10"), type="NodePort", node_port=30080)
    eps = [b.endpoint("10.244.1.5"), b.endpoint("fd00:244:1::5")]
    return b.plan([b.state(svc, eps, NODE)], node_info=NODE)


@pytest.mark.parametrize("backend", sorted(TRACERS))
@pytest.mark.parametrize(
    ("dst", "verdict"),
    [
        ("192.168.50.2", "forward"),  # the primary IPv4 address
        ("10.0.0.2", "accept"),  # another node address: not a NodePort
        ("fd00:50::2", "forward"),
        ("fd00:60::2", "accept"),
    ],
)
def test_nodeports_only_on_the_primary_ips(backend: str, dst: str, verdict: str) -> None:
    plan = _plan()
    src = "203.0.113.7" if ":" not in dst else "2001:db8::7"
    packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=30080)
    model = ex.explain(plan, packet, PRIMARY)
    config_ = ex.options_config("node-a", PRIMARY)
    traced = TRACERS[backend](plan, packet, model.origin, config_)
    assert str(model.verdict) == verdict
    assert ex.outcome(traced) == ex.outcome(model), traced.kernel


def test_a_configured_node_ip_is_the_primary() -> None:
    cfg = BackendConfig(nodeport_primary=True, node_ips=(ipaddress.ip_address("10.0.0.2"),))
    assert cfg.for_node(NODE).nodeport_addresses == (
        ipaddress.ip_network("10.0.0.2/32"),
        ipaddress.ip_network("fd00:50::2/128"),
    )


def test_rules_name_the_primary_ips() -> None:
    cfg = BackendConfig(nodeport_primary=True).for_node(NODE)
    base = nft_render.base_objects(cfg)
    services = base["ip chain services"]
    assert isinstance(services, nft_render.Chain)
    assert any("fib daddr type local ip daddr 192.168.50.2/32 " in r for r in services.rules)
    ctx = ipt_render.context(BackendConfig(nodeport_primary=True), NODE)
    rules = [k.rule for k in ipt_render.base(ctx, 4) if k.rule.endswith("KPY-NODEPORTS")]
    assert rules == ["-d 192.168.50.2/32 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"]
    ipvs_ctx = ipvs_render.context(BackendConfig(nodeport_primary=True), NODE)
    assert ipvs_ctx.nodeport_ips == (
        ipaddress.ip_address("192.168.50.2"),
        ipaddress.ip_address("fd00:50::2"),
    )


def test_before_the_node_is_known_nodeports_answer_nowhere() -> None:
    """Not every address: until the Node tells its addresses there is no primary IP."""
    services = nft_render.base_objects(BackendConfig(nodeport_primary=True))["ip chain services"]
    assert isinstance(services, nft_render.Chain)
    assert not [r for r in services.rules if "fib daddr type local" in r]


def test_configuration(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("nodePortAddresses: [primary]\n")
    bc = config.resolve(f, {}, {}).backend_config()
    assert (bc.nodeport_primary, bc.nodeport_addresses) == (True, ())
    bc = config.resolve(f, {}, {"node_ips": ("10.0.0.2",)}).backend_config()
    assert bc.nodeport_addresses == (ipaddress.ip_network("10.0.0.2/32"),)
    f.write_text("nodePortAddresses: [primary, 10.0.0.0/8]\n")
    with pytest.raises(config.ConfigError, match="can't use both 'primary' and CIDRs"):
        config.resolve(f, {}, {})
    result = CliRunner().invoke(
        main,
        ["run", "--nodeport-addresses", "primary,10.0.0.0/8", "--write-config-to", "-"],
        env={},
    )
    assert result.exit_code == 2 and "can't use both" in result.output


@pytest.mark.parametrize("backend", [None, "nftables", "iptables", "ipvs"])
def test_explain_takes_primary(backend: str | None) -> None:
    base = ["explain", "--manifests", "examples", "--node", "node-1", "-o", "json"]
    base += ["--node-ip", "192.168.100.11,192.168.7.7", "--nodeport-addresses", "primary"]
    base += ["--backend", backend] if backend else []
    for dst, verdict in (("192.168.100.11", "forward"), ("192.168.7.7", "accept")):
        result = CliRunner().invoke(
            main, [*base, "--from", "203.0.113.100", "--to", f"{dst}:30081"]
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["verdict"] == verdict
        assert "trace_disagrees_with_model" not in data["reasons"]


@pytest.mark.parametrize(
    ("cidrs", "primary", "v4", "v6"),
    [
        ((), False, None, None),  # every address of both families
        (("192.168.50.0/24",), False, ("192.168.50.0/24",), None),  # IPv6 everywhere
        (("fd00:50::/64",), False, None, ("fd00:50::/64",)),
        (("0.0.0.0/0", "192.168.50.0/24"), False, None, None),  # zero-masked: everywhere
        (("192.168.50.2/32",), True, ("192.168.50.2/32",), ()),  # primary: v6 has none yet
    ],
)
def test_nodeport_networks_per_family(
    cidrs: tuple[str, ...],
    primary: bool,
    v4: tuple[str, ...] | None,
    v6: tuple[str, ...] | None,
) -> None:
    """Upstream's NewNodePortAddresses: the CIDRs are taken per family, and a family
    without any (or with a zero-masked one) answers on every address."""
    config = BackendConfig(
        nodeport_addresses=tuple(ipaddress.ip_network(c) for c in cidrs), nodeport_primary=primary
    )

    def text(nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None) -> object:
        return None if nets is None else tuple(str(n) for n in nets)

    assert (text(config.nodeport_networks(4)), text(config.nodeport_networks(6))) == (v4, v6)
