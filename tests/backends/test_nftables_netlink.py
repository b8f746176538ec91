"""The netlink writer against nft itself: the same transaction sent by ``nft -f`` in one
namespace and by :class:`kpy_nftables.netlink.NetlinkWriter` in another must leave
identical rulesets (``nft list ruleset``), for every kind of Service render produces.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from kpy_nftables import netlink, render
from kpy_nftables.apply import NftError

from kpy.core.backend import BackendConfig
from kpy.core.model import Endpoint, ServicePort, ServicePortState
from kpy.testing import builders as b
from kpy.testing import netns as lab
from kpy.testing.netns import nft, scratch
from tests.conftest import require_root

V4_CIDR = ipaddress.ip_network("10.244.0.0/16")
V6_CIDR = ipaddress.ip_network("fd00:244::/48")
DUAL = ["10.96.0.10", "fd00:96::10"]


def _apply(netns: str, script: str) -> None:
    if script:
        nft(netns, "-f", "-", script=script)


def _ruleset(netns: str) -> str:
    return nft(netns, "list", "ruleset")


def _want(states: Sequence[ServicePortState], config: BackendConfig) -> dict[str, render.Obj]:
    want: dict[str, render.Obj] = {}
    for state in states:
        want.update(render.port_objects(state, config))
    return want


@dataclass
class Node:
    """One namespace with kpy's base objects and a set of service ports programmed."""

    netns: str
    config: BackendConfig
    have: dict[str, render.Obj] = field(default_factory=dict)

    def start(self, states: Sequence[ServicePortState]) -> None:
        base = render.base_objects(self.config)
        _apply(self.netns, render.transaction(base, {}, base).script)
        want = _want(states, self.config)
        _apply(self.netns, render.transaction(want, {}, want).script)
        self.have = {**base, **want}


