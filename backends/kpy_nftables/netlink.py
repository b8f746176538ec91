"""Sending kpy's nftables transactions to the kernel over netlink, without ``nft``.

A one-endpoint change at 10,000 Services spends most of its time outside the kernel
when it goes through ``nft -f``: starting the process, and nft listing every chain
and set of the ruleset into its cache before it sends a byte. kpy knows exactly what
it wants, so :func:`encode` turns the operations of a
:class:`kpy_nftables.render.Transaction` (render's typed commands, which carry render's
objects) into nf_tables netlink messages itself, and :class:`NetlinkWriter` sends them
as one atomic batch (``NFNL_MSG_BATCH_BEGIN`` … ``NFNL_MSG_BATCH_END``) on a socket it
keeps open inside the node's network namespace. Tables, chains, sets and elements are
encoded from the objects' fields, a rule from its typed statements
(:class:`kpy_nftables.render.Rule`); no text is read back.

Only what render writes is understood: tables, regular chains, named sets and maps,
their elements, the rules of the per-service chains (with anonymous sets of source
ranges) and of the ``cluster-ips-check`` chain (``reject``, service CIDR drops).
Anything else — base chains, verdict-map lookups, statements render never writes —
raises :class:`Unsupported`, and the caller sends that transaction with ``nft -f``
(each operation's ``nft()`` line) instead. Nothing is guessed: every encoding here is
the one ``nft --debug=mnl`` shows nft 1.0 sending, and the tests compare
``nft list ruleset`` after both writers.
"""

from __future__ import annotations

import errno as errno_
import ipaddress
import os
import re
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kpy.kernel.netlink import (
    NETLINK_NETFILTER,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)
from kpy.kernel.netlink import attr as _attr
from kpy.kernel.netns import run_in_netns
from kpy_nftables import render
from kpy_nftables.apply import NftError

# --- netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h) --------

NETLINK_CAP_ACK = 10
SOL_NETLINK = 270
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17

NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14

FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}

# Set key types: nft's datatype ids and the bytes one value takes in a key.
DATATYPES: dict[str, tuple[int, int]] = {
    "ipv4_addr": (7, 4),
    "ipv6_addr": (8, 16),
    "inet_proto": (12, 1),
    "inet_service": (13, 2),
    "mark": (19, 4),
}
TYPE_BITS = 6  # a concatenation's type id: component ids shifted in, 6 bits each
NFT_DATA_VERDICT = 0xFFFFFF00
NFT_SET_MAP = 0x8
NFT_SET_TIMEOUT = 0x10
NFT_SET_EVAL = 0x20
NFT_SET_ANONYMOUS = 0x1
NFT_SET_CONSTANT = 0x2
NFT_SET_INTERVAL = 0x4
NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_LOOKUP_F_INV = 0x1
# Set userdata as nft 1.0 writes it (libnftnl's NFTNL_UDATA_SET_* TLVs); ``nft list``
# reads the key's byte order back from it.
UDATA_ADDR_SET = bytes.fromhex("000402000000")  # key byte order: big endian
UDATA_CONCAT_SET = bytes.fromhex("000400000000030800040d0000000100")
# An anonymous interval set of source addresses: byte order, "merge elements", and the
# ``typeof ip saddr`` / ``typeof ip6 saddr`` description nft uses to print it.
UDATA_SADDR_SET = {
    "ip": bytes.fromhex("0004020000000204010000000314000407000000010c00040c00000001040b000000"),
    "ip6": bytes.fromhex("0004020000000204010000000314000407000000010c00040d000000010408000000"),
}
UDATA_CONCAT_MAP = bytes.fromhex("000400000000010400000000030800040d0000000100060400000000")

VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
NFT_REJECT_ICMP_UNREACH = 0  # NFTA_REJECT_TYPE; NFTA_REJECT_ICMP_CODE is one byte:
ICMP_PORT_UNREACH = 3
ICMPV6_PORT_UNREACH = 4
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
# (family, selector) → payload offset in the network header, length.
ADDRESSES = {
    ("ip", "saddr"): (12, 4),
    ("ip", "daddr"): (16, 4),
    ("ip6", "saddr"): (8, 16),
    ("ip6", "daddr"): (24, 16),
}
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_PAYLOAD_TRANSPORT_HEADER = 2
NFT_META_MARK = 3
NFT_META_L4PROTO = 16
NFT_CMP_EQ = 0
NFT_CMP_NEQ = 1
NFT_NG_RANDOM = 1
NFT_DYNSET_OP_UPDATE = 1
NFT_NAT_DNAT = 1
NF_NAT_RANGE_PROTO_SPECIFIED = 0x2
NFT_FIB_RESULT_ADDRTYPE = 3
NFTA_FIB_F_SADDR = 0x1
RTN_LOCAL = 2
REG_VERDICT = 0
REG_1 = 1
REG_2 = 2


class Unsupported(Exception):
    """An operation outside the subset this module encodes; use ``nft -f`` instead."""


@dataclass(frozen=True, slots=True)
class SetType:
    """What encoding a set's elements needs to know about the set."""

    type: str  # "ipv4_addr . inet_proto . inet_service"
    kind: str = "set"  # "set" or "map" (a verdict map)
    timeout: int | None = None  # seconds


@dataclass(frozen=True, slots=True)
class Batch:
    """Netlink messages (sequence numbers still 0) and the operation each encodes."""

    messages: tuple[bytes, ...]
    sources: tuple[render.Op, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        """Each message's operation as an ``nft`` line (for messages and tests)."""
        return tuple(s.nft() for s in self.sources)

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)

    def __len__(self) -> int:
        return len(self.messages)


# --- attributes and messages ------------------------------------------------------------


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def _u64(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">Q", value))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _message(kind: int, flags: int, family: int, *attrs: bytes) -> bytes:
    body = b"".join(attrs)
    header = struct.pack(
        "=IHHIIBBH",
        16 + 4 + len(body),
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        NLM_F_REQUEST | NLM_F_ACK | flags,
        0,
        0,
        family,
        0,  # NFNETLINK_V0
        0,
    )
    return header + body


def _batch_marker(kind: int, seq: int) -> bytes:
    return struct.pack(
        "=IHHIIBBH", 20, kind, NLM_F_REQUEST, seq, 0, 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES)
    )


def _data(value: bytes) -> bytes:
    return _attr(1, value)  # NFTA_DATA_VALUE


def _verdict_data(kind: int, verdict: str, chain: str | None) -> bytes:
    code = _u32(1, VERDICTS[verdict])  # NFTA_VERDICT_CODE
    target = (_str(2, _check_name(chain)),) if chain is not None else ()  # NFTA_VERDICT_CHAIN
    return _nest(kind, _nest(2, code, *target))  # NFTA_DATA_VERDICT


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *attrs))  # NFTA_LIST_ELEM{NAME, DATA}


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, REG_1), _u32(2, op), _nest(3, _data(value)))


def _meta_load(key: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, REG_1))


def _bitwise(mask: bytes, xor: bytes, *, op: bool) -> bytes:
    attrs = [_u32(1, REG_1), _u32(2, REG_1)]
    if op:
        attrs.append(_u32(6, 0))  # NFT_BITWISE_BOOL, as nft writes it for statements
    attrs += [_u32(3, len(mask)), _nest(4, _data(mask)), _nest(5, _data(xor))]
    return _expr("bitwise", *attrs)


def _immediate(reg: int, value: bytes) -> bytes:
    return _expr("immediate", _u32(1, reg), _nest(2, _data(value)))


# --- values -------------------------------------------------------------------------------


def _address(text: str, family: str) -> bytes:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise Unsupported(f"not an address: {text!r}") from exc
    if addr.version != (4 if family == "ip" else 6):
        raise Unsupported(f"{text} is not an {family} address")
    return addr.packed


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise Unsupported(f"not a number: {text!r}") from exc


