"""Localhost NodePorts (iptables backend, upstream's iptables.localhostNodePorts):
NodePorts on 127.0.0.1 for IPv4, masqueraded, with upstream's martian-packet guard;
never on ::1; off with --no-iptables-localhost-nodeports. Render, trace, model,
configuration and ``kpy explain``."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from kpy_iptables import render
from kpy_iptables import trace as ipt

from kpy.agent import config
from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.testing import builders as b

NODE = b.node(addresses=("192.168.50.2", "fd00:50::2"))
GUARD = (
    '! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet '
    'connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP'
)


def _base(family: int, **cfg: object) -> dict[render.Key, render.Rules]:
    return render.base(render.context(BackendConfig(**cfg), NODE), family)  # type: ignore[arg-type]


def _dispatch(objs: dict[render.Key, render.Rules]) -> list[str]:
    return [k.rule for k in objs if k.chain == render.SERVICES and k.rule]


def test_on_with_the_guard() -> None:
    """On by default in `kpy run` (AgentConfig); a bare BackendConfig has it off."""
    assert BackendConfig().localhost_nodeports is False
    v4 = _base(4, localhost_nodeports=True)
    assert _dispatch(v4) == ["-m addrtype --dst-type LOCAL -j KPY-NODEPORTS"]
    assert v4[render.Key(4, "filter", "KPY-FIREWALL")] == (GUARD,)
    jumps = sorted(k.chain for k in v4 if k.rule.endswith("-j KPY-FIREWALL"))
    assert jumps == ["INPUT", "OUTPUT"]
    assert render.owned("KPY-FIREWALL")  # kpy's: read back, cleaned up
    v6 = _base(6, localhost_nodeports=True)
    assert _dispatch(v6) == ["! -d ::1/128 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"]
    assert not [k for k in v6 if "FIREWALL" in k.chain or "FIREWALL" in k.rule]


def test_off() -> None:
    v4 = _base(4, localhost_nodeports=False)
    assert _dispatch(v4) == ["! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"]
    assert not [k for k in v4 if "FIREWALL" in k.chain or "FIREWALL" in k.rule]


@pytest.mark.parametrize(
    ("cidrs", "on", "rules", "guard"),
    [
        (["192.168.50.0/24"], True, ["-d 192.168.50.0/24"], False),  # no loopback in them
        (["127.0.0.0/8", "192.168.50.0/24"], True, ["-d 127.0.0.0/8", "-d 192.168.50.0/24"], True),
        (["127.0.0.0/8", "192.168.50.0/24"], False, ["-d 192.168.50.0/24"], False),
        (["64.0.0.0/2"], False, ["-d 64.0.0.0/3", "-d 96.0.0.0/4", "-d 112.0.0.0/5",
                                  "-d 120.0.0.0/6", "-d 124.0.0.0/7", "-d 126.0.0.0/8"], False),
    ],
)  # fmt: skip
def test_with_nodeport_addresses(cidrs: list[str], on: bool, rules: list[str], guard: bool) -> None:
    nets = tuple(ipaddress.ip_network(c) for c in cidrs)
    v4 = _base(4, nodeport_addresses=nets, localhost_nodeports=on)
    suffix = " -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    assert sorted(_dispatch(v4)) == sorted(r + suffix for r in rules)
    assert (render.Key(4, "filter", "KPY-FIREWALL") in v4) is guard


def _trace(dst: str, port: int, on: bool, origin: ex.Origin = ex.Origin.NODE) -> ex.Trace:
    svc = b.service(type="NodePort", node_port=30080, cluster_ip=("10.96.0.10", "fd00:96::10"))
    plan = b.plan(
        [
            b.state(
                svc,
                [
                    b.endpoint("10.244.2.5", node="node-b"),
                    b.endpoint("fd00:244:2::5", node="node-b"),
                ],
                NODE,
            )
        ],
        node_info=NODE,
    )
    options = ex.Options(localhost_nodeports=on)
    src = "::1" if ":" in dst else "127.0.0.1"
    packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
    model = ex.explain(plan, packet, options)
    traced = ipt.trace(plan, packet, origin, ex.options_config(NODE.name, options))
    assert ex.outcome(traced) == ex.outcome(model), traced.kernel
    return traced


def test_traced_and_modelled() -> None:
    on = _trace("127.0.0.1", 30080, True)
    assert (on.verdict, on.masquerade) == (ex.Verdict.FORWARD, True)
    assert _trace("127.0.0.1", 30080, False).verdict is ex.Verdict.ACCEPT
    assert _trace("::1", 30080, True).verdict is ex.Verdict.ACCEPT


def test_configuration(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("iptables:\n  localhostNodePorts: false\n")
    c = config.resolve(f, {}, {})
    assert c.iptables_localhost_nodeports is False
    assert c.backend_config().localhost_nodeports is False
    assert yaml.safe_load(c.to_yaml())["iptables"] == {"localhostNodePorts": False}
    assert config.resolve(None, {}, {}).backend_config().localhost_nodeports is True
    env = {"KPY_IPTABLES_LOCALHOST_NODEPORTS": "false"}
    assert config.resolve(None, env, {}).iptables_localhost_nodeports is False
    f.write_text("iptables:\n  masqueradeBit: 14\n")
    with pytest.raises(config.ConfigError, match=r"unknown field\(s\) iptables.masqueradeBit"):
        config.resolve(f, {}, {})
    for flag, value in (
        ("--no-iptables-localhost-nodeports", False),
        ("--iptables-localhost-nodeports", True),
    ):
        result = CliRunner().invoke(main, ["run", flag, "--write-config-to", "-"], env={})
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(result.output)["iptables"]["localhostNodePorts"] is value


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        (["--backend", "iptables"], "forward"),  # on by default where it is programmed
        (["--backend", "iptables", "--no-iptables-localhost-nodeports"], "accept"),
        ([], "accept"),  # the model alone: not unless asked for
        (["--iptables-localhost-nodeports"], "forward"),
        (["--backend", "nftables"], "accept"),
    ],
)
def test_explain(args: list[str], verdict: str) -> None:
    base = ["explain", "--manifests", "examples", "--node", "node-1", "-o", "json"]
    result = CliRunner().invoke(
        main, [*base, *args, "--from", "127.0.0.1", "--to", "127.0.0.1:30081"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == verdict
    assert "trace_disagrees_with_model" not in data["reasons"]
    if verdict == "forward":
        assert data["masquerade"] is True
