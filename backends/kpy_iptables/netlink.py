"""Reading kpy's iptables-nft chains over nf_tables netlink, chain by chain.

With the nft flavour every iptables chain is an nf_tables chain of table ``ip nat``,
``ip filter`` (``ip6`` …) and every rule an nf_tables rule. ``iptables-nft-save`` reads
the *whole* ruleset and rebuilds iptables' view of it in user space (over a minute at
10,000 Services once a chain's rules were inserted at its head one by one) and crashed
``xtables-nft-multi`` at 330,000 rules. :class:`ChainReader` instead asks for the chain
list (``NFT_MSG_GETCHAIN``, cheap) and then dumps only the chains it is given, one small
``NFT_MSG_GETRULE`` dump each, on an nfnetlink socket opened inside the node's
namespace for the read. Nothing is written and no table is created.

What comes back:

* :func:`chain_digest` — a chain's rules' raw netlink expressions, in order, with the
  ``counter`` expression's values zeroed, and their ``NFTA_RULE_USERDATA``, digested:
  the same iptables text written gives the same digest. The backend records the digest
  of what it wrote and compares at each full sync (drift detection without decoding
  xtables match payloads);
* per rule (:class:`NlRule`, when asked to decode) a *summary* of the few expressions
  ``kpy dump`` and the comparisons need: destination address, protocol, destination
  port, the ``comment``, ``statistic`` and ``recent`` matches, the jump or verdict, the
  ``DNAT`` target's address and the packet counter. :meth:`NlRule.text` writes it in
  ``iptables-save`` words so :mod:`kpy_iptables.observe` reads it like saved rules (a
  summary, not the exact rule).

A read runs between two reads of the ruleset's generation id; when a commit happened in
between (another writer, or kpy itself from another task) the read is done again.
"""

from __future__ import annotations

import contextlib
import errno as errno_
import hashlib
import os
import re
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from kpy.kernel.netlink import (
    NLA_TYPE_MASK,
    DumpInterrupted,
    NfTablesSocket,
)
from kpy.kernel.netlink import attr_str as _attr_str
from kpy.kernel.netlink import attrs as _attrs
from kpy.kernel.netlink import string as _string

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7

NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_HOOK = 4
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_HANDLE = 3
NFTA_RULE_EXPRESSIONS = 4
NFTA_RULE_USERDATA = 7
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2

FAMILIES = {4: int(socket.AF_INET), 6: int(socket.AF_INET6)}
VERDICTS = {0: "DROP", 1: "ACCEPT", -5: "RETURN"}
NFT_JUMP, NFT_GOTO = -3, -4
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "ipv6-icmp"}
XT_RECENT_CHECK = 1

RETRIES = 10
T = TypeVar("T")


class NetlinkError(Exception):
    """The nf_tables netlink read failed (the message says how)."""


# (destination, protocol, comment, port, rcheck, probability, target, goto, DNAT to)
Summary = tuple[str, str, str | None, int | None, bool, str | None, str, bool, str]


