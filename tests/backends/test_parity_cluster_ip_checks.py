"""nftables, as upstream's nftables mode: a new connection to an allocated ClusterIP on
a port/protocol no Service serves is rejected; one to an address of the service CIDRs
that no Service has is dropped. The iptables backend leaves both alone (upstream's
iptables mode). Render, traces, model, configuration and ``kpy explain``."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from kpy_iptables import trace as ipt
from kpy_nftables import render
from kpy_nftables import trace as nft

from kpy.agent import config
from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.core.model import Plan, Protocol
from kpy.testing import builders as b

NODE = b.node(addresses=("192.168.50.2",))
CIDRS = (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:96::/108"))


def _plan() -> Plan:
    http = b.service("web", cluster_ip=("10.96.0.10", "fd00:96::10"))
    dns = b.service("web", cluster_ip=("10.96.0.10", "fd00:96::10"), port=53, protocol="UDP",
                    port_name_="dns")  # fmt: skip
    eps = [b.endpoint("10.244.1.5"), b.endpoint("fd00:244:1::5")]
    return b.plan([b.state(http, eps, NODE), b.state(dns, eps, NODE)], node_info=NODE)


def test_the_check_chain_and_its_hooks() -> None:
    base = render.base_objects(BackendConfig(service_cidrs=CIDRS))
    check = base["ip chain cluster-ips-check"]
    assert isinstance(check, render.Chain)
    assert check.rules == ("ip daddr @cluster-ips reject", "ip daddr 10.96.0.0/12 drop")
    check6 = base["ip6 chain cluster-ips-check"]
    assert isinstance(check6, render.Chain)
    assert check6.rules == ("ip6 daddr @cluster-ips reject", "ip6 daddr fd00:96::/108 drop")
    forward = base["ip chain filter-forward"]
    assert isinstance(forward, render.Chain)
    assert forward.rules[-1] == "ct state new jump cluster-ips-check"
    post = base["ip chain filter-output-post-dnat"]
    assert isinstance(post, render.Chain)
    assert post.hook == "type filter hook output priority 0; policy accept;"
    assert post.rules == ("ct state new jump cluster-ips-check",)
    # without service CIDRs: unknown ports are still rejected, nothing is dropped
    bare = render.base_objects(BackendConfig())["ip chain cluster-ips-check"]
    assert isinstance(bare, render.Chain)
    assert bare.rules == ("ip daddr @cluster-ips reject",)


def test_every_port_of_a_service_wants_the_same_shared_element() -> None:
    plan = _plan()
    keys = [
        {k for k in render.port_objects(state, BackendConfig()) if " cluster-ips " in k}
        for state in plan.services.values()
    ]
    assert (
        keys[0]
        == keys[1]
        == {
            "ip element cluster-ips 10.96.0.10",
            "ip6 element cluster-ips fd00:96::10",
        }
    )
    objs = render.port_objects(next(iter(plan.services.values())), BackendConfig())
    for key in keys[0]:
        assert render.is_shared(objs[key])
        shared = render.shared_object(key)
        assert shared.key == key and shared.value == " # "


CASES = [
    # (source, destination, port, protocol, origin, nftables verdict, reason)
    ("10.244.1.7", "10.96.0.10", 81, "TCP", "pod", "reject", "cluster_ip_port_not_served"),
    ("10.244.1.7", "10.96.0.10", 80, "UDP", "pod", "reject", "cluster_ip_port_not_served"),
    ("192.168.50.2", "10.96.0.10", 81, "TCP", "node", "reject", "cluster_ip_port_not_served"),
    ("203.0.113.7", "10.96.0.10", 81, "TCP", "external", "reject", "cluster_ip_port_not_served"),
    ("10.244.1.7", "10.96.0.99", 80, "TCP", "pod", "drop", "unallocated_service_ip"),
    ("192.168.50.2", "10.96.0.99", 80, "TCP", "node", "drop", "unallocated_service_ip"),
    ("fd00:244:1::7", "fd00:96::99", 80, "TCP", "pod", "drop", "unallocated_service_ip"),
    ("fd00:244:1::7", "fd00:96::10", 81, "TCP", "pod", "reject", "cluster_ip_port_not_served"),
    ("10.244.1.7", "10.97.0.1", 80, "TCP", "pod", "drop", "unallocated_service_ip"),
    ("10.244.1.7", "10.112.0.1", 80, "TCP", "pod", "accept", "no_service"),  # outside
    ("10.244.1.7", "10.96.0.10", 80, "TCP", "pod", "forward", "cluster_ip"),  # served
    ("10.244.1.7", "10.96.0.10", 53, "UDP", "pod", "forward", "cluster_ip"),
]


@pytest.mark.parametrize("row", CASES, ids=[f"{r[1]}:{r[2]}/{r[3]}-{r[4]}" for r in CASES])
def test_traced_and_modelled(row: tuple[str, str, int, str, str, str, str]) -> None:
    src, dst, port, proto, origin, verdict, reason = row
    plan = _plan()
    packet = ex.Packet(
        src=ipaddress.ip_address(src),
        dst=ipaddress.ip_address(dst),
        port=port,
        protocol=Protocol(proto),
        origin=ex.Origin(origin),
    )
    for tracer, checks in ((nft.trace, True), (ipt.trace, False)):
        options = ex.Options(service_cidrs=CIDRS, clusterip_checks=checks)
        model = ex.explain(plan, packet, options)
        traced = tracer(plan, packet, model.origin, ex.options_config(NODE.name, options))
        assert ex.outcome(traced) == ex.outcome(model), traced.kernel
        if checks:
            assert str(model.verdict) == verdict
            assert reason in model.reasons
        elif verdict in ("reject", "drop"):
            assert model.verdict is ex.Verdict.ACCEPT  # iptables: not touched


def test_configuration(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("serviceCIDRs: [10.96.0.0/12, 'fd00:96::/108']\n")
    c = config.resolve(f, {}, {})
    assert c.backend_config().service_cidrs == CIDRS
    assert yaml.safe_load(c.to_yaml())["serviceCIDRs"] == ["10.96.0.0/12", "fd00:96::/108"]
    assert config.resolve(None, {"KPY_SERVICE_CIDRS": "10.96.0.0/12"}, {}).service_cidrs == (
        "10.96.0.0/12",
    )
    f.write_text("serviceCIDRs: [nope]\n")
    with pytest.raises(config.ConfigError, match="serviceCIDRs: 'nope' is not a CIDR"):
        config.resolve(f, {}, {})
    result = CliRunner().invoke(
        main,
        ["run", "--service-cidr", "10.96.0.0/12", "--service-cidr", "fd00:96::/108",
         "--write-config-to", "-"],
        env={},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["serviceCIDRs"] == ["10.96.0.0/12", "fd00:96::/108"]


def _explain(*args: str) -> dict[str, object]:
    base = ["explain", "--manifests", "examples", "--node", "node-1", "-o", "json"]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    assert "trace_disagrees_with_model" not in data["reasons"]  # type: ignore[operator]
    return data


def test_explain() -> None:
    from tests.unit.test_explain import example_cluster_ip_target

    served = example_cluster_ip_target()
    vip = served.split(":")[0]
    unserved = ["--from", "10.244.1.7", "--to", f"{vip}:1"]
    assert _explain(*unserved)["verdict"] == "reject"  # kpy's default backend: nftables
    assert _explain(*unserved, "--backend", "nftables")["verdict"] == "reject"
    assert _explain(*unserved, "--backend", "iptables")["verdict"] == "accept"
    unallocated = ["--from", "10.244.1.7", "--to", "10.96.0.250:80", "--service-cidr",
                   "10.96.0.0/12"]  # fmt: skip
    assert _explain(*unallocated, "--backend", "nftables")["verdict"] == "drop"
    assert _explain(*unallocated, "--backend", "iptables")["verdict"] == "accept"


def test_explain_with_a_service_cidr_object_in_the_manifests(tmp_path: Path) -> None:
    """A ServiceCIDR object in the manifests counts as --service-cidr does: the model and
    the nftables trace agree on the drop; iptables leaves the address alone."""
    import shutil

    shutil.copytree("examples", tmp_path / "m")
    (tmp_path / "m" / "servicecidr.yaml").write_text(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\n"
        "metadata: {name: extra}\nspec: {cidrs: [10.200.0.0/24]}\n"
    )
    unallocated = ["--manifests", str(tmp_path / "m"), "--from", "10.244.1.7",
                   "--to", "10.200.0.9:80"]  # fmt: skip
    assert _explain(*unallocated)["verdict"] == "drop"
    assert _explain(*unallocated, "--backend", "nftables")["verdict"] == "drop"
    assert _explain(*unallocated, "--backend", "iptables")["verdict"] == "accept"
    outside = ["--manifests", str(tmp_path / "m"), "--from", "10.244.1.7",
               "--to", "10.201.0.9:80"]  # fmt: skip
    assert _explain(*outside, "--backend", "nftables")["verdict"] == "accept"
