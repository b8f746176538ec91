"""Drift of the nftables backend's objects, one test per kind the backend owns (table,
chain, rule, set, set/map element): each deletes (or edits) it behind the agent's back
in a fresh network namespace, asserts that ``kpy dump`` flags it, and that one full
sync restores exactly what was there."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from kpy_nftables import NftablesBackend, render

from kpy.core.model import Plan, Protocol
from kpy.core.trace import Origin, Packet
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states, run
from kpy.testing.netns import nft
from kpy.tools import dump
from tests.nftables_state import config, snapshot


def drifted(ns: str, plan: Plan) -> dict[str, Any]:
    """What ``kpy dump --backend nftables`` flags: a fresh backend (the dump is its own
    process, with no record of what the agent wrote) observing the namespace."""
    rows = dump.rows(plan, run(NftablesBackend(config(ns)).observe()))
    return {row["service"]: row for row in rows if row["drift"]}


@dataclass
class Node:
    ns: str
    backend: NftablesBackend
    plan: Plan
    before: tuple[dict[str, object], dict[tuple[str, str, str], tuple[int, bytes]]]

    def repaired_by_one_full_sync(self, backend: NftablesBackend | None = None) -> int:
        """One full sync (by the running agent, or ``backend``: a restarted one) puts
        back exactly what was there; a second one has nothing to do."""
        agent = backend or self.backend
        result = run(agent.apply(b.plan(self.plan.services.values())))
        assert result.full_sync and result.ops > 0
        assert snapshot(self.ns) == self.before
        assert not drifted(self.ns, self.plan)
        assert run(agent.apply(b.plan(self.plan.services.values()))).ops == 0
        return result.ops


@pytest.fixture
def node(netns: str) -> Iterator[Node]:
    plan = b.plan(conformance_states())
    backend = NftablesBackend(config(netns))
    run(backend.apply(plan))
    # a full sync after the first start: every chain's rules have been read back once
    assert run(backend.apply(b.plan(plan.services.values()))).ops == 0
    assert not drifted(netns, plan)
    yield Node(netns, backend, plan, snapshot(netns))
    backend.close()


def chain_of(name: str, kind: str = "service") -> tuple[str, str]:
    """The shard table and chain name of a conformance service's chain."""
    svc = next(s for s in conformance_states() if s.name.name == name)
    return render.shard_table(svc.name), f"{kind}-{render.PortNames(svc.name)._base}"


def handles(ns: str, table: str, chain: str) -> list[tuple[str, str]]:
    """(rule text, handle) of each rule in a chain."""
    listed = nft(ns, "-a", "list", "chain", "ip", table, chain)
    found = re.findall(r"^\s+(.+?) # handle (\d+)$", listed, re.MULTILINE)
    return [(text, handle) for text, handle in found if not text.endswith("{")]


# --- tables -------------------------------------------------------------------------


def test_a_flushed_shard_table_is_flagged_and_restored_by_a_restarted_agent(node: Node) -> None:
    """``nft flush table ip kpy-N``: every rule of the shard's chains gone (its dispatch
    and its services' DNATs), the chains, maps and elements left — the fingerprints
    still claim every chain intact."""
    table, _ = chain_of("web")
    nft(node.ns, "flush", "table", "ip", table)
    flagged = drifted(node.ns, node.plan)
    assert "default/web:http/TCP" in flagged
    assert "0 of" in flagged["default/web:http/TCP"]["programmed"]["extra"]["drift"]
    assert "(nftables tables)" in flagged  # the shard's dispatch chains
    partial = run(node.backend.apply(b.plan(node.plan.services.values(), full_sync=False)))
    assert partial.ops == 0, "a partial sync trusts its record and reads nothing"
    ops = node.repaired_by_one_full_sync(NftablesBackend(config(node.ns)))
    assert ops >= 4  # services, nat-prerouting, nat-output and web's service chain


def test_a_deleted_shard_table_is_flagged_and_restored(node: Node) -> None:
    table, _ = chain_of("web")
    nft(node.ns, "delete", "table", "ip", table)
    flagged = drifted(node.ns, node.plan)
    # its frontends and the record of its endpoints were in that table: nothing of it left
    assert flagged["default/web:http/TCP"]["programmed"] is None
    assert "(nftables tables)" in flagged  # the fingerprints of its chains are orphans
    node.repaired_by_one_full_sync()


def test_a_deleted_base_table_is_flagged_and_restored(node: Node) -> None:
    nft(node.ns, "delete", "table", "ip", "kpy")
    flagged = drifted(node.ns, node.plan)
    assert "(nftables tables)" in flagged
    assert "default/empty:http/TCP" in flagged  # its reject element was in the base table
    node.repaired_by_one_full_sync()


# --- chains -------------------------------------------------------------------------


