"""The IPVS backend: Service VIPs as IPVS virtual services, programmed over netlink.

:class:`IpvsBackend` keeps two views of the kernel objects it owns: what it *wants*
(rendered per service port by :mod:`kpy_ipvs.render`) and what the kernel *has*
(adopted from a dump on every full sync, then kept up to date by each message it
sends). A sync diffs the two with :mod:`kpy.core.diff` — over every key on a full sync, over
the changed ports' keys on a partial one — and sends only the messages the difference
needs, in an order that never leaves a VIP unbound while it could serve:
addresses, companion elements, services, real servers first; removals last.

Graceful termination: a real server that is no longer wanted is deleted at once when it
has no connections; otherwise its weight drops to 0 (no new connections) and it stays
on a pending list until its connections reach 0 or the grace period
(``grace_period`` option, seconds, default 30) passes — checked on every sync.

The short-circuit mark mask (``ipvs_mark_mask`` option, default ``0xffff0000``; see
:func:`kpy_ipvs.render.mark_mask`) is checked when the backend is constructed.

A failed message raises :class:`~kpy.core.backend.BackendError` and makes the next sync a
full one, which re-reads the kernel and retries whatever is still missing.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from kpy.core import diff
from kpy.core.backend import ApplyResult, BackendConfig, BackendError, Programmed
from kpy.core.model import IPAddress, Plan, Protocol, ServicePortName
from kpy.core.trace import Origin, Packet, Trace
from kpy_ipvs import apply as apply_
from kpy_ipvs import observe as observe_
from kpy_ipvs import render
from kpy_ipvs import trace as trace_
from kpy_ipvs.apply import IPTABLES, DestStatus, Kernel, KernelError, Snapshot
from kpy_ipvs.render import DestKey, Element, PortObjects, VirtualKey, VirtualService

__all__ = ["IpvsBackend"]

log = structlog.get_logger("kpy.ipvs")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Held:
    """What the kernel holds of this backend's objects, as far as the backend knows."""

    services: dict[VirtualKey, VirtualService] = field(default_factory=dict)
    destinations: dict[DestKey, int] = field(default_factory=dict)  # weight
    addresses: set[IPAddress] = field(default_factory=set)
    elements: set[Element] = field(default_factory=set)
    table_id: str | None = None