def _change(
    config: BackendConfig,
    before: Sequence[ServicePortState],
    after: Sequence[ServicePortState],
) -> tuple[render.Transaction, dict[tuple[str, str, str], netlink.SetType]]:
    """The transaction from ``before`` to ``after`` and the set types programmed before."""
    old = _want(before, config)
    new = _want(after, config)
    have = {key: obj.value for key, obj in old.items()}
    txn = render.transaction(new, have, {*old, *new})
    return txn, netlink.set_types({**render.base_objects(config), **old}.values())


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces: ``nft -f`` programs the first, the netlink writer the second."""
    require_root()
    with scratch("kpy-nl-") as a, scratch("kpy-nl-") as b_:
        yield a, b_


def _same_after(
    pair: tuple[str, str],
    config: BackendConfig,
    before: Sequence[ServicePortState],
    after: Sequence[ServicePortState],
) -> str:
    for ns in pair:
        Node(ns, config).start(before)
    txn, sets = _change(config, before, after)
    assert txn.script, "the case changes nothing"
    return _both_writers(pair, txn, netlink.encode(txn.iter_ops(), sets))


def _both_writers(pair: tuple[str, str], txn: render.Transaction, batch: netlink.Batch) -> str:
    """``txn`` by ``nft -f`` into the first namespace, ``batch`` (its netlink encoding)
    into the second: the rulesets must be the same; that ruleset."""
    a, b_ = pair
    _apply(a, txn.script)
    writer = netlink.NetlinkWriter(b_)
    try:
        writer.send(batch)
    finally:
        writer.close()
    ruleset = _ruleset(a)
    assert _ruleset(b_) == ruleset
    return ruleset


# --- the cases: (config, before, after) -------------------------------------------------


def _eps(*ips: str, port: int = 8080, node: str = b.NODE) -> list[Endpoint]:
    return [b.endpoint(ip, port, node=node) for ip in ips]


PLAIN = BackendConfig()
CIDRS = BackendConfig(cluster_cidrs=(V4_CIDR, V6_CIDR))
ODD_CIDRS = BackendConfig(
    cluster_cidrs=(ipaddress.ip_network("10.240.0.0/12"), ipaddress.ip_network("fd00:240::/28"))
)
MASQ_ALL = BackendConfig(masquerade_all=True)
MULTI_CIDRS = BackendConfig(
    cluster_cidrs=tuple(
        ipaddress.ip_network(c)
        for c in ("10.244.0.0/16", "10.96.128.0/17", "fd00:244::/48", "fd00:300::/40")
    )
)


def _state(svc: ServicePort, eps: Sequence[Endpoint] = ()) -> ServicePortState:
    return b.state(svc, eps)


CLUSTER_IP = _state(b.service("web"), _eps("10.244.1.5", "10.244.1.6", "10.244.2.5"))
CLUSTER_IP_MORE = _state(
    b.service("web"), _eps("10.244.1.5", "10.244.1.6", "10.244.2.5", "10.244.2.6")
)
CLUSTER_IP_LESS = _state(b.service("web"), _eps("10.244.1.5", "10.244.2.5"))
NO_ENDPOINTS = _state(b.service("web"))
NOT_READY = _state(b.service("web"), [b.endpoint("10.244.1.5", ready=False, serving=False)])
UDP = _state(
    b.service("dns", protocol="UDP", port=53, cluster_ip="10.96.0.53"),
    _eps("10.244.1.7", "10.244.1.8", port=53),
)
SCTP = _state(
    b.service("sig", protocol="SCTP", port=3868, cluster_ip="10.96.0.68"),
    _eps("10.244.1.9", port=3868),
)
NODE_PORT = _state(
    b.service("np", type="NodePort", node_port=30080, cluster_ip="10.96.0.80"),
    _eps("10.244.1.5", "10.244.2.5"),
)
LB = _state(
    b.service(
        "lb",
        type="LoadBalancer",
        node_port=30443,
        cluster_ip="10.96.0.43",
        port=443,
        lb_ips=["172.18.0.50"],
        source_ranges=["203.0.113.0/24", "198.51.100.0/24"],
    ),
    _eps("10.244.1.5"),
)
LB_ONE_RANGE = _state(
    b.service(
        "lb1",
        type="LoadBalancer",
        node_port=30444,
        cluster_ip="10.96.0.44",
        lb_ips=["172.18.0.51"],
        source_ranges=["203.0.113.0/24"],
    ),
    _eps("10.244.1.5"),
)
EXTERNAL_IPS = _state(
    b.service("ext", cluster_ip="10.96.0.90", external_ips=["192.0.2.10", "192.0.2.11"]),
    _eps("10.244.1.6"),
)
ETP_LOCAL = _state(
    b.service(
        "loc",
        type="NodePort",
        node_port=30090,
        cluster_ip="10.96.0.91",
        etp_local=True,
    ),
    [*_eps("10.244.1.5"), *_eps("10.244.2.5", node="node-b")],
)
ETP_LOCAL_NONE_HERE = _state(
    b.service(
        "loc",
        type="NodePort",
        node_port=30090,
        cluster_ip="10.96.0.91",
        etp_local=True,
    ),
    _eps("10.244.2.5", node="node-b"),
)
AFFINITY = _state(
    b.service("aff", cluster_ip="10.96.0.92", affinity=True, affinity_timeout=600),
    _eps("10.244.1.5", "10.244.1.6"),
)
AFFINITY_LONGER = _state(
    b.service("aff", cluster_ip="10.96.0.92", affinity=True, affinity_timeout=900),
    _eps("10.244.1.5", "10.244.1.6"),
)
DUAL_STACK = _state(
    b.service(
        "dual",
        cluster_ip=DUAL,
        type="LoadBalancer",
        node_port=30100,
        lb_ips=["172.18.0.60", "fd00:18::60"],
        affinity=True,
        etp_local=True,
    ),
    [
        *_eps("10.244.1.5", "fd00:244:1::5"),
        *_eps("10.244.2.5", "fd00:244:2::5", node="node-b"),
    ],
)
IPV6_ONLY = _state(
    b.service("six", cluster_ip="fd00:96::20"),
    _eps("fd00:244:1::5", "fd00:244:1::6"),
)


@dataclass(frozen=True)
class Case:
    id: str
    config: BackendConfig
    before: tuple[ServicePortState, ...]
    after: tuple[ServicePortState, ...]


CASES = [
    Case("clusterip-new", CIDRS, (), (CLUSTER_IP,)),
    Case("endpoint-added", CIDRS, (CLUSTER_IP,), (CLUSTER_IP_MORE,)),
    Case("endpoint-removed", CIDRS, (CLUSTER_IP,), (CLUSTER_IP_LESS,)),
    Case("to-no-endpoints", CIDRS, (CLUSTER_IP,), (NO_ENDPOINTS,)),
    Case("from-no-endpoints", CIDRS, (NO_ENDPOINTS,), (CLUSTER_IP,)),
    Case("not-ready-drop", CIDRS, (), (NOT_READY,)),
    Case("service-removed", CIDRS, (CLUSTER_IP, UDP), (UDP,)),
    Case("udp-and-sctp", PLAIN, (), (UDP, SCTP)),
    Case("nodeport", CIDRS, (), (NODE_PORT,)),
    Case("loadbalancer-source-range", CIDRS, (), (LB_ONE_RANGE,)),
    Case("loadbalancer-source-ranges", CIDRS, (), (LB, LB_ONE_RANGE)),
    Case("several-cluster-cidrs", MULTI_CIDRS, (), (CLUSTER_IP, ETP_LOCAL, DUAL_STACK)),
    Case("several-cluster-cidrs-changed", MULTI_CIDRS, (CLUSTER_IP,), (CLUSTER_IP_LESS,)),
    Case("loadbalancer-removed", CIDRS, (LB_ONE_RANGE, NODE_PORT), (NODE_PORT,)),
    Case("external-ips", CIDRS, (), (EXTERNAL_IPS,)),
    Case("etp-local", CIDRS, (), (ETP_LOCAL,)),
    Case("etp-local-last-local-endpoint-gone", CIDRS, (ETP_LOCAL,), (ETP_LOCAL_NONE_HERE,)),
    Case("affinity", CIDRS, (), (AFFINITY,)),
    Case("affinity-timeout-changed", CIDRS, (AFFINITY,), (AFFINITY_LONGER,)),
    Case("affinity-removed", CIDRS, (AFFINITY,), ()),
    Case("dual-stack-lb-affinity-etp-local", CIDRS, (), (DUAL_STACK,)),
    Case("ipv6", CIDRS, (), (IPV6_ONLY,)),
    Case("masquerade-all", MASQ_ALL, (), (CLUSTER_IP, DUAL_STACK, NODE_PORT)),
    Case("no-cluster-cidrs", PLAIN, (), (CLUSTER_IP, ETP_LOCAL, IPV6_ONLY)),
    Case("unaligned-cluster-cidrs", ODD_CIDRS, (), (CLUSTER_IP, DUAL_STACK, ETP_LOCAL)),
    Case(
        "everything-at-once",
        CIDRS,
        (),
        (
            CLUSTER_IP,
            UDP,
            SCTP,
            NODE_PORT,
            LB_ONE_RANGE,
            EXTERNAL_IPS,
            ETP_LOCAL,
            AFFINITY,
            DUAL_STACK,
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_writer_leaves_the_ruleset_nft_leaves(pair: tuple[str, str], case: Case) -> None:
    ruleset = _same_after(pair, case.config, case.before, case.after)
    for state in case.after:  # the comparison is about something: the services are there
        assert render.service_chain(state.name) in ruleset or "no-endpoint" in ruleset


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((), ("10.96.0.0/12",)),
        (("10.96.0.0/12",), ("10.96.0.0/12", "10.200.0.0/24", "fd00:96::/108")),
        (("10.96.0.0/12", "10.200.0.0/24", "fd00:96::/108"), ("fd00:96::/108",)),
    ],
    ids=["first", "added-both-families", "removed"],
)
def test_service_cidr_changes_over_netlink_leave_the_ruleset_nft_leaves(
    pair: tuple[str, str], before: tuple[str, ...], after: tuple[str, ...]
) -> None:
    """A ServiceCIDR change rewrites the cluster-ips-check chains (a reject and a drop
    per CIDR): encoded for netlink — no nft process — and the same as nft's."""
    old = BackendConfig(service_cidrs=tuple(ipaddress.ip_network(c) for c in before))
    new = BackendConfig(service_cidrs=tuple(ipaddress.ip_network(c) for c in after))
    for ns in pair:
        Node(ns, old).start([CLUSTER_IP])
    was, will = render.base_objects(old), render.base_objects(new)
    keys = {k for k in was.keys() | will.keys() if was[k].value != will[k].value}
    txn = render.transaction(will, {k: o.value for k, o in was.items()}, keys)
    assert "cluster-ips-check" in txn.script
    batch = netlink.encode(txn.iter_ops(), netlink.set_types(will.values()))  # no Unsupported
    ruleset = _both_writers(pair, txn, batch)
    for cidr in after:
        assert f"daddr {cidr} drop" in ruleset
    assert "reject" in ruleset