def test_a_deleted_chain_is_flagged_and_restored(node: Node) -> None:
    """A chain is only deleted once nothing refers to it: the firewall chain of the
    LoadBalancer with source ranges, after its firewall-ips element."""
    svc = next(s for s in conformance_states() if s.name.name == "lb")
    chain = render.firewall_chain(svc.name)
    nft(node.ns, "delete", "element", "ip", "kpy", "firewall-ips", "{ 172.18.0.50 . tcp . 80 }")
    nft(node.ns, "delete", "chain", "ip", "kpy", chain)
    assert f"ip chain {chain}" not in snapshot(node.ns)[0]
    # its fingerprint is left without a chain (the fingerprint does not name it)
    flagged = drifted(node.ns, node.plan)["(nftables tables)"]["programmed"]["extra"]
    assert "1 chains recorded in the fingerprints sets are missing" in flagged["drift"]
    assert node.repaired_by_one_full_sync() == 2  # the chain, the element (not its fingerprint)


def test_a_chain_without_its_fingerprint_is_flagged_and_rewritten(node: Node) -> None:
    table, chain = chain_of("np")
    key = render.fingerprint_key(f"ip {table} chain {chain}")
    nft(node.ns, "delete", "element", "ip", "kpy", "fingerprints", "{", key, "}")
    flagged = drifted(node.ns, node.plan)
    assert "no fingerprint" in flagged["default/np:http/TCP"]["programmed"]["extra"]["drift"]
    node.repaired_by_one_full_sync()


# --- rules --------------------------------------------------------------------------


def test_one_deleted_dnat_rule_is_flagged_and_restored(node: Node) -> None:
    table, chain = chain_of("web")
    rules = handles(node.ns, table, chain)
    text, handle = next((t, h) for t, h in rules if "dnat to 10.244.2.6" in t)
    nft(node.ns, "delete", "rule", "ip", table, chain, "handle", handle)
    flagged = drifted(node.ns, node.plan)
    reason = flagged["default/web:http/TCP"]["programmed"]["extra"]["drift"]
    assert f"{len(rules) - 1} of {len(rules)} rules" in reason
    assert node.repaired_by_one_full_sync() == 1
    assert [t for t, _ in handles(node.ns, table, chain)] == [t for t, _ in rules]
    assert text in nft(node.ns, "list", "chain", "ip", table, chain)


def test_a_dispatch_rule_deleted_from_a_base_chain_is_flagged_and_restored(node: Node) -> None:
    rules = handles(node.ns, "kpy", "masquerading")
    nft(node.ns, "delete", "rule", "ip", "kpy", "masquerading", "handle", rules[0][1])
    flagged = drifted(node.ns, node.plan)
    assert "ip chain masquerading" in flagged["(nftables tables)"]["programmed"]["extra"]["drift"]
    node.repaired_by_one_full_sync()


def test_a_rule_replaced_in_place_is_found_by_the_running_agent(node: Node) -> None:
    """Same number of rules, another DNAT target: the rule count cannot tell, the
    digest the agent recorded when it wrote the chain can."""
    table, chain = chain_of("np")
    text, handle = next((t, h) for t, h in handles(node.ns, table, chain) if "dnat" in t)
    edited = text.replace("10.244.1.7", "10.244.1.99")
    nft(node.ns, "replace", "rule", "ip", table, chain, "handle", handle, *edited.split())
    views = run(node.backend.observe()).services
    assert "rules changed" in views["default/np:http/TCP"].extra["drift"]
    assert node.repaired_by_one_full_sync() == 1
    assert "10.244.1.99" not in nft(node.ns, "list", "chain", "ip", table, chain)


# --- sets ---------------------------------------------------------------------------


def test_a_deleted_set_is_flagged_and_restored(node: Node) -> None:
    """``service-endpoints`` is used by no rule, so it can be deleted whole."""
    nft(node.ns, "delete", "set", "ip", chain_of("web")[0], "service-endpoints")
    flagged = drifted(node.ns, node.plan)
    assert flagged["default/web:http/TCP"]["programmed"]["endpoints"] == []
    node.repaired_by_one_full_sync()


def test_a_deleted_affinity_set_is_flagged_and_restored(node: Node) -> None:
    """An affinity set is used by its service chain's rules: they go first."""
    table, chain = chain_of("sticky")
    sets = re.findall(r"set (affinity-\S+)", nft(node.ns, "list", "table", "ip", table))
    assert sets
    nft(node.ns, "flush", "chain", "ip", table, chain)
    nft(node.ns, "delete", "set", "ip", table, sets[0])
    assert "default/sticky:http/TCP" in drifted(node.ns, node.plan)
    assert node.repaired_by_one_full_sync() == 2  # the set, the chain's rules


# --- elements -----------------------------------------------------------------------