def _component(kind: str, text: str) -> bytes:
    if kind == "ipv4_addr":
        return _address(text, "ip")
    if kind == "ipv6_addr":
        return _address(text, "ip6")
    if kind == "inet_proto":
        if text in PROTOCOLS:
            return bytes([PROTOCOLS[text]])
        value = _number(text)
        if not 0 <= value <= 255:
            raise Unsupported(f"not a protocol: {text!r}")
        return bytes([value])
    if kind == "inet_service":
        value = _number(text)
        if not 0 <= value <= 65535:
            raise Unsupported(f"not a port: {text!r}")
        return struct.pack(">H", value)
    if kind == "mark":
        value = _number(text)
        if not 0 <= value <= 0xFFFFFFFF:
            raise Unsupported(f"not a mark: {text!r}")
        return struct.pack("=I", value)
    raise Unsupported(f"set key type {kind!r}")


def _key_parts(type_: str) -> list[str]:
    parts = [p.strip() for p in type_.split(" . ")]
    for part in parts:
        if part not in DATATYPES:
            raise Unsupported(f"set key type {type_!r}")
    return parts


def _key(type_: str, text: str) -> bytes:
    """A set key: one value, or a concatenation of values each padded to 4 bytes."""
    parts = _key_parts(type_)
    values = [v.strip() for v in text.split(" . ")]
    if len(values) != len(parts):
        raise Unsupported(f"{text!r} does not match the set type {type_!r}")
    if len(parts) == 1:
        return _component(parts[0], values[0])
    out = b""
    for part, value in zip(parts, values, strict=True):
        raw = _component(part, value)
        out += raw + b"\0" * (-len(raw) % 4)
    return out


def _key_type(type_: str) -> tuple[int, int]:
    """nft's type id and the key length in bytes of a set of ``type_``."""
    parts = _key_parts(type_)
    if len(parts) == 1:
        return DATATYPES[parts[0]]
    type_id = 0
    length = 0
    for part in parts:
        ident, size = DATATYPES[part]
        type_id = (type_id << TYPE_BITS) | ident
        length += size + (-size % 4)
    return type_id, length


# --- the script ---------------------------------------------------------------------------


# A name nft reads without quotes (its scanner's string token); anything else would be
# quoted or a variable in the script, and is left to nft.
_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9/_.\-]*")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise Unsupported(f"name {name!r}")
    return name