@pytest.mark.parametrize(
    "ranges",
    [
        "10.0.0.0/9, 10.128.0.0/9",  # adjacent: nft merges them
        "10.0.0.0/8, 10.1.0.0/16",  # overlapping
        "0.0.0.0/8, 10.0.0.0/8",  # from the lowest address
        "10.0.0.0/8, 255.0.0.0/8",  # to the highest
    ],
)
def test_anonymous_sets_nft_would_rewrite_are_unsupported(ranges: str) -> None:
    nets = tuple(r.strip() for r in ranges.split(","))
    op = render.AddRule("ip", "kpy", "x", render.rule(render.Addr("ip", "saddr", nets, True), DROP))
    line = f"add rule ip kpy x ip saddr != {{ {ranges} }} drop"
    assert op.nft() == line
    with pytest.raises(netlink.Unsupported) as refused:
        netlink.encode([op], {})
    assert line in str(refused.value)


def test_an_anonymous_set_comes_before_its_rule() -> None:
    nets = ("203.0.113.0/24", "198.51.100.0/24")
    op = render.AddRule("ip", "kpy", "x", render.rule(render.Addr("ip", "saddr", nets, True), DROP))
    line = "add rule ip kpy x ip saddr != { 203.0.113.0/24, 198.51.100.0/24 } drop"
    batch = netlink.encode([op], {})
    assert batch.lines == (line, line, line)
    assert all(b"__set%d\0" in m for m in batch.messages)


