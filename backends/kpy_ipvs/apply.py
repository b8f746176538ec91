"""The kernel side of the IPVS backend: netlink (IPVS, rtnetlink) and the companion rules.

Every kernel call of the backend goes through one :class:`Kernel`, which owns one
worker thread. When the backend is given a network namespace the thread enters it once
(``setns`` affects only the calling thread), so its netlink sockets, ``/proc/sys``
writes and ``ipset``/``iptables`` subprocesses all act inside that namespace and nowhere else.

Virtual services, real servers and ``kpy-ipvs0``'s addresses are read with raw dumps
(:meth:`Pipeline.dump`, on sockets of their own), decoded with precompiled ``struct``
formats. Writes of virtual services,
real servers, ``kpy-ipvs0``'s addresses and companion set elements go through a
:class:`Pipeline`: one message
per object (IPVS has no batch), but encoded here with ``struct`` and sent back to back on
a plain netlink socket, many messages per ``send``; the kernel handles them in order and
acknowledges only failures, plus the last message of each window, so a window costs one
round trip and a failure is still attributed to its own message. The dummy interface
itself is made with pyroute2's IPRoute; the companion sets (empty) with
``ipset restore``, its fixed rules with ``iptables-legacy-restore --noflush``.
Each method counts the messages it sends so ``ApplyResult.ops`` is honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPVS, IPRoute, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from kpy.core.model import IPAddress, Protocol
from kpy.kernel.netlink import (
    HEADER,
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attrs,
)
from kpy.kernel.netlink import attr as _nla
from kpy.kernel.netns import enter as enter_netns
from kpy_ipvs import render
from kpy_ipvs.render import DestKey, Element, VirtualKey, VirtualService

T = TypeVar("T")
Done = Callable[[], None] | None  # run once a queued write succeeded

PROTO_NUMBERS = {
    Protocol.TCP: socket.IPPROTO_TCP,
    Protocol.UDP: socket.IPPROTO_UDP,
    Protocol.SCTP: 132,
}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
MASQ = 0  # IP_VS_CONN_F_MASQ
PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
IPTABLES = ("iptables-legacy", "ip6tables-legacy")  # the UML 6.1 kernel has no nf_tables inet
SYSCTLS = (
    ("net/ipv4/vs/conntrack", "1"),  # keep conntrack entries so the companion can masquerade
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/vs/conn_reuse_mode", "0"),
    ("net/ipv4/ip_forward", "1"),
)


# netlink framing (linux/netlink.h, linux/genetlink.h, linux/ip_vs.h, linux/rtnetlink.h)
SOL_NETLINK, NETLINK_CAP_ACK, SO_RCVBUFFORCE = 270, 10, 33
IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_SERVICE, IPVS_CMD_DEL_SERVICE = 1, 2, 3
IPVS_CMD_NEW_DEST, IPVS_CMD_SET_DEST, IPVS_CMD_DEL_DEST, IPVS_CMD_GET_DEST = 5, 6, 7, 8
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IPVS_CMD_GET_SERVICE = 4
GENL_HEADER = 4  # genlmsghdr: command, version, reserved
GENL_GET_SERVICE = struct.pack("=BBH", IPVS_CMD_GET_SERVICE, 1, 0)
GENL_GET_DEST = struct.pack("=BBH", IPVS_CMD_GET_DEST, 1, 0)
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
U16, U32, BE16 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("!H")
FLAGS = struct.Struct("=II")  # ip_vs_flags: flags, mask
WINDOW_MESSAGES = 512  # in flight per send; failures each queue one small ack
WINDOW_BYTES = 64 * 1024  # well under the default socket send buffer
NETLINK_NETFILTER, NLA_F_NESTED, NLA_F_NET_BYTEORDER = 12, 0x8000, 0x4000
IPSET_CMD_ADD, IPSET_CMD_DEL = (6 << 8) | 9, (6 << 8) | 10  # nfnetlink subsystem 6: ipset
IPSET_CMD_LIST = (6 << 8) | 7
# ipset's own error numbers (linux/netfilter/ipset/ip_set.h, ip_set_hash.h), which
# strerror() does not know; the rest are errno values.
IPSET_ERRORS = {
    4097: "set type not supported",
    4098: "too many sets",
    4099: "set busy",
    4100: "a set with that name exists with other options",
    4101: "set types differ",
    4102: "element already exists",
    4107: "set is referenced",
    4352: "set is full (maxelem reached)",
    4353: "element does not fit the set",
}
NEW_SET = "KPY-IPVS-NEW"  # a companion set being made, before it takes its name (swap)
BE64 = struct.Struct("!Q")
IPSET_PROTOCOL = 7
SET_TYPES = {name: typ.split(":", 1)[1] for name, typ, _ in render.set_names()}


def describe_error(number: int) -> str:
    """An error number of a netlink reply, in words (ipset's own numbers included)."""
    return IPSET_ERRORS.get(number) or os.strerror(number)


class KernelError(Exception):
    """A kernel operation failed; the message names the object."""


def _u16(v: int) -> bytes:
    return struct.pack("=H", v)


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


def _port(v: int) -> bytes:
    return struct.pack("!H", v)


def encode_service(key: VirtualKey, settings: VirtualService | None = None) -> bytes:
    """The ``IPVS_CMD_ATTR_SERVICE`` attribute for ``key`` (with ``settings``: complete,
    as adding or changing a service needs)."""
    v6 = key.address.version == 6
    body = _nla(1, _u16(socket.AF_INET6 if v6 else socket.AF_INET))  # AF
    if key.fwmark:
        body += _nla(5, _u32(key.fwmark))  # FWMARK (no protocol, address or port)
    else:
        body += (
            _nla(2, _u16(PROTO_NUMBERS[key.protocol]))  # PROTOCOL
            + _nla(3, key.address.packed)  # ADDR
            + _nla(4, _port(key.port))  # PORT
        )
    if settings is not None:
        flags = PERSISTENT if settings.persistence else 0
        body += (
            _nla(6, settings.scheduler.encode() + b"\0")  # SCHED_NAME
            + _nla(7, struct.pack("=II", flags, PERSISTENT))  # FLAGS {flags, mask}
            + _nla(8, _u32(settings.persistence))  # TIMEOUT
            # NETMASK: all ones for IPv4; IPv6 reads it as a prefix length (128)
            + _nla(9, _u32(128) if v6 else b"\xff\xff\xff\xff")
        )
    return _nla(1, body)


def encode_dest(key: DestKey, weight: int) -> bytes:
    """The ``IPVS_CMD_ATTR_DEST`` attribute: a masqueraded real server of ``weight``."""
    v6 = key.address.version == 6
    body = (
        _nla(1, key.address.packed)  # ADDR
        + _nla(2, _port(key.port))  # PORT
        + _nla(3, _u32(MASQ))  # FWD_METHOD
        + _nla(4, _u32(weight))  # WEIGHT
        + _nla(5, _u32(0))  # U_THRESH
        + _nla(6, _u32(0))  # L_THRESH
        + _nla(11, _u16(socket.AF_INET6 if v6 else socket.AF_INET))  # ADDR_FAMILY
    )
    return _nla(2, body)


def encode_address(index: int, address: IPAddress) -> bytes:
    """An ``ifaddrmsg`` with its attributes: ``address`` alone (/32, /128) on ``index``."""
    v6 = address.version == 6
    family, prefix = (socket.AF_INET6, 128) if v6 else (socket.AF_INET, 32)
    return (
        struct.pack("=BBBBI", family, prefix, 0, 0, index)
        + _nla(2, address.packed)  # IFA_LOCAL
        + _nla(1, address.packed)  # IFA_ADDRESS
    )


def _ipset_ip(kind: int, address: IPAddress) -> bytes:
    inner = _nla((1 if address.version == 4 else 2) | NLA_F_NET_BYTEORDER, address.packed)
    return _nla(kind | NLA_F_NESTED, inner)


def encode_element(el: Element) -> bytes:
    """An ipset add/del request body for ``el`` (ipset's own text, e.g.
    ``10.244.1.2,tcp:8080,10.244.1.2`` in a ``hash:ip,port,ip`` set, or
    ``172.18.0.10,tcp:80 skbmark 0x10000/0xffff0000`` in a ``skbinfo`` one)."""
    data = b""
    family = socket.AF_INET
    value, _, extension = el.value.partition(" ")
    if extension:
        word, _, mark = extension.partition(" ")
        if word != "skbmark":
            raise KernelError(f"ipset element {el}: unknown extension {word!r}")
        text, _, mask = mark.partition("/")
        full = (int(text, 0) << 32) | int(mask or "0xffffffff", 0)
        data += _nla(27 | NLA_F_NET_BYTEORDER, struct.pack("!Q", full))  # SKBMARK
    for i, (part, kind) in enumerate(
        zip(value.split(","), SET_TYPES[el.set].split(","), strict=True)
    ):
        if kind == "port":
            proto, _, port = part.partition(":")
            data += _nla(4 | NLA_F_NET_BYTEORDER, _port(int(port)))  # PORT
            data += _nla(7, bytes([PROTO_NUMBERS[Protocol(proto.upper())]]))  # PROTO
            continue
        net = ipaddress.ip_network(part, strict=False)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        first = i == 0
        data += _ipset_ip(1 if first else 20, net.network_address)  # IP / IP2
        if kind == "net":
            data += _nla(3 if first else 21, bytes([net.prefixlen]))  # CIDR / CIDR2
    return (
        struct.pack("=BBH", family, 0, 0)  # nfgenmsg
        + _nla(1, bytes([IPSET_PROTOCOL]))  # PROTOCOL
        + _nla(2, el.set.encode() + b"\0")  # SETNAME
        + _nla(7 | NLA_F_NESTED, data)  # DATA
    )


@dataclass(slots=True)
class _Message:
    what: str
    kind: int
    flags: int
    payload: bytes
    done: Done


class Pipeline:
    """Netlink requests of one protocol, sent in windows and acknowledged per window.

    :meth:`add` queues a request (with an optional callback for when it succeeded);
    :meth:`flush` sends the queue in order. Each window is one ``send`` of up to
    ``WINDOW_MESSAGES`` concatenated messages; only its last asks for an ack
    (``NLM_F_ACK``), while the kernel acks every failing message on its own (with
    ``NETLINK_CAP_ACK``, a small ack). Messages are handled in order, so once the last
    ack is in, every message of the window has been handled and each failure is known
    by its sequence number. A lost ack (``ENOBUFS``) leaves the outcome unknown, which
    is reported as a failure of the whole window.
    """

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        # small error acks; older kernels echo the whole request, which parses the same
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        # A kernel that never answers is a failure, not a hang: the timeout is the
        # socket's own (SO_RCVTIMEO; recv fails with EAGAIN), not Python's, which would
        # poll() before every recv — a second system call per reply, costly under UML.
        timeval = struct.pack("@ll", 30, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock.bind((0, 0))
        self._seq = 0
        self._queue: list[_Message] = []
        self.sent = 0

    def close(self) -> None:
        self.sock.close()

    def add(
        self,
        what: str,
        kind: int,
        flags: int,
        payload: bytes,
        done: Done = None,
    ) -> None:
        self._queue.append(_Message(what, kind, flags, payload, done))

    def flush(self) -> None:
        """Send everything queued; raise :class:`KernelError` naming the failures after
        the callbacks of every message that succeeded have run."""
        queue, self._queue = self._queue, []
        failures: list[str] = []
        start = 0
        while start < len(queue):
            end, size = start, 0
            while end < len(queue) and end - start < WINDOW_MESSAGES and size < WINDOW_BYTES:
                size += HEADER.size + len(queue[end].payload)
                end += 1
            failures += self._window(queue[start:end])
            start = end
        if failures:
            more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
            raise KernelError("; ".join(failures[:3]) + more)

    def dump(self, what: str, kind: int, payload: bytes) -> list[tuple[bytes, int, int]]:
        """One dump request (the queue must be empty): each reply as (buffer, start,
        end) of its payload, so nothing is copied out of the received buffers.

        One dump at a time: a netlink socket refuses a second dump request (``EBUSY``)
        while one is still running, and a dump of more than one reply runs until its
        caller reads it. Its replies are matched by sequence number."""
        if self._queue:
            raise KernelError(f"{what}: {len(self._queue)} writes still queued")
        self._seq = self._seq % 0x7FFFFFFF + 1
        seq = self._seq
        size = HEADER.size + len(payload)
        replies: list[tuple[bytes, int, int]] = []
        unpack, header = HEADER.unpack_from, HEADER.size
        try:
            self.sock.send(HEADER.pack(size, kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + payload)
            while True:
                data = self.sock.recv(1 << 17)
                offset, end = 0, len(data)
                while offset + header <= end:
                    size, typ, _, got, _ = unpack(data, offset)
                    if got == seq:
                        if typ == NLMSG_DONE:
                            return replies
                        if typ == NLMSG_ERROR:
                            (error,) = struct.unpack_from("=i", data, offset + header)
                            if error:
                                raise KernelError(f"{what}: {describe_error(-error)}")
                            return replies
                        if size < header or offset + size > end:
                            raise KernelError(f"{what}: a truncated reply")
                        replies.append((data, offset + header, offset + size))
                    offset += max(size + (-size % 4), header)
        except OSError as exc:
            raise KernelError(f"{what}: {exc}") from exc

    def _window(self, window: list[_Message]) -> list[str]:
        by_seq: dict[int, _Message] = {}
        chunks: list[bytes] = []
        for i, m in enumerate(window):
            self._seq = self._seq % 0x7FFFFFFF + 1
            by_seq[self._seq] = m
            flags = NLM_F_REQUEST | m.flags | (NLM_F_ACK if i == len(window) - 1 else 0)
            size = HEADER.size + len(m.payload)
            chunks.append(HEADER.pack(size, m.kind, flags, self._seq, 0) + m.payload)
            chunks.append(bytes(-size % 4))
        last = self._seq
        failed: dict[int, str] = {}
        self.sent += len(window)
        try:
            self.sock.send(b"".join(chunks))
            done = False
            while not done:
                data = self.sock.recv(1 << 16)
                offset = 0
                while offset + HEADER.size <= len(data):
                    size, kind, _, seq, _ = HEADER.unpack_from(data, offset)
                    if kind == NLMSG_ERROR and seq in by_seq:
                        (error,) = struct.unpack_from("=i", data, offset + HEADER.size)
                        if error:
                            failed[seq] = f"{by_seq[seq].what}: {describe_error(-error)}"
                        done = done or seq == last
                    offset += max(size + (-size % 4), HEADER.size)
        except OSError as exc:
            return [f"{len(window)} messages from {window[0].what}: outcome unknown ({exc})"]
        for seq, m in by_seq.items():
            if seq not in failed and m.done is not None:
                m.done()
        return list(failed.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class DestStatus:
    weight: int
    active: int
    inactive: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What the kernel holds of everything this backend owns."""

    services: dict[VirtualKey, VirtualService]
    destinations: dict[DestKey, DestStatus]
    addresses: frozenset[IPAddress]
    table_id: str | None  # the companion rules' identity; None when absent
    elements: frozenset[Element]


def _service(key: VirtualKey, settings: VirtualService | None = None) -> IPVSService:
    fields: dict[str, Any] = {
        "addr": str(key.address),
        "port": key.port,
        "protocol": PROTO_NUMBERS[key.protocol],
    }
    if key.address.version == 6:
        fields["af"] = socket.AF_INET6
        fields["netmask"] = "128.0.0.0"  # prefix length 128 as the kernel reads it (raw be32)
    if settings is not None:
        fields["sched_name"] = settings.scheduler
        fields["timeout"] = settings.persistence
        fields["flags"] = {
            "flags": PERSISTENT if settings.persistence else 0,
            "mask": PERSISTENT,
        }
    return IPVSService(**fields)


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class Kernel:
    """All kernel I/O of one backend instance, on one thread (inside ``netns`` if given)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kpy-ipvs", initializer=self._enter
        )
        self._ipvs: IPVS | None = None
        self._ipr: IPRoute | None = None
        self._genl_pipe: Pipeline | None = None
        self._rtnl_pipe: Pipeline | None = None
        self._nfnl_pipe: Pipeline | None = None
        self._read_pipe: Pipeline | None = None
        self._route_reader: Pipeline | None = None
        self._nfnl_reader: Pipeline | None = None
        self._ipvs_family = 0
        self.sent = 0  # write messages sent since the last reset
        self.reads = 0  # dump/get requests since the last reset

    def _enter(self) -> None:
        if self.netns is not None:
            enter_netns(self.netns)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Close the sockets (on the thread that made them) and stop the thread."""
        self._executor.submit(self._close_sockets).result()
        self._executor.shutdown(wait=True)

    def _close_sockets(self) -> None:
        pipes = (
            self._genl_pipe,
            self._rtnl_pipe,
            self._nfnl_pipe,
            self._read_pipe,
            self._route_reader,
            self._nfnl_reader,
        )
        for sock in (self._ipvs, self._ipr, *pipes):
            if sock is not None:
                sock.close()
        self._ipvs = self._ipr = None
        self._genl_pipe = self._rtnl_pipe = self._nfnl_pipe = self._read_pipe = None
        self._route_reader = self._nfnl_reader = None

    # --- sockets (created lazily on the worker thread) ---------------------------------

    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = IPVS()
        return self._ipvs

    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def loaded(self) -> bool:
        """Whether ip_vs is loaded (seen from this thread's namespace): without it there
        is no virtual service of anyone's."""
        return os.path.exists("/proc/thread-self/net/ip_vs")

    def probe(self) -> str | None:
        if not os.path.exists("/proc/net/ip_vs"):
            return "ip_vs is not loaded (no /proc/net/ip_vs; modprobe ip_vs)"
        try:
            self.ipvs()
        except (NetlinkError, OSError) as exc:
            return f"the IPVS generic netlink family cannot be resolved: {exc}"
        return None

    def sysctls(self) -> None:
        for path, value in SYSCTLS:
            full = f"/proc/sys/{path}"
            try:
                with open(full) as f:
                    if f.read().strip() == value:
                        continue
                with open(full, "w") as f:
                    f.write(value)
            except OSError as exc:
                raise KernelError(f"sysctl {path}={value}: {exc}") from exc

    # --- reading ------------------------------------------------------------------------

    def _reader(self) -> Pipeline:
        """The generic-netlink socket for dumps (its own: writes may be queued meanwhile)."""
        self._genl()  # resolves the family
        if self._read_pipe is None:
            self._read_pipe = Pipeline(NETLINK_GENERIC)
        return self._read_pipe

    def dump_services(self) -> dict[VirtualKey, VirtualService]:
        """Every virtual service of this namespace (one raw generic-netlink dump)."""
        self.reads += 1
        request = GENL_GET_SERVICE
        result: dict[VirtualKey, VirtualService] = {}
        for data, start, end in self._reader().dump(
            "dump virtual services", self._ipvs_family, request
        ):
            for kind, s, e in attrs(data, start + GENL_HEADER, end):
                if kind == 1:  # IPVS_CMD_ATTR_SERVICE
                    found = _decode_service(data, s, e)
                    if found is not None:
                        result[found[0]] = found[1]
        return result

    def dump_destinations(self, key: VirtualKey) -> dict[DestKey, DestStatus]:
        """The real servers of one virtual service with weights and connection counts
        (one raw generic-netlink dump: graceful termination reads this on every removal,
        and a full sync once per virtual service)."""
        self.reads += 1
        request = GENL_GET_DEST + encode_service(key)
        result: dict[DestKey, DestStatus] = {}
        for data, start, end in self._reader().dump(
            f"dump real servers of {key}", self._ipvs_family, request
        ):
            for kind, s, e in attrs(data, start + GENL_HEADER, end):
                if kind == 2:  # IPVS_CMD_ATTR_DEST
                    dkey, status = _decode_dest(key, data, s, e)
                    result[dkey] = status
        return result

    def link_index(self) -> int | None:
        self.reads += 1
        found = self.ipr().link_lookup(ifname=render.INTERFACE)
        return int(found[0]) if found else None

    def dump_addresses(self) -> frozenset[IPAddress]:
        index = self.link_index()
        if index is None:
            return frozenset()
        self.reads += 1
        if self._route_reader is None:
            self._route_reader = Pipeline(socket.NETLINK_ROUTE)
        found: set[IPAddress] = set()
        request = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)  # every ifaddrmsg
        for data, start, end in self._route_reader.dump(
            f"dump addresses of {render.INTERFACE}", RTM_GETADDR, request
        ):
            if end - start < IFADDRMSG.size:
                continue
            family, _, _, _, at = IFADDRMSG.unpack_from(data, start)
            if at != index or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            for kind, s, e in attrs(data, start + IFADDRMSG.size, end):
                if kind == 1:  # IFA_ADDRESS
                    found.add(ipaddress.ip_address(bytes(data[s:e])))
        return frozenset(found)

    def run(self, args: list[str], stdin: str | None = None, *, check: bool = True) -> str:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise KernelError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def dump_companion(self) -> tuple[str | None, frozenset[Element]]:
        """The companion rules' identity ("" when incomplete, None when absent) and the
        elements of its sets."""
        self.reads += 1
        names = {name for name, _, _ in render.set_names()}
        present, elements = self.dump_sets()
        ids: set[str] = set()
        for tool in IPTABLES:
            saved = self.run([f"{tool}-save"], check=False)
            found = [w for w in saved.split() if w.startswith("kpy-ipvs-")]
            ids.add(found[0] if found else "")
            if _missing_jumps(saved):
                ids.add("")
        if not present and ids == {""}:
            return None, frozenset()
        if present != names or len(ids) != 1:
            return "", frozenset(elements)
        return ids.pop(), frozenset(elements)

    def dump_sets(self) -> tuple[set[str], set[Element]]:
        """The companion sets that exist and their elements, in render's text: one
        ipset ``LIST`` dump per set over nfnetlink (``ipset save`` took 5.6 s for 54,000
        elements under UML). A set the kernel will not list (absent, or no ipset in
        this kernel) counts as absent, as it did for ``ipset save``."""
        if self._nfnl_reader is None:
            self._nfnl_reader = Pipeline(NETLINK_NETFILTER)
        present: set[str] = set()
        elements: set[Element] = set()
        for name, typ, version in render.set_names():
            kinds = typ.split(":", 1)[1].split(",")
            family = socket.AF_INET6 if version == 6 else socket.AF_INET
            request = (
                struct.pack("=BBH", family, 0, 0)  # nfgenmsg
                + _nla(1, bytes([IPSET_PROTOCOL]))  # PROTOCOL
                + _nla(2, name.encode() + b"\0")  # SETNAME
            )
            try:
                replies = self._nfnl_reader.dump(f"list ipset {name}", IPSET_CMD_LIST, request)
            except KernelError:
                continue
            for data, start, end in replies:
                for kind, s, e in attrs(data, start + 4, end):  # after the nfgenmsg
                    if kind == 2:  # SETNAME
                        if bytes(data[s:e]).split(b"\0", 1)[0].decode() == name:
                            present.add(name)
                    elif kind == 8:  # ADT: the elements
                        for inner, es, ee in attrs(data, s, e):
                            if inner != 7:  # DATA
                                continue
                            value = _decode_element(kinds, data, es, ee)
                            if value is not None:
                                elements.add(Element(set=name, value=value))
        return present, elements

    def snapshot(self) -> Snapshot:
        services = self.dump_services()
        dests: dict[DestKey, DestStatus] = {}
        for key in services:
            dests.update(self.dump_destinations(key))
        table_id, elements = self.dump_companion()
        return Snapshot(
            services=services,
            destinations=dests,
            addresses=self.dump_addresses(),
            table_id=table_id,
            elements=elements,
        )

    # --- writing ------------------------------------------------------------------------

    def _send(self, what: str, fn: Callable[[], object]) -> None:
        self.sent += 1
        try:
            fn()
        except (NetlinkError, OSError) as exc:
            raise KernelError(f"{what}: {exc}") from exc

    def _genl(self) -> Pipeline:
        if self._genl_pipe is None:
            self._ipvs_family = int(self.ipvs().prid)
            self._genl_pipe = Pipeline(NETLINK_GENERIC)
        return self._genl_pipe

    def _rtnl(self) -> Pipeline:
        if self._rtnl_pipe is None:
            self._rtnl_pipe = Pipeline(socket.NETLINK_ROUTE)
        return self._rtnl_pipe

    def _nfnl(self) -> Pipeline:
        if self._nfnl_pipe is None:
            self._nfnl_pipe = Pipeline(NETLINK_NETFILTER)
        return self._nfnl_pipe

    def _ipvs_cmd(self, what: str, cmd: int, attrs: bytes, done: Done) -> None:
        pipe = self._genl()
        self.sent += 1
        pipe.add(what, self._ipvs_family, 0, struct.pack("=BBH", cmd, 1, 0) + attrs, done)

    def flush(self) -> None:
        """Send the queued writes (addresses, set elements, IPVS) and wait for their acks."""
        for pipe in (self._rtnl_pipe, self._nfnl_pipe, self._genl_pipe):
            if pipe is not None:
                pipe.flush()

    # Each write below is queued; :meth:`flush` sends it and runs ``done`` on success.

    def add_service(self, key: VirtualKey, settings: VirtualService, done: Done = None) -> None:
        attrs = encode_service(key, settings)
        self._ipvs_cmd(f"add service {key}", IPVS_CMD_NEW_SERVICE, attrs, done)

    def set_service(self, key: VirtualKey, settings: VirtualService, done: Done = None) -> None:
        attrs = encode_service(key, settings)
        self._ipvs_cmd(f"set service {key}", IPVS_CMD_SET_SERVICE, attrs, done)

    def del_service(self, key: VirtualKey, done: Done = None) -> None:
        self._ipvs_cmd(f"delete service {key}", IPVS_CMD_DEL_SERVICE, encode_service(key), done)

    def add_dest(self, key: DestKey, weight: int, done: Done = None) -> None:
        attrs = encode_service(key.virtual) + encode_dest(key, weight)
        self._ipvs_cmd(f"add real server {key}", IPVS_CMD_NEW_DEST, attrs, done)

    def set_dest(self, key: DestKey, weight: int, done: Done = None) -> None:
        attrs = encode_service(key.virtual) + encode_dest(key, weight)
        self._ipvs_cmd(f"set real server {key}", IPVS_CMD_SET_DEST, attrs, done)

    def del_dest(self, key: DestKey, done: Done = None) -> None:
        attrs = encode_service(key.virtual) + encode_dest(key, 0)
        self._ipvs_cmd(f"delete real server {key}", IPVS_CMD_DEL_DEST, attrs, done)

    def add_address(self, index: int, address: IPAddress, done: Done = None) -> None:
        self.sent += 1
        self._rtnl().add(
            f"add address {address}",
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            encode_address(index, address),
            done,
        )

    def del_address(self, index: int, address: IPAddress, done: Done = None) -> None:
        self.sent += 1
        self._rtnl().add(
            f"delete address {address}", RTM_DELADDR, 0, encode_address(index, address), done
        )

    def ensure_link(self) -> int:
        index = self.link_index()
        if index is not None:
            return index
        self._send(
            f"add link {render.INTERFACE}",
            lambda: self.ipr().link("add", ifname=render.INTERFACE, kind="dummy"),
        )
        index = self.link_index()
        if index is None:
            raise KernelError(f"{render.INTERFACE} missing after creating it")
        return index

    def del_link(self) -> None:
        index = self.link_index()
        if index is not None:
            self._send(
                f"delete link {render.INTERFACE}", lambda: self.ipr().link("del", index=index)
            )

    def write_companion(self, ctx: render.Context, elements: Iterable[Element]) -> None:
        """(Re)create the companion sets and rules, and fill the sets with ``elements``.

        A set that exists is replaced by a new one made with today's options (``ipset
        swap``: the rules that use it keep their reference; a set made by an earlier
        version with another ``maxelem`` cannot be created again with ``-exist``)."""
        existing = set(self.run(["ipset", "list", "-n"], check=False).split())
        lines = [f"destroy {NEW_SET}"] if NEW_SET in existing else []  # left by a crash
        for name, typ, version in render.set_names():
            options = f"{typ} family {'inet6' if version == 6 else 'inet'} "
            options += render.create_options(name)
            if name in existing:
                lines += [
                    f"create {NEW_SET} {options}",
                    f"swap {NEW_SET} {name}",
                    f"destroy {NEW_SET}",
                ]
            else:
                lines.append(f"create {name} {options}")
        # every set is new now (made, or swapped in): nothing to flush
        self.sent += 1
        self.run(["ipset", "restore"], "\n".join(lines) + "\n")
        self.change_elements(elements, ())
        self.flush()
        for version, tool in zip((4, 6), IPTABLES, strict=True):
            missing = _missing_jumps(self.run([f"{tool}-save"], check=False))
            script = render.rules(ctx, version)
            for table, chain, target in missing:
                script += f"*{table}\n-I {chain} 1 -j {target}\nCOMMIT\n"
            self.sent += 1
            self.run([f"{tool}-restore", "-w", "--noflush"], script)

    def change_elements(
        self,
        add: Iterable[Element],
        delete: Iterable[Element],
        done: Callable[[Element], None] | None = None,
    ) -> None:
        """Add and delete companion set elements, one ipset netlink message each, sent
        through the pipeline (queued; :meth:`flush` sends them). Adding an element that
        is there, or deleting one that is not, is no error (no ``NLM_F_EXCL``)."""
        for cmd, verb, elements in ((IPSET_CMD_ADD, "add", add), (IPSET_CMD_DEL, "del", delete)):
            for el in sorted(elements):
                self.sent += 1
                ok = None if done is None else functools.partial(done, el)
                self._nfnl().add(f"ipset {verb} {el}", cmd, 0, encode_element(el), ok)

    def delete_companion(self) -> None:
        """Remove the companion rules and sets; a tool that is not installed cannot
        have made any."""
        for tool in IPTABLES:
            if shutil.which(tool) is None:
                continue
            for table, chain, target in render.HOOKS:
                while (
                    subprocess.run(
                        [tool, "-w", "-t", table, "-D", chain, "-j", target],
                        capture_output=True,
                        check=False,
                    ).returncode
                    == 0
                ):
                    self.sent += 1
            for table, chain in render.CHAINS:
                for verb in ("-F", "-X"):
                    self.run([tool, "-w", "-t", table, verb, chain], check=False)
        if shutil.which("ipset") is None:
            return
        for name, _, _ in render.set_names():
            self.run(["ipset", "destroy", name], check=False)


def _fields(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    return {kind: (s, e) for kind, s, e in attrs(data, start, end)}


def _u32_at(data: bytes, fields: dict[int, tuple[int, int]], kind: int) -> int:
    span = fields.get(kind)
    if span is None or span[1] - span[0] < 4:
        return 0
    return int(U32.unpack_from(data, span[0])[0])


def _address(data: bytes, span: tuple[int, int], family: int) -> IPAddress:
    """An ``nf_inet_addr`` (16 bytes, IPv4 in the first 4) of ``family``."""
    size = 16 if family == socket.AF_INET6 else 4
    if span[1] - span[0] < size:
        raise KernelError(f"an address attribute of {span[1] - span[0]} bytes")
    return ipaddress.ip_address(bytes(data[span[0] : span[0] + size]))


def _decode_service(data: bytes, start: int, end: int) -> tuple[VirtualKey, VirtualService] | None:
    """A virtual service of a ``GET_SERVICE`` reply; None for a protocol kpy does not
    make (it owns none of those)."""
    f = _fields(data, start, end)
    family = U16.unpack_from(data, f[1][0])[0] if 1 in f else socket.AF_INET  # AF
    fwmark = _u32_at(data, f, 5)  # FWMARK
    if fwmark:
        key = render.fwmark_key(fwmark, 6 if family == socket.AF_INET6 else 4)
    else:
        proto = PROTO_NAMES.get(U16.unpack_from(data, f[2][0])[0]) if 2 in f else None
        if proto is None or 3 not in f or 4 not in f:
            return None
        key = VirtualKey(
            address=_address(data, f[3], family),
            port=BE16.unpack_from(data, f[4][0])[0],
            protocol=proto,
        )
    sched = f.get(6)  # SCHED_NAME, NUL-terminated
    scheduler = bytes(data[sched[0] : sched[1]]).split(b"\0", 1)[0].decode() if sched else ""
    flags = FLAGS.unpack_from(data, f[7][0])[0] if 7 in f and f[7][1] - f[7][0] >= 8 else 0
    persistence = _u32_at(data, f, 8) if flags & PERSISTENT else 0  # TIMEOUT
    return key, VirtualService(scheduler=scheduler, persistence=persistence)


def _set_address(data: bytes, span: tuple[int, int]) -> IPAddress | None:
    """The address inside an ipset ``IP``/``IP2`` attribute (nested IPv4 or IPv6)."""
    for kind, s, e in attrs(data, span[0], span[1]):
        if (kind, e - s) in ((1, 4), (2, 16)):
            return ipaddress.ip_address(bytes(data[s:e]))
    return None


def _decode_element(kinds: list[str], data: bytes, start: int, end: int) -> str | None:
    """An ipset element's text as render writes it (the inverse of
    :func:`encode_element`): ``kinds`` are its set type's dimensions (``ip``, ``port``,
    ``net``). None for one kpy cannot have written (an unknown protocol)."""
    f = _fields(data, start, end)
    parts: list[str] = []
    for i, kind in enumerate(kinds):
        if kind == "port":
            if 4 not in f or 7 not in f:
                return None
            proto = PROTO_NAMES.get(data[f[7][0]])
            if proto is None:
                return None
            parts.append(f"{str(proto).lower()}:{BE16.unpack_from(data, f[4][0])[0]}")
            continue
        ip_kind, cidr_kind = (1, 3) if i == 0 else (20, 21)  # IP, CIDR / IP2, CIDR2
        address = _set_address(data, f[ip_kind]) if ip_kind in f else None
        if address is None:
            return None
        if kind == "net":
            cidr = data[f[cidr_kind][0]] if cidr_kind in f else address.max_prefixlen
            # a host network as render writes it (render.net_text): the bare address
            parts.append(str(address) if cidr == address.max_prefixlen else f"{address}/{cidr}")
        else:
            parts.append(str(address))
    value = ",".join(parts)
    if 27 in f and f[27][1] - f[27][0] >= 8:  # SKBMARK: mark << 32 | mask
        full = BE64.unpack_from(data, f[27][0])[0]
        value += f" skbmark {full >> 32:#x}/{full & 0xFFFFFFFF:#x}"
    return value


def _decode_dest(
    virtual: VirtualKey, data: bytes, start: int, end: int
) -> tuple[DestKey, DestStatus]:
    """A real server of a ``GET_DEST`` reply for ``virtual``."""
    f = _fields(data, start, end)
    family = U16.unpack_from(data, f[11][0])[0] if 11 in f else socket.AF_INET  # ADDR_FAMILY
    if 1 not in f or 2 not in f:
        raise KernelError(f"a real server of {virtual} without address or port")
    key = DestKey(
        virtual=virtual,
        address=_address(data, f[1], family),
        port=BE16.unpack_from(data, f[2][0])[0],
    )
    return key, DestStatus(
        weight=_u32_at(data, f, 4),  # WEIGHT
        active=_u32_at(data, f, 7),  # ACTIVE_CONNS
        inactive=_u32_at(data, f, 8),  # INACT_CONNS
    )


def _missing_jumps(saved: str) -> list[tuple[str, str, str]]:
    """The companion's jump rules absent from ``iptables-save`` output."""
    table = ""
    rules: set[tuple[str, str]] = set()
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            rules.add((table, line.strip()))
    return [
        (t, chain, target)
        for t, chain, target in render.HOOKS
        if (t, f"-A {chain} -j {target}") not in rules
    ]
