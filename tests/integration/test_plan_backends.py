"""`kpy plan --backend` renders each backend's dry run and programs nothing.

Before, only nftables had a dry run; iptables and userspace answered "cannot render a
dry run". Each runs against a namespace of its own (the dry run of a full sync reads
the kernel back, as apply does) and the namespace holds nothing of kpy's afterwards.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from kpy.cli import main

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
