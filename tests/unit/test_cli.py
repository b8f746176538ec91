"""The command line over the shipped examples, offline."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kpy.cli import main

MANIFESTS = """
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints:
  - {addresses: [10.244.1.5], nodeName: node-a}
  - addresses: [10.244.2.5]
    nodeName: node-b
    conditions: {ready: false, serving: true, terminating: true}
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: default}
  spec: {clusterIP: None, ports: [{port: 5432}]}
- apiVersion: v1
  kind: Service
  metadata: {name: cname, namespace: default}
  spec: {type: ExternalName, externalName: example.com}
"""


def test_dump_json_shows_every_kind(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(MANIFESTS)
    result = CliRunner().invoke(main, ["dump", "--manifests", str(tmp_path), "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = {r["service"]: r for r in json.loads(result.output)["services"]}
    web = rows["default/web:http/TCP"]
    assert web["frontends"] == ["*:30080/TCP", "10.96.0.10:80/TCP"]
    assert [e["address"] for e in web["endpoints"]] == ["10.244.1.5:8080", "10.244.2.5:8080"]
    assert web["endpoints"][1]["conditions"] == ["serving", "terminating"]
    assert rows["default/db/TCP"]["type"] == "Headless"
    assert rows["default/cname/TCP"]["externalName"] == "example.com"


def test_dump_table_and_plan(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(MANIFESTS)
    table = CliRunner().invoke(main, ["dump", "--manifests", str(tmp_path)])
    assert table.exit_code == 0 and "example.com (CNAME)" in table.output
    plan = CliRunner().invoke(main, ["plan", "--manifests", str(tmp_path), "-o", "json"])
    assert plan.exit_code == 0
    assert json.loads(plan.output)["services"] == 3


def test_run_rejects_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("nodePortAddreses: []\n")
    result = CliRunner().invoke(main, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown field(s) nodePortAddreses" in result.output


def test_write_config_to_stdout() -> None:
    result = CliRunner().invoke(main, ["run", "--write-config-to", "-", "--backend", "iptables"])
    assert result.exit_code == 0 and "mode: iptables" in result.output


def test_unknown_backend_is_a_clear_error() -> None:
    result = CliRunner().invoke(
        main, ["run", "--backend", "nope", "--write-config-to", "/dev/null"]
    )
    assert result.exit_code == 0  # only writes config
    result = CliRunner().invoke(main, ["run", "--backend", "nope"])
    assert result.exit_code == 2 and "unknown backend 'nope'" in result.output


def test_offline_defaults_are_the_first_node_of_the_examples() -> None:
    """With no options, plan/dump/explain read examples/ as its node-1: its NodePort
    under externalTrafficPolicy Local reaches node-1's own endpoint."""
    packet = ["--from", "203.0.113.7", "--to", "192.168.100.11:30082/TCP", "-o", "json"]
    result = CliRunner().invoke(main, ["explain", *packet])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["verdict"], data["endpoints"]) == ("forward", ["10.244.1.2:80", "10.244.1.3:80"])
    plan = CliRunner().invoke(main, ["plan"])
    assert plan.exit_code == 0 and plan.output.startswith("node node-1:")


def test_a_refused_backend_option_is_a_clear_error() -> None:
    for backend, option, word in (
        ("nftables", "nftables_writer=bogus", "nftables_writer"),
        ("ipvs", "ipvs_mark_mask=0x4000", "ipvs_mark_mask"),
        ("iptables", "iptables_mode=bogus", "iptables_mode"),
    ):
        args = ["run", "--backend", backend, "--backend-option", option]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (backend, result.output)
        assert f"backend '{backend}'" in result.output and word in result.output
        assert "Traceback" not in result.output