def test_one_endpoint_change_among_many_services(pair: tuple[str, str]) -> None:
    states = b.synthetic_states(60)
    changed = list(states)
    first = changed[0]
    changed[0] = b.state(first.service, [*first.endpoints, b.endpoint("10.244.99.99")])
    ruleset = _same_after(pair, CIDRS, states, changed)
    assert "10.244.99.99" in ruleset


def test_a_writer_is_reused_for_many_sends(pair: tuple[str, str]) -> None:
    a, b_ = pair
    for ns in pair:
        Node(ns, CIDRS).start([CLUSTER_IP])
    writer = netlink.NetlinkWriter(b_)
    try:
        previous = [CLUSTER_IP]
        for n in range(20):
            eps = _eps(*(f"10.244.3.{i}" for i in range(1, 2 + n % 5)))
            current = [_state(b.service("web"), eps), *([UDP] if n % 2 else [])]
            txn, sets = _change(CIDRS, previous, current)
            _apply(a, txn.script)
            writer.send(netlink.encode(txn.iter_ops(), sets))
            previous = current
    finally:
        writer.close()
    assert _ruleset(b_) == _ruleset(a)


def test_refused_transaction_names_the_line_and_changes_nothing(pair: tuple[str, str]) -> None:
    _, b_ = pair
    Node(b_, CIDRS).start([CLUSTER_IP])
    before = _ruleset(b_)
    txn, sets = _change(CIDRS, [CLUSTER_IP], [CLUSTER_IP_MORE, UDP])
    table = render.shard_table(UDP.name) if hasattr(render, "shard_table") else render.TABLE
    goto = render.rule(render.Verdict("goto", "no-such-chain"))
    bad_op = render.AddRule("ip", table, render.service_chain(UDP.name), goto)
    bad = f"add rule ip {table} {render.service_chain(UDP.name)} goto no-such-chain"
    ops = list(txn.iter_ops())
    at = max(i for i, op in enumerate(ops) if isinstance(op, render.AddRule)) + 1
    ops = [*ops[:at], bad_op, *ops[at:]]
    writer = netlink.NetlinkWriter(b_)
    try:
        with pytest.raises(NftError) as refused:
            writer.send(netlink.encode(ops, sets))
        assert bad in str(refused.value)
        assert "No such file or directory" in str(refused.value)
        assert _ruleset(b_) == before
        # The same writer goes on working after a refusal.
        good, sets = _change(CIDRS, [CLUSTER_IP], [CLUSTER_IP_MORE])
        writer.send(netlink.encode(good.iter_ops(), sets))
        assert _ruleset(b_) != before
    finally:
        writer.close()


