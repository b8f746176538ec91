"""List-valued flags: repeated and comma-separated forms merge, in every command; a
single-valued flag given twice is an error, never a silently dropped value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kpy.agent import config
from kpy.cli import main
from kpy.core.backend import split_values


def _written(*flags: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["run", *flags, "--write-config-to", "-"], env={})
    assert result.exit_code == 0, result.output
    data: dict[str, object] = yaml.safe_load(result.output)
    return data


def test_run_merges_repeated_and_comma_separated_values() -> None:
    data = _written(
        "--node-ip", "10.0.0.1", "--node-ip", "10.0.0.2,fd00::1",
        "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:244::/48,10.245.0.0/16",
        "--nodeport-addresses", "192.168.0.0/16", "--nodeport-addresses", "10.0.0.0/8,fd00::/64",
    )  # fmt: skip
    assert data["nodeIPs"] == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    assert data["clusterCIDR"] == ["10.244.0.0/16", "fd00:244::/48", "10.245.0.0/16"]
    assert data["nodePortAddresses"] == ["192.168.0.0/16", "10.0.0.0/8", "fd00::/64"]


def test_a_value_given_twice_is_kept_once() -> None:
    assert _written("--node-ip", "10.0.0.1,10.0.0.1", "--node-ip", "10.0.0.1")["nodeIPs"] == [
        "10.0.0.1"
    ]


def test_an_empty_value_means_none() -> None:
    assert _written("--cluster-cidr", "")["clusterCIDR"] == []


def test_the_file_and_the_environment_take_both_forms(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("nodePortAddresses: ['10.0.0.0/8,192.168.0.0/16', fd00::/64]\nnodeIPs: 10.0.0.1\n")
    c = config.resolve(f, {"KPY_CLUSTER_CIDR": "10.1.0.0/16, fd00:1::/48"}, {})
    assert c.node_port_addresses == ("10.0.0.0/8", "192.168.0.0/16", "fd00::/64")
    assert c.node_ips == ("10.0.0.1",)
    assert c.cluster_cidr == ("10.1.0.0/16", "fd00:1::/48")


def test_split_values() -> None:
    assert split_values(["a,b", " c , ,a", ""]) == ("a", "b", "c")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--backend", "nftables", "--backend", "iptables"],
        ["run", "--backend", "nftables", "--mode", "iptables"],
        ["run", "--sync-period=30s", "--sync-period", "60s"],
        ["explain", "--from", "10.0.0.1", "--from", "10.0.0.2", "--to", "10.96.0.10:80"],
        ["plan", "--node", "a", "--node", "b"],
    ],
)
def test_a_single_valued_flag_given_twice_is_refused(argv: list[str]) -> None:
    result = CliRunner().invoke(
        main, [*argv, "--write-config-to", "-"] if argv[0] == "run" else argv, env={}
    )
    assert result.exit_code == 2, result.output
    assert "given more than once" in result.output


def _explain(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(
        main,
        ["explain", "--manifests", "examples", "--node", "node-1", "-o", "json", *args],
    )
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def test_explain_keeps_every_nodeport_address() -> None:
    """web-lb's NodePort 30081 on node-1 (192.168.100.11): the first CIDR holds it."""
    to = ["--from", "203.0.113.100", "--to", "192.168.100.11:30081"]
    both = ["--nodeport-addresses", "192.168.100.0/24", "--nodeport-addresses", "10.0.0.0/8"]
    assert _explain(*both, *to)["verdict"] == "forward"
    assert _explain("--nodeport-addresses", "10.0.0.0/8,192.168.100.0/24", *to)["verdict"] == (
        "forward"
    )
    assert _explain("--nodeport-addresses", "10.0.0.0/8", *to)["verdict"] == "accept"


def test_explain_takes_several_node_ips() -> None:
    to = ["--from", "203.0.113.100", "--to", "192.168.7.7:30081"]
    assert _explain("--node-ip", "192.168.100.11,192.168.7.7", *to)["verdict"] == "forward"
    assert (
        _explain("--node-ip", "192.168.100.11", "--node-ip", "192.168.7.7", *to)["verdict"]
        == "forward"
    )


def test_offline_commands_merge_cluster_cidrs() -> None:
    result = CliRunner().invoke(
        main,
        ["plan", "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:244::/48", "-o", "json",
         "--backend", "nftables"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    transaction = json.loads(result.output)["transaction"]
    assert "10.244.0.0/16" in transaction and "fd00:244::/48" in transaction
