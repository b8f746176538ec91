"""Reading kpy's nftables state back from the kernel over netlink, without ``nft``.

A restarted agent adopts what the kernel holds, and every periodic full sync compares
against it (:mod:`kpy_nftables.observe`). Through ``nft -j list`` that costs three nft
processes and, at 10,000 Services, tens of MB of JSON text decoded into Python objects
all at once — the agent's peak memory. :meth:`NetlinkReader.observe` asks the kernel
itself: ``NFT_MSG_GETTABLE``, ``NFT_MSG_GETCHAIN`` and ``NFT_MSG_GETSET`` dumps, then
one ``NFT_MSG_GETSETELEM`` dump per set, on one nfnetlink socket opened inside the
node's namespace, and decodes each object straight into the observed model
(:class:`kpy_nftables.observe.Reading`, which :func:`kpy_nftables.observe.parse` feeds
from ``nft -j`` output): element keys into the text render writes for them, comments
and verdicts as ``nft`` prints them. Nothing in between is built.

It is the mirror of :mod:`kpy_nftables.netlink` (the writer): the same key encodings
(concatenated values each padded to 4 bytes, ports big endian, marks in host order),
element comments in the userdata TLV, verdicts in ``NFTA_SET_ELEM_DATA``. Only kpy's
tables (:func:`kpy_nftables.render.is_kpy_table`) of families ip and ip6 are read.

Two things differ from ``nft -j list`` on purpose:

* Elements of dynamic sets (session-affinity sets, ``flags dynamic,timeout``) are not
  read: they are clients the kernel added, not anything render writes, and reading
  them would make a full sync delete them (breaking affinity). The definitions are
  read.
* A set's element dump is decoded one received part at a time, each part dropped once
  decoded, so no more than one set's raw dump is held.

Not mirrored, because render writes none of them: named interval sets (their elements
come as raw bounds, where nft prints prefixes and ranges), key types other than
addresses, protocols, ports and marks (printed as hex), and tables of other families
(an ``inet kpy`` table is not kpy's).

Every dump is received whole (raw bytes, a fraction of their decoded size) before any
of it is decoded, between two reads of the ruleset's generation id: a dump during
which the ruleset changed (a different generation, or ``NLM_F_DUMP_INTR``), or that
the kernel refuses as busy, is simply asked for again. A set deleted between the
listing of the sets and the dump of its elements is left out.
"""

from __future__ import annotations

import contextlib
import errno as errno_
import functools
import hashlib
import os
import queue
import re
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kpy.kernel.netlink import (
    NLA_TYPE_MASK,
    DumpInterrupted,
    NfTablesSocket,
)
from kpy.kernel.netlink import attr_str as _attr_str
from kpy.kernel.netlink import attrs as _attrs
from kpy.kernel.netlink import string as _string
from kpy.kernel.netns import run_in_netns
from kpy_nftables import observe as observe_
from kpy_nftables import render
from kpy_nftables.apply import NftError

# --- netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h) --------


NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_GETSETELEM = 13
NFT_MSG_GETGEN = 16

NFPROTO_UNSPEC = 0
FAMILY_NAMES: dict[int, str] = {int(socket.AF_INET): "ip", int(socket.AF_INET6): "ip6"}
FAMILY_NUMBERS = {name: number for number, name in FAMILY_NAMES.items()}

# NFTA_TABLE_*, NFTA_CHAIN_*
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
# NFTA_RULE_*
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_EXPRESSIONS = 4
NFTA_RULE_USERDATA = 7
# NFTA_SET_*
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_FLAGS = 3
NFTA_SET_KEY_TYPE = 4
NFTA_SET_KEY_LEN = 5
NFTA_SET_DATA_TYPE = 6
NFTA_SET_TIMEOUT = 11
NFT_SET_ANONYMOUS = 0x1
NFT_SET_MAP = 0x8
NFT_SET_TIMEOUT = 0x10
NFT_SET_EVAL = 0x20
# NFTA_SET_ELEM_LIST_*, NFTA_SET_ELEM_*, NFTA_DATA_*, NFTA_VERDICT_*
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFTNL_UDATA_SET_ELEM_COMMENT = 0
NFT_DATA_VERDICT = 0xFFFFFF00