@dataclass(frozen=True, slots=True)
class NlRule:
    """One rule as the kernel holds it (see the module docstring)."""

    handle: int
    print: bytes  # this rule's own digest: expressions (counters zeroed) and userdata
    target: str = ""  # a chain jumped to, or ACCEPT/DROP/RETURN, or an xtables target
    goto: bool = False
    dest: str = ""  # "10.96.0.10/32"
    proto: str = ""
    dport: int | None = None
    comment: str | None = None
    probability: float | None = None
    rcheck: bool = False
    to_destination: str = ""
    packets: int = 0

    def key(self) -> Summary:
        """The summary as a tuple (cheaper to compare than :meth:`text`)."""
        chance = None if self.probability is None else f"{self.probability:.11f}"
        return (
            self.dest,
            self.proto,
            self.comment,
            self.dport,
            self.rcheck,
            chance,
            self.target,
            self.goto,
            self.to_destination,
        )

    def text(self) -> str:
        """The summary in iptables-save words (match order as iptables-save prints)."""
        parts: list[str] = []
        if self.dest:
            parts.append(f"-d {self.dest}")
        if self.proto:
            parts.append(f"-p {self.proto}")
        if self.comment is not None:
            parts.append(f'-m comment --comment "{self.comment}"')
        if self.dport is not None:
            parts.append(f"-m {self.proto or 'tcp'} --dport {self.dport}")
        if self.rcheck:
            parts.append("-m recent --rcheck")
        if self.probability is not None:
            parts.append(f"-m statistic --mode random --probability {self.probability:.11f}")
        if self.target:
            parts.append(f"{'-g' if self.goto else '-j'} {self.target}")
        if self.to_destination:
            parts.append(f"--to-destination {self.to_destination}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Chain:
    family: int
    table: str
    name: str
    base: bool  # a built-in (hooked) chain


def _messages(buffers: Iterable[bytes]) -> Iterator[tuple[bytes, int, int, int]]:
    for data in buffers:
        at = 0
        while at + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, at)
            if length < 16 or at + length > len(data):
                break
            if kind >> 8 == NFNL_SUBSYS_NFTABLES and length >= 20:
                yield data, data[at + 16], at + 20, at + length
            at += (length + 3) & ~3


def _address(raw: bytes) -> str:
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}/32"
    if len(raw) == 16:
        return f"{socket.inet_ntop(socket.AF_INET6, raw)}/128"
    return ""


def _nested_value(data: bytes, start: int, end: int) -> bytes:
    for kind, s, e in _attrs(data, start, end):
        if kind == NFTA_DATA_VALUE:
            return data[s:e]
    return b""


_NLA = struct.Struct("=HH")
# A counter expression: its name, then its data nest (NFTA_COUNTER_BYTES and _PACKETS,
# two u64 attributes: 28 bytes with the nest header); the 24 bytes of values vary.
_COUNTER = re.compile(rb"counter\x00\x1c\x00\x02[\x00\x80].{24}", re.DOTALL)
_NO_COUNTS = b"counter\x00\x1c\x00\x02\x00" + bytes(24)


_MSG = struct.Struct("=IH")
NEWRULE = (NFNL_SUBSYS_NFTABLES << 8) | 6  # NFT_MSG_NEWRULE, what a rule dump answers


def chain_digest(parts: Iterable[bytes]) -> bytes:
    """16 bytes that identify a chain's rules, in order, from its raw rule dump: each
    rule's expressions (counter values zeroed) and userdata — the kernel puts them last
    in a rule message, so per rule this is one slice, not a walk of every attribute.
    The same rules give the same digest, whatever their handles, counters or the dump's
    sequence numbers."""
    digest = hashlib.blake2b(digest_size=16)
    unpack_msg = _MSG.unpack_from
    unpack = _NLA.unpack_from
    for raw in parts:
        data = _COUNTER.sub(_NO_COUNTS, raw)
        at = 0
        n = len(data)
        while at + 16 <= n:
            length, kind = unpack_msg(data, at)
            if length < 16 or at + length > n:
                break
            if kind == NEWRULE:
                p = at + 20
                end = at + length
                while p + 4 <= end:
                    alen, akind = unpack(data, p)
                    if alen < 4:
                        break
                    if akind & NLA_TYPE_MASK == NFTA_RULE_EXPRESSIONS:
                        digest.update(data[p:end])
                        break
                    p += (alen + 3) & ~3
            at += (length + 3) & ~3
    return digest.digest()


_COUNTER_HEAD = b"\x0c\x00\x01\x00counter\x00"
_PACKETS_AT = 28  # in a counter expression: NFTA_COUNTER_PACKETS after the name, nest, bytes
_EXPRESSIONS: dict[bytes, tuple[str, Any]] = {}  # raw expression → what it means
_EXPRESSIONS_MAX = 1 << 19


