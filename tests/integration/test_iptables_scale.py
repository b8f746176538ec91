"""The iptables backend (nft flavour) at 10,000 Services in a namespace: the periodic
full sync, a restart that adopts what the kernel holds, and cleanup each succeed, and a
change made in between is programmed each time. Timings are in bench/bench_iptables.py.

Programs only a network namespace it created (deleted afterwards).
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from kpy_iptables import IptablesBackend, render

from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b

pytestmark = [pytest.mark.root, pytest.mark.slow]

SIZE = 10_000


def backend(netns: str) -> IptablesBackend:
    return IptablesBackend(
        BackendConfig(node_name="node-a", netns=netns, options=(("iptables_mode", "nft"),))
    )


def endpoints_in_kernel(netns: str, state: ServicePortState) -> set[str]:
    """The KPY-SEP- chains the service chain of ``state`` jumps to (one chain listed)."""
    chain = render.chain_name("SVC", str(state.name))
    listed = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-nft", "-t", "nat", "-S", chain],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.rsplit(" -j ", 1)[1] for line in listed.splitlines() if " -j KPY-SEP-" in line}


def expected(state: ServicePortState) -> set[str]:
    return {render.chain_name("SEP", str(state.name), str(ep)) for ep in state.internal}


def change(netns: str, kpy: IptablesBackend, states: list[ServicePortState], index: int) -> None:
    """Drop one endpoint of one Service with a partial sync; check the kernel has it."""
    old = states[index]
    states[index] = b.state(old.service, old.endpoints[1:])
    result = asyncio.run(kpy.apply(b.plan(states, full_sync=False, changed=[old.name])))
    assert not result.full_sync
    assert endpoints_in_kernel(netns, states[index]) == expected(states[index])
    assert len(expected(states[index])) == len(old.internal) - 1


def test_full_sync_restart_and_cleanup_at_10000_services(netns: str) -> None:
    states = b.synthetic_states(SIZE)
    kpy = backend(netns)
    asyncio.run(kpy.apply(b.plan(states)))
    change(netns, kpy, states, 0)

    periodic = asyncio.run(kpy.apply(b.plan(states)))  # the periodic full sync
    assert periodic.full_sync and periodic.ops == 0
    assert periodic.detail["readback_failures"] == 0
    change(netns, kpy, states, 1)

    restarted = backend(netns)  # a new agent: adopts, writes nothing
    adopted = asyncio.run(restarted.apply(b.plan(states)))
    assert adopted.ops == 0, restarted.last_drift[:5]
    change(netns, restarted, states, 2)

    asyncio.run(restarted.cleanup())
    left = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-nft-save"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "KPY-" not in left
