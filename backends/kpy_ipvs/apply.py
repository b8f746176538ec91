"""The kernel side of the IPVS backend: netlink (IPVS, rtnetlink) and the companion rules.

Every kernel call of the backend goes through one :class:`Kernel`, which owns one
worker thread. When the backend is given a network namespace the thread enters it once
(``setns`` affects only the calling thread), so its netlink sockets, ``/proc/sys``
writes and ``ipset``/``iptables`` subprocesses all act inside that namespace and nowhere else.

IPVS is written with pyroute2's generic-netlink IPVS socket, one message per object
(there is no IPVS batch); the dummy interface ``kpy-ipvs0`` and its addresses with
pyroute2's IPRoute; the companion ipset elements with one ``ipset restore``, its fixed rules with
``iptables-legacy-restore --noflush``.
Each method counts the messages it sends so ``ApplyResult.ops`` is honest.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import socket
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from kpy.model import IPAddress, Protocol
from kpy_ipvs import render
from kpy_ipvs.render import DestKey, Element, VirtualKey, VirtualService

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
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


class KernelError(Exception):
    """A kernel operation failed; the message names the object."""


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


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


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


def _dest(key: DestKey, weight: int) -> IPVSDest:
    return IPVSDest(
        addr=str(key.address),
        port=key.port,
        weight=weight,
        fwd_method=MASQ,
        addr_family=socket.AF_INET6 if key.address.version == 6 else socket.AF_INET,
    )


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
        self.sent = 0  # write messages sent since the last reset
        self.reads = 0  # dump/get requests since the last reset

    def _enter(self) -> None:
        if self.netns is not None:
            _enter_netns(self.netns)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Close the sockets (on the thread that made them) and stop the thread."""
        self._executor.submit(self._close_sockets).result()
        self._executor.shutdown(wait=True)

    def _close_sockets(self) -> None:
        for sock in (self._ipvs, self._ipr):
            if sock is not None:
                sock.close()
        self._ipvs = self._ipr = None

    # --- sockets (created lazily on the worker thread) ---------------------------------

    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = IPVS()
        return self._ipvs

    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

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

    def dump_services(self) -> dict[VirtualKey, VirtualService]:
        self.reads += 1
        result: dict[VirtualKey, VirtualService] = {}
        for msg in self.ipvs().service("dump"):
            attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if attrs is None or attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue
            proto = PROTO_NAMES.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
            addr = attrs.get_attr("IPVS_SVC_ATTR_ADDR")
            if proto is None or addr is None:
                continue
            flags = attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {"flags": 0}
            persistent = bool(flags["flags"] & PERSISTENT)
            key = VirtualKey(
                address=ipaddress.ip_address(addr),
                port=attrs.get_attr("IPVS_SVC_ATTR_PORT"),
                protocol=proto,
            )
            result[key] = VirtualService(
                scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
                persistence=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") if persistent else 0,
            )
        return result

    def dump_destinations(self, key: VirtualKey) -> dict[DestKey, DestStatus]:
        self.reads += 1
        result: dict[DestKey, DestStatus] = {}
        for msg in self.ipvs().dest("dump", service=_service(key)):
            attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
            if attrs is None:
                continue
            dest = DestKey(
                virtual=key,
                address=ipaddress.ip_address(attrs.get_attr("IPVS_DEST_ATTR_ADDR")),
                port=attrs.get_attr("IPVS_DEST_ATTR_PORT"),
            )
            result[dest] = DestStatus(
                weight=attrs.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0,
                active=attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                inactive=attrs.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
            )
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
        return frozenset(
            ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            for msg in self.ipr().get_addr(index=index)
        )

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
        elements: set[Element] = set()
        present: set[str] = set()
        for line in self.run(["ipset", "save"], check=False).splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in names:
                if parts[0] == "create":
                    present.add(parts[1])
                elif parts[0] == "add":
                    elements.add(Element(set=parts[1], value=parts[2]))
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

    def add_service(self, key: VirtualKey, settings: VirtualService) -> None:
        self._send(
            f"add service {key}",
            lambda: self.ipvs().service("add", service=_service(key, settings)),
        )

    def set_service(self, key: VirtualKey, settings: VirtualService) -> None:
        self._send(
            f"set service {key}",
            lambda: self.ipvs().service("set", service=_service(key, settings)),
        )

    def del_service(self, key: VirtualKey) -> None:
        self._send(
            f"delete service {key}", lambda: self.ipvs().service("del", service=_service(key))
        )

    def add_dest(self, key: DestKey, weight: int) -> None:
        self._send(
            f"add real server {key}",
            lambda: self.ipvs().dest("add", service=_service(key.virtual), dest=_dest(key, weight)),
        )

    def set_dest(self, key: DestKey, weight: int) -> None:
        self._send(
            f"set real server {key}",
            lambda: self.ipvs().dest("set", service=_service(key.virtual), dest=_dest(key, weight)),
        )

    def del_dest(self, key: DestKey) -> None:
        self._send(
            f"delete real server {key}",
            lambda: self.ipvs().dest("del", service=_service(key.virtual), dest=_dest(key, 0)),
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

    def add_address(self, index: int, address: IPAddress) -> None:
        prefix = 32 if address.version == 4 else 128
        self._send(
            f"add address {address}",
            lambda: self.ipr().addr("add", index=index, address=str(address), prefixlen=prefix),
        )

    def del_address(self, index: int, address: IPAddress) -> None:
        prefix = 32 if address.version == 4 else 128
        self._send(
            f"delete address {address}",
            lambda: self.ipr().addr("del", index=index, address=str(address), prefixlen=prefix),
        )

    def del_link(self) -> None:
        index = self.link_index()
        if index is not None:
            self._send(
                f"delete link {render.INTERFACE}", lambda: self.ipr().link("del", index=index)
            )

    def write_companion(self, ctx: render.Context, elements: Iterable[Element]) -> None:
        """(Re)create the companion sets and rules, and fill the sets with ``elements``."""
        lines = [
            f"create {name} {typ} family {'inet6' if version == 6 else 'inet'} -exist"
            for name, typ, version in render.set_names()
        ]
        lines += [f"flush {name}" for name, _, _ in render.set_names()]
        self.sent += 1
        self.run(
            ["ipset", "restore"],
            "\n".join(lines) + "\n" + render.elements_script(elements, ()),
        )
        for version, tool in zip((4, 6), IPTABLES, strict=True):
            missing = _missing_jumps(self.run([f"{tool}-save"], check=False))
            script = render.rules(ctx, version)
            for table, chain, target in missing:
                script += f"*{table}\n-I {chain} 1 -j {target}\nCOMMIT\n"
            self.sent += 1
            self.run([f"{tool}-restore", "-w", "--noflush"], script)

    def change_elements(self, add: Iterable[Element], delete: Iterable[Element]) -> None:
        script = render.elements_script(add, delete)
        if script:
            self.sent += 1
            self.run(["ipset", "restore"], script)

    def delete_companion(self) -> None:
        for tool in IPTABLES:
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
            for table, chain in (
                ("nat", render.CHAIN_MARK),
                ("nat", render.CHAIN_POST),
                ("filter", render.CHAIN_FILTER),
            ):
                for verb in ("-F", "-X"):
                    self.run([tool, "-w", "-t", table, verb, chain], check=False)
        for name, _, _ in render.set_names():
            self.run(["ipset", "destroy", name], check=False)


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
