"""The userspace backend: every Service port relayed by an asyncio TCP/UDP proxy.

:class:`UserspaceBackend` puts each Service's VIPs (ClusterIPs, external IPs,
LoadBalancer IPs) on the node namespace's ``lo`` as /32 or /128 addresses and listens
on them, and on the node's addresses for NodePorts; connections and datagrams are
relayed to endpoints by :class:`kpy_userspace.proxy.Proxy`, which runs on its own
thread and event loop inside the node's network namespace (``BackendConfig.netns``).

Per sync: render (pure, :mod:`kpy_userspace.render`) turns each changed service port
into a :class:`~kpy_userspace.render.PortTable`; the proxy installs only those tables
(a partial sync touches only what changed), adding and removing the addresses and
listeners they imply. A full sync reads the addresses on ``lo`` back and adopts those
carrying this backend's address protocol mark, so a restarted agent does not churn
them. See README.md beside this file for what a proxy cannot express, and
docs/decisions/userspace.md for why VIPs are bound rather than redirected.

Options (``BackendConfig.options``): ``grace_period`` (seconds a connection to a
removed endpoint may keep running, default 30), ``connect_timeout`` (seconds before the
next endpoint is tried, default 2), ``udp_idle_timeout`` (default 30).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import structlog

from kpy.core.backend import ApplyResult, BackendConfig, BackendError, Programmed, ServiceView
from kpy.core.model import IPAddress, Plan, ServicePortName, ServicePortState
from kpy_userspace import render
from kpy_userspace.proxy import Proxy, Settings

__all__ = ["UserspaceBackend"]

log = structlog.get_logger("kpy.userspace")


def _seconds(config: BackendConfig, key: str, default: float) -> float:
    raw = config.option(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise BackendError(f"option {key}={raw!r} is not a number of seconds") from exc
    if value < 0:
        raise BackendError(f"option {key}={raw!r} must not be negative")
    return value


def settings_for(config: BackendConfig) -> Settings:
    return Settings(
        connect_timeout=_seconds(config, "connect_timeout", 2.0),
        grace_period=_seconds(config, "grace_period", 30.0),
        udp_idle_timeout=_seconds(config, "udp_idle_timeout", 30.0),
    )


class UserspaceBackend:
    """kpy's userspace proxy backend (see the module docstring and README.md)."""

    name = "userspace"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._settings = settings_for(config)
        self._nodeports = render.nodeport_addresses(config)
        self._proxy = Proxy(config.netns, self._settings)
        # Dropping the backend closes its sockets, as the agent's exit would; the
        # addresses on lo stay for the next one to adopt.
        self._finalizer = weakref.finalize(self, self._proxy.stop)
        self._needs_full = True
        self._primary: tuple[IPAddress, ...] = ()  # the node's, as of the last sync

    # --- the Backend protocol -----------------------------------------------------------

    def probe(self) -> str | None:
        if self.config.netns is not None and not Path("/run/netns", self.config.netns).exists():
            return f"network namespace {self.config.netns!r} not found"
        try:
            import pyroute2  # noqa: F401 - only whether it imports
        except ImportError as exc:
            return f"pyroute2 is missing: {exc}"
        return None

    async def dry_run(self, plan: Plan) -> str:
        """The listeners ``apply(plan)`` would hold for the plan's changed service ports
        (every port on a full sync), one line each, touching nothing."""
        full = plan.full_sync or self._needs_full or self._primary_ips(plan) != self._primary
        names = sorted(plan.services) if full else sorted(plan.changed | plan.removed)
        lines = [f"# userspace proxy: {'full' if full else 'partial'} sync"]
        table_of = self._tables(plan)
        for name in names:
            state = plan.services.get(name)
            if state is None:
                lines.append(f"close {name}")
                continue
            table = table_of(state)
            if table is None:
                continue
            for frontend in table.frontends:
                eps = table.endpoints(frontend.role, frontend.key.family)
                what = str(table.disposition(frontend))
                targets = " ".join(f"{ep.ip}:{ep.port}" for ep in eps) or "-"
                ranges = ",".join(str(r) for r in frontend.source_ranges)
                lines.append(
                    f"{what} {frontend.key} {name} -> {targets}"
                    + (f" from {ranges}" if ranges else "")
                    + (
                        f" affinity {table.affinity_timeout}s"
                        if table.affinity_timeout is not None
                        else ""
                    )
                )
        return "\n".join(lines) + "\n"

    async def apply(self, plan: Plan) -> ApplyResult:
        # a new primary IP changes every ranged LB frontend: re-render them all
        primary = self._primary_ips(plan)
        full = plan.full_sync or self._needs_full or primary != self._primary
        started = time.monotonic()
        names = sorted(plan.services) if full else sorted(plan.changed | plan.removed)
        updates: dict[ServicePortName, render.PortTable | None] = {}
        table_of = self._tables(plan)
        for name in names:
            state = plan.services.get(name)
            updates[name] = None if state is None else table_of(state)
        if full:  # ports without a VIP have no table; leave them out of the whole state
            updates = {n: t for n, t in updates.items() if t is not None}
        try:
            result = await self._proxy.call(lambda: self._proxy.sync(updates, replace=full))
        except BaseException as exc:
            self._needs_full = True
            if isinstance(exc, Exception):
                raise BackendError(f"userspace sync failed: {exc}") from exc
            raise
        if result.errors:
            self._needs_full = True
            log.warning("userspace_apply_incomplete", errors=result.errors, full_sync=full)
            raise BackendError("; ".join(result.errors[:5]))
        self._needs_full = False
        self._primary = primary
        log.debug(
            "userspace_applied",
            full_sync=full,
            ops=result.ops,
            ms=round((time.monotonic() - started) * 1000, 3),
        )
        return ApplyResult(
            full_sync=full,
            ops=result.ops,
            size=len(updates),
            size_unit="ports",
            detail={
                "addresses_added": result.addresses_added,
                "addresses_removed": result.addresses_removed,
                "listeners_opened": result.listeners_opened,
                "listeners_closed": result.listeners_closed,
                "tables_changed": result.tables_changed,
            },
        )

    def _primary_ips(self, plan: Plan) -> tuple[IPAddress, ...]:
        return self.config.for_node(plan.node).primary_ips()

    def _tables(self, plan: Plan) -> Callable[[ServicePortState], render.PortTable | None]:
        """Render for this plan's node (its primary IPs: the source ranges' LB IP rule)."""
        return functools.partial(
            render.port_table,
            nodeport_addresses=self._nodeports,
            primary_ips=self._primary_ips(plan),
        )

    async def observe(self) -> Programmed:
        try:
            snap = await self._proxy.call(self._proxy.snapshot)
        except Exception as exc:
            raise BackendError(f"cannot read the userspace proxy back: {exc}") from exc
        objects: dict[str, object] = {
            render.address_key(a): render.INTERFACE for a in snap.addresses
        }
        services: dict[str, ServiceView] = {}
        for name, stats in sorted(snap.ports.items()):
            table = stats.table
            for key, value in render.objects(table).items():
                if key.startswith("listener/"):
                    continue
                objects.setdefault(key, value)
            closed = []
            for fe in table.listening():
                if fe.key in snap.listeners:
                    objects[f"listener/{fe.key}"] = f"{name} {table.disposition(fe)}"
                else:
                    closed.append(str(fe.key))
            extra = {
                "listeners": str(stats.listeners),
                "active": str(stats.active),
                "connections": str(stats.connections),
                "bytes_in": str(stats.bytes_in),
                "bytes_out": str(stats.bytes_out),
                "affinity": "ClientIP" if table.affinity_timeout is not None else "None",
            }
            if closed:  # reopened by the next full sync
                extra["drift"] = f"not listening on {', '.join(sorted(closed))}"
            services[str(name)] = ServiceView(
                frontends=table.view.frontends, endpoints=table.view.endpoints, extra=extra
            )
        return Programmed(backend=self.name, objects=objects, services=services)

    async def cleanup(self) -> None:
        try:
            removed = await self._proxy.call(self._proxy.remove_all)
        except Exception as exc:
            raise BackendError(f"userspace cleanup failed: {exc}") from exc
        finally:
            self._needs_full = True
        log.info("userspace_cleaned_up", addresses_removed=removed)
        self.close()

    def close(self) -> None:
        """Stop the proxy thread and close every socket (addresses on lo stay)."""
        self._finalizer()
        self._proxy = Proxy(self.config.netns, self._settings)
        self._finalizer = weakref.finalize(self, self._proxy.stop)
        self._needs_full = True
