"""Configuration: file < environment < flags; unknown fields are rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpy.agent import config


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "mode: iptables\nclusterCIDR: [10.0.0.0/8]\nsyncPeriod: 30s\nminSyncPeriod: 500ms\n"
    )
    env = {"KPY_MODE": "ipvs", "KPY_MASQUERADE_ALL": "true"}
    c = config.resolve(f, env, {"hostname_override": "n1"})
    assert c.mode == "ipvs" and c.masquerade_all and c.hostname_override == "n1"
    assert c.cluster_cidr == ("10.0.0.0/8",) and c.sync_period == 30 and c.min_sync_period == 0.5
    assert config.resolve(f, env, {"mode": "nftables"}).mode == "nftables"


def test_unknown_field_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("mode: nftables\nclusterCidr: 10.0.0.0/8\n")
    with pytest.raises(config.ConfigError, match=r"unknown field.*clusterCidr"):
        config.resolve(f, {}, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clusterCIDR: [not-a-cidr]", "not a CIDR"),
        ("syncPeriod: soon", "not a duration"),
        ("masqueradeAll: maybe", "not a boolean"),
        ("- a list", "mapping"),
    ],
)
def test_bad_values_are_explained(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(f, {}, {})


def test_written_defaults_read_back(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(config.AgentConfig().to_yaml())
    assert config.resolve(f, {}, {}) == config.AgentConfig()