def _expression(raw: bytes) -> tuple[str, Any]:
    """One expression (an ``NFTA_LIST_ELEM``'s payload) → what the summary needs:
    ``("load", (what, offset, length))``, ``("clear", None)``, ``("cmp", (op, value))``,
    ``("set", fields)`` or ``("none", None)``. Cached: most expressions repeat."""
    known = _EXPRESSIONS.get(raw)
    if known is not None:
        return known
    name = ""
    ds = de = 0
    for k, s, e in _attrs(raw, 0, len(raw)):
        if k == NFTA_EXPR_NAME:
            name = _string(raw, s, e)
        elif k == NFTA_EXPR_DATA:
            ds, de = s, e
    got = {k: (s, e) for k, s, e in _attrs(raw, ds, de)}
    result: tuple[str, Any] = ("none", None)
    if name == "payload" and 2 in got and 3 in got and 4 in got:
        base = struct.unpack_from(">I", raw, got[2][0])[0]
        offset = struct.unpack_from(">I", raw, got[3][0])[0]
        length = struct.unpack_from(">I", raw, got[4][0])[0]
        result = ("load", (f"payload{base}", offset, length))
    elif name == "meta" and 2 in got:
        result = ("load", ("meta", struct.unpack_from(">I", raw, got[2][0])[0], 0))
    elif name == "bitwise":
        result = ("clear", None)  # a masked value: a prefix, not one address
    elif name == "cmp" and 2 in got and 3 in got:
        op = struct.unpack_from(">I", raw, got[2][0])[0]
        result = ("cmp", (op, _nested_value(raw, *got[3])))
    elif name == "immediate" and 2 in got:
        fields: dict[str, Any] = {}
        for k, s, e in _attrs(raw, *got[2]):
            if k != NFTA_DATA_VERDICT:
                continue
            code = None
            target = ""
            for k3, s3, e3 in _attrs(raw, s, e):
                if k3 == NFTA_VERDICT_CODE:
                    (code,) = struct.unpack_from(">i", raw, s3)
                elif k3 == NFTA_VERDICT_CHAIN:
                    target = _string(raw, s3, e3)
            if code in (NFT_JUMP, NFT_GOTO):
                fields["target"] = target
                fields["goto"] = code == NFT_GOTO
            elif code in VERDICTS:
                fields["target"] = VERDICTS[code]
        result = ("set", fields)
    elif name in ("match", "target") and 1 in got:
        xt = _string(raw, *got[1])
        info = raw[got[3][0] : got[3][1]] if 3 in got else b""
        fields = {}
        if name == "target":
            fields["target"] = xt
            if xt == "DNAT" and len(info) >= 40:
                fields["to_destination"] = _dnat(info)
        elif xt == "comment":
            fields["comment"] = info.split(b"\0", 1)[0].decode(errors="replace")
        elif xt == "statistic" and len(info) >= 8:
            fields["probability"] = struct.unpack_from("=I", info, 4)[0] / 0x80000000
        elif xt == "recent" and len(info) >= 9:
            fields["rcheck"] = bool(info[8] & XT_RECENT_CHECK)
        result = ("set", fields)
    if len(_EXPRESSIONS) >= _EXPRESSIONS_MAX:
        _EXPRESSIONS.clear()
    _EXPRESSIONS[raw] = result
    return result