class _Encoder:
    def __init__(self, sets: Mapping[tuple[str, str, str], SetType]) -> None:
        self.sets = dict(sets)
        self.new_sets: dict[tuple[str, str, str], int] = {}  # set id within this batch
        self.messages: list[bytes] = []
        self.sources: list[render.Op] = []  # what each message was encoded from
        self.last_set_id = 0

    # --- operations (render's typed commands) ----------------------------------------

    def op(self, op: render.Op) -> None:
        """Encode one operation: its message(s), each recorded with the operation."""
        _check_name(op.table)
        if op.family not in FAMILIES:
            raise Unsupported(op.nft())
        nf = FAMILIES[op.family]
        if isinstance(op, render.AddRule):  # the most frequent first
            exprs = _Rule(self, op).encode(op.rule.statements)
            msg = _message(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                nf,
                _str(1, op.table),
                _str(2, _check_name(op.chain)),
                _nest(4, *exprs),
            )
        elif isinstance(op, (render.AddElements, render.DeleteElements)):
            if len(op.elements) == 1:
                self.messages.append(self._element_op(op, op.elements[0]))
                self.sources.append(op)
                return
            for e in op.elements:  # one message per element, each its own line
                one = type(op)(op.family, op.table, op.map, (e,))
                self.messages.append(self._element_op(one, e))
                self.sources.append(one)
            return
        else:
            msg = self._definition(op, nf, _str(1, op.table))
        self.messages.append(msg)
        self.sources.append(op)

    def _definition(
        self,
        op: render.AddTable
        | render.DeleteTable
        | render.AddChain
        | render.FlushChain
        | render.DeleteChain
        | render.AddSet
        | render.DeleteSet,
        nf: int,
        table: bytes,
    ) -> bytes:
        """A table's, chain's or set's message."""
        if isinstance(op, render.AddTable):
            return _message(NFT_MSG_NEWTABLE, NLM_F_CREATE, nf, table, _u32(2, 0))
        if isinstance(op, render.DeleteTable):
            return _message(NFT_MSG_DELTABLE, 0, nf, table)
        if isinstance(op, render.AddChain):
            if op.chain.hook:
                raise Unsupported(op.nft())  # base chains: written by nft
            name = _str(3, _check_name(op.chain.name))
            return _message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, nf, table, name)
        if isinstance(op, render.FlushChain):
            return _message(NFT_MSG_DELRULE, 0, nf, table, _str(2, _check_name(op.name)))
        if isinstance(op, render.DeleteChain):
            return _message(NFT_MSG_DELCHAIN, 0, nf, table, _str(3, _check_name(op.name)))
        if isinstance(op, render.DeleteSet):
            return _message(NFT_MSG_DELSET, 0, nf, table, _str(2, _check_name(op.name)))
        return self._set_op(op)

    def _set_op(self, op: render.AddSet) -> bytes:
        s = op.set
        _check_name(s.name)
        if s.kind not in ("set", "map"):
            raise Unsupported(op.nft())
        flags = NFT_SET_MAP if s.kind == "map" else 0
        timeout = s.timeout if s.kind == "set" else None  # a map's spec has none
        if timeout is not None:
            flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL
        type_id, key_len = _key_type(s.type)
        concat = " . " in s.type
        if not concat and s.type not in ("ipv4_addr", "ipv6_addr"):
            raise Unsupported(op.nft())  # other byte orders: not written by render
        set_id = self.next_set_id()
        self.new_sets[(s.family, s.table, s.name)] = set_id
        self.sets[(s.family, s.table, s.name)] = SetType(s.type, s.kind, timeout)
        attrs = [
            _str(1, s.table),
            _str(2, s.name),
            _u32(3, flags),
            _u32(4, type_id),
            _u32(5, key_len),
        ]
        if s.kind == "map":
            attrs += [_u32(6, NFT_DATA_VERDICT), _u32(7, 0)]
        attrs.append(_u32(10, set_id))
        if timeout is not None:
            attrs.append(_u64(11, timeout * 1000))
        if not concat:
            udata = UDATA_ADDR_SET
        else:
            udata = UDATA_CONCAT_MAP if s.kind == "map" else UDATA_CONCAT_SET
        attrs.append(_attr(13, udata))
        return _message(NFT_MSG_NEWSET, NLM_F_CREATE, FAMILIES[s.family], *attrs)

    def _element_op(
        self, op: render.AddElements | render.DeleteElements, e: render.Element
    ) -> bytes:
        """One element's message: added with its comment and verdict, or removed by key."""
        set_type = self.sets.get((op.family, op.table, _check_name(op.map)))
        if set_type is None:
            raise Unsupported(f"type of set {op.map!r} unknown")
        add = isinstance(op, render.AddElements)
        if add and bool(e.verdict) != (set_type.kind == "map"):
            raise Unsupported(op.nft())
        elem = [_nest(1, _data(_key(set_type.type, e.element.strip())))]  # ELEM_KEY
        if add and e.verdict:
            elem.append(_verdict_data(2, *_verdict(e.verdict, op)))  # NFTA_SET_ELEM_DATA
        if add and e.comment:
            raw = render.comment_text(e.comment).encode() + b"\0"
            if len(raw) > 128:
                raise Unsupported(op.nft())
            elem.append(_attr(6, bytes([0, len(raw)]) + raw))  # NFTNL_UDATA_SET_ELEM_COMMENT
        ref = self.set_ref(op.family, op.table, op.map)
        attrs = [_str(1, op.table), _attr(2, ref[0] + b"\0")]
        if len(ref) > 1:
            attrs.append(_attr(4, ref[1]))
        attrs.append(_nest(3, _nest(1, *elem)))
        kind, flags = (NFT_MSG_NEWSETELEM, NLM_F_CREATE) if add else (NFT_MSG_DELSETELEM, 0)
        return _message(kind, flags, FAMILIES[op.family], *attrs)

    def next_set_id(self) -> int:
        """A set id, unique within the batch, for named and anonymous sets alike."""
        self.last_set_id += 1
        return self.last_set_id

    def extra(self, message: bytes, source: render.Op) -> None:
        """A message an operation needs before its own (an anonymous set for a rule)."""
        self.messages.append(message)
        self.sources.append(source)

    def set_ref(self, family: str, table: str, name: str) -> tuple[bytes, ...]:
        """The name (and, for a set created in this batch, the id) to reference a set by."""
        set_id = self.new_sets.get((family, table, _check_name(name)))
        return (name.encode(),) if set_id is None else (name.encode(), struct.pack(">I", set_id))