# nft's datatype ids (src/datatype.h) → the name ``nft -j`` prints, and how many bytes
# one value takes in a key (None: only known from the key length).
DATATYPES: dict[int, tuple[str, int | None]] = {
    4: ("integer", None),
    5: ("string", None),
    7: ("ipv4_addr", 4),
    8: ("ipv6_addr", 16),
    9: ("ether_addr", 6),
    12: ("inet_proto", 1),
    13: ("inet_service", 2),
    19: ("mark", 4),
    20: ("iface_index", 4),
    41: ("ifname", 16),
}
TYPE_BITS = 6  # a concatenation's type id: component ids shifted in, 6 bits each
# NF_DROP, NF_ACCEPT and NFT_CONTINUE … NFT_RETURN
VERDICTS = {
    0: "drop",
    1: "accept",
    -1: "continue",
    -2: "break",
    -3: "jump",
    -4: "goto",
    -5: "return",
}
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}

RETRIES = 10  # dumps asked again after an interruption or a busy socket


@dataclass(frozen=True, slots=True)
class SetDef:
    """A set or map as ``NFT_MSG_GETSET`` describes it."""

    family: str
    table: str
    name: str
    flags: int
    key_type: int
    key_len: int
    data_type: int | None
    timeout_ms: int | None

    @property
    def is_map(self) -> bool:
        return bool(self.flags & NFT_SET_MAP)

    @property
    def dynamic(self) -> bool:
        """Filled by the kernel from the packet path (affinity): elements not read."""
        return bool(self.flags & (NFT_SET_TIMEOUT | NFT_SET_EVAL))

    @property
    def type_text(self) -> str:
        """The key type as render writes it: ``"ipv4_addr . inet_proto . inet_service"``."""
        return " . ".join(type_names(self.key_type))

    @property
    def timeout(self) -> int | None:
        """The default timeout in seconds, as ``nft`` prints it."""
        return None if self.timeout_ms is None else self.timeout_ms // 1000


# --- decoding ---------------------------------------------------------------------------


def type_names(type_id: int) -> list[str]:
    """``7`` → ``["ipv4_addr"]``; a concatenation's id → each component's name."""
    ids: list[int] = []
    while type_id:
        ids.append(type_id & ((1 << TYPE_BITS) - 1))
        type_id >>= TYPE_BITS
    if not ids:
        ids = [0]
    return [DATATYPES.get(i, (f"type-{i}", None))[0] for i in reversed(ids)]


def _component(name: str, raw: bytes) -> str | int:
    """One value of a key, as nft prints it (in JSON: a number where it is one)."""
    if name == "ipv4_addr" and len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if name == "ipv6_addr" and len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    if name == "inet_proto" and len(raw) == 1:
        return PROTOCOL_NAMES.get(raw[0], raw[0])
    if name == "inet_service" and len(raw) == 2:
        return int.from_bytes(raw, "big")
    if name in ("mark", "iface_index") and len(raw) == 4:
        return int.from_bytes(raw, sys.byteorder)  # host byte order
    return "0x" + raw.hex()


_PROTOCOL_TEXT: dict[int, str | int] = {n: PROTOCOL_NAMES.get(n, n) for n in range(256)}
# A concatenation's value → (struct format in host order, padded to 4 bytes; converter)
_FIELDS: dict[str, tuple[str, Callable[[Any], str | int]]] = {
    "ipv4_addr": ("4s", functools.partial(socket.inet_ntop, socket.AF_INET)),
    "ipv6_addr": ("16s", functools.partial(socket.inet_ntop, socket.AF_INET6)),
    "inet_proto": ("B3x", _PROTOCOL_TEXT.__getitem__),
    "inet_service": ("H2x", socket.ntohs),  # big endian in the key
    "mark": ("I", int),
    "iface_index": ("I", int),
}
_EXPLODED = struct.Struct("!8H")
_EXPLODED_TEXT = ":".join(["%04x"] * 8)