def decode_rule(data: bytes, start: int, end: int) -> tuple[str, NlRule] | None:
    """One ``NFT_MSG_NEWRULE`` message body → (chain, rule). The attribute walk is
    written out: it runs once per rule (180,000 at 10,000 Services)."""
    unpack = _NLA.unpack_from
    chain = ""
    handle = 0
    packets = 0
    exprs: list[tuple[str, Any]] = []
    digest = hashlib.blake2b(digest_size=16)  # this rule alone, as chain_digest takes it
    at = start
    while at + 4 <= end:
        length, kind = unpack(data, at)
        if length < 4 or at + length > end:
            break
        kind &= NLA_TYPE_MASK
        if kind == NFTA_RULE_CHAIN:
            chain = _string(data, at + 4, at + length)
        elif kind == NFTA_RULE_HANDLE:
            (handle,) = struct.unpack_from(">Q", data, at + 4)
        elif kind == NFTA_RULE_USERDATA:
            digest.update(b"\0udata" + data[at + 4 : at + length])
        elif kind == NFTA_RULE_EXPRESSIONS:
            p = at + 4
            stop = at + length
            digest.update(_COUNTER.sub(_NO_COUNTS, data[p:stop]))
            while p + 4 <= stop:
                elen, _ = unpack(data, p)
                if elen < 4:
                    break
                raw = data[p + 4 : p + elen]
                if raw.startswith(_COUNTER_HEAD):
                    if raw[_PACKETS_AT : _PACKETS_AT + 4] == b"\x0c\x00\x02\x00":
                        (packets,) = struct.unpack_from(">Q", raw, _PACKETS_AT + 4)
                else:
                    exprs.append(_expression(raw))
                p += (elen + 3) & ~3
        at += (length + 3) & ~3
    if not chain:
        return None
    fields: dict[str, Any] = {"packets": packets}
    load: tuple[str, int, int] | None = None  # (what, offset, length) in the register
    for what, value in exprs:
        if what == "load":
            load = value
        elif what == "clear":
            load = None
        elif what == "cmp":
            op, raw_value = value
            if op == 0 and load is not None:  # NFT_CMP_EQ
                source, offset, length = load
                if source == "payload1" and (offset, length) in ((16, 4), (24, 16)):
                    fields["dest"] = _address(raw_value)
                elif source == "meta" and offset == 16 and raw_value:  # NFT_META_L4PROTO
                    fields["proto"] = PROTOCOLS.get(raw_value[0], str(raw_value[0]))
                elif source == "payload2" and offset == 2 and length == 2:
                    fields["dport"] = int.from_bytes(raw_value[:2], "big")
            load = None
        elif what == "set":
            fields.update(value)
    return chain, NlRule(handle, digest.digest(), **fields)


def _dnat(info: bytes) -> str:
    """``--to-destination`` of a DNAT rev 2 target (struct nf_nat_range2)."""
    (flags,) = struct.unpack_from("=I", info, 0)
    raw = info[4:20]
    (port,) = struct.unpack_from(">H", info, 36)
    v4 = raw[4:] == b"\0" * 12 and raw[:4] != b"\0" * 4
    addr = (
        socket.inet_ntop(socket.AF_INET, raw[:4]) if v4 else socket.inet_ntop(socket.AF_INET6, raw)
    )
    if not flags & 2:  # NF_NAT_RANGE_PROTO_SPECIFIED
        return addr
    return f"{addr}:{port}" if v4 else f"[{addr}]:{port}"


