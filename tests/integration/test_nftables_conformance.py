"""The nftables backend against the shared conformance suite, and its transaction
properties, in a fresh network namespace per test (never the machine's own)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from kpy_nftables import NftablesBackend, netlink, render

from kpy.core.backend import Backend, BackendConfig, BackendError, parse_networks
from kpy.core.model import ServicePortState
from kpy.testing import builders as b
from kpy.testing.conformance import BackendConformance, run
from kpy.testing.netns import nft


def config(ns: str) -> BackendConfig:
    return BackendConfig(
        node_name="node-a",
        netns=ns,
        cluster_cidrs=parse_networks(["10.244.0.0/16", "fd00:244::/32"]),
    )


class TestNftablesConformance(BackendConformance):
    @pytest.fixture
    def make_backend(self, netns: str) -> Callable[[], Backend]:
        return lambda: NftablesBackend(config(netns))


def states_with(n: int) -> list[ServicePortState]:
    return b.synthetic_states(n)


def test_one_endpoint_change_sends_a_constant_size_transaction(netns: str) -> None:
    sizes = {}
    for size in (10, 10_000):
        nft(netns, "flush", "ruleset")
        states = states_with(size)
        backend = NftablesBackend(config(netns))
        run(backend.apply(b.plan(states)))
        first = states[0]
        states[0] = b.state(first.service, first.endpoints[1:])
        plan = b.plan(states, full_sync=False, changed=[first.name])
        script = run(backend.dry_run(plan))
        result = run(backend.apply(plan))
        assert result.size == len(script.encode())
        sizes[size] = (result.ops, script.count("\n"))
    assert sizes[10] == sizes[10_000], sizes
    assert sizes[10][1] < 20, sizes


def test_failed_transaction_keeps_rules_and_forces_a_full_sync(netns: str) -> None:
    states = states_with(3)
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan(states)))
    before = nft(netns, "list", "ruleset")
    # Sabotage: a hand-made rule in a chain the next partial sync deletes keeps it
    # referenced, so the kernel refuses the whole transaction.
    gone = states.pop(0)
    svc_chain = next(
        line.split()[1]
        for line in before.splitlines()
        if line.strip().startswith("chain service-") and "ns-0/svc-0/" in line
    )
    table = render.shard_table(gone.name)  # a jump must stay in its table
    nft(netns, "add", "chain", "ip", table, "hand-made")
    nft(netns, "add", "rule", "ip", table, "hand-made", "jump", svc_chain)
    with pytest.raises(BackendError):
        run(backend.apply(b.plan(states, full_sync=False, removed=[gone.name])))
    after = nft(netns, "list", "ruleset")
    assert "ns-0/svc-0/" in after, "a failed transaction must leave the rules as they were"
    nft(netns, "delete", "chain", "ip", table, "hand-made")
    result = run(backend.apply(b.plan(states, full_sync=False, changed=[])))
    assert result.full_sync, "after a failure the next sync is a full one"
    assert "ns-0/svc-0/" not in nft(netns, "list", "ruleset")


def test_hand_deleted_objects_are_restored_by_the_next_full_sync(netns: str) -> None:
    states = states_with(3)
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan(states)))
    want = run(backend.observe())
    # An operator removes a ClusterIP's dispatch element and its service chain, and
    # an element of another Service.
    dispatch = sorted(k for k in want.objects if " element service-ips " in k)
    verdicts = [str(v).split(" # ")[0] for v in want.objects.values()]
    # an element whose chain nothing else jumps to (no NodePort element): deletable
    first = next(k for k in dispatch if verdicts.count(str(want.objects[k]).split(" # ")[0]) == 1)
    second = next(k for k in dispatch if k != first)
    target = str(want.objects[first]).split(" # ")[0].removeprefix("goto ")
    for key in (first, second):
        _, table, _, rest = render.split_key(key)
        nft(netns, "delete", "element", "ip", table, "service-ips", "{", rest.split(" ", 1)[1], "}")
    table = render.split_key(first)[1]
    nft(netns, "flush", "chain", "ip", table, target)
    nft(netns, "delete", "chain", "ip", table, target)
    assert run(backend.observe()).objects != want.objects
    partial = run(backend.apply(b.plan(states, full_sync=False, changed=[])))
    assert partial.ops == 0, "a partial sync trusts its record and does not list the kernel"
    repaired = run(backend.apply(b.plan(states, full_sync=True)))
    assert repaired.ops == 3  # two elements and one chain
    assert run(backend.observe()).objects == want.objects


def test_conflicting_frontends_keep_the_first_and_serve_the_rest(netns: str) -> None:
    n = b.node()
    a = b.state(b.service("a", cluster_ip="10.96.1.1"), [b.endpoint("10.244.1.5")], n)
    # a rival whose chains live in another shard table: the claim spans the shards
    rival = next(
        f"b{i}"
        for i in range(100)
        if render.shard_table(b.service(f"b{i}").name) != render.shard_table(a.name)
    )
    same_vip = b.state(b.service(rival, cluster_ip="10.96.1.1"), [b.endpoint("10.244.1.6")], n)
    other = b.state(b.service("c", cluster_ip="10.96.1.2"), [b.endpoint("10.244.1.7")], n)
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan([a, same_vip, other])))
    views = run(backend.observe()).services
    assert views[str(a.name)].frontends == ("10.96.1.1:80/TCP",)
    assert views[str(other.name)].frontends == ("10.96.1.2:80/TCP",)
    assert str(same_vip.name) not in views or not views[str(same_vip.name)].frontends
    held = [k for k in run(backend.observe()).objects if k.endswith(" 10.96.1.1 . tcp . 80")]
    assert held == [f"ip {render.shard_table(a.name)} element service-ips 10.96.1.1 . tcp . 80"]


def test_cleanup_leaves_other_tables_alone(netns: str) -> None:
    nft(netns, "add", "table", "inet", "someone-else")
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan(states_with(2))))
    run(backend.cleanup())
    tables = nft(netns, "list", "tables")
    assert "someone-else" in tables
    assert "kpy" not in tables


def _one_endpoint_less(states: list[ServicePortState]) -> tuple[list[ServicePortState], str]:
    first = states[0]
    states = [b.state(first.service, first.endpoints[1:]), *states[1:]]
    return states, str(first.endpoints[0].ip)


def test_partial_syncs_go_over_netlink_and_full_syncs_through_nft(netns: str) -> None:
    states = states_with(3)
    backend = NftablesBackend(config(netns))
    assert run(backend.apply(b.plan(states))).detail["netlink"] == 0
    changed, gone = _one_endpoint_less(states)
    result = run(backend.apply(b.plan(changed, full_sync=False, changed=[changed[0].name])))
    assert result.detail["netlink"] == 1 and result.ops > 0
    assert f"dnat to {gone}:" not in nft(netns, "list", "ruleset")
    # what netlink wrote is what a full sync would have written: nothing left to do
    assert run(backend.apply(b.plan(changed, full_sync=True))).ops == 0
    backend.close()


def test_writer_option_nft_and_fallback_for_lines_netlink_cannot_encode(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = states_with(3)
    forced = BackendConfig(node_name="node-a", netns=netns, options=(("nftables_writer", "nft"),))
    backend = NftablesBackend(forced)
    run(backend.apply(b.plan(states)))
    changed, _ = _one_endpoint_less(states)
    result = run(backend.apply(b.plan(changed, full_sync=False, changed=[changed[0].name])))
    assert result.detail["netlink"] == 0 and result.ops > 0

    def refuse(ops: Iterable[render.Op], sets: object) -> netlink.Batch:
        raise netlink.Unsupported(next(iter(ops)).nft())

    monkeypatch.setattr(netlink, "encode", refuse)
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan(changed)))
    result = run(backend.apply(b.plan(states, full_sync=False, changed=[states[0].name])))
    assert result.detail["netlink"] == 0 and result.ops > 0
    assert run(backend.apply(b.plan(states, full_sync=True))).ops == 0
    with pytest.raises(ValueError, match="nftables_writer"):
        NftablesBackend(BackendConfig(node_name="n", options=(("nftables_writer", "x"),)))


def test_a_hairpin_element_stays_while_any_port_has_that_endpoint(netns: str) -> None:
    n = b.node()
    a = b.state(b.service("a", cluster_ip="10.96.1.1"), [b.endpoint("10.244.1.5")], n)
    both = b.state(
        b.service("b", cluster_ip="10.96.1.2"),
        [b.endpoint("10.244.1.5"), b.endpoint("10.244.1.6")],
        n,
    )
    backend = NftablesBackend(config(netns))

    def hairpin() -> set[str]:
        out = nft(netns, "list", "set", "ip", "kpy", "hairpin")
        return {ip for ip in ("10.244.1.5", "10.244.1.6") if f"{ip} . {ip}" in out}

    run(backend.apply(b.plan([a, both])))
    assert hairpin() == {"10.244.1.5", "10.244.1.6"}
    run(backend.apply(b.plan([both], full_sync=False, removed=[a.name])))
    assert hairpin() == {"10.244.1.5", "10.244.1.6"}  # b still has 10.244.1.5
    only_6 = b.state(both.service, [b.endpoint("10.244.1.6")], n)
    run(backend.apply(b.plan([only_6], full_sync=False, changed=[both.name])))
    assert hairpin() == {"10.244.1.6"}
    run(backend.apply(b.plan([a, only_6], full_sync=False, changed=[a.name])))
    assert hairpin() == {"10.244.1.5", "10.244.1.6"}
    assert run(backend.apply(b.plan([a, only_6], full_sync=True))).ops == 0
    backend.close()


@pytest.mark.parametrize("writer", ["netlink", "nft"])
def test_a_full_sync_keeps_the_clients_in_affinity_sets(netns: str, writer: str) -> None:
    n = b.node()
    sticky = b.state(
        b.service("sticky", cluster_ip="10.96.1.3", affinity=True), [b.endpoint("10.244.1.5")], n
    )
    options = (("nftables_writer", writer),)
    backend = NftablesBackend(BackendConfig(node_name="node-a", netns=netns, options=options))
    run(backend.apply(b.plan([sticky])))
    table = render.shard_table(sticky.name)
    affinity = next(
        line.split()[1]
        for line in nft(netns, "list", "table", "ip", table).splitlines()
        if line.strip().startswith("set affinity-")
    )
    nft(netns, "add", "element", "ip", table, affinity, "{", "192.0.2.7", "}")  # a client
    assert run(backend.apply(b.plan([sticky], full_sync=True))).ops == 0
    assert "192.0.2.7" in nft(netns, "list", "set", "ip", table, affinity)
    backend.close()


def test_parallel_transactions_report_the_one_the_kernel_refused(netns: str) -> None:
    from kpy_nftables.apply import Nft, NftError

    good = ["add table ip kpy-parallel-test", "add chain ip kpy-parallel-test c"]
    bad = ["add rule ip no-such-table c drop"]
    with pytest.raises(NftError, match="no-such-table"):
        run(Nft(netns).run_parallel([good, bad]))
    assert "kpy-parallel-test" in nft(netns, "list", "tables")  # each one is atomic alone
