"""Rule-level drift in the iptables backend against a real kernel, and what cleanup
removes: a chain flushed, one rule deleted from a service chain, a dispatch rule
deleted, a jump from a built-in chain deleted — each shows in ``observe()`` (``kpy
dump``) and one full sync restores the exact rules; cleanup removes exactly kpy's
chains and creates nothing.

Every test programs only a network namespace it created (deleted afterwards).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from collections.abc import Callable

import pytest
from kpy_iptables import IptablesBackend, held, render
from kpy_iptables.apply import IptablesError
from kpy_iptables.netlink import NetlinkError

from kpy.core.backend import BackendConfig, BackendError
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states
from kpy.testing.netns import nft
from kpy.tools import dump

pytestmark = pytest.mark.root

FLAVOURS = ["nft", "legacy"]


def sh(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def backend(netns: str, mode: str) -> IptablesBackend:
    return IptablesBackend(
        BackendConfig(node_name="node-a", netns=netns, options=(("iptables_mode", mode),))
    )


def rules(netns: str, mode: str) -> list[str]:
    """Both tables' rules and chains, sorted (dispatch rule order carries no meaning)."""
    save = sh(netns, f"iptables-{mode}-save", "-t", "nat") + sh(
        netns, f"iptables-{mode}-save", "-t", "filter"
    )
    return sorted(line for line in save.splitlines() if line[:1] in ("-", ":"))


def drifted(kpy: IptablesBackend, states: list) -> list[str]:  # type: ignore[type-arg]
    rows = dump.rows(b.plan(states), asyncio.run(kpy.observe()))
    return [row["service"] for row in rows if row.get("drift")]


def delete(netns: str, mode: str, table: str, line: str) -> None:
    sh(netns, f"iptables-{mode}", "-t", table, *shlex.split(line.replace("-A ", "-D ", 1)))


def first_rule(netns: str, mode: str, table: str, match: Callable[[str], bool]) -> str:
    save = sh(netns, f"iptables-{mode}-save", "-t", table)
    return next(line for line in save.splitlines() if line.startswith("-A ") and match(line))


WEB = str(conformance_states()[0].name)
SVC = render.chain_name("SVC", WEB)


def flush_chain(netns: str, mode: str) -> None:
    sh(netns, f"iptables-{mode}", "-t", "nat", "-F", SVC)


def delete_spread_rule(netns: str, mode: str) -> None:
    line = first_rule(netns, mode, "nat", lambda r: r.startswith(f"-A {SVC} -j KPY-SEP-"))
    delete(netns, mode, "nat", line)


def delete_dispatch_rule(netns: str, mode: str) -> None:
    line = first_rule(netns, mode, "nat", lambda r: r.startswith("-A KPY-SERVICES ") and SVC in r)
    delete(netns, mode, "nat", line)


def delete_builtin_jump(netns: str, mode: str) -> None:
    line = first_rule(netns, mode, "nat", lambda r: r.startswith("-A PREROUTING ") and "KPY-" in r)
    delete(netns, mode, "nat", line)


DAMAGE = {
    "chain flushed": (flush_chain, [WEB]),
    "spread rule deleted": (delete_spread_rule, [WEB]),
    "dispatch rule deleted": (delete_dispatch_rule, [WEB]),
    "built-in jump deleted": (delete_builtin_jump, None),  # every Service with a VIP
}


