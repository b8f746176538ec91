"""Netlink primitives every raw netlink reader and writer of kpy shares.

The backends talk to the kernel over netlink directly where a tool or a library would be
slower (nf_tables for nftables and the nft flavour of iptables, generic netlink for IPVS,
ipset, rtnetlink): the message and attribute layout (linux/netlink.h) is the same for all
of them, so it lives here once — the constants, walking the attributes of a message, and
encoding an attribute. What an attribute means is each backend's business.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NETLINK_GENERIC = 16
NETLINK_NETFILTER = 12

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # the type without NLA_F_NESTED and NLA_F_NET_BYTEORDER

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NLA = struct.Struct("=HH")  # nlattr: length, type


def attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``data[start:end]``; an
    attribute that is too short or runs past ``end`` ends the walk."""
    unpack = NLA.unpack_from
    at = start
    while at + 4 <= end:
        length, kind = unpack(data, at)
        if length < 4 or at + length > end:
            return
        yield kind & NLA_TYPE_MASK, at + 4, at + length
        at += (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header, payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return NLA.pack(length, kind) + payload + bytes(-length % 4)


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, value.encode() + b"\0")


def string(data: bytes, start: int, end: int) -> str:
    """A string attribute's payload (up to its NUL)."""
    return data[start:end].split(b"\0", 1)[0].decode(errors="replace")