ELEMENTS = {
    # set or map, table, element, the service port flagged
    "service-ips": ("kpy-?", "10.96.0.10 . tcp . 80", "default/web:http/TCP"),
    "service-nodeports": ("kpy-?", "tcp . 30080", "default/np:http/TCP"),
    "no-endpoint-services": ("kpy", "10.96.0.16 . tcp . 80", "default/empty:http/TCP"),
    "service-endpoints": ("kpy-?", None, "default/web:http/TCP"),
    "hairpin": ("kpy", "10.244.1.5 . 10.244.1.5", "default/web:http/TCP"),
    "masquerade-nodeports": ("kpy", "tcp . 30080", "default/np:http/TCP"),
    "masquerade-ips": ("kpy", "192.0.2.10 . tcp . 80", "default/ext:http/TCP"),
    "firewall-ips": ("kpy", "172.18.0.50 . tcp . 80", "default/lb:http/TCP"),
}
SHARD_OF = {"service-ips": "web", "service-nodeports": "np", "service-endpoints": "web"}


@pytest.mark.parametrize("name", sorted(ELEMENTS))
def test_a_deleted_element_is_flagged_and_restored(node: Node, name: str) -> None:
    table, element, flagged_port = ELEMENTS[name]
    if table == "kpy-?":
        table = chain_of(SHARD_OF[name])[0]
    if element is None:  # the endpoint's element holds the port's hash
        listed = nft(node.ns, "list", "set", "ip", table, name)
        element = re.findall(r"10\.244\.1\.5 \. 8080 \. (?:0x[0-9a-f]+|\d+)", listed)[0]
    nft(node.ns, "delete", "element", "ip", table, name, "{", element, "}")
    assert flagged_port in drifted(node.ns, node.plan)
    assert node.repaired_by_one_full_sync() == 1


def test_a_rule_replaced_right_after_the_first_sync_is_found(netns: str) -> None:
    """The first sync reads every rule back once it is written (in a thread, while
    ``apply`` returns), so an edit made before any full sync has read the kernel is
    found by the next one."""
    plan = b.plan(conformance_states())
    backend = NftablesBackend(config(netns))
    run(backend.apply(plan))
    run(backend._settle())  # the read-back of the first sync is done
    table, chain = chain_of("web")
    text, handle = next((t, h) for t, h in handles(netns, table, chain) if "dnat" in t)
    edited = text.replace("10.244.1.5", "10.244.1.99").replace("10.244.2.6", "10.244.2.99")
    nft(netns, "replace", "rule", "ip", table, chain, "handle", handle, *edited.split())
    repaired = run(backend.apply(b.plan(plan.services.values())))
    assert repaired.ops == 1
    assert "99" not in nft(netns, "list", "chain", "ip", table, chain)
    backend.close()


def test_chains_a_partial_sync_rewrote_are_compared_with_what_it_wrote(node: Node) -> None:
    """A partial sync (over netlink) reads back the chains it wrote: the next full sync
    finds nothing to repair, and a rule then replaced in place is found."""
    states = list(node.plan.services.values())
    web = next(i for i, s in enumerate(states) if s.name.name == "web")
    states[web] = b.state(states[web].service, states[web].endpoints[:1])
    partial = run(node.backend.apply(b.plan(states, full_sync=False, changed=[states[web].name])))
    assert partial.ops > 0 and partial.detail["netlink"]
    assert run(node.backend.apply(b.plan(states))).ops == 0, "no drift after its own write"
    table, chain = chain_of("web")
    text, handle = next((t, h) for t, h in handles(node.ns, table, chain) if "dnat" in t)
    edited = text.replace("10.244.1.5", "10.244.1.99")
    nft(node.ns, "replace", "rule", "ip", table, chain, "handle", handle, *edited.split())
    assert run(node.backend.apply(b.plan(states))).ops == 1
    assert "10.244.1.99" not in nft(node.ns, "list", "chain", "ip", table, chain)


def test_explain_on_a_live_node_names_what_its_kernel_holds_otherwise(node: Node) -> None:
    """``kpy explain --backend nftables --netns NS``: the objects a packet traverses are
    compared with the namespace's kernel, and each difference is named."""
    packet = Packet(
        src=ipaddress.ip_address("10.244.1.2"),
        dst=ipaddress.ip_address("10.96.0.10"),
        port=80,
        protocol=Protocol.TCP,
    )
    live = NftablesBackend(config(node.ns))
    traced = live.trace(node.plan, packet, Origin.POD)
    assert traced.differs == ()
    assert (
        not NftablesBackend(replace(config(node.ns), netns=None))
        .trace(node.plan, packet, Origin.POD)
        .differs
    )
    table, chain = chain_of("web")
    rules = handles(node.ns, table, chain)
    _, handle = next((t, h) for t, h in rules if "dnat to 10.244.2.6" in t)
    nft(node.ns, "delete", "rule", "ip", table, chain, "handle", handle)
    nft(node.ns, "delete", "element", "ip", table, "service-ips", "{ 10.96.0.10 . tcp . 80 }")
    differs = live.trace(node.plan, packet, Origin.POD).differs
    assert f"ip {table} chain {chain}: the kernel holds 2 of its 3 rules" in differs
    assert f"ip {table} element service-ips 10.96.0.10 . tcp . 80: not in the kernel" in differs
    assert len(differs) == 2