class IpvsBackend:
    """kpy's IPVS backend (see the module docstring and README.md)."""

    name = "ipvs"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.grace_period = float(config.option("grace_period", "30") or "30")
        # the short-circuit mark mask is checked here, before any kernel is touched
        mask = render.mark_mask(config.option(render.MARK_MASK_OPTION))
        self._kernel = Kernel(config.netns)
        self._ctx = render.Context(mark_mask=mask)  # cleanup before a sync needs the mask
        self._ports: dict[ServicePortName, PortObjects] = {}
        self._marks: dict[ServicePortName, int] = {}  # short-circuit marks in use
        self._want_services: dict[VirtualKey, VirtualService] = {}
        self._want_dests: dict[DestKey, int] = {}
        self._want_elements: dict[Element, bool] = {}
        self._address_refs: Counter[IPAddress] = Counter()
        self._element_refs: Counter[Element] = Counter()  # hairpin elements are shared
        self._have = _Held()
        self._pending: dict[DestKey, float] = {}  # draining real server → deadline
        self._needs_full = True

    # --- the Backend protocol -----------------------------------------------------------

    def probe(self) -> str | None:
        try:
            return self._kernel._executor.submit(self._kernel.probe).result()
        except Exception as exc:  # any failure to reach IPVS is a reason, not a crash
            return f"IPVS unavailable: {type(exc).__name__}: {exc}"

    async def apply(self, plan: Plan) -> ApplyResult:
        full = plan.full_sync or self._needs_full
        started = time.monotonic()
        try:
            detail = await self._kernel.call(self._sync, plan, full)
        except KernelError as exc:
            self._needs_full = True
            log.warning("ipvs_apply_failed", error=str(exc), full_sync=full)
            raise BackendError(str(exc)) from exc
        self._needs_full = False
        ops = detail.pop("ops")
        log.debug(
            "ipvs_applied",
            full_sync=full,
            ops=ops,
            ms=round((time.monotonic() - started) * 1000, 3),
            pending=len(self._pending),
        )
        return ApplyResult(
            full_sync=full, ops=ops, size=ops, size_unit="netlink messages", detail=detail
        )

    async def observe(self) -> Programmed:
        snap = await self._kernel.call(self._kernel.snapshot)
        owned = self._owned(snap.services, snap.addresses)
        return observe_.programmed(
            self.name, snap, owned, self._ports, pending=frozenset(self._pending)
        )

    async def cleanup(self) -> None:
        """Delete kpy's virtual services, companion rules and sets and ``kpy-ipvs0``.
        Where ip_vs is not loaded there is no virtual service to delete (the rest is
        still removed); raises BackendError when anything could not be removed."""
        netns = self.config.netns
        if netns is not None and not _netns_exists(netns):
            raise BackendError(f"network namespace {netns!r} not found")
        try:
            await self._kernel.call(self._cleanup)
        except (KernelError, NetlinkError, OSError) as exc:
            raise BackendError(f"IPVS cleanup failed: {exc}") from exc
        self._ports.clear()
        self._marks.clear()
        self._want_services.clear()
        self._want_dests.clear()
        self._want_elements.clear()
        self._address_refs.clear()
        self._element_refs.clear()
        self._pending.clear()
        self._have = _Held()
        self._needs_full = True

    def close(self) -> None:
        """Close the netlink sockets and the worker thread."""
        self._kernel.close()

    def trace(self, plan: Plan, packet: Packet, origin: Origin) -> Trace:
        """``packet`` through the virtual services, real servers and companion layer
        render makes of ``plan`` (:func:`kpy_ipvs.trace.trace`; touches no kernel)."""
        return trace_.trace(plan, packet, origin, self.config)

    async def dry_run(self, plan: Plan) -> str:
        """The operations a full sync of ``plan`` would perform now, as ``ipvsadm``-,
        ``ipset``- and ``ip``-like lines in apply's order, diffed (as apply diffs them)
        against what the kernel holds; sends nothing. Where ip_vs is not loaded the
        kernel is taken to hold no virtual service (said in a first comment line)."""
        ctx = render.context(self.config, plan.node)
        want = render.merged(render.render(plan, ctx).values())
        services, dests = dict(want.services), dict(want.destinations)
        elements, addresses = want.elements, want.addresses
        loaded, snap, link, missing, sysctls = await self._kernel.call(self._dry_read)
        node_ips = set(ctx.nodeport_ips) | set(self.config.node_ips)
        owned = {
            k
            for k in snap.services
            if k in services
            or render.is_short_circuit(k, ctx.mark_mask)
            or (not k.fwmark and (k.address in snap.addresses or k.address in node_ips))
        }
        have_dests = {d: s for d, s in snap.destinations.items() if d.virtual in owned}
        svc = diff.compute({k: snap.services[k] for k in owned}, services)
        dst = diff.compute({d: s.weight for d, s in have_dests.items()}, dests)
        addr = diff.compute(dict.fromkeys(snap.addresses, True), dict.fromkeys(addresses, True))
        els = diff.compute(dict.fromkeys(snap.elements, True), dict.fromkeys(elements, True))

        lines: list[str] = []
        if not loaded:
            lines.append("# ip_vs is not loaded: the kernel is taken to hold no virtual service")
        lines += [f"sysctl -w {name}" for name in sysctls]
        if not link:
            lines.append(f"ip link add {render.INTERFACE} type dummy")
        for a, _ in sorted(addr.added, key=lambda kv: str(kv[0])):
            lines.append(f"ip addr add {_prefix(a)} dev {render.INTERFACE}")
        skeleton = render.skeleton_id(ctx)
        if snap.table_id != skeleton:
            for set_name, typ, version in render.set_names():
                family = "inet6" if version == 6 else "inet"
                extra = render.create_options(set_name)
                lines.append(f"ipset create {set_name} {typ} family {family} {extra} -exist")
            lines += [f"ipset flush {set_name}" for set_name, _, _ in render.set_names()]
            lines += [f"ipset add {el}" for el in sorted(elements)]
            for version, tool in zip((4, 6), IPTABLES, strict=True):
                script = render.rules(ctx, version)
                for table, chain, target in missing[version]:
                    script += f"*{table}\n-I {chain} 1 -j {target}\nCOMMIT\n"
                lines.append(f"# {tool}-restore -w --noflush")
                lines += script.rstrip("\n").splitlines()
        else:
            lines += [f"ipset add {el}" for el, _ in sorted(els.added)]
        for key, settings in sorted(svc.added, key=lambda kv: str(kv[0])):
            lines.append(f"-A {_service_spec(key)}{_settings(settings)}")
        for key, _, settings in sorted(svc.changed, key=lambda kv: str(kv[0])):
            lines.append(f"-E {_service_spec(key)}{_settings(settings)}")
        for dest, weight in sorted(dst.added, key=lambda kv: str(kv[0])):
            lines.append(f"-a {_dest_spec(dest)} -m -w {weight}")
        for dest, _, weight in sorted(dst.changed, key=lambda kv: str(kv[0])):
            lines.append(f"-e {_dest_spec(dest)} -m -w {weight}")
        gone = {key for key, _ in svc.removed}
        for dest, _ in sorted(dst.removed, key=lambda kv: str(kv[0])):
            if dest.virtual in gone:
                continue
            status = have_dests[dest]
            conns = status.active + status.inactive
            if conns:  # apply drains it (weight 0) until its connections end
                lines.append(f"-e {_dest_spec(dest)} -m -w 0  # draining: {conns} connections")
            else:
                lines.append(f"-d {_dest_spec(dest)}")
        for key in sorted(gone, key=str):
            lines.append(f"-D {_service_spec(key)}")
        if snap.table_id == skeleton:
            lines += [f"ipset del {el}" for el, _ in sorted(els.removed)]
        for a, _ in sorted(addr.removed, key=lambda kv: str(kv[0])):
            lines.append(f"ip addr del {_prefix(a)} dev {render.INTERFACE}")
        return "".join(f"{line}\n" for line in lines)

    def _dry_read(
        self,
    ) -> tuple[bool, Snapshot, bool, dict[int, list[tuple[str, str, str]]], list[str]]:
        """What the kernel holds, read only: (ip_vs loaded, snapshot, kpy-ipvs0 exists,
        the companion jumps missing per IP version, the sysctls apply would write). No
        virtual service where ip_vs is not loaded; no companion where its tools are not
        installed."""
        kernel = self._kernel
        sysctls: list[str] = []
        for path, value in apply_.SYSCTLS:
            try:
                with open(f"/proc/sys/{path}") as f:
                    current: str | None = f.read().strip()
            except OSError:
                current = None
            if current != value:
                sysctls.append(f"{path.replace('/', '.')}={value}")
        loaded = kernel.loaded()
        services = kernel.dump_services() if loaded else {}
        dests: dict[DestKey, DestStatus] = {}
        for key in services:
            dests.update(kernel.dump_destinations(key))
        try:
            table_id, elements = kernel.dump_companion()
        except OSError:
            table_id, elements = None, frozenset()
        missing: dict[int, list[tuple[str, str, str]]] = {}
        for version, tool in zip((4, 6), IPTABLES, strict=True):
            try:
                saved = kernel.run([f"{tool}-save"], check=False)
            except OSError:
                saved = ""
            missing[version] = apply_._missing_jumps(saved)
        snap = Snapshot(
            services=services,
            destinations=dests,
            addresses=kernel.dump_addresses(),
            table_id=table_id,
            elements=elements,
        )
        return loaded, snap, kernel.link_index() is not None, missing, sysctls

    # --- internals (run on the kernel thread) ------------------------------------------

    def _owned(
        self, services: dict[VirtualKey, VirtualService], bound: frozenset[IPAddress]
    ) -> set[VirtualKey]:
        """Virtual services that are kpy's: on kpy-ipvs0's addresses, on the NodePort
        addresses, short-circuit firewall marks, or rendered by this backend. Anything
        else is left alone."""
        known = set(self._want_services)
        node_ips = set(self._ctx.nodeport_ips) | set(self.config.node_ips)
        return {
            k
            for k in services
            if k in known
            or render.is_short_circuit(k, self._ctx.mark_mask)
            or (not k.fwmark and (k.address in bound or k.address in node_ips))
        }

    def _register(self, objs: PortObjects, sign: int) -> None:
        if sign > 0:
            self._want_services.update(objs.services)
            self._want_dests.update(objs.destinations)
            self._want_elements.update(dict.fromkeys(objs.elements, True))
            self._element_refs.update(objs.elements)
            self._address_refs.update(objs.addresses)
        else:
            for key in objs.services:
                self._want_services.pop(key, None)
            for dest in objs.destinations:
                self._want_dests.pop(dest, None)
            self._element_refs.subtract(objs.elements)
            for el in objs.elements:
                if self._element_refs[el] <= 0:
                    del self._element_refs[el]
                    self._want_elements.pop(el, None)
            self._address_refs.subtract(objs.addresses)
            for addr in objs.addresses:
                if self._address_refs[addr] <= 0:
                    del self._address_refs[addr]

    def _sync(self, plan: Plan, full: bool) -> dict[str, int]:
        kernel = self._kernel
        kernel.sent = kernel.reads = 0
        if full:
            self._ctx = render.context(self.config, plan.node)
            kernel.sysctls()
            self._marks = render.allocate_marks(
                (name for name, state in plan.services.items() if render.wants_mark(state)),
                count=self._ctx.mark_count,
            )
            self._ports = {
                name: render.render_port(state, self._ctx, self._marks.get(name, 0))
                for name, state in plan.services.items()
            }
            self._want_services, self._want_dests = {}, {}
            self._want_elements, self._address_refs = {}, Counter()
            self._element_refs = Counter()
            for objs in self._ports.values():
                self._register(objs, +1)
            snap = kernel.snapshot()
            owned = self._owned(snap.services, snap.addresses)
            self._have = _Held(
                services={k: v for k, v in snap.services.items() if k in owned},
                destinations={
                    d: s.weight for d, s in snap.destinations.items() if d.virtual in owned
                },
                addresses=set(snap.addresses),
                elements=set(snap.elements),
                table_id=snap.table_id,
            )
            self._write(None)
        else:
            touched: list[PortObjects] = []
            for name in sorted(plan.changed | plan.removed):
                old = self._ports.pop(name, render.EMPTY)
                self._register(old, -1)
                state = plan.services.get(name)
                if state is None or not render.wants_mark(state):
                    self._marks.pop(name, None)
                elif name not in self._marks:
                    self._marks = render.allocate_marks(
                        [name], self._marks, count=self._ctx.mark_count
                    )
                mark = self._marks.get(name, 0)
                new = (
                    render.render_port(state, self._ctx, mark)
                    if state is not None
                    else render.EMPTY
                )
                if new is not render.EMPTY:
                    self._ports[name] = new
                    self._register(new, +1)
                touched += [old, new]
            self._write(touched)
        self._reap()
        return {"ops": kernel.sent, "reads": kernel.reads, "pending": len(self._pending)}

    def _write(self, touched: list[PortObjects] | None) -> None:
        kernel, have = self._kernel, self._have
        if touched is None:
            services = _full_diff(have.services, self._want_services)
            dests = _full_diff(have.destinations, self._want_dests)
            addresses = _full_diff(
                dict.fromkeys(have.addresses, True), dict.fromkeys(self._address_refs, True)
            )
            elements = _full_diff(dict.fromkeys(have.elements, True), self._want_elements)
        else:
            # only the touched keys: nothing here grows with the number of Services
            services = diff.compute_keys(
                have.services, self._want_services, (k for o in touched for k in o.services)
            )
            dests = diff.compute_keys(
                have.destinations, self._want_dests, (k for o in touched for k in o.destinations)
            )
            some = {a for o in touched for a in o.addresses}
            addresses = diff.compute_keys(
                {a: True for a in some if a in have.addresses},
                {a: True for a in some if a in self._address_refs},
                some,
            )
            els = {e for o in touched for e in o.elements}
            elements = diff.compute_keys(
                {e: True for e in els if e in have.elements}, self._want_elements, els
            )

        # Every stage is queued, then flushed (sent in windows, acks collected); the
        # bookkeeping in ``have`` runs per message once its success is known.
        # 1. VIPs first: a virtual service is only reachable once its address is local.
        if addresses.added or touched is None:
            index = kernel.ensure_link()
            for addr, _ in addresses.added:
                kernel.add_address(index, addr, partial(have.addresses.add, addr))
            kernel.flush()
        # 2. Companion sets and rules (rules rewritten only when they changed).
        skeleton_id = render.skeleton_id(self._ctx)
        if touched is None and have.table_id != skeleton_id:
            kernel.write_companion(self._ctx, self._want_elements)
            have.elements = set(self._want_elements)
            have.table_id = skeleton_id
            elements = diff.Diff()
        kernel.change_elements([e for e, _ in elements.added], (), have.elements.add)
        # 3. Virtual services, then 4. their real servers.
        for key, settings in services.added:
            kernel.add_service(key, settings, partial(have.services.__setitem__, key, settings))
        for key, _, settings in services.changed:
            kernel.set_service(key, settings, partial(have.services.__setitem__, key, settings))
        kernel.flush()
        for dest, weight in dests.added:
            if dest.virtual not in have.services:
                continue  # its service failed to appear; the full sync retries
            kernel.add_dest(dest, weight, partial(have.destinations.__setitem__, dest, weight))
        for dest, _, weight in dests.changed:
            kernel.set_dest(dest, weight, partial(self._weighted, dest, weight))
        kernel.flush()
        # 5. Removals: real servers drain gracefully, services go at once.
        gone = {key for key, _ in services.removed}
        status: dict[VirtualKey, dict[DestKey, DestStatus]] = {}
        for dest, _ in dests.removed:
            if dest.virtual not in gone:
                self._retire(dest, status)
        for key in gone:
            kernel.del_service(key, partial(self._forget_service, key))
        kernel.flush()
        kernel.change_elements((), [e for e, _ in elements.removed], have.elements.discard)
        kernel.flush()
        if addresses.removed:
            index = kernel.ensure_link()
            for addr, _ in addresses.removed:
                kernel.del_address(index, addr, partial(have.addresses.discard, addr))
            kernel.flush()

    def _weighted(self, dest: DestKey, weight: int) -> None:
        self._have.destinations[dest] = weight
        self._pending.pop(dest, None)

    def _forget_dest(self, dest: DestKey) -> None:
        self._have.destinations.pop(dest, None)
        self._pending.pop(dest, None)

    def _forget_service(self, key: VirtualKey) -> None:
        del self._have.services[key]
        for dest in [d for d in self._have.destinations if d.virtual == key]:
            self._forget_dest(dest)

    def _status(
        self, dest: DestKey, cache: dict[VirtualKey, dict[DestKey, DestStatus]]
    ) -> DestStatus | None:
        if dest.virtual not in cache:
            cache[dest.virtual] = self._kernel.dump_destinations(dest.virtual)
        return cache[dest.virtual].get(dest)

    def _retire(self, dest: DestKey, cache: dict[VirtualKey, dict[DestKey, DestStatus]]) -> None:
        """Remove a real server now if it has no connections, else drain it (weight 0)."""
        status = self._status(dest, cache)
        if status is None:
            self._have.destinations.pop(dest, None)
            self._pending.pop(dest, None)
            return
        if status.active + status.inactive == 0:
            self._kernel.del_dest(dest, partial(self._forget_dest, dest))
            return
        if status.weight != 0:
            self._kernel.set_dest(dest, 0, partial(self._drain, dest))
        else:
            self._drain(dest)
        log.info(
            "ipvs_real_server_draining",
            real_server=str(dest),
            active=status.active,
            inactive=status.inactive,
        )

    def _drain(self, dest: DestKey) -> None:
        self._have.destinations[dest] = 0
        self._pending.setdefault(dest, time.monotonic() + self.grace_period)

    def _reap(self) -> None:
        """Delete draining real servers whose connections are gone or whose grace ended."""
        if not self._pending:
            return
        cache: dict[VirtualKey, dict[DestKey, DestStatus]] = {}
        now = time.monotonic()
        for dest, deadline in sorted(self._pending.items(), key=lambda kv: str(kv[0])):
            if dest in self._want_dests:
                self._pending.pop(dest)
                continue
            status = self._status(dest, cache)
            if status is None:
                self._pending.pop(dest)
                self._have.destinations.pop(dest, None)
            elif status.active + status.inactive == 0 or now >= deadline:
                self._kernel.del_dest(dest, partial(self._forget_dest, dest))
                log.info(
                    "ipvs_real_server_removed",
                    real_server=str(dest),
                    drained=status.active + status.inactive == 0,
                )
        self._kernel.flush()

    def _cleanup(self) -> None:
        kernel = self._kernel
        if kernel.loaded():
            services = kernel.dump_services()
            bound = kernel.dump_addresses()
            for key in sorted(self._owned(services, bound), key=str):
                kernel.del_service(key)
            kernel.flush()
        kernel.delete_companion()
        kernel.del_link()