@pytest.mark.parametrize("mode", FLAVOURS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_drift_is_shown_and_one_full_sync_repairs_it(netns: str, mode: str, damage: str) -> None:
    states = conformance_states()
    kpy = backend(netns, mode)
    asyncio.run(kpy.apply(b.plan(states)))
    before = rules(netns, mode)
    assert drifted(kpy, states) == []
    assert drifted(backend(netns, mode), states) == []  # kpy dump: a backend of its own

    hurt, services = DAMAGE[damage]
    hurt(netns, mode)
    assert rules(netns, mode) != before
    shown = drifted(backend(netns, mode), states)
    if services is None:
        assert WEB in shown and len(shown) > 1
    else:
        assert shown == services

    result = asyncio.run(kpy.apply(b.plan(states)))  # the periodic full sync
    assert result.ops > 0
    assert rules(netns, mode) == before
    assert drifted(kpy, states) == []
    again = asyncio.run(kpy.apply(b.plan(states)))
    assert again.ops == 0


@pytest.mark.parametrize("chain", [SVC, "KPY-SERVICES", "PREROUTING"])
def test_a_rule_added_to_a_chain_of_kpys_is_removed(netns: str, chain: str) -> None:
    states = conformance_states()
    kpy = backend(netns, "nft")
    asyncio.run(kpy.apply(b.plan(states)))
    before = rules(netns, "nft")
    target = "KPY-MARK-MASQ" if chain == "PREROUTING" else "RETURN"  # a jump kpy owns
    sh(netns, "iptables-nft", "-t", "nat", "-I", chain, "1", "-j", target)
    result = asyncio.run(kpy.apply(b.plan(states)))
    assert result.ops > 0
    assert rules(netns, "nft") == before


def test_a_restarted_agent_adopts_without_writing(netns: str) -> None:
    states = conformance_states()
    asyncio.run(backend(netns, "nft").apply(b.plan(states)))
    generation = nft(netns, "list", "ruleset")
    result = asyncio.run(backend(netns, "nft").apply(b.plan(states)))
    assert result.ops == 0
    assert nft(netns, "list", "ruleset") == generation


@pytest.mark.parametrize("mode", FLAVOURS)
def test_cleanup_removes_exactly_kpys_chains(netns: str, mode: str) -> None:
    ipt = f"iptables-{mode}"
    kpy = backend(netns, mode)
    asyncio.run(kpy.apply(b.plan(conformance_states())))
    for chain in ("KPY-MINE", "KPY-IPVS-MASQ"):  # a user's, and the IPVS backend's
        sh(netns, ipt, "-t", "nat", "-N", chain)
        sh(netns, ipt, "-t", "nat", "-A", chain, "-j", "RETURN")
        sh(netns, ipt, "-t", "nat", "-A", "PREROUTING", "-j", chain)
    asyncio.run(kpy.cleanup())
    left = rules(netns, mode)
    assert [r for r in left if "KPY-" in r] == sorted(
        [
            ":KPY-IPVS-MASQ - [0:0]",
            ":KPY-MINE - [0:0]",
            "-A KPY-IPVS-MASQ -j RETURN",
            "-A KPY-MINE -j RETURN",
            "-A PREROUTING -j KPY-IPVS-MASQ",
            "-A PREROUTING -j KPY-MINE",
        ]
    )


def test_cleanup_in_a_fresh_namespace_creates_nothing(netns: str) -> None:
    asyncio.run(backend(netns, "nft").cleanup())
    assert nft(netns, "list", "tables") == ""
    for names in ("ip_tables_names", "ip6_tables_names"):
        found = sh(netns, "sh", "-c", f"cat /proc/net/{names} 2>/dev/null || true")
        assert found == "", names


def test_cleanup_that_cannot_clean_raises(netns: str) -> None:
    kpy = backend(netns, "nft")
    asyncio.run(kpy.apply(b.plan(conformance_states())))
    # a user's chain jumping to one of kpy's keeps it in use: it cannot be deleted
    sh(netns, "iptables-nft", "-t", "nat", "-N", "USER-CHAIN")
    sh(netns, "iptables-nft", "-t", "nat", "-A", "USER-CHAIN", "-j", SVC)
    with pytest.raises(BackendError, match="cleanup incomplete"):
        asyncio.run(kpy.cleanup())


def test_dispatch_rules_changed_by_partial_syncs_are_checked_at_the_next_full_sync(
    netns: str,
) -> None:
    states = conformance_states()
    kpy = backend(netns, "nft")
    asyncio.run(kpy.apply(b.plan(states)))
    new = b.state(b.service("late", cluster_ip="10.96.0.99"), [b.endpoint("10.244.1.99")])
    states.append(new)
    asyncio.run(kpy.apply(b.plan(states, full_sync=False, changed=[new.name])))
    assert asyncio.run(kpy.apply(b.plan(states))).ops == 0  # the full sync: all as wanted
    before = rules(netns, "nft")
    late = render.chain_name("SVC", str(new.name))
    line = first_rule(netns, "nft", "nat", lambda r: r.startswith("-A KPY-SERVICES ") and late in r)
    delete(netns, "nft", "nat", line)
    assert asyncio.run(kpy.apply(b.plan(states))).ops > 0
    assert rules(netns, "nft") == before


@pytest.mark.parametrize("mode", FLAVOURS)
def test_a_restart_whose_read_back_fails_writes_every_chain_once(
    netns: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = conformance_states()
    asyncio.run(backend(netns, mode).apply(b.plan(states)))
    before = rules(netns, mode)
    restarted = backend(netns, mode)

    async def crash(*args: object, **kwargs: object) -> object:
        raise IptablesError("iptables-save failed (killed by signal 11 (SIGSEGV))")

    def refuse(*args: object, **kwargs: object) -> object:
        raise NetlinkError("netlink receive failed")

    monkeypatch.setattr(restarted, "_read", crash)
    monkeypatch.setattr(held, "read", refuse)
    result = asyncio.run(restarted.apply(b.plan(states)))
    assert result.full_sync and result.detail["readback_failures"] == 1
    assert result.ops > 0  # written blind: every chain declared and filled
    assert rules(netns, mode) == before  # nothing doubled (built-in jumps checked with -C)
    # a partial sync goes on from what was written
    new = b.state(b.service("late", cluster_ip="10.96.0.99"), [b.endpoint("10.244.1.99")])
    states.append(new)
    asyncio.run(restarted.apply(b.plan(states, full_sync=False, changed=[new.name])))
    assert render.chain_name("SVC", str(new.name)) in "\n".join(rules(netns, mode))
