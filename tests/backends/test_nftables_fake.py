"""The nftables backend's diff, adoption and drift repair against a fake kernel
(:class:`kpy_nftables.fake.FakeKernel`: render's objects in dicts), without a
namespace. The real kernel's tests (test_nftables_netlink*, tests/integration) stay
the reference for what the kernel does; these are for the backend's own logic."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from kpy_nftables import NftablesBackend, render
from kpy_nftables.apply import NftError
from kpy_nftables.fake import FakeKernel

from kpy.core.backend import BackendConfig, BackendError
from kpy.core.model import ServicePortState
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states, run

CONFIG = BackendConfig(
    node_name=b.NODE,
    cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00::/48")),
)


def _states() -> list[ServicePortState]:
    return conformance_states()  # one service port per semantic


def _programmed() -> tuple[FakeKernel, NftablesBackend, list[ServicePortState]]:
    kernel = FakeKernel()
    backend = NftablesBackend(CONFIG, kernel)
    states = _states()
    result = run(backend.apply(b.plan(states)))
    assert result.full_sync and result.ops > 50 and kernel.transactions == 1
    return kernel, backend, states


def test_a_first_start_and_changes_leave_what_render_wants() -> None:
    kernel, backend, states = _programmed()
    assert run(backend.differences(b.plan(states))) == ()
    first = states[0]
    changed = [b.state(first.service, first.endpoints[1:]), *states[1:-1]]
    plan = b.plan(changed, full_sync=False, changed=[first.name], removed=[states[-1].name])
    result = run(backend.apply(plan))
    assert result.detail["netlink"] and result.ops > 0  # encoded, then applied by the fake
    assert kernel.transactions == 2
    assert run(backend.differences(b.plan(changed))) == ()
    assert run(backend.apply(b.plan(changed, full_sync=True))).ops == 0
    assert kernel.transactions == 2
    backend.close()


def test_a_restarted_agent_adopts_the_tables_and_sends_nothing() -> None:
    kernel, backend, states = _programmed()
    backend.close()
    restarted = NftablesBackend(CONFIG, kernel)
    assert run(restarted.apply(b.plan(states))).ops == 0
    assert kernel.transactions == 1


def test_drift_is_repaired_by_the_next_full_sync() -> None:
    kernel, backend, states = _programmed()
    name = next(s.name for s in states if s.endpoints)
    shard, chain = render.shard_table(name), render.service_chain(name)
    held = kernel.state.elements[("ip", shard, render.SERVICE_IPS)]
    element = next(e for e in held.values() if e.verdict == f"goto {chain}")
    kernel.apply(
        [
            render.FlushChain("ip", shard, chain),  # the rule count no longer matches
            render.DeleteElements("ip", shard, render.SERVICE_IPS, (element,)),
        ]
    )
    assert len(run(backend.differences(b.plan(states)))) == 2
    result = run(backend.apply(b.plan(states, full_sync=True)))
    assert result.ops == 2
    assert run(backend.differences(b.plan(states))) == ()
    backend.close()


def test_a_rule_replaced_by_hand_is_found_by_its_digest() -> None:
    """Same count of rules, other rules: the fingerprint still matches, the digest the
    backend recorded when it wrote the chain does not."""
    kernel, backend, states = _programmed()
    name = next(s.name for s in states if s.endpoints)
    shard, chain = render.shard_table(name), render.service_chain(name)
    rules = list(kernel.state.chains[("ip", shard, chain)][1])
    other = render.rule(render.L4Proto("tcp"), render.Dnat("ip", "192.0.2.1", 9))
    kernel.apply(
        [
            render.FlushChain("ip", shard, chain),
            *(render.AddRule("ip", shard, chain, r) for r in [*rules[:-1], other]),
        ]
    )
    assert run(backend.apply(b.plan(states, full_sync=True))).ops == 1
    assert kernel.state.chains[("ip", shard, chain)][1] == rules
    backend.close()


def test_the_fake_refuses_what_the_kernel_refuses_and_changes_nothing() -> None:
    kernel, backend, states = _programmed()
    backend.close()
    name = next(s.name for s in states if s.endpoints)
    shard, chain = render.shard_table(name), render.service_chain(name)
    before = kernel.observe().values
    refused: list[list[render.Op]] = [
        [render.FlushChain("ip", shard, chain), render.DeleteChain("ip", shard, chain)],
        [render.DeleteSet("ip", render.TABLE, "set", render.CLUSTER_IPS)],  # a rule uses it
        [render.AddRule("ip", shard, chain, render.rule(render.Verdict("goto", "nowhere")))],
        [render.FlushChain("ip", "kpy-99", chain)],
    ]
    for ops in refused:
        with pytest.raises(NftError, match="kernel refused"):
            kernel.apply(ops)
        assert kernel.observe().values == before


def _rivals() -> tuple[ServicePortState, ServicePortState, ServicePortState]:
    """Two service ports claiming one ClusterIP (the first in name order keeps it), in
    different shard tables, and a third sharing an endpoint with the first."""
    a = b.state(b.service("a", cluster_ip="10.96.1.1"), [b.endpoint("10.244.1.5")])
    rival = next(
        f"b{i}"
        for i in range(100)
        if render.shard_table(b.service(f"b{i}").name) != render.shard_table(a.name)
    )
    same_vip = b.state(b.service(rival, cluster_ip="10.96.1.1"), [b.endpoint("10.244.1.6")])
    other = b.state(b.service("c", cluster_ip="10.96.1.2"), [b.endpoint("10.244.1.5")])
    return a, same_vip, other


def _holder(kernel: FakeKernel) -> list[str]:
    """The shard tables whose service-ips map holds 10.96.1.1."""
    return [
        table
        for (_family, table, name), held in kernel.state.elements.items()
        if name == render.SERVICE_IPS and "10.96.1.1 . tcp . 80" in held
    ]


def test_a_partial_sync_renders_the_recorded_state_without_the_frontends_it_lost() -> None:
    """The backend records what it wrote as the states it rendered (and the frontends a
    port lost to another); a partial sync renders the old state again. A port that lost
    its ClusterIP changes: nothing of the lost frontend is deleted (the kernel never had
    it, and would refuse). Then the holder goes: the rival, changed in the same sync,
    takes the frontend over."""
    a, rival, other = _rivals()
    kernel = FakeKernel()
    backend = NftablesBackend(CONFIG, kernel)
    run(backend.apply(b.plan([a, rival, other])))
    assert _holder(kernel) == [render.shard_table(a.name)]

    moved = b.state(rival.service, [b.endpoint("10.244.1.7")])
    run(backend.apply(b.plan([a, moved, other], full_sync=False, changed=[moved.name])))
    assert _holder(kernel) == [render.shard_table(a.name)]
    assert run(backend.apply(b.plan([a, moved, other], full_sync=True))).ops == 0

    again = b.state(rival.service, [b.endpoint("10.244.1.8")])
    plan = b.plan([again, other], full_sync=False, changed=[again.name], removed=[a.name])
    run(backend.apply(plan))
    assert _holder(kernel) == [render.shard_table(rival.name)]
    # the hairpin element of the endpoint a shared with c stays: c still wants it
    assert "10.244.1.5 . 10.244.1.5" in kernel.state.elements[("ip", render.TABLE, "hairpin")]
    assert run(backend.apply(b.plan([again, other], full_sync=True))).ops == 0
    backend.close()


def test_a_first_start_writes_elements_per_chunk_of_ports_and_shared_ones_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(render, "FRESH_CHUNK", 2)
    a, rival, other = _rivals()
    states = [*_states(), a, rival, other]
    kernel = FakeKernel()
    backend = NftablesBackend(CONFIG, kernel)
    script = run(backend.dry_run(b.plan(states)))
    hairpin = [line for line in script.splitlines() if " hairpin " in line]
    shared = [line for line in hairpin if "10.244.1.5 . 10.244.1.5" in line]
    assert len(shared) == 1 and shared[0].count("10.244.1.5 . 10.244.1.5") == 1
    assert len(hairpin) > 2  # written in several commands, one per chunk
    run(backend.apply(b.plan(states)))
    assert run(backend.apply(b.plan(states, full_sync=True))).ops == 0
    lost = f"ip {render.shard_table(rival.name)} element service-ips 10.96.1.1 . tcp . 80"
    assert run(backend.differences(b.plan(states))) == (f"{lost}: not in the kernel",)
    backend.close()


def test_a_sync_reads_only_what_it_compares() -> None:
    """A full sync's read leaves out the dump's views and self-checks, not a value."""
    kernel, backend, _states = _programmed()
    full, lean = kernel.observe(), kernel.observe(views=False)
    assert lean.values == full.values and full.endpoints and full.frontends
    assert not lean.endpoints and not lean.frontends and not lean.counts
    backend.close()


def test_a_node_with_the_endpoints_set_in_the_base_table_is_moved_by_a_full_sync() -> None:
    """Before the ``service-endpoints`` elements moved to the shard tables they were in
    the base table: a restarted agent's full sync deletes that set and its elements."""
    kernel, backend, states = _programmed()
    backend.close()
    old = [
        dataclasses.replace(obj, table=render.TABLE)
        for state in states
        for obj in render.port_objects(state, CONFIG).values()
        if isinstance(obj, render.Element) and obj.map == render.SERVICE_ENDPOINTS
    ]
    assert old
    kernel.apply(
        [
            render.AddSet(
                render.Set("ip", render.SERVICE_ENDPOINTS, "ipv4_addr . inet_service . mark")
            ),
            render.AddElements(
                "ip",
                render.TABLE,
                render.SERVICE_ENDPOINTS,
                tuple(e for e in old if e.family == "ip"),
            ),
        ]
    )
    restarted = NftablesBackend(CONFIG, kernel)
    assert run(restarted.apply(b.plan(states))).ops > len(old) // 2
    assert ("ip", render.TABLE, render.SERVICE_ENDPOINTS) not in kernel.state.sets
    assert run(restarted.differences(b.plan(states))) == ()
    assert run(restarted.apply(b.plan(states, full_sync=True))).ops == 0
    restarted.close()


def test_a_failed_read_of_the_rules_beside_the_sets_fails_the_full_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules are read on a second reader while the sets are: its failure is the
    sync's, and the next full sync reads both again."""
    kernel, backend, states = _programmed()

    def refuse(self: FakeKernel, chains: object = None) -> object:
        raise NftError("the rule dump failed")

    with monkeypatch.context() as patch:
        patch.setattr(FakeKernel, "rules", refuse)
        with pytest.raises(BackendError, match="the rule dump failed"):
            run(backend.apply(b.plan(states, full_sync=True)))
    assert run(backend.apply(b.plan(states, full_sync=False, changed=[]))).full_sync
    assert kernel.transactions == 1
    backend.close()