def _verdict(text: str, source: render.Op) -> tuple[str, str | None]:
    words = text.split()
    if len(words) == 1 and words[0] in ("drop", "accept", "return"):
        return words[0], None
    if len(words) == 2 and words[0] in ("jump", "goto"):
        return words[0], words[1]
    raise Unsupported(source.nft())


class _Rule:
    """One rule's statements → expressions, as nft 1.0 linearizes them."""

    def __init__(self, encoder: _Encoder, op: render.AddRule) -> None:
        self.encoder = encoder
        self.family = op.family
        self.table = op.table
        self.op = op
        self.l4proto = False

    def fail(self) -> Unsupported:
        return Unsupported(self.op.nft())

    def encode(self, statements: tuple[render.Statement, ...]) -> list[bytes]:
        if not statements:
            raise self.fail()  # a rule made from text alone: what it means is not known
        exprs: list[bytes] = []
        last = len(statements) - 1
        for i, st in enumerate(statements):
            if isinstance(st, render.Verdict | render.Reject | render.Dnat) and i != last:
                raise self.fail()  # a statement that ends the rule, not at its end
            exprs += self._statement(st)
        return exprs

    def _statement(self, st: render.Statement) -> list[bytes]:
        if isinstance(st, render.Reject):
            if st.tcp_reset:
                raise self.fail()
            # nft 1.0 in an ip/ip6 table: ICMP(v6) port unreachable
            code = ICMP_PORT_UNREACH if self.family == "ip" else ICMPV6_PORT_UNREACH
            return [_expr("reject", _u32(1, NFT_REJECT_ICMP_UNREACH), _attr(2, bytes([code])))]
        if isinstance(st, render.Verdict):
            if (st.chain is None) != (st.verdict in ("drop", "accept", "return")):
                raise self.fail()
            if st.verdict not in VERDICTS:
                raise self.fail()
            return [
                _expr("immediate", _u32(1, REG_VERDICT), _verdict_data(2, st.verdict, st.chain))
            ]
        if isinstance(st, render.L4Proto):
            if st.proto not in PROTOCOLS or self.l4proto:
                raise self.fail()
            self.l4proto = True
            return [_meta_load(NFT_META_L4PROTO), _cmp(NFT_CMP_EQ, bytes([PROTOCOLS[st.proto]]))]
        if isinstance(st, render.MarkSet):
            mark = _number(st.mark)
            if st.op != "|" or not 0 <= mark <= 0xFFFFFFFF:
                raise self.fail()
            return [
                _meta_load(NFT_META_MARK),
                _bitwise(struct.pack("=I", ~mark & 0xFFFFFFFF), struct.pack("=I", mark), op=True),
                _expr("meta", _u32(2, NFT_META_MARK), _u32(3, REG_1)),
            ]
        if isinstance(st, render.Addr | render.AddrIn):
            return self._address_match(st)
        if isinstance(st, render.DPort):
            if st.proto not in PROTOCOLS or self.l4proto:
                raise self.fail()  # nft would drop its own dependency: not encoded
            return [
                _meta_load(NFT_META_L4PROTO),
                _cmp(NFT_CMP_EQ, bytes([PROTOCOLS[st.proto]])),
                _payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
                _cmp(NFT_CMP_EQ, _component("inet_service", str(st.port))),
            ]
        if isinstance(st, render.Numgen):
            if not 1 <= st.modulus <= 0xFFFFFFFF:
                raise self.fail()
            return [
                _expr(
                    "numgen",
                    _u32(1, REG_1),
                    _u32(2, st.modulus),
                    _u32(3, NFT_NG_RANDOM),
                    _u32(4, 0),
                ),
                _cmp(NFT_CMP_EQ, struct.pack("=I", 0)),
            ]
        if isinstance(st, render.FibLocal):
            if st.selector != "saddr":
                raise self.fail()
            return [
                _expr(
                    "fib",
                    _u32(3, NFTA_FIB_F_SADDR),
                    _u32(2, NFT_FIB_RESULT_ADDRTYPE),
                    _u32(1, REG_1),
                ),
                _cmp(NFT_CMP_EQ, struct.pack("=I", RTN_LOCAL)),
            ]
        if isinstance(st, render.Update):
            if st.family != self.family:
                raise self.fail()
            offset, length = ADDRESSES[(self.family, "saddr")]
            ref = self.encoder.set_ref(self.family, self.table, st.set)
            attrs = [_u32(3, NFT_DYNSET_OP_UPDATE), _u32(4, REG_1), _attr(1, ref[0] + b"\0")]
            if len(ref) > 1:
                attrs.append(_attr(2, ref[1]))
            return [
                _payload(NFT_PAYLOAD_NETWORK_HEADER, offset, length),
                _expr("dynset", *attrs),
            ]
        if isinstance(st, render.Dnat):
            return self._dnat(st)
        raise self.fail()  # lookups of concatenations, verdict maps, masquerade, ct, …

    def _address_match(self, st: render.Addr | render.AddrIn) -> list[bytes]:
        if st.family != self.family or (self.family, st.selector) not in ADDRESSES:
            raise self.fail()
        offset, length = ADDRESSES[(self.family, st.selector)]
        load = _payload(NFT_PAYLOAD_NETWORK_HEADER, offset, length)
        if isinstance(st, render.AddrIn):
            ref = self.encoder.set_ref(self.family, self.table, st.set)
            attrs = [_u32(2, REG_1), _attr(1, ref[0] + b"\0")]
            if len(ref) > 1:
                attrs.append(_attr(4, ref[1]))
            return [load, _expr("lookup", *attrs)]
        op = NFT_CMP_NEQ if st.negate else NFT_CMP_EQ
        if len(st.values) != 1:
            return [load, self._anonymous_lookup(st.selector, list(st.values), op)]
        value = st.values[0]
        if "/" not in value:
            return [load, _cmp(op, _address(value, self.family))]
        try:
            net = ipaddress.ip_network(value)
        except ValueError as exc:
            raise self.fail() from exc
        if net.version != (4 if self.family == "ip" else 6) or net.prefixlen == 0:
            raise self.fail()
        if net.prefixlen == net.max_prefixlen:
            return [load, _cmp(op, net.network_address.packed)]
        if net.prefixlen % 8 == 0:
            size = net.prefixlen // 8
            return [
                _payload(NFT_PAYLOAD_NETWORK_HEADER, offset, size),
                _cmp(op, net.network_address.packed[:size]),
            ]
        mask = net.netmask.packed
        return [
            load,
            _bitwise(mask, b"\0" * length, op=False),
            _cmp(op, net.network_address.packed),
        ]

    def _anonymous_lookup(self, selector: str, items: list[str], op: int) -> bytes:
        """``ip saddr { a/16, b/16 }``: an anonymous interval set, as nft writes it —
        a set named ``__set%d`` (the kernel numbers it), its elements as ranges (start,
        and end + 1 flagged as an interval end), and a lookup by its id."""
        if selector != "saddr":
            raise self.fail()  # the set's typeof userdata is only known for saddr
        try:
            nets = sorted((ipaddress.ip_network(x) for x in items), key=lambda n: int(n[0]))
        except ValueError as exc:
            raise self.fail() from exc
        if not nets or any(n.version != (4 if self.family == "ip" else 6) for n in nets):
            raise self.fail()
        bits = nets[0].max_prefixlen
        bounds: list[tuple[int, int]] = []  # [start, end) of each range
        for net in nets:
            start, end = int(net[0]), int(net[-1]) + 1
            if bounds and start <= bounds[-1][1]:
                raise self.fail()  # nft would merge overlapping or adjacent ranges
            if start == 0 or end == 1 << bits:
                raise self.fail()  # nft leaves out an end at the edges: not encoded
            bounds.append((start, end))
        size = bits // 8
        elems: list[tuple[int, bool]] = [(0, True)]  # (key, interval end)
        for start, end in bounds:
            elems += [(start, False), (end, True)]
        nested = []
        for n, (key, is_end) in enumerate(elems, 1):
            flags = (_u32(3, NFT_SET_ELEM_INTERVAL_END),) if is_end else ()
            nested.append(_nest(n, *flags, _nest(1, _data(key.to_bytes(size, "big")))))
        set_id = self.encoder.next_set_id()
        nf = FAMILIES[self.family]
        name = _str(2, "__set%d")
        self.encoder.extra(
            _message(
                NFT_MSG_NEWSET,
                NLM_F_CREATE,
                nf,
                _str(1, self.table),
                name,
                _u32(3, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL),
                _u32(4, DATATYPES["ipv4_addr" if self.family == "ip" else "ipv6_addr"][0]),
                _u32(5, size),
                _u32(10, set_id),
                _nest(9, _u32(1, len(elems))),  # NFTA_SET_DESC_SIZE
                _attr(13, UDATA_SADDR_SET[self.family]),
            ),
            self.op,
        )
        self.encoder.extra(
            _message(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                nf,
                _str(1, self.table),
                name,
                _u32(4, set_id),
                _nest(3, *nested),
            ),
            self.op,
        )
        attrs = [_u32(2, REG_1), _str(1, "__set%d"), _u32(4, set_id)]
        if op == NFT_CMP_NEQ:
            attrs.append(_u32(5, NFT_LOOKUP_F_INV))
        return _expr("lookup", *attrs)

    def _dnat(self, st: render.Dnat) -> list[bytes]:
        if st.family != self.family:
            raise self.fail()
        return [
            _immediate(REG_1, _address(st.ip, self.family)),
            _immediate(REG_2, _component("inet_service", str(st.port))),
            _expr(
                "nat",
                _u32(1, NFT_NAT_DNAT),
                _u32(2, FAMILIES[self.family]),
                _u32(3, REG_1),
                _u32(5, REG_2),
                _u32(7, NF_NAT_RANGE_PROTO_SPECIFIED),
            ),
        ]