class ChainReader(NfTablesSocket):
    """An nfnetlink socket inside ``netns`` (None: here) that reads chains and rules."""

    failure = NetlinkError

    def _refused(self, errno: int) -> Exception:
        return _Refused(errno)

    def _exchange(
        self,
        kind: int,
        family: int,
        attributes: tuple[bytes, ...],
        *,
        dump: bool = True,
        consume: Callable[[bytes], None] | None = None,
    ) -> list[bytes]:
        """As the socket's, with ``family`` 4 or 6 for the protocol family."""
        nfproto = FAMILIES.get(family, family)
        return super()._exchange(kind, nfproto, attributes, dump=dump, consume=consume)

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """A socket for one read, closed afterwards (no descriptor kept between syncs)."""
        try:
            yield
        finally:
            self._reset()

    # --- reads ---------------------------------------------------------------------------

    def generation(self) -> int:
        """The ruleset's generation id; also the cheap "can I talk nf_tables here" probe."""
        with self._lock, self._session():
            return self._generation()

    def chains(self, family: int, tables: Iterable[str]) -> list[Chain]:
        """Every chain of ``tables`` in ``family`` (4 or 6); a missing table has none."""
        wanted = set(tables)
        with self._lock, self._session():
            parts = self._consistent(lambda: self._exchange(NFT_MSG_GETCHAIN, family, ()))
        result = []
        unpack = _NLA.unpack_from
        for data, _fam, start, end in _messages(parts):  # 63,000 at 10,000 Services
            table = name = None
            base = False
            at = start
            while at + 4 <= end:
                length, kind = unpack(data, at)
                if length < 4:
                    break
                kind &= NLA_TYPE_MASK
                if kind == NFTA_CHAIN_TABLE:
                    table = data[at + 4 : at + length].split(b"\0", 1)[0].decode()
                elif kind == NFTA_CHAIN_NAME:
                    name = data[at + 4 : at + length].split(b"\0", 1)[0].decode()
                elif kind == NFTA_CHAIN_HOOK:
                    base = True
                at += (length + 3) & ~3
            if table in wanted and name is not None:
                result.append(Chain(family, table, name, base))
        return result

    def rules(
        self, family: int, chains: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[NlRule]]:
        """The rules of each (table, chain), in order, decoded; a chain that does not
        exist is left out. All chains are read between two equal generation ids."""
        return {key: rules for key, (_digest, rules) in self.read(family, chains).items()}

    def read(
        self, family: int, chains: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[bytes, list[NlRule]]]:
        """:meth:`rules`, each chain with its :func:`chain_digest` too."""
        out: dict[tuple[str, str], tuple[bytes, list[NlRule]]] = {}
        try:
            for key, parts in self._dumps(family, chains).items():
                got: list[NlRule] = []
                for data, _fam, start, end in _messages(parts):
                    decoded = decode_rule(data, start, end)
                    if decoded is not None and decoded[0] == key[1]:
                        got.append(decoded[1])
                out[key] = (chain_digest(parts), got)
        finally:
            _EXPRESSIONS.clear()  # the cache lives for one read, not in the agent
        return out

    def digests(
        self, family: int, chains: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes]:
        """Only each chain's :func:`chain_digest`, several times faster than
        :meth:`rules`: what a full sync compares."""
        return {key: chain_digest(parts) for key, parts in self._dumps(family, chains).items()}

    def _dumps(
        self, family: int, chains: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[bytes]]:
        chains = list(chains)

        def read() -> dict[tuple[str, str], list[bytes]]:
            out: dict[tuple[str, str], list[bytes]] = {}
            for table, chain in chains:
                try:
                    out[(table, chain)] = self._exchange(
                        NFT_MSG_GETRULE,
                        family,
                        (_attr_str(NFTA_RULE_TABLE, table), _attr_str(NFTA_RULE_CHAIN, chain)),
                    )
                except _Refused as exc:
                    if exc.errno == errno_.ENOENT:
                        continue
                    raise NetlinkError(str(exc)) from exc
            return out

        with self._lock, self._session():
            return self._consistent(read)

    # --- the socket ----------------------------------------------------------------------

    def _consistent(self, read: Callable[[], T]) -> T:
        for _attempt in range(RETRIES):
            try:
                before = self._generation()
                result = read()
                if self._generation() != before:
                    raise DumpInterrupted
                return result
            except DumpInterrupted:
                self.restarts += 1
        raise NetlinkError(f"the ruleset changed during {RETRIES} reads in a row")


class _Refused(Exception):
    def __init__(self, errno: int) -> None:
        name = errno_.errorcode.get(errno, str(errno))
        super().__init__(f"kernel refused the nf_tables dump: {os.strerror(errno)} ({name})")
        self.errno = errno


__all__ = [
    "Chain",
    "ChainReader",
    "NetlinkError",
    "NlRule",
    "Summary",
    "chain_digest",
    "decode_rule",
]