def test_rules_sent_over_netlink_carry_real_connections() -> None:
    """Real packets: the node's Services programmed only by the writer answer."""
    require_root()
    config = BackendConfig(
        cluster_cidrs=(V4_CIDR, V6_CIDR), node_ips=(ipaddress.ip_address(lab.NODE_IP),)
    )
    pods = _eps(lab.POD_A, lab.POD_B, lab.POD_A6, lab.POD_B6)
    web = b.service("web", cluster_ip=DUAL, type="NodePort", node_port=30080)
    sticky = b.service("sticky", cluster_ip="10.96.0.11", affinity=True)
    dns = b.service("dns", protocol="UDP", cluster_ip="10.96.0.12", port=53)
    both = [_state(web, pods), _state(sticky, pods), _state(dns, pods)]
    only_b = [_state(web, _eps(lab.POD_B, lab.POD_B6)), *both[1:]]
    with lab.topology("kpy-nl") as topo:
        base = render.base_objects(config)
        _apply(topo.node, render.transaction(base, {}, base).script)
        pod_a = topo.pods["pod-a"]
        writer = netlink.NetlinkWriter(topo.node)
        try:
            txn, sets = _change(config, (), both)
            writer.send(netlink.encode(txn.iter_ops(), sets))
            seen = {lab.tcp(pod_a, "10.96.0.10", 80).split()[0] for _ in range(40)}
            assert seen == {"pod-a", "pod-b"}
            assert lab.tcp(pod_a, "fd00:96::10", 80).split()[0] in {"pod-a", "pod-b"}
            assert lab.tcp(topo.client, lab.NODE_IP, 30080).split()[0] in {"pod-a", "pod-b"}
            assert lab.udp(pod_a, "10.96.0.12", 53).split()[0] in {"pod-a", "pod-b"}
            assert len({lab.tcp(pod_a, "10.96.0.11", 80).split()[0] for _ in range(10)}) == 1
            txn, sets = _change(config, both, only_b)
            writer.send(netlink.encode(txn.iter_ops(), sets))
            seen = {lab.tcp(pod_a, "10.96.0.10", 80).split()[0] for _ in range(20)}
            assert seen == {"pod-b"}
        finally:
            writer.close()


# --- pure: encoding -----------------------------------------------------------------------

SETS = {
    ("ip", "kpy", "service-ips"): netlink.SetType("ipv4_addr . inet_proto . inet_service", "map"),
    ("ip", "kpy", "service-endpoints"): netlink.SetType("ipv4_addr . inet_service . mark"),
}


DROP = render.Verdict("drop")


def _rule(*statements: render.Statement, chain: str = "x") -> render.AddRule:
    return render.AddRule("ip", "kpy", chain, render.rule(*statements))


def _elements(name: str, element: str, verdict: str = "", comment: str = "") -> render.Op:
    return render.AddElements(
        "ip", "kpy", name, (render.Element("ip", name, element, verdict, comment),)
    )


HOOK = "type nat hook output priority -100; policy accept;"


@pytest.mark.parametrize(
    "op",
    [
        render.AddChain(render.Chain("ip", "nat-output", (), HOOK)),
        _rule(
            render.Lookup(("ip daddr", "meta l4proto", "th dport"), "service-ips", vmap=True),
            chain="services",
        ),
        _rule(render.Addr("ip", "saddr", ("10.0.0.0/8", "10.244.0.0/16"), True), DROP),
        _rule(render.Masquerade(), chain="masquerading"),
        _rule(
            render.CtState("new"),
            render.Verdict("jump", "nodeport-endpoints-check"),
            chain="filter-input",
        ),
        _rule(render.Reject(tcp_reset=True), chain="reject-chain"),
        _rule(render.Dnat("ip6", "fd00::5", 80)),  # in an ip table
        _rule(render.L4Proto("tcp"), render.DPort("tcp", 80), DROP),
        _rule(render.Addr("ip6", "saddr", ("fd00::1",)), DROP),
        _rule(DROP, render.Verdict("accept")),
        _rule(render.Verdict("goto", "$chain")),
        render.AddRule("ip", "kpy", "x", render.Rule("drop")),  # text alone, no statements
        _elements("unknown-set", "10.0.0.1"),
        _elements("service-ips", "10.96.0.1 . tcp", "goto a", "x"),
        _elements("service-endpoints", "10.244.1.5 . 8080 . 1", "drop", "x"),
        _elements('"service-ips"', "10.96.0.1 . tcp . 80", "drop"),
        render.AddSet(render.Set("ip", "s", "ether_addr")),
        render.AddSet(render.Set("ip", "m", "inet_service", kind="map")),
        render.AddChain(render.Chain("ip", '"quoted name"', ())),
    ],
    ids=lambda op: op.nft(),
)
def test_operations_outside_the_subset_are_unsupported(op: render.Op) -> None:
    with pytest.raises(netlink.Unsupported) as refused:
        netlink.encode([render.AddTable("ip", "kpy"), op], SETS)
    assert op.nft() in str(refused.value)