def set_types(objs: Iterable[render.Obj]) -> dict[tuple[str, str, str], SetType]:
    """What :func:`encode` needs to know of the sets among ``objs``, keyed by (family,
    table, name)."""
    return {
        (o.family, o.table, o.name): SetType(o.type, o.kind, o.timeout)
        for o in objs
        if isinstance(o, render.Set)
    }


def encode(ops: Iterable[render.Op], sets: Mapping[tuple[str, str, str], SetType]) -> Batch:
    """The netlink messages for ``ops`` (one or more each), pure.

    ``sets`` gives the key type of every set the operations add elements to, keyed by
    (family, table, name); :class:`kpy_nftables.render.AddSet` operations add to it.
    Raises :class:`Unsupported` for an operation outside the subset this module encodes.
    """
    encoder = _Encoder(sets)
    for op in ops:
        try:
            encoder.op(op)
        except Unsupported as exc:
            line = op.nft()
            if str(exc).startswith(line):
                raise
            raise Unsupported(f"{line} ({exc})") from exc
    return Batch(tuple(encoder.messages), tuple(encoder.sources))


# --- the socket ---------------------------------------------------------------------------


def _grow(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """A socket buffer of at least ``size`` bytes: past the sysctl limit as root."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class NetlinkWriter:
    """An nfnetlink socket inside ``netns`` (None: this namespace), reused for every send."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._seq = 0
        self._rcvbuf = 0
        self._sndbuf = 0
        self._sock: socket.socket | None = run_in_netns(netns, self._open)

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without our message
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, batch: Batch) -> None:
        """Send ``batch`` as one transaction; blocking. Raises NftError when the kernel
        refuses it (nothing was changed then), naming the first refused operation (its
        ``nft`` line)."""
        if not batch.messages:
            return
        with self._lock:
            sock = self._sock
            if sock is None:
                raise NftError("netlink writer is closed")
            self._reserve(sock, len(batch.messages), batch.size)
            begin = self._seq + 1
            self._seq += len(batch.messages) + 2
            data = bytearray(_batch_marker(NFNL_MSG_BATCH_BEGIN, begin))
            for n, msg in enumerate(batch.messages):
                at = len(data)
                data += msg
                struct.pack_into("=I", data, at + 8, begin + 1 + n)
            data += _batch_marker(NFNL_MSG_BATCH_END, begin + len(batch.messages) + 1)
            try:
                sock.sendto(data, (0, 0))
            except OSError as exc:
                raise NftError(f"netlink send failed: {exc}") from exc
            errors = self._replies(sock, begin, len(batch.messages))
        if errors:
            seq, err = errors[0]
            text = f"{os.strerror(err)} (errno {errno_.errorcode.get(err, err)})"
            if begin < seq <= begin + len(batch.messages):
                where = batch.sources[seq - begin - 1].nft()
            else:
                where = "the transaction's commit"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise NftError(f"kernel refused: {text}: {where}{more}")

    def _reserve(self, sock: socket.socket, count: int, size: int) -> None:
        """Room to send the batch in one ``sendto`` (the kernel refuses a message larger
        than the send buffer) and to queue one acknowledgement per message (each takes
        up to ~1 KiB of receive buffer)."""
        snd = size + 65536
        if snd > self._sndbuf:
            _grow(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, snd)
            self._sndbuf = snd
        rcv = count * 1024 + 65536
        if rcv > self._rcvbuf:
            _grow(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcv)
            self._rcvbuf = rcv

    def _replies(self, sock: socket.socket, begin: int, count: int) -> list[tuple[int, int]]:
        """Read every answer to the batch: (seq, errno) of each refusal.

        nfnetlink handles a batch synchronously inside ``sendto``, so its answers are
        queued by the time that returns; they are read until the queue is empty.
        """
        acked: set[int] = set()
        errors: list[tuple[int, int]] = []
        last = begin + count + 1
        while True:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                raise NftError(f"netlink receive failed, outcome unknown: {exc}") from exc
            at = 0
            while at + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
                if length < 16:
                    break
                if kind == NLMSG_ERROR and begin <= seq <= last:
                    (err,) = struct.unpack_from("=i", data, at + 16)
                    if err:
                        errors.append((seq, -err))
                    else:
                        acked.add(seq)
                at += (length + 3) & ~3
        if not errors and len(acked) < count:
            raise NftError(f"kernel acknowledged {len(acked)} of {count} messages, outcome unknown")
        errors.sort()
        return errors

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


__all__ = ["Batch", "NetlinkWriter", "SetType", "Unsupported", "encode"]