class _KeyDecoder:
    """Key bytes → the text render writes for it: ``"10.96.0.1 . tcp . 80"``.

    Called once per element (~140,000 at 10,000 Services), so a concatenation is
    unpacked by one precompiled struct."""

    __slots__ = ("convert", "exploded", "name", "struct")

    def __init__(self, key_type: int, key_len: int, *, exploded: bool = False) -> None:
        names = type_names(key_type)
        self.name = names[0] if len(names) == 1 else None
        self.exploded = exploded and self.name == "ipv6_addr"
        self.struct: struct.Struct | None = None
        self.convert: tuple[Callable[[Any], str | int], ...] = ()
        if len(names) > 1 and all(n in _FIELDS for n in names):
            layout = struct.Struct("=" + "".join(_FIELDS[n][0] for n in names))
            if layout.size == key_len:
                self.struct = layout
                self.convert = tuple(_FIELDS[n][1] for n in names)

    def __call__(self, data: bytes, start: int, end: int) -> str:
        if self.struct is not None and end - start == self.struct.size:
            values = self.struct.unpack_from(data, start)
            convert = self.convert
            if len(values) == 3:  # the common case, without a loop
                first, second, third = values
                return f"{convert[0](first)} . {convert[1](second)} . {convert[2](third)}"
            return " . ".join([str(f(v)) for f, v in zip(convert, values, strict=True)])
        if self.exploded and end - start == 16:
            return _EXPLODED_TEXT % _EXPLODED.unpack_from(data, start)
        if self.name is not None:
            return str(_component(self.name, data[start:end]))
        return "0x" + data[start:end].hex()


def _u32(data: bytes, start: int) -> int:
    value: int = struct.unpack_from(">I", data, start)[0]
    return value


def _messages(buffers: list[bytes]) -> Iterator[tuple[bytes, int, int, int]]:
    """(buffer, family, attributes start, message end) of every dumped object."""
    for data in buffers:
        at = 0
        while at + 16 <= len(data):
            length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, at)
            if length < 16 or at + length > len(data):
                break
            if kind >> 8 == NFNL_SUBSYS_NFTABLES and length >= 20:
                yield data, data[at + 16], at + 20, at + length
            at += (length + 3) & ~3


def _comment(data: bytes, start: int, end: int) -> str | None:
    """The comment TLV (``NFTNL_UDATA_SET_ELEM_COMMENT``) of an element's userdata."""
    at = start
    while at + 2 <= end:
        kind, length = data[at], data[at + 1]
        if kind == NFTNL_UDATA_SET_ELEM_COMMENT:
            return _string(data, at + 2, min(at + 2 + length, end))
        at += 2 + length
    return None


def _verdict(data: bytes, start: int, end: int) -> str | None:
    """A verdict as nft prints it: ``"drop"``, ``"goto service-…"``."""
    code: int | None = None
    chain = None
    for kind, s, e in _attrs(data, start, end):
        if kind == NFTA_VERDICT_CODE:
            code = struct.unpack_from(">i", data, s)[0]
        elif kind == NFTA_VERDICT_CHAIN:
            chain = _string(data, s, e)
    if code is None:
        return None
    word = VERDICTS.get(code, f"verdict-{code}")
    if chain is not None and word in ("jump", "goto"):
        return f"{word} {chain}"
    return word


_NLA = struct.Struct("=HH")


