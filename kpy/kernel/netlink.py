"""Netlink primitives every raw netlink reader and writer of kpy shares.

The backends talk to the kernel over netlink directly where a tool or a library would be
slower (nf_tables for nftables and the nft flavour of iptables, generic netlink for IPVS,
ipset, rtnetlink): the message and attribute layout (linux/netlink.h) is the same for all
of them, so it lives here once — the constants, walking the attributes of a message, and
encoding an attribute. What an attribute means is each backend's business.
"""

from __future__ import annotations

import errno as errno_
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

from kpy.kernel.netns import run_in_netns

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


# --- nf_tables requests --------------------------------------------------------------------

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFPROTO_UNSPEC = 0
RECV_SIZE = 1 << 16  # a dump part is at most ~32 KiB
_NFGEN = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg: family, version, resource id
_ERRNO = struct.Struct("=i")


class DumpInterrupted(Exception):
    """The ruleset changed during a read, or the kernel said busy: read again."""


class NfTablesSocket:
    """An nfnetlink socket inside ``netns`` (None: this namespace) for nf_tables requests
    and dumps: opened on a thread that entered the namespace (a socket belongs to the
    namespace it was made in), replies matched by sequence number, a part left over from
    an abandoned request dropped, a dump the kernel marks interrupted (or answers busy)
    raised as :class:`DumpInterrupted`. ``failure`` is the exception the socket's own
    errors are raised as; :meth:`_refused` makes the one for an error the kernel answers.
    Not thread-safe by itself: callers hold ``_lock`` around a read."""

    failure: type[Exception] = OSError

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._seq = 0
        self.restarts = 0  # reads asked again (interrupted or busy), for tests and logs

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.settimeout(30.0)  # a dump that stops answering is an error, not a hang
        except OSError:
            sock.close()
            raise
        return sock

    def _socket(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = run_in_netns(self.netns, self._open)
            except OSError as exc:
                raise self.failure(f"cannot open an nfnetlink socket: {exc}") from exc
        return self._sock

    def close(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _refused(self, errno: int) -> Exception:
        """The exception for a request the kernel refused with ``errno``."""
        return self.failure(f"nf_tables refused the request: {os.strerror(errno)}")

    def _receive(self, sock: socket.socket, kind: int, part: int) -> bytes:
        """The next part (number ``part``) of a ``kind`` answer; tests override this to
        change the ruleset in the middle of a dump."""
        return sock.recv(RECV_SIZE)

    def _exchange(
        self,
        kind: int,
        family: int,
        attributes: tuple[bytes, ...],
        *,
        dump: bool,
        consume: Callable[[bytes], None] | None = None,
    ) -> list[bytes]:
        """Send one request; every part of its answer (a dump: up to NLMSG_DONE), or
        each part handed to ``consume`` (then nothing is returned)."""
        sock = self._socket()
        self._seq += 1
        seq = self._seq
        body = b"".join(attributes)
        flags = NLM_F_REQUEST | NLM_F_DUMP if dump else NLM_F_REQUEST
        header = _NFGEN.pack(
            _NFGEN.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, 0,
            family, 0, 0,  # NFNETLINK_V0, resource id
        )  # fmt: skip
        try:
            sock.sendto(header + body, (0, 0))
        except OSError as exc:
            self._reset()
            raise self.failure(f"netlink send failed: {exc}") from exc
        parts: list[bytes] = []
        interrupted = False
        while True:
            try:
                data = self._receive(sock, kind, len(parts))
            except OSError as exc:
                self._reset()
                raise self.failure(f"netlink receive failed: {exc}") from exc
            done = False
            ours = False  # a part left over from an abandoned request is dropped
            at = 0
            while at + 16 <= len(data):
                length, mtype, mflags, mseq, _pid = HEADER.unpack_from(data, at)
                if length < 16:
                    break
                if mseq == seq:
                    ours = True
                    if not dump and mtype != NLMSG_ERROR:
                        done = True
                    if mflags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if mtype == NLMSG_DONE:
                        done = True
                    elif mtype == NLMSG_ERROR:
                        (err,) = _ERRNO.unpack_from(data, at + 16)
                        if err in (-errno_.EINTR, -errno_.EBUSY, -errno_.EAGAIN):
                            if err == -errno_.EBUSY:
                                self._reset()  # a dump left running: start afresh
                            raise DumpInterrupted
                        if err:
                            raise self._refused(-err)
                        done = True
                at += (length + 3) & ~3
            if ours:
                if consume is None:
                    parts.append(data)
                else:
                    consume(data)
            if done:
                break
        if interrupted:
            raise DumpInterrupted
        return parts

    def _generation(self) -> int:
        """The ruleset's generation id (``NFT_MSG_GETGEN``): each commit changes it."""
        for data in self._exchange(NFT_MSG_GETGEN, NFPROTO_UNSPEC, (), dump=False):
            at = 0
            while at + 20 <= len(data):
                length, mtype = HEADER.unpack_from(data, at)[:2]
                if length < 16:
                    break
                if mtype >> 8 == NFNL_SUBSYS_NFTABLES:
                    for kind, s, _e in attrs(data, at + 20, at + length):
                        if kind == NFTA_GEN_ID:
                            value: int = struct.unpack_from(">I", data, s)[0]
                            return value
                at += (length + 3) & ~3
        raise self.failure("the kernel sent no nf_tables generation id")
