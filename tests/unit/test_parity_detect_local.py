"""Detecting local (pod) traffic as kube-proxy does: --detect-local-mode and its settings
in flags, environment and the configuration file (KubeProxyConfiguration's
``detectLocalMode`` and ``detectLocal``), validated; and what ``kpy explain`` says."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kpy.agent import config
from kpy.cli import main
from kpy.core import trace as ex
from kpy.core.backend import BackendConfig, LocalDetector
from kpy.testing import builders as b
from tests.unit.test_explain import EXAMPLES_AS_NODE_1


def test_file_keys_are_kube_proxys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "detectLocalMode: BridgeInterface\n"
        "detectLocal:\n  bridgeInterface: cni0\n  interfaceNamePrefix: veth\n"
    )
    c = config.resolve(f, {}, {})
    assert (c.detect_local_mode, c.pod_bridge_interface, c.pod_interface_name_prefix) == (
        "BridgeInterface",
        "cni0",
        "veth",
    )
    bc = c.backend_config()
    assert bc.local_detector(4) == LocalDetector("BridgeInterface", interface="cni0")
    # written back the same way, and read back equal
    written = yaml.safe_load(c.to_yaml())
    assert written["detectLocalMode"] == "BridgeInterface"
    assert written["detectLocal"] == {"bridgeInterface": "cni0", "interfaceNamePrefix": "veth"}
    f.write_text(c.to_yaml())
    assert config.resolve(f, {}, {}) == c


def test_flags_and_environment(tmp_path: Path) -> None:
    env = {"KPY_DETECT_LOCAL_MODE": "InterfaceNamePrefix", "KPY_POD_INTERFACE_NAME_PREFIX": "cali"}
    c = config.resolve(None, env, {})
    assert c.backend_config().local_detector(6) == LocalDetector(
        "InterfaceNamePrefix", interface="cali", prefix=True
    )
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "br0",
            "--write-config-to",
            "-",
        ],
        env={},
    )
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(result.output)
    assert written["detectLocalMode"] == "BridgeInterface"
    assert written["detectLocal"]["bridgeInterface"] == "br0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("detectLocalMode: PodCIDR", "not one of ClusterCIDR, NodeCIDR"),
        ("detectLocalMode: BridgeInterface", "pod-bridge-interface must be an interface name"),
        ("detectLocalMode: InterfaceNamePrefix", "pod-interface-name-prefix must be"),
        (
            'detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: "br0\\" x"}',
            "pod-bridge-interface must be",
        ),
        (
            "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: abcdefghijklmnop}",
            "pod-bridge-interface must be",
        ),
        ("detectLocal: {bridge: br0}", r"unknown field\(s\) detectLocal.bridge"),
        ("detectLocal: br0", "detectLocal: expected a mapping"),
        ("podBridgeInterface: br0", r"unknown field\(s\) podBridgeInterface"),
    ],
)
def test_bad_settings_are_explained(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(f, {}, {})


def test_a_bad_flag_is_refused_before_anything_runs() -> None:
    result = CliRunner().invoke(
        main, ["run", "--detect-local-mode", "BridgeInterface", "--write-config-to", "-"], env={}
    )
    assert result.exit_code == 2
    assert "pod-bridge-interface must be an interface name" in result.output


NODE = b.node(addresses=("192.168.50.2",), pod_cidrs=("10.244.1.0/24",))


@pytest.mark.parametrize(
    ("config_", "v4", "v6"),
    [
        (
            BackendConfig(cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),)),
            LocalDetector("ClusterCIDR", cidrs=(ipaddress.ip_network("10.244.0.0/16"),)),
            LocalDetector("ClusterCIDR"),  # no IPv6 cluster CIDR: no-op for IPv6
        ),
        (BackendConfig(), LocalDetector("ClusterCIDR"), LocalDetector("ClusterCIDR")),
        (
            BackendConfig(detect_local_mode="NodeCIDR").for_node(NODE),
            LocalDetector("NodeCIDR", cidrs=(ipaddress.ip_network("10.244.1.0/24"),)),
            LocalDetector("NodeCIDR"),
        ),
    ],
)
def test_detectors_per_family(config_: BackendConfig, v4: LocalDetector, v6: LocalDetector) -> None:
    assert (config_.local_detector(4), config_.local_detector(6)) == (v4, v6)
    assert not LocalDetector("ClusterCIDR").implemented


# --- kpy explain --------------------------------------------------------------------------


def _explain(*args: str) -> dict[str, object]:
    if "--cluster-cidr" not in args:
        args = ("--cluster-cidr", "10.244.0.0/16", *args)
    node_1 = EXAMPLES_AS_NODE_1[: EXAMPLES_AS_NODE_1.index("--cluster-cidr")]
    result = CliRunner().invoke(main, ["explain", *node_1, "-o", "json", *args])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def _cluster_ip() -> str:
    from tests.unit.test_explain import example_cluster_ip_target

    return example_cluster_ip_target()


@pytest.mark.parametrize("backend", [None, "nftables", "iptables", "ipvs"])
def test_explain_takes_the_detect_local_flags(backend: str | None) -> None:
    traced = ["--backend", backend] if backend else []
    target = _cluster_ip()
    bridge = ["--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cni0"]
    # a pod (on the bridge) is not masqueraded; the node (no input interface) is
    pod = _explain(*bridge, *traced, "--from", "10.244.1.7", "--to", target, "--origin", "pod")
    assert pod["masquerade"] is False
    node = _explain(*bridge, *traced, "--from", "192.168.100.11", "--to", target)
    assert node["masquerade"] is True
    assert "masquerade_not_from_pod_bridge" in node["reasons"]  # type: ignore[operator]
    for data in (pod, node):
        assert "trace_disagrees_with_model" not in data["reasons"]  # type: ignore[operator]
    # no cluster CIDR: no detector at all, nothing is masqueraded for being outside
    args = ["--cluster-cidr", "", *traced, "--from", "203.0.113.9", "--to", target]
    outside = _explain(*args, "--origin", "external")
    assert outside["masquerade"] is False
    assert "trace_disagrees_with_model" not in outside["reasons"]  # type: ignore[operator]


def test_explain_refuses_a_bridge_mode_without_a_bridge() -> None:
    result = CliRunner().invoke(
        main,
        ["explain", "--from", "10.244.1.7", "--to", "10.96.0.10:80", "--detect-local-mode",
         "BridgeInterface"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "pod-bridge-interface" in result.output


def test_input_interface_of_each_origin() -> None:
    bridge = BackendConfig(detect_local_mode="BridgeInterface", pod_bridge_interface="eth0")
    prefix = BackendConfig(detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="e")
    assert ex.input_interface(ex.Origin.NODE, bridge) == ""
    assert ex.input_interface(ex.Origin.POD, bridge) == "eth0"
    assert ex.input_interface(ex.Origin.EXTERNAL, bridge) == "uplink0"
    assert ex.input_interface(ex.Origin.POD, prefix) == "e0"
    assert ex.input_interface(ex.Origin.EXTERNAL, prefix) == "uplink0"
    assert ex.input_interface(ex.Origin.EXTERNAL, BackendConfig()) == "eth0"