def _elements(
    data: bytes,
    start: int,
    end: int,
    key: _KeyDecoder,
    data_key: _KeyDecoder | None,
    add: Callable[[str, str, str | None], None],
) -> None:
    """Hand each element of an ``NFTA_SET_ELEM_LIST_ELEMENTS`` nest to ``add``: its key
    text, its comment ("" for none) and in a map its data (a verdict's text). The
    attribute walk is written out: it runs once per element."""
    unpack = _NLA.unpack_from
    at = start
    while at + 4 <= end:
        length, _ = unpack(data, at)  # NFTA_LIST_ELEM
        if length < 4 or at + length > end:
            return
        stop = at + length
        val: str | None = None
        comment = None
        mapped: str | None = None
        p = at + 4
        while p + 4 <= stop:
            alen, kind = unpack(data, p)
            if alen < 4:
                break
            kind &= NLA_TYPE_MASK
            if kind == NFTA_SET_ELEM_KEY:
                vlen, vkind = unpack(data, p + 4)
                if vkind & NLA_TYPE_MASK == NFTA_DATA_VALUE and vlen >= 4:
                    val = key(data, p + 8, p + 4 + vlen)
            elif kind == NFTA_SET_ELEM_DATA:
                vlen, vkind = unpack(data, p + 4)
                vkind &= NLA_TYPE_MASK
                if vkind == NFTA_DATA_VERDICT:
                    mapped = _verdict(data, p + 8, p + 4 + vlen)
                elif vkind == NFTA_DATA_VALUE and data_key is not None:
                    mapped = data_key(data, p + 8, p + 4 + vlen)
            elif kind == NFTA_SET_ELEM_USERDATA:
                comment = _comment(data, p + 4, p + alen)
            p += (alen + 3) & ~3
        add(str(val), comment or "", mapped)
        at += (length + 3) & ~3


# --- rules ----------------------------------------------------------------------------------

_ANONYMOUS_SET = re.compile(rb"(?s)..\x01\x00__set\d+\x00+")


class RuleDigests:
    """(rule count, digest) per chain, keyed ``(family, table, chain)``, for kpy's tables.

    The digest is a hash of the chain's rules as the kernel holds them — each rule's
    expressions and userdata in order, exactly as ``NFT_MSG_GETRULE`` returns them (the
    kernel's own encoding of its state; handles and positions left out) — so any rule
    added, deleted, replaced or reordered changes it. The name of an anonymous set
    (``__set3``: the kernel numbers them, a rewrite renumbers) is left out of it, and
    so are that set's elements (a rule's anonymous set cannot be edited, only the rule
    replaced, which changes the rule's handle but not its expressions when the set is
    the same)."""

    __slots__ = ("_close", "chains")

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str, str], tuple[int, bytes]] = {}
        self._close: Callable[[], None] = lambda: None

    def start(self) -> Callable[[bytes], None]:
        """A consumer of one dump's parts (a restarted dump starts over). A chain's
        rules come one after another, so one digest is open at a time. The walk is
        written out: it runs once per rule (60,000 at 10,000 Services)."""
        done = self.chains
        done.clear()
        tables: dict[bytes, str] = {}  # raw table name → its name, "" when not kpy's
        # the open chain: raw (family, table, chain), its key, rule count, digest
        open_: list[Any] = [None, None, 0, None]
        unpack = _NLA.unpack_from
        header = struct.Struct("=IH").unpack_from
        lengths = struct.Struct("=II").pack

        def close() -> None:
            if open_[1] is not None:
                done[open_[1]] = (open_[2], open_[3].digest())
                open_[0] = open_[1] = None

        def consume(data: bytes) -> None:
            at = 0
            size = len(data)
            while at + 20 <= size:
                length, mtype = header(data, at)
                if length < 16 or at + length > size:
                    return
                end = at + length
                family = data[at + 16]
                start = at + 20
                at += (length + 3) & ~3
                if mtype >> 8 != NFNL_SUBSYS_NFTABLES or family not in FAMILY_NAMES:
                    continue
                table = chain = None
                exprs = udata = b""
                p = start
                while p + 4 <= end:
                    alen, kind = unpack(data, p)
                    if alen < 4:
                        break
                    kind &= NLA_TYPE_MASK
                    if kind == NFTA_RULE_TABLE:
                        table = data[p + 4 : p + alen]
                    elif kind == NFTA_RULE_CHAIN:
                        chain = data[p + 4 : p + alen]
                    elif kind == NFTA_RULE_EXPRESSIONS:
                        exprs = data[p + 4 : p + alen]
                    elif kind == NFTA_RULE_USERDATA:
                        udata = data[p + 4 : p + alen]
                    p += (alen + 3) & ~3
                if table is None or chain is None:
                    continue
                name = tables.get(table)
                if name is None:
                    name = _string(table, 0, len(table))
                    name = tables[table] = name if render.is_kpy_table(name) else ""
                if not name:
                    continue
                if b"__set" in exprs:
                    exprs = _ANONYMOUS_SET.sub(b"__set", exprs)
                raw = (family, table, chain)
                if raw != open_[0]:
                    close()
                    key = (FAMILY_NAMES[family], name, _string(chain, 0, len(chain)))
                    digest = hashlib.blake2b(digest_size=16)
                    count = 0
                    earlier = done.pop(key, None)  # not one after another after all
                    if earlier is not None:
                        count = earlier[0]
                        digest.update(earlier[1])
                    open_[:] = [raw, key, count, digest]
                open_[2] += 1
                digest = open_[3]
                digest.update(lengths(len(exprs), len(udata)))
                digest.update(exprs)
                digest.update(udata)

        self._close = close
        return consume

    def finish(self) -> RuleDigests:
        """Close the last chain the dump's consumer saw: :attr:`chains` is complete."""
        self._close()
        return self