def _full_diff(old: Mapping[K, V], new: Mapping[K, V]) -> diff.Diff[K, V]:
    """``diff.compute(old, new)``, with only the differing keys sorted: a restarted
    agent's full sync compares every object, and nearly all of them are equal."""
    missing = object()
    keys = {k for k, v in new.items() if old.get(k, missing) != v}
    keys.update(k for k in old if k not in new)
    return diff.compute_keys(old, new, keys)


_PROTO_FLAGS = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _service_spec(key: VirtualKey) -> str:
    """``ipvsadm``'s name of a virtual service: ``-t 10.96.0.10:80``, ``-f 65536``."""
    if key.fwmark:
        return f"-f {key.fwmark}" + (" -6" if key.address.version == 6 else "")
    return f"{_PROTO_FLAGS[key.protocol]} {_endpoint(key.address, key.port)}"


def _settings(settings: VirtualService) -> str:
    return f" -s {settings.scheduler}" + (
        f" -p {settings.persistence}" if settings.persistence else ""
    )


def _dest_spec(dest: DestKey) -> str:
    return f"{_service_spec(dest.virtual)} -r {_endpoint(dest.address, dest.port)}"


def _prefix(address: IPAddress) -> str:
    return f"{address}/{128 if address.version == 6 else 32}"


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")