def test_concatenated_keys_are_padded_registers() -> None:
    """The element bytes nft 1.0 sends (``nft --debug=mnl``) for the same line."""
    batch = netlink.encode(
        [
            _elements("service-ips", "10.96.0.1 . tcp . 80", "goto service-x", "ns/name/tcp/80"),
            _elements("service-endpoints", "10.244.1.5 . 8080 . 1234567", "", "x"),
        ],
        SETS,
    )
    assert len(batch) == 2
    assert batch.lines[1].startswith("add element ip kpy service-endpoints")
    assert bytes.fromhex("0a6000010600000000500000") in batch.messages[0]
    assert bytes.fromhex("000f") + b"ns/name/tcp/80\0" in batch.messages[0]
    assert bytes.fromhex("0af401051f90000087d61200") in batch.messages[1]


def test_sets_added_in_the_transaction_are_known_to_later_operations() -> None:
    aff = render.Element("ip6", "aff", "fd00::5", "", "", "kpy-3")
    batch = netlink.encode(
        [
            render.AddSet(render.Set("ip6", "aff", "ipv6_addr", timeout=300, table="kpy-3")),
            render.AddElements("ip6", "kpy-3", "aff", (aff,)),
            render.AddRule(
                "ip6",
                "kpy-3",
                "c",
                render.rule(
                    render.AddrIn("ip6", "saddr", "aff"), render.Update("ip6", "aff"), DROP
                ),
            ),
        ],
        {},
    )
    assert len(batch) == 3
    assert all(b"kpy-3\0" in m for m in batch.messages)


def test_empty_transaction_is_an_empty_batch() -> None:
    assert len(netlink.encode([], {})) == 0


def _every_case_encoded() -> list[netlink.Batch]:
    """Each case's transaction encoded from its operations (one element each, as the
    backend sends them, and grouped), and a ServiceCIDR change."""
    batches = []
    for case in CASES:
        old, new = _want(case.before, case.config), _want(case.after, case.config)
        have = {k: o.value for k, o in old.items()}
        sets = netlink.set_types({**render.base_objects(case.config), **old}.values())
        for group in (False, True):
            txn = render.transaction(new, have, {*old, *new}, group=group)
            batches.append(netlink.encode(txn.iter_ops(), sets))
    was = render.base_objects(BackendConfig())
    will = render.base_objects(BackendConfig(service_cidrs=(ipaddress.ip_network("10.96.0.0/12"),)))
    keys = {k for k in was if was[k].value != will[k].value}
    txn = render.transaction(will, {k: o.value for k, o in was.items()}, keys)
    batches.append(netlink.encode(txn.iter_ops(), netlink.set_types(will.values())))
    return batches


# The digest of every message above. It was first taken from the encoder of ``nft -f``
# script lines (which this encoder of render's operations replaced) and this encoder
# wrote the same bytes; taken again when ``service-endpoints`` moved into the shard
# tables (the layout, not the encoding, changed). With 16 shard tables (the count
# then): the test renders with that count.
SCRIPT_ENCODER_DIGEST = "3eca7671386b985cc4c7d9780c95e531c3e5abd36f230b417325c65fe7237ee1"


def test_operations_encode_to_the_bytes_script_lines_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(render, "SHARDS", 16)
    batches = _every_case_encoded()
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(b"".join(batch.messages))
    assert digest.hexdigest() == SCRIPT_ENCODER_DIGEST
    # grouped operations are sent one element a message, named one element a line
    for single, grouped in zip(batches[0:-1:2], batches[1:-1:2], strict=True):
        assert grouped.messages == single.messages and grouped.lines == single.lines
    assert sum(len(b) for b in batches) > 500
