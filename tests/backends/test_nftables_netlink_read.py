"""The netlink reader against nft itself: for real kpy state programmed by the nftables
backend in a namespace, what :meth:`kpy_nftables.netlink_read.NetlinkReader.observe`
reads must be exactly what ``nft -j list chains / sets / maps`` parses to
(:func:`kpy_nftables.observe.parse`) — the same keys and values, the same per-Service
views.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from kpy_nftables import NftablesBackend, netlink_read, observe, render
from kpy_nftables.apply import Nft, NftError
from kpy_nftables.netlink_read import NetlinkReader, type_names

from kpy.core.backend import BackendConfig
from kpy.core.model import Endpoint, ServicePortState
from kpy.testing import builders as b
from kpy.testing.netns import nft, scratch
from tests.conftest import require_root

pytestmark = pytest.mark.root

CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/48"))
DUAL = ["10.96.0.10", "fd00:96::10"]


@pytest.fixture
def ns() -> Iterator[str]:
    require_root()
    with scratch("kpy-nlr-") as name:
        yield name


def _program(
    netns: str, states: Sequence[ServicePortState], *, masquerade_all: bool = False
) -> None:
    config = BackendConfig(netns=netns, cluster_cidrs=CIDRS, masquerade_all=masquerade_all)
    backend = NftablesBackend(config)
    try:
        asyncio.run(backend.apply(b.plan(states)))
    finally:
        backend.close()


def _nft_documents(netns: str) -> Iterator[dict[str, Any]]:
    """``nft -j list chains/sets/maps``, families ip and ip6 only (kpy's; observe
    itself does not look at the family, and the reader reads no other)."""
    for doc in asyncio.run(Nft(netns).list_tables()):
        items = doc.get("nftables", [])
        yield {
            "nftables": [
                item
                for item in items
                if all(body.get("family") in ("ip", "ip6") for body in item.values())
            ]
        }


def _bynft(netns: str) -> observe.Observed:
    return observe.parse(_nft_documents(netns))


def _by_netlink(netns: str) -> observe.Observed:
    reader = NetlinkReader(netns)
    try:
        return reader.observe()
    finally:
        reader.close()


def _assert_same(netns: str) -> observe.Observed:
    want = _bynft(netns)
    got = _by_netlink(netns)
    assert got.values == want.values
    assert observe.views(got) == observe.views(want)
    assert got.tables == want.tables
    return got


# --- the cases ----------------------------------------------------------------------------


def _eps(*ips: str, port: int = 8080, node: str = b.NODE) -> list[Endpoint]:
    return [b.endpoint(ip, port, node=node) for ip in ips]


CLUSTER_IP = b.state(b.service("web"), _eps("10.244.1.5", "10.244.1.6", "10.244.2.5"))
NO_ENDPOINTS = b.state(b.service("empty", cluster_ip="10.96.0.30"))
NOT_READY = b.state(
    b.service("down", cluster_ip="10.96.0.31"),
    [b.endpoint("10.244.1.5", ready=False, serving=False)],
)
UDP = b.state(
    b.service("dns", protocol="UDP", port=53, cluster_ip="10.96.0.53"),
    _eps("10.244.1.7", "10.244.1.8", port=53),
)
SCTP = b.state(
    b.service("sig", protocol="SCTP", port=3868, cluster_ip="10.96.0.68"),
    _eps("10.244.1.9", port=3868),
)
NODE_PORT = b.state(
    b.service("np", type="NodePort", node_port=30080, cluster_ip="10.96.0.80"),
    _eps("10.244.1.5", "10.244.2.5"),
)
LB = b.state(
    b.service(
        "lb",
        type="LoadBalancer",
        node_port=30443,
        cluster_ip="10.96.0.43",
        port=443,
        lb_ips=["172.18.0.50", "172.18.0.51"],
        source_ranges=["203.0.113.0/24", "198.51.100.0/24"],
    ),
    _eps("10.244.1.5"),
)
LB_NO_ENDPOINTS = b.state(
    b.service(
        "lb0",
        type="LoadBalancer",
        node_port=30444,
        cluster_ip="10.96.0.44",
        lb_ips=["172.18.0.52"],
        source_ranges=["203.0.113.0/24"],
    ),
)
EXTERNAL_IPS = b.state(
    b.service("ext", cluster_ip="10.96.0.90", external_ips=["192.0.2.10", "192.0.2.11"]),
    _eps("10.244.1.6"),
)
ETP_LOCAL = b.state(
    b.service("loc", type="NodePort", node_port=30090, cluster_ip="10.96.0.91", etp_local=True),
    [*_eps("10.244.1.5"), *_eps("10.244.2.5", node="node-b")],
)
ETP_LOCAL_NONE_HERE = b.state(
    b.service("far", type="NodePort", node_port=30091, cluster_ip="10.96.0.93", etp_local=True),
    _eps("10.244.2.6", node="node-b"),
)
AFFINITY = b.state(
    b.service("aff", cluster_ip="10.96.0.92", affinity=True, affinity_timeout=600),
    _eps("10.244.1.5", "10.244.1.6"),
)
DUAL_STACK = b.state(
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
IPV6_ONLY = b.state(
    b.service("six", cluster_ip="fd00:96::20", type="NodePort", node_port=30200),
    _eps("fd00:244:1::5", "fd00:244:1::6", "fd00::1:0:0:7"),
)
# The same VIP claimed by two Services: the second is refused (a conflict).
CONFLICT = b.state(b.service("clash", cluster_ip="10.96.0.10"), _eps("10.244.3.3"))


@dataclass(frozen=True)
class Case:
    id: str
    states: tuple[ServicePortState, ...]
    masquerade_all: bool = False


CASES = [
    Case("base-tables-only", ()),
    Case("clusterip", (CLUSTER_IP,)),
    Case("no-endpoints", (NO_ENDPOINTS, NOT_READY)),
    Case("udp-and-sctp", (UDP, SCTP)),
    Case("nodeport", (NODE_PORT,)),
    Case("loadbalancer-source-ranges", (LB, LB_NO_ENDPOINTS)),
    Case("external-ips", (EXTERNAL_IPS,)),
    Case("etp-local", (ETP_LOCAL, ETP_LOCAL_NONE_HERE)),
    Case("affinity", (AFFINITY,)),
    Case("dual-stack", (DUAL_STACK,)),
    Case("ipv6", (IPV6_ONLY,)),
    Case("conflict", (CLUSTER_IP, CONFLICT)),
    Case("masquerade-all", (CLUSTER_IP, DUAL_STACK, NODE_PORT), masquerade_all=True),
    Case(
        "everything",
        (
            CLUSTER_IP,
            NO_ENDPOINTS,
            UDP,
            SCTP,
            NODE_PORT,
            LB,
            LB_NO_ENDPOINTS,
            EXTERNAL_IPS,
            ETP_LOCAL,
            ETP_LOCAL_NONE_HERE,
            AFFINITY,
            DUAL_STACK,
            IPV6_ONLY,
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reads_what_nft_reads(ns: str, case: Case) -> None:
    _program(ns, case.states, masquerade_all=case.masquerade_all)
    got = _assert_same(ns)
    # about something: every service port's frontends or endpoints were read
    assert got.tables == {"ip", "ip6"}
    views = observe.views(got)
    for state in case.states:
        if state.name != CONFLICT.name:
            assert str(state.name) in views, state.name
    chains = {k.rsplit(" chain ", 1)[1] for k in got.values if " chain " in k}
    for state in case.states:
        if state.name != CONFLICT.name:
            assert (render.service_chain(state.name) in chains) == bool(state.internal), state


def test_two_hundred_services(ns: str) -> None:
    _program(ns, b.synthetic_states(200))
    got = _assert_same(ns)
    assert len(observe.views(got)) == 200
    fingerprinted = [v for k, v in got.values.items() if " chain " in k]
    assert fingerprinted and render.CHAIN_ONLY not in fingerprinted


class _Counting(NetlinkReader):
    """A reader that counts the dumps it asks for, by kind, records the sets whose
    elements it dumps and the parts of each, and fails after ``fail_after`` of them."""

    def __init__(self, netns: str, fail_after: int | None = None) -> None:
        super().__init__(netns)
        self.dumps: dict[int, int] = {}
        self.element_dumps: list[tuple[str, int]] = []  # (set name, parts)
        self.fail_after = fail_after

    def dump(self, kind: int, family: int, *attrs: bytes) -> list[bytes]:
        self.dumps[kind] = self.dumps.get(kind, 0) + 1
        return super().dump(kind, family, *attrs)

    def element_parts(self, family: str, table: str, name: str) -> list[bytes]:
        if self.fail_after is not None and len(self.element_dumps) == self.fail_after:
            self.fail_after = None
            raise NftError("stopped part way")
        parts = super().element_parts(family, table, name)
        self.element_dumps.append((name, len(parts)))
        return parts


def test_large_sets_are_read_in_parts(ns: str) -> None:
    """A large set's elements come in several parts of one dump, each decoded as it
    comes (none held decoded whole beside the others): read the same as nft."""
    _program(ns, b.synthetic_states(40))
    reader = _Counting(ns)
    try:
        got = reader.observe()
    finally:
        reader.close()
    assert max(parts for _name, parts in reader.element_dumps) > 1
    assert got.values == _bynft(ns).values


def test_a_read_stopped_part_way_leaves_the_reader_usable(ns: str) -> None:
    """A read that stops after the first set's elements (an error) leaves the reader
    usable: the next read reads everything."""
    _program(ns, b.synthetic_states(30))
    reader = _Counting(ns, fail_after=1)
    try:
        with pytest.raises(NftError):
            reader.observe()
        assert reader.dumps.get(netlink_read.NFT_MSG_GETSETELEM) == 1
        assert reader.observe().values == _bynft(ns).values
    finally:
        reader.close()


def test_drift_is_read_as_it_is(ns: str) -> None:
    """Hand-made damage — a chain gone, an element gone, a stray element — reads the
    same through both."""
    _program(ns, (CLUSTER_IP, NODE_PORT, UDP))
    shard = render.shard_table(CLUSTER_IP.name)
    chain = render.service_chain(CLUSTER_IP.name)
    nft(
        ns,
        "-f",
        "-",
        script=(
            f"delete element ip {shard} service-ips {{ 10.96.0.10 . tcp . 80 }}\n"
            f"flush chain ip {shard} {chain}\n"
            f"delete chain ip {shard} {chain}\n"
            "add element ip kpy masquerade-nodeports { udp . 31000 }\n"
            "add element ip kpy no-endpoint-services"
            ' { 10.96.9.9 . tcp . 9 comment "x/y/tcp/z" : drop }\n'
            "add element ip kpy no-endpoint-nodeports"
            " { tcp . 31999 : accept, udp . 31998 : jump reject-chain }\n"
            f"add element ip6 {shard} service-endpoints {{ ::ffff:10.1.2.3 . 80 . 4294967295 }}\n"
        ),
    )
    got = _assert_same(ns)
    assert f"ip {shard} chain {chain}" not in got.values
    assert got.values["ip element masquerade-nodeports udp . 31000"] == " # "
    assert got.values["ip element no-endpoint-nodeports udp . 31998"] == "jump reject-chain # "
    assert got.values["ip element no-endpoint-nodeports tcp . 31999"] == "accept # "


def test_empty_namespace_reads_nothing(ns: str) -> None:
    reader = NetlinkReader(ns)
    try:
        nothing = reader.observe()
        assert not nothing.seen_tables and not nothing.values
    finally:
        reader.close()
    assert _by_netlink(ns).values == {} == _bynft(ns).values


FOREIGN = """\
table ip filter {
  set blocked { type ipv4_addr; elements = { 192.0.2.1 } }
  map ports { type inet_service : verdict; elements = { 22 : drop } }
  chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }
}
table inet kpy {
  set s { type ipv4_addr . inet_service; elements = { 10.0.0.1 . 80 } }
  chain c {
  }
}
add table ip kpy-x
add chain ip kpy-x c
add table ip kpyish
add chain ip kpyish c
add table netdev kpy-1
add chain netdev kpy-1 c
"""


def test_foreign_tables_are_ignored(ns: str) -> None:
    nft(ns, "-f", "-", script=FOREIGN)
    reader = _Counting(ns)
    try:
        nothing = reader.observe()
        assert not nothing.seen_tables and not nothing.values
        assert reader.element_dumps == []  # no set of the foreign tables was read
        _program(ns, (CLUSTER_IP, IPV6_ONLY))
        got = reader.observe()  # the same reader, a second time
    finally:
        reader.close()
    assert got.seen_tables == {("ip", render.TABLE), ("ip6", render.TABLE)} | {
        (f, t) for f in ("ip", "ip6") for t in render.shard_tables()
    }
    assert {name for name, _parts in reader.element_dumps} <= {*render.SETS, *render.MAPS}
    assert got.values == _bynft(ns).values
    listed = json.loads(nft(ns, "-j", "list", "tables"))["nftables"]
    families = {item["table"]["family"] for item in listed if "table" in item}
    assert {"inet", "netdev"} <= families  # the foreign tables are still there


def test_affinity_clients_are_not_read(ns: str) -> None:
    """Clients the kernel adds to an affinity set are not render's: nft lists them, the
    reader does not even read them (the definition it does)."""
    _program(ns, (AFFINITY,))
    shard = render.shard_table(AFFINITY.name)
    sets = [k for k in _bynft(ns).values if k.startswith(f"ip {shard} set affinity-")]
    assert len(sets) == 2
    name = sets[0].split(" set ", 1)[1]
    nft(ns, "add", "element", "ip", shard, name, "{ 10.244.7.7 }")
    assert "10.244.7.7" in json.dumps(list(_nft_documents(ns)))
    reader = _Counting(ns)
    try:
        got = reader.observe().values
    finally:
        reader.close()
    assert name not in {n for n, _parts in reader.element_dumps}  # never dumped
    assert "10.244.7.7" not in json.dumps(got)
    assert got == _bynft(ns).values
    assert got[f"ip {shard} set {name}"] == "ipv4_addr timeout 600s"


class _Meddler(NetlinkReader):
    """A reader that runs ``script`` with nft once, after the first part of the first
    dump of ``kind`` whose request names ``target`` — a change to the ruleset in the
    middle of that dump (the kernel has made the next part already; the one after it
    is made after the change)."""

    def __init__(self, netns: str, kind: int, target: bytes, script: str) -> None:
        super().__init__(netns)
        self.kind = kind
        self.target = target
        self.script: str | None = script
        self.asking = threading.local()  # the request of each reading thread's dump

    def dump(self, kind: int, family: int, *attrs: bytes) -> list[bytes]:
        self.asking.request = b"".join(attrs)
        return super().dump(kind, family, *attrs)

    def _companion(self) -> NetlinkReader:
        # every dump through this reader, one at a time (its lock): a change made during
        # one dump is seen by that dump alone
        return self

    def _receive(self, sock: socket.socket, kind: int, part: int) -> bytes:
        data = super()._receive(sock, kind, part)
        request = getattr(self.asking, "request", b"")
        meddle = kind == self.kind and part == 0 and self.target in request
        if meddle and self.script is not None:
            nft(self.netns or "", "-f", "-", script=self.script)
            self.script = None
        return data


@pytest.mark.parametrize(
    ("kind", "target", "script", "added"),
    [
        (
            netlink_read.NFT_MSG_GETSETELEM,
            b"service-endpoints",
            "add element ip kpy-0 service-endpoints { 10.244.99.9 . 8080 . 7 }",
            "ip kpy-0 element service-endpoints 10.244.99.9 . 8080 . 7",
        ),
        (
            netlink_read.NFT_MSG_GETCHAIN,
            b"",
            "add chain ip kpy extra-chain",
            "ip chain extra-chain",
        ),
        (netlink_read.NFT_MSG_GETSET, b"", "add table ip other", None),
    ],
    ids=["elements", "chains", "sets"],
)
def test_a_dump_changed_under_the_reader_is_asked_again(
    ns: str, kind: int, target: bytes, script: str, added: str | None
) -> None:
    """The kernel marks a dump whose ruleset changed between its parts
    (``NLM_F_DUMP_INTR``); the reader drops it and asks again, so what it reads is
    the ruleset after the change."""
    _program(ns, b.synthetic_states(300))
    reader = _Meddler(ns, kind, target, script)
    try:
        got = reader.observe().values
    finally:
        reader.close()
    assert reader.script is None, "the dump came in one part: nothing was changed under it"
    assert reader.restarts == 1
    assert got == _bynft(ns).values
    if added is not None:
        assert added in got


def test_a_set_deleted_before_its_elements_are_read_is_not_there(ns: str) -> None:
    _program(ns, (CLUSTER_IP, NODE_PORT))
    nft(ns, "add", "set", "ip", "kpy", "zz-extra", "{ type ipv4_addr; elements = { 192.0.2.7 } }")
    reader = _Meddler(
        ns, netlink_read.NFT_MSG_GETSETELEM, b"fingerprints", "delete set ip kpy zz-extra"
    )
    try:
        got = reader.observe().values
    finally:
        reader.close()
    assert reader.script is None
    assert not any("zz-extra" in k for k in got)
    assert got == _bynft(ns).values


def test_a_dump_of_a_missing_set_is_refused_with_its_errno(ns: str) -> None:
    _program(ns, ())
    reader = NetlinkReader(ns)
    try:
        with pytest.raises(netlink_read.DumpRefused) as refused:
            reader.element_parts("ip", render.TABLE, "no-such-set")
        assert refused.value.errno == errno.ENOENT
        assert reader.observe().values == _bynft(ns).values  # still usable
    finally:
        reader.close()


# --- pure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_id", "names"),
    [
        (7, ["ipv4_addr"]),
        (8, ["ipv6_addr"]),
        ((7 << 12) | (12 << 6) | 13, ["ipv4_addr", "inet_proto", "inet_service"]),
        ((8 << 12) | (13 << 6) | 19, ["ipv6_addr", "inet_service", "mark"]),
        ((12 << 6) | 13, ["inet_proto", "inet_service"]),
    ],
)
def test_type_names(type_id: int, names: list[str]) -> None:
    assert type_names(type_id) == names


def test_rule_digests_follow_the_rules_and_ignore_handles_and_set_numbers(ns: str) -> None:
    """A chain's (count, digest): equal for the same rules written again (new handles,
    a renumbered anonymous set), different for another rule or order; only kpy's
    tables; a chain without rules is not listed."""
    nft(
        ns,
        "-f",
        "-",
        script="add table ip kpy-3\nadd chain ip kpy-3 c\nadd chain ip kpy-3 empty\n"
        "add rule ip kpy-3 c ip saddr != { 10.0.0.0/8, 10.244.0.0/16 } drop\n"
        "add rule ip kpy-3 c ip daddr 10.96.0.1 accept\n"
        "add table ip other\nadd chain ip other c\nadd rule ip other c drop\n",
    )

    def digests() -> dict[tuple[str, str, str], tuple[int, bytes]]:
        with NetlinkReader(ns) as reader:
            return dict(reader.rules().chains)

    first = digests()
    assert list(first) == [("ip", "kpy-3", "c")]
    assert first[("ip", "kpy-3", "c")][0] == 2
    with NetlinkReader(ns) as reader:
        assert reader.rules([("ip", "kpy-3", "c"), ("ip", "kpy-3", "gone")]).chains == first
    nft(ns, "flush", "chain", "ip", "kpy-3", "c")
    nft(ns, "add", "rule", "ip", "kpy-3", "c", "ip saddr != { 10.0.0.0/8, 10.244.0.0/16 } drop")
    nft(ns, "add", "rule", "ip", "kpy-3", "c", "ip daddr 10.96.0.1 accept")
    assert digests() == first, "rewritten alike: same digest (handles, __set number)"
    nft(ns, "insert", "rule", "ip", "kpy-3", "c", "ip daddr 10.96.0.1 accept")
    nft(ns, "delete", "rule", "ip", "kpy-3", "c", "handle", _last_handle(ns, "c"))
    reordered = digests()[("ip", "kpy-3", "c")]
    assert reordered[0] == 2 and reordered != first[("ip", "kpy-3", "c")]


def _last_handle(ns: str, chain: str) -> str:
    listed = nft(ns, "-a", "list", "chain", "ip", "kpy-3", chain)
    return [line.rsplit(" ", 1)[1] for line in listed.splitlines() if "# handle" in line][-1]


class _RuleMeddler(NetlinkReader):
    """Changes a rule of table ``kpy-3`` while the rules of table ``kpy-5`` (read
    after it, in a dump of its own) come in."""

    def __init__(self, netns: str, script: str) -> None:
        super().__init__(netns)
        self.script: str | None = script
        self.request = b""

    def dump_into(self, start: Any, kind: int, family: int, *attrs: bytes, **kw: Any) -> None:
        self.request = b"".join(attrs)
        super().dump_into(start, kind, family, *attrs, **kw)

    def _receive(self, sock: socket.socket, kind: int, part: int) -> bytes:
        data = super()._receive(sock, kind, part)
        if kind == netlink_read.NFT_MSG_GETRULE and b"kpy-5" in self.request and self.script:
            nft(self.netns or "", "-f", "-", script=self.script)
            self.script = None
        return data


def test_rules_are_read_table_by_table_and_again_when_the_ruleset_changed(ns: str) -> None:
    """Every rule of kpy's tables, one dump per table; a commit between two tables'
    dumps (the first one's already read) makes the reader read them all again, so the
    digests are of one ruleset: the one after the change."""
    script = "".join(
        f"add table ip kpy-{t}\nadd chain ip kpy-{t} c\n"
        f"add rule ip kpy-{t} c ip daddr 10.96.0.{t} accept\n"
        for t in (3, 5)
    )
    nft(ns, "-f", "-", script=script)
    with NetlinkReader(ns) as reader:
        before = dict(reader.rules().chains)
    assert sorted(before) == [("ip", "kpy-3", "c"), ("ip", "kpy-5", "c")]
    reader = _RuleMeddler(ns, "add rule ip kpy-3 c ip daddr 10.96.0.33 accept\n")
    try:
        got = dict(reader.rules().chains)
    finally:
        reader.close()
    assert reader.script is None and reader.restarts == 1
    with NetlinkReader(ns) as fresh:
        after = dict(fresh.rules().chains)
    assert got == after
    assert (
        got[("ip", "kpy-3", "c")][0] == 2
        and got[("ip", "kpy-5", "c")] == before[("ip", "kpy-5", "c")]
    )


class _Failing(NetlinkReader):
    """A reader whose element dump of set ``fail`` fails (on a prefetching thread), and
    which records the sets whose dumps were asked for (the base tables' on a second
    reader, of this class too)."""

    def __init__(self, netns: str, fail: str | None, asked: list[tuple[str, str]]) -> None:
        super().__init__(netns)
        self.fail = fail
        self.asked = asked

    def _element_parts(self, set_def: netlink_read.SetDef) -> list[bytes] | Exception | None:
        self.asked.append((set_def.table, set_def.name))
        if set_def.name == self.fail:
            raise NftError("the dump failed")
        return super()._element_parts(set_def)

    def _companion(self) -> NetlinkReader:
        return _Failing(self.netns or "", self.fail, self.asked)


def _prefetchers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "kpy-nftables-prefetch"]


def test_set_dumps_are_read_ahead_once_each_and_a_failure_ends_the_read(ns: str) -> None:
    _program(ns, b.synthetic_states(30))
    whole = NetlinkReader(ns)
    try:
        want = whole.observe().values
        names = sorted((s.table, s.name) for s in whole.sets())
    finally:
        whole.close()
    assert len(names) > netlink_read.PREFETCH + 2
    asked: list[tuple[str, str]] = []
    ok = _Failing(ns, None, asked)
    try:
        assert ok.observe().values == want == _bynft(ns).values
    finally:
        ok.close()
    assert sorted(asked) == names  # every set dumped once
    for fail in ("hairpin", "service-ips"):  # a base table's set, a shard's
        failing = _Failing(ns, fail, [])
        try:
            with pytest.raises(NftError, match="the dump failed"):
                failing.observe()
        finally:
            failing.close()
        assert not _prefetchers()


def test_a_read_abandoned_while_sets_wait_to_be_decoded_stops_its_thread(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _program(ns, b.synthetic_states(30))

    def refuse(self: NetlinkReader, *args: object) -> None:
        raise ValueError("decoding failed")

    monkeypatch.setattr(NetlinkReader, "_read_set", refuse)
    interval = sys.getswitchinterval()
    reader = NetlinkReader(ns)
    try:
        with pytest.raises(ValueError, match="decoding failed"):
            reader.observe()
    finally:
        reader.close()
    assert not _prefetchers()
    assert sys.getswitchinterval() == interval  # shortened while reading only


def test_overlapping_reads_restore_the_switch_interval_when_the_last_ends() -> None:
    interval = sys.getswitchinterval()
    switches = netlink_read._ShortSwitches()
    switches.enter()
    switches.enter()
    assert sys.getswitchinterval() == min(interval, netlink_read.SWITCH_INTERVAL)
    switches.leave()  # the first read ends while the second goes on
    assert sys.getswitchinterval() == min(interval, netlink_read.SWITCH_INTERVAL)
    switches.leave()
    assert sys.getswitchinterval() == interval
