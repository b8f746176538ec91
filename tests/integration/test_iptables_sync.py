"""The iptables backend against a real kernel: flavour detection, drift repair, failed
restores, adoption and the size of a one-endpoint change at 10,000 Services.

Every test programs only a network namespace it created (deleted afterwards).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess

import pytest
from kpy_iptables import IptablesBackend, render

from kpy.core.backend import BackendConfig, BackendError
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states

pytestmark = pytest.mark.root


def sh(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def _rules(save: str) -> list[str]:
    """The lines of a save, sorted (the order of dispatch rules carries no meaning)."""
    return sorted(line for line in save.splitlines() if not line.startswith("#"))


def backend(netns: str, mode: str | None = None) -> IptablesBackend:
    options = (("iptables_mode", mode),) if mode else ()
    return IptablesBackend(BackendConfig(node_name="node-a", netns=netns, options=options))


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_detects_the_flavour_that_holds_rules(netns: str, flavour: str) -> None:
    sh(netns, f"iptables-{flavour}", "-t", "nat", "-N", "SOMEONE-ELSE")
    sh(netns, f"iptables-{flavour}", "-t", "nat", "-A", "SOMEONE-ELSE", "-j", "RETURN")
    found = backend(netns)
    assert found.mode == flavour
    asyncio.run(found.apply(b.plan(conformance_states())))
    assert "KPY-SERVICES" in sh(netns, f"iptables-{flavour}-save")
    other = "legacy" if flavour == "nft" else "nft"
    assert "KPY-" not in sh(netns, f"iptables-{other}-save")
    assert backend(netns).mode == flavour  # a restarted agent finds its own chains
    assert "SOMEONE-ELSE" in sh(netns, f"iptables-{flavour}-save")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="iptables_mode"):
        IptablesBackend(BackendConfig(options=(("iptables_mode", "nftables"),)))


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_full_sync_repairs_rules_deleted_by_hand(netns: str, flavour: str) -> None:
    states = conformance_states()
    kpy = backend(netns, flavour)
    asyncio.run(kpy.apply(b.plan(states)))
    web = render.chain_name("SVC", str(states[0].name))
    before = sh(netns, f"iptables-{flavour}-save", "-t", "nat")
    rule = next(line for line in before.splitlines() if line.endswith(f"-j {web}"))
    sh(netns, f"iptables-{flavour}", "-t", "nat", *shlex.split(rule.replace("-A ", "-D ", 1)))
    sh(netns, f"iptables-{flavour}", "-t", "nat", "-F", web)
    damaged = sh(netns, f"iptables-{flavour}-save", "-t", "nat")
    assert rule not in damaged
    result = asyncio.run(kpy.apply(b.plan(states)))
    assert result.ops == 4  # the dispatch rule back; the chain declared and refilled (2 rules)
    after = sh(netns, f"iptables-{flavour}-save", "-t", "nat")
    assert _rules(after) == _rules(before)


def test_failed_restore_changes_nothing_and_forces_a_full_sync(netns: str) -> None:
    states = conformance_states()
    kpy = backend(netns, "nft")
    asyncio.run(kpy.apply(b.plan(states)))
    np = states[1]
    front = render.chain_name("EXT", str(np.name))
    save = sh(netns, "iptables-nft-save", "-t", "nat")
    rule = next(line for line in save.splitlines() if line.endswith(f"-j {front}"))
    sh(netns, "iptables-nft", "-t", "nat", *shlex.split(rule.replace("-A ", "-D ", 1)))
    before = sh(netns, "iptables-nft-save", "-t", "nat")
    states.pop(1)  # the partial sync will try to delete the rule removed by hand
    partial = b.plan(states, full_sync=False, changed=[], removed=[np.name])
    with pytest.raises(BackendError, match=r"RULE_DELETE|Bad rule"):
        asyncio.run(kpy.apply(partial))
    assert _rules(sh(netns, "iptables-nft-save", "-t", "nat")) == _rules(before)  # all or nothing
    retry = asyncio.run(kpy.apply(b.plan(states, full_sync=False, changed=[])))
    assert retry.full_sync
    assert front not in sh(netns, "iptables-nft-save", "-t", "nat")


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_one_endpoint_change_at_10000_services_is_a_small_restore(netns: str, flavour: str) -> None:
    states = b.synthetic_states(10_000)
    kpy = backend(netns, flavour)
    asyncio.run(kpy.apply(b.plan(states)))
    first = states[0]
    states[0] = b.state(first.service, first.endpoints[1:])
    result = asyncio.run(kpy.apply(b.plan(states, full_sync=False, changed=[first.name])))
    assert not result.full_sync
    assert 0 < result.size <= 50, f"restore input of {result.size} lines"
    # the one chain that changed (reading back all 240,000 rules is slow with nft)
    chain = render.chain_name("SVC", str(first.name))
    rules = sh(netns, f"iptables-{flavour}", "-t", "nat", "-S", chain)
    targets = {line.rsplit(" -j ", 1)[1] for line in rules.splitlines() if " -j KPY-SEP-" in line}
    expected = {render.chain_name("SEP", str(first.name), str(ep)) for ep in states[0].internal}
    assert targets == expected and len(expected) == 4
