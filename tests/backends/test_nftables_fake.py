"""The nftables backend's diff, adoption and drift repair against a fake kernel
(:class:`kpy_nftables.fake.FakeKernel`: render's objects in dicts), without a
namespace. The real kernel's tests (test_nftables_netlink*, tests/integration) stay
the reference for what the kernel does; these are for the backend's own logic."""

from __future__ import annotations

import ipaddress

import pytest
from kpy_nftables import NftablesBackend, render
from kpy_nftables.apply import NftError
from kpy_nftables.fake import FakeKernel

from kpy.core.backend import BackendConfig
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
