"""`kpy plan --backend` renders each backend's dry run and programs nothing.

Before, only nftables had a dry run; iptables and userspace answered "cannot render a
dry run". Each runs against a namespace of its own (the dry run of a full sync reads
the kernel back, as apply does) and the namespace holds nothing of kpy's afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kpy.cli import _backend_for, _offline_plan, main
from kpy.core import trace
from kpy.tools import explain

pytestmark = pytest.mark.root


def _plan(netns: str, backend: str) -> dict[str, object]:
    where = ["--manifests", "examples/", "--node", "node-1", "--netns", netns]
    result = CliRunner().invoke(main, ["plan", *where, "--backend", backend, "-o", "json"])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _kernel(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
    ).stdout


def test_iptables_dry_run_is_the_restore_input_and_applies_nothing(netns: str) -> None:
    text = str(_plan(netns, "iptables")["transaction"])
    assert text.startswith("# iptables-nft-restore --noflush\n*filter\n")
    assert "-A KPY-SERVICES -d 10.96.0.10/32 -p tcp" in text  # the web Service's ClusterIP
    assert '--comment "default/web:http/TCP"' in text
    assert text.count("COMMIT\n") >= 2  # filter and nat, per family
    assert "KPY-" not in _kernel(netns, "iptables-nft-save")
    assert "KPY-" not in _kernel(netns, "ip6tables-nft-save")


def test_userspace_dry_run_lists_the_listeners_and_binds_nothing(netns: str) -> None:
    lines = str(_plan(netns, "userspace")["transaction"]).splitlines()
    assert lines[0] == "# userspace proxy: full sync"
    assert (
        "forward 10.96.0.10:80/TCP/v4 default/web:http/TCP ->"
        " 10.244.1.2:80 10.244.1.3:80 10.244.2.2:80 10.244.2.3:80"
    ) in lines
    assert "reject 10.96.0.17:80/TCP/v4 default/no-endpoints:http/TCP -> -" in lines
    assert any(line.startswith("forward [fd00:96::20]:80/TCP/v6 ") for line in lines)
    assert "10.96.0.10" not in _kernel(netns, "ip", "-o", "addr")  # no VIP bound
    assert ":80 " not in _kernel(netns, "ss", "-ltnH")


# --- the node flags: plan renders with them, dump compares the kernel with them ----------

CIDR_OBJECT = """apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: extra}
spec: {cidrs: [10.200.0.0/24]}
"""


def _transaction(netns: str, backend: str, *flags: str, manifests: str = "examples/") -> str:
    where = ["--manifests", manifests, "--node", "node-1", "--netns", netns]
    argv = ["plan", *where, "--backend", backend, *flags, "-o", "json"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["transaction"])


def test_plan_renders_with_the_node_flags_and_the_manifests_service_cidrs(
    netns: str, tmp_path: Path
) -> None:
    drop = "ip daddr 10.96.0.0/12 drop"
    assert drop not in _transaction(netns, "nftables")
    assert drop in _transaction(netns, "nftables", "--service-cidr", "10.96.0.0/12")
    shutil.copytree("examples", tmp_path / "m")
    (tmp_path / "m" / "servicecidr.yaml").write_text(CIDR_OBJECT)
    both = _transaction(netns, "nftables", "--service-cidr", "10.96.0.0/12",
                        manifests=str(tmp_path / "m"))  # fmt: skip
    assert "ip daddr 10.200.0.0/24 drop" in both and "ip daddr 10.96.0.0/12 drop" in both
    # how pods are told apart changes the rules too
    bridge = _transaction(netns, "nftables", "--detect-local-mode", "BridgeInterface",
                          "--pod-bridge-interface", "cbr0")  # fmt: skip
    assert 'iifname "cbr0"' in bridge and 'iifname "cbr0"' not in _transaction(netns, "nftables")
    # iptables: NodePorts on 127.0.0.1 by default (as kpy run), not when told
    assert "KPY-FIREWALL" in _transaction(netns, "iptables")
    assert "KPY-FIREWALL" not in _transaction(
        netns, "iptables", "--no-iptables-localhost-nodeports"
    )
    assert "10.0.0.0/8" in _transaction(netns, "iptables", "--nodeport-addresses", "10.0.0.0/8")
    refused = CliRunner().invoke(
        main, ["plan", "--backend", "nftables", "--nodeport-addresses", "primary,10.0.0.0/8"]
    )
    assert refused.exit_code == 2 and "can't use both 'primary' and CIDRs" in refused.output


def _dump(netns: str, backend: str, *flags: str) -> tuple[int, list[dict[str, object]]]:
    where = ["--manifests", "examples/", "--netns", netns, "--backend", backend]
    result = CliRunner().invoke(main, ["dump", *where, *flags, "-o", "json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)["services"]


def _node_row(rows: list[dict[str, object]]) -> dict[str, object] | None:
    found = [r for r in rows if r["service"] == "(kernel objects)"]
    return found[0] if found else None


@pytest.mark.parametrize(
    ("backend", "agent", "other"),
    [
        ("nftables", ("--service-cidr", "10.96.0.0/12"), ()),
        ("nftables", ("--detect-local-mode", "NodeCIDR"), ()),
        ("nftables", ("--nodeport-addresses", "192.168.0.0/16"), ("--nodeport-addresses",
                                                                  "primary")),
        ("iptables", (), ("--no-iptables-localhost-nodeports",)),
        ("iptables", ("--no-iptables-localhost-nodeports",), ()),
    ],
)  # fmt: skip
def test_dump_compares_the_node_wide_objects_with_its_flags(
    netns: str, backend: str, agent: tuple[str, ...], other: tuple[str, ...]
) -> None:
    """Programmed with some node flags (as an agent runs): ``kpy dump`` with the same
    flags finds nothing amiss; with others it names the node-wide objects that differ
    and exits 1."""
    flags = dict(explain.NODE_FLAG_DEFAULTS)
    run = CliRunner().invoke(main, ["run", *agent, "--write-config-to", "-"], env={})
    assert run.exit_code == 0, run.output  # the flags are kpy run's too
    argv = iter(agent)
    for flag in argv:  # as kpy run takes them, for the backend the agent would run
        name = flag.removeprefix("--").replace("-", "_")
        if name == "no_iptables_localhost_nodeports":
            flags["iptables_localhost_nodeports"] = False
        elif name in ("service_cidr", "nodeport_addresses"):
            flags[name] = (next(argv),)
        else:
            flags[name] = next(argv)
    node, node_ip = trace.DEMO_NODE, trace.DEMO_NODE_IP
    programmed = _backend_for(backend, node, (node_ip,), ("10.244.0.0/16",), netns, flags)
    plan = _offline_plan(("examples/",), node, (node_ip,))
    try:
        asyncio.run(programmed.apply(plan))
        code, rows = _dump(netns, backend, *agent)
        assert code == 0 and _node_row(rows) is None, _node_row(rows)
        code, rows = _dump(netns, backend, *other)
        row = _node_row(rows)
        assert code == 1 and row is not None
        assert row["drift"] is True and row["differs"], row
        table = CliRunner().invoke(main, ["dump", "--manifests", "examples/", "--netns", netns,
                                          "--backend", backend, *other])  # fmt: skip
        assert table.exit_code == 1 and "(kernel objects)" in table.output
        assert "DRIFT" in table.output
    finally:
        asyncio.run(programmed.cleanup())