def ping(netns: str | None, timeout: float = 5.0) -> str | None:
    """None when nf_tables answers over netlink inside ``netns``, else why not: one
    ``NFT_MSG_GETGEN`` request, nothing listed (the backend's probe)."""

    def ask() -> None:
        sock = NetlinkReader._open()
        sock.settimeout(timeout)
        reader = NetlinkReader(netns)
        reader._sock = sock
        try:
            reader._generation()
        finally:
            reader.close()

    try:
        run_in_netns(netns, ask)
    except (OSError, NftError) as exc:
        return f"nf_tables does not answer over netlink: {exc}"
    return None


# --- the socket ---------------------------------------------------------------------------


class DumpRefused(NftError):
    """The kernel answered a dump with an error (``errno``)."""

    def __init__(self, errno: int) -> None:
        text = f"{os.strerror(errno)} (errno {errno_.errorcode.get(errno, errno)})"
        super().__init__(f"kernel refused the nf_tables dump: {text}")
        self.errno = errno


PREFETCH = 4  # set dumps read ahead of their decoding (see NetlinkReader._prefetched)
SWITCH_INTERVAL = 0.0005  # seconds, the interpreter's GIL switch interval while reading


class NetlinkReader(NfTablesSocket):
    """An nfnetlink socket inside ``netns`` (None: this namespace) that reads kpy's
    tables back (see the module docstring)."""

    failure = NftError

    def _refused(self, errno: int) -> Exception:
        return DumpRefused(errno)

    def __enter__(self) -> NetlinkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- dumps --------------------------------------------------------------------------

    def dump(self, kind: int, family: int, *attrs: bytes) -> list[bytes]:
        """Every part of one dump, raw; asked again while the ruleset changed during
        the dump: the kernel marks only some dumps (``NLM_F_DUMP_INTR``; not a set's
        elements), so the ruleset's generation is also compared before and after."""
        parts: list[bytes] = []

        def start() -> Callable[[bytes], None]:
            parts.clear()
            return parts.append

        self.dump_into(start, kind, family, *attrs)
        return parts

    def dump_into(
        self,
        start: Callable[[], Callable[[bytes], None]],
        kind: int,
        family: int,
        *attrs: bytes,
        marked: bool = False,
    ) -> None:
        """One dump, each part handed to the consumer ``start()`` returns as it arrives
        (nothing held whole); on an interrupted dump ``start()`` is called again and
        the dump asked for afresh, as :meth:`dump` does. ``marked``: the kernel marks
        this kind of dump ``NLM_F_DUMP_INTR`` itself when the ruleset changes during it
        (rules do), so the generation is not asked for around it."""
        with self._lock:
            for _attempt in range(RETRIES):
                try:
                    before = None if marked else self._generation()
                    self._exchange(kind, family, attrs, dump=True, consume=start())
                    if before is not None and self._generation() != before:
                        raise DumpInterrupted
                    return
                except DumpInterrupted:
                    self.restarts += 1
                    continue
        raise NftError(f"nf_tables dump {kind} interrupted {RETRIES} times in a row")

    # --- reading -------------------------------------------------------------------------

    def observe(
        self, rules: observe_.RuleCounts | None = None, *, views: bool = True
    ) -> observe_.Observed:
        """What kpy's tables hold (:class:`kpy_nftables.observe.Observed`): tables,
        chains, then every set and map (definition and elements), each set's element
        dump decoded part by part as it is read; with ``rules`` (what
        :meth:`rules` read), each chain's rule count checked against its fingerprint.
        Without ``views``, only what a sync compares (see :class:`observe_.Reading`)."""
        reading = observe_.Reading(views=views)
        for nf, name in self.tables():
            reading.table(nf, name)
        if not reading.result.seen_tables:
            return reading.finish(rules)
        for data, family, start, end in _messages(self.dump(NFT_MSG_GETCHAIN, NFPROTO_UNSPEC)):
            chain_family = FAMILY_NAMES.get(family)
            if chain_family is None:
                continue
            table = chain = None
            for kind, s, e in _attrs(data, start, end):
                if kind == NFTA_CHAIN_TABLE:
                    table = _string(data, s, e)
                elif kind == NFTA_CHAIN_NAME:
                    chain = _string(data, s, e)
            if table is not None and chain is not None:
                reading.chain(chain_family, table, chain)
        for set_def, parts in self._prefetched(self.sets()):
            self._read_set(set_def, reading, parts)
        return reading.finish(rules)

    def _prefetched(
        self, sets: list[SetDef]
    ) -> Iterator[tuple[SetDef, list[bytes] | Exception | None]]:
        """Each of ``sets`` with its element dump (None for a dynamic set, whose elements
        are not read; or the exception the dump raised), dumped on threads while the
        caller decodes the dumps before it. A set's dump is mostly the kernel's time —
        it walks the set from its first element for every ~32 KiB part: 2.2 s for the
        500,000 hairpin elements of 100,000 Services — and the decoding mostly Python's:
        on two cores, one goes on while the other does. The base tables' sets (the
        large ones) are dumped on a socket of their own (:meth:`_companion`) from the
        start, while the shards' sets are dumped (at most :data:`PREFETCH` ahead) and
        decoded; the base tables' are decoded last."""
        shards = [s for s in sets if s.table != render.TABLE]
        base = [s for s in sets if s.table == render.TABLE]
        if len(sets) < 2:
            for set_def in sets:
                yield set_def, self._element_parts(set_def)
            return
        companion = self._companion() if base and shards else self
        stop = threading.Event()
        # A fetching thread back from the kernel with a part waits for the GIL while
        # this one decodes; with the default 5 ms switch interval that wait was as long
        # as the kernel's work (an element dump is ~300 parts): 0.5 ms while reading
        # (8.1 → 7.1 s to read 100,000 Services' sets on two cores).
        _short_switches.enter()
        fetches: list[_Fetch] = []
        try:
            fetches.append(_Fetch(self, shards, PREFETCH, stop))
            fetches.append(_Fetch(companion, base, len(base) + 1, stop))
            for fetch in fetches:
                for set_def in fetch.sets:
                    got = fetch.ready.get()
                    if isinstance(got, Exception) and not isinstance(got, DumpRefused):
                        raise got
                    yield set_def, got
        finally:
            stop.set()
            for fetch in fetches:
                fetch.finish()
            if companion is not self:
                companion.close()
            _short_switches.leave()

    def _companion(self) -> NetlinkReader:
        """A second reader in the same namespace, for dumps made at the same time."""
        return NetlinkReader(self.netns)

    def _element_parts(self, set_def: SetDef) -> list[bytes] | Exception | None:
        if set_def.dynamic:
            return None
        try:
            return self.element_parts(set_def.family, set_def.table, set_def.name)
        except DumpRefused as exc:
            return exc

    def tables(self) -> list[tuple[str, str]]:
        """(family, name) of kpy's base and shard tables (of any shard count)."""
        found = []
        for data, family, start, end in _messages(self.dump(NFT_MSG_GETTABLE, NFPROTO_UNSPEC)):
            name = _find_string(data, start, end, NFTA_TABLE_NAME)
            nf = FAMILY_NAMES.get(family)
            if nf is not None and name is not None and render.is_kpy_table(name):
                found.append((nf, name))
        return sorted(found)

    def rules(self, chains: Iterable[tuple[str, str, str]] | None = None) -> RuleDigests:
        """How many rules each chain of kpy's tables holds, and a digest of them (see
        :class:`RuleDigests`): one ``NFT_MSG_GETRULE`` dump of every table, or with
        ``chains`` ((family, table, chain) each) one dump filtered to each chain. Each
        part of a dump is digested as it arrives: nothing of the rules is kept (at
        10,000 Services they are 27 MB)."""
        if chains is None:
            return self._all_rules()
        result = RuleDigests()
        for family, table, chain in chains:
            result.chains.update(self._rule_digests(family, table, chain))
        return result

    def _rule_digests(
        self, family: str, table: str, chain: str | None = None
    ) -> dict[tuple[str, str, str], tuple[int, bytes]]:
        """The digests of one table's rules (or one chain's); none when the kernel has no
        such table or chain (it went away, or never was)."""
        one = RuleDigests()
        attrs = [_attr_str(NFTA_RULE_TABLE, table)]
        if chain is not None:
            attrs.append(_attr_str(NFTA_RULE_CHAIN, chain))
        try:
            self.dump_into(one.start, NFT_MSG_GETRULE, FAMILY_NUMBERS[family], *attrs, marked=True)
        except DumpRefused as exc:
            if exc.errno != errno_.ENOENT:
                raise
            return {}
        return one.finish().chains

    def _all_rules(self) -> RuleDigests:
        """Every rule of kpy's tables: one dump per table, all of them read again when
        the ruleset's generation changed in between (each dump alone is marked
        interrupted by the kernel).

        Not one dump of everything: the kernel resumes a rule dump for each ~32 KiB
        part by walking its tables' rules from the first again, up to where the last
        part ended, so a dump costs the square of the rules it walks. Per table (the
        base and each shard per family) the walk is over that table's rules only: at
        30,000 Services the read-back after a cold sync went from 18.6 s to 2.0 s."""
        for _attempt in range(RETRIES):
            with self._lock:
                before = self._generation()
            result = RuleDigests()
            for family, table in self.tables():
                # a table gone meanwhile has no rules: the generation says it changed
                result.chains.update(self._rule_digests(family, table))
            with self._lock:
                if self._generation() == before:
                    return result
            self.restarts += 1
        raise NftError(f"nf_tables rule dump interrupted {RETRIES} times in a row")

    def sets(self) -> list[SetDef]:
        """The named sets and maps of kpy's tables."""
        result = []
        for data, family, start, end in _messages(self.dump(NFT_MSG_GETSET, NFPROTO_UNSPEC)):
            nf = FAMILY_NAMES.get(family)
            if nf is None:
                continue
            got: dict[int, tuple[int, int]] = {k: (s, e) for k, s, e in _attrs(data, start, end)}
            if NFTA_SET_TABLE not in got or NFTA_SET_NAME not in got:
                continue
            table = _string(data, *got[NFTA_SET_TABLE])
            flags = _u32(data, got[NFTA_SET_FLAGS][0]) if NFTA_SET_FLAGS in got else 0
            if not render.is_kpy_table(table) or flags & NFT_SET_ANONYMOUS:
                continue

            def number(kind: int) -> int | None:
                return _u32(data, got[kind][0]) if kind in got else None  # noqa: B023

            timeout = None
            if NFTA_SET_TIMEOUT in got:
                (timeout,) = struct.unpack_from(">Q", data, got[NFTA_SET_TIMEOUT][0])
            result.append(
                SetDef(
                    family=nf,
                    table=table,
                    name=_string(data, *got[NFTA_SET_NAME]),
                    flags=flags,
                    key_type=number(NFTA_SET_KEY_TYPE) or 0,
                    key_len=number(NFTA_SET_KEY_LEN) or 0,
                    data_type=number(NFTA_SET_DATA_TYPE),
                    timeout_ms=timeout,
                )
            )
        return result

    def element_parts(self, family: str, table: str, name: str) -> list[bytes]:
        """The raw dump of one set's elements (``NFT_MSG_GETSETELEM``); raises
        :class:`DumpRefused` (``ENOENT``) when there is no such set."""
        return self.dump(
            NFT_MSG_GETSETELEM,
            FAMILY_NUMBERS[family],
            _attr_str(NFTA_SET_ELEM_LIST_TABLE, table),
            _attr_str(NFTA_SET_ELEM_LIST_SET, name),
        )

    def _read_set(
        self,
        set_def: SetDef,
        reading: observe_.Reading,
        dumped: list[bytes] | Exception | None,
    ) -> None:
        """One set's definition and (unless it is dynamic) its ``dumped`` elements, into
        ``reading``; nothing of it when it was deleted since the sets were listed."""
        if isinstance(dumped, DumpRefused) and dumped.errno == errno_.ENOENT:
            return  # deleted since the sets were listed: it is not there
        if isinstance(dumped, Exception):
            raise dumped
        parts = dumped or []
        elements = reading.set(
            "map" if set_def.is_map else "set",
            set_def.family,
            set_def.table,
            set_def.name,
            set_def.type_text,
            set_def.timeout,
        )
        if elements is None or set_def.dynamic:
            return
        key = _KeyDecoder(
            set_def.key_type, set_def.key_len, exploded=set_def.name == render.FINGERPRINTS
        )
        data_key = None
        if set_def.is_map and set_def.data_type not in (None, NFT_DATA_VERDICT):
            data_key = _KeyDecoder(set_def.data_type or 0, 0)
        parts.reverse()
        while parts:
            data = parts.pop()  # each part dropped once decoded
            for part, _family, start, end in _messages([data]):
                for kind, s, e in _attrs(part, start, end):
                    if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                        _elements(part, s, e, key, data_key, elements.element)


