"""`kpy plan --backend ipvs`: the IPVS backend's dry run, programming nothing.

The dry run lists what a full sync would do, in ``ipvsadm``/``ipset``/``ip`` form, diffed
against what the namespace holds. This host has no IPVS, so the kernel is taken to hold
no virtual service (a first comment line says so) and the dry run of examples/ is every
virtual service, real server and VIP; afterwards the namespace holds nothing of kpy's.
The diff itself is checked against a kernel read back as holding everything (nothing to
do) and then one endpoint fewer (one real-server line).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import replace

import pytest
from click.testing import CliRunner
from kpy_ipvs import IpvsBackend, render
from kpy_ipvs.apply import DestStatus, Snapshot

from kpy.cli import _backend_for, _offline_plan, main
from kpy.core.model import Plan

pytestmark = pytest.mark.root

WHERE = ["--manifests", "examples/", "--node", "node-1"]


def _kernel(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
    ).stdout


def _lines(netns: str) -> list[str]:
    args = ["plan", *WHERE, "--netns", netns, "--backend", "ipvs", "-o", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["transaction"]).splitlines()


def _ops(lines: list[str]) -> list[str]:
    """The IPVS, address and ipset element operations (not the companion's text)."""
    heads = ("-A ", "-E ", "-D ", "-a ", "-e ", "-d ", "ip ", "ipset add ", "ipset del ")
    return [line for line in lines if line.startswith(heads)]


def test_dry_run_of_examples_lists_the_services_and_creates_nothing(netns: str) -> None:
    lines = _lines(netns)
    assert lines[0] == "# ip_vs is not loaded: the kernel is taken to hold no virtual service"
    assert "ip link add kpy-ipvs0 type dummy" in lines
    assert "ip addr add 10.96.0.10/32 dev kpy-ipvs0" in lines
    assert "ip addr add fd00:96::20/128 dev kpy-ipvs0" in lines
    assert "-A -t 10.96.0.10:80 -s rr" in lines  # web
    assert "-A -t 10.96.0.14:80 -s rr -p 600" in lines  # sticky
    assert "-A -u 10.96.0.53:53 -s rr" in lines  # dns
    assert "-A -t [fd00:96::20]:80 -s rr" in lines  # dual stack
    for backend in ("10.244.1.2", "10.244.1.3", "10.244.2.2", "10.244.2.3"):
        assert f"-a -t 10.96.0.10:80 -r {backend}:80 -m -w 1" in lines
    assert "-a -u 10.96.0.53:53 -r 10.244.1.3:5353 -m -w 1" in lines
    assert "ipset add KPY-IPVS-CLUSTER 10.96.0.10,tcp:80" in lines
    assert "# iptables-legacy-restore -w --noflush" in lines
    assert not any(line.startswith(("-D ", "-d ", "ip addr del")) for line in lines)
    # services come before their real servers, addresses before both
    assert lines.index("ip addr add 10.96.0.10/32 dev kpy-ipvs0") < lines.index(
        "-A -t 10.96.0.10:80 -s rr"
    )
    assert lines.index("-A -t 10.96.0.10:80 -s rr") < lines.index(
        "-a -t 10.96.0.10:80 -r 10.244.1.2:80 -m -w 1"
    )
    # nothing was sent
    assert "kpy-ipvs0" not in _kernel(netns, "ip", "-o", "link")
    assert "KPY-" not in _kernel(netns, "ipset", "list", "-n")
    assert "KPY-" not in _kernel(netns, "iptables-legacy-save")
    assert "KPY-" not in _kernel(netns, "ip6tables-legacy-save")


def _held(backend: IpvsBackend, plan: Plan) -> Snapshot:
    """A kernel holding exactly what a full sync of ``plan`` programs."""
    ctx = render.context(backend.config, plan.node)
    objs = render.merged(render.render(plan, ctx).values())
    dests = {d: DestStatus(weight=w, active=0, inactive=0) for d, w in objs.destinations.items()}
    return Snapshot(
        services=dict(objs.services),
        destinations=dests,
        addresses=objs.addresses,
        table_id=render.skeleton_id(ctx),
        elements=objs.elements,
    )


def test_dry_run_against_a_synced_kernel_is_empty_then_one_real_server(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _offline_plan(("examples/",), "node-1", ())
    backend = _backend_for("ipvs", "node-1", (), (), netns)
    assert isinstance(backend, IpvsBackend)
    try:
        snap = _held(backend, plan)
        no_jumps: dict[int, list[tuple[str, str, str]]] = {4: [], 6: []}
        monkeypatch.setattr(backend, "_dry_read", lambda: (True, snap, True, no_jumps, []))
        assert asyncio.run(backend.dry_run(plan)) == ""

        # the kernel lacks one real server (an endpoint was added): that one line
        gone = next(d for d in snap.destinations if str(d.address) == "10.244.2.3")
        fewer = replace(
            snap, destinations={d: s for d, s in snap.destinations.items() if d != gone}
        )
        monkeypatch.setattr(backend, "_dry_read", lambda: (True, fewer, True, no_jumps, []))
        lines = _ops(asyncio.run(backend.dry_run(plan)).splitlines())
        spec = f"{gone.virtual.address}:{gone.virtual.port}"
        assert len(lines) == 1 and lines[0].startswith("-a ") and spec in lines[0], lines

        # and holds one too many (an endpoint went): removed at once without connections,
        # drained (weight 0) with some
        extra = replace(gone, port=9999)
        more = {**snap.destinations, extra: DestStatus(weight=1, active=0, inactive=0)}
        monkeypatch.setattr(
            backend,
            "_dry_read",
            lambda: (True, replace(snap, destinations=more), True, no_jumps, []),
        )
        lines = _ops(asyncio.run(backend.dry_run(plan)).splitlines())
        assert len(lines) == 1 and lines[0].startswith("-d ") and ":9999" in lines[0], lines
        more[extra] = DestStatus(weight=1, active=2, inactive=1)
        lines = _ops(asyncio.run(backend.dry_run(plan)).splitlines())
        assert lines == [lines[0]] and lines[0].startswith("-e ") and "-w 0" in lines[0], lines
        assert "draining: 3 connections" in lines[0]
    finally:
        backend.close()