class _ShortSwitches:
    """The interpreter's switch interval set to :data:`SWITCH_INTERVAL` while any read
    is under way (reads may overlap: the first in sets it, the last out restores it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers = 0
        self._saved = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._readers == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL))
            self._readers += 1

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0:
                sys.setswitchinterval(self._saved)


_short_switches = _ShortSwitches()


class _Fetch:
    """``sets``' element dumps by ``reader`` on a thread of their own, in order, into
    ``ready`` (at most ``ahead`` waiting); stopped by ``stop``, or by a failure (put in
    ``ready`` for the decoding thread to raise)."""

    def __init__(
        self, reader: NetlinkReader, sets: list[SetDef], ahead: int, stop: threading.Event
    ) -> None:
        self.sets = sets
        self.ready: queue.Queue[list[bytes] | Exception | None] = queue.Queue(maxsize=ahead)
        self.stop = stop
        self.thread = threading.Thread(
            target=self._run, args=(reader,), name="kpy-nftables-prefetch", daemon=True
        )
        self.thread.start()

    def _run(self, reader: NetlinkReader) -> None:
        try:
            for set_def in self.sets:
                if self.stop.is_set():
                    return
                self.ready.put(reader._element_parts(set_def))
        except Exception as exc:  # handed to the decoding thread, raised there
            self.ready.put(exc)

    def finish(self) -> None:
        """Wait for the thread (a dump waiting on a full queue is let through)."""
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.ready.get_nowait()
            self.thread.join(0.01)


def _find_string(data: bytes, start: int, end: int, kind: int) -> str | None:
    for k, s, e in _attrs(data, start, end):
        if k == kind:
            return _string(data, s, e)
    return None


__all__ = ["DumpRefused", "NetlinkReader", "RuleDigests", "SetDef", "ping", "type_names"]
