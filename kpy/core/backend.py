"""The backend contract, and how backends are found.

A backend turns a :class:`~kpy.core.model.Plan` into kernel (or proxy) state. It is found
through the entry-point group ``kpy.backends``: a third party adds one the same way the
built-in ones are added, and a broken plugin is reported and skipped, never fatal.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Protocol, runtime_checkable

from kpy.core.model import IPAddress, IPNetwork, NodeInfo, Plan, ServicePortState

ENTRY_POINT_GROUP = "kpy.backends"


DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
_INTERFACE = re.compile(r"[A-Za-z0-9_.@:-]{1,15}")


def check_interface(name: str, what: str) -> None:
    """An interface name (or prefix) as the kernel takes it: 1 to 15 characters, none of
    them a quote, space, slash or wildcard (it reaches rule text)."""
    if not _INTERFACE.fullmatch(name):
        raise ValueError(
            f"{what} must be an interface name (1-15 of A-Z a-z 0-9 _ . @ : -), got {name!r}"
        )


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """Upstream's LocalTrafficDetector for one IP family: traffic from this node's pods
    is traffic from ``cidrs`` (ClusterCIDR, NodeCIDR modes), or arriving on the
    interface ``interface`` (BridgeInterface) or on any interface whose name starts with
    it (InterfaceNamePrefix, ``prefix``). Neither (no CIDR of the family): a no-op
    detector — no rule tells pods apart, as upstream without a cluster CIDR."""

    mode: str
    cidrs: tuple[IPNetwork, ...] = ()
    interface: str = ""
    prefix: bool = False

    @property
    def implemented(self) -> bool:
        return bool(self.cidrs or self.interface)

    def is_local(self, src: IPAddress, iif: str) -> bool:
        """Whether a packet from ``src`` arriving on ``iif`` ("" for the node's own
        packets) is pod traffic (False for a no-op detector)."""
        if self.interface:
            if self.prefix:
                return iif.startswith(self.interface)
            return iif == self.interface
        return any(src.version == c.version and src in c for c in self.cidrs)


def nodeport_networks(
    addresses: tuple[IPNetwork, ...], primary: bool, version: int
) -> tuple[IPNetwork, ...] | None:
    """Where NodePorts of one IP family answer: the ``addresses`` (nodePortAddresses) of
    that family, or None for every local address of it. As upstream, a family none of the
    CIDRs belongs to answers everywhere, and so does one with a zero-masked CIDR. With
    ``primary``, a family without a primary IP (yet) answers nowhere: ``()`` (upstream
    then falls back to the loopback address)."""
    nets = tuple(n for n in addresses if n.version == version)
    if primary:
        return nets
    if not nets or any(n.prefixlen == 0 for n in nets):
        return None
    return nets


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """Node-wide settings every backend needs. Changing any of them means a full sync."""

    node_name: str = "localhost"
    node_ips: tuple[IPAddress, ...] = ()
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    nodeport_addresses: tuple[IPNetwork, ...] = ()  # () = every local address
    # nodePortAddresses "primary": NodePorts on the node's primary IP of each family only
    # (nodeport_addresses is then those IPs, filled in by for_node: none until known)
    nodeport_primary: bool = False
    # the service CIDRs given by flag or configuration (nftables backend: an address in
    # them, or in the cluster's ServiceCIDR objects, that no Service has is dropped, as
    # upstream's nftables mode)
    service_cidrs: tuple[IPNetwork, ...] = ()
    # iptables backend: NodePorts also on 127.0.0.1 (upstream's iptables.localhostNodePorts;
    # IPv4, masqueraded; sets route_localnet=1 in the node's namespace). Off unless asked
    # for: `kpy run` asks by default (AgentConfig, as upstream), a BackendConfig built
    # elsewhere (tests, tools) never writes that sysctl by accident.
    localhost_nodeports: bool = False
    masquerade_all: bool = False
    netns: str | None = None  # run every kernel command in this named network namespace
    options: tuple[tuple[str, str], ...] = ()  # backend-specific flags, e.g. ("scheduler", "rr")
    # How traffic from this node's pods is told (upstream's --detect-local-mode):
    detect_local_mode: str = "ClusterCIDR"  # see DETECT_LOCAL_MODES
    pod_bridge_interface: str = ""  # BridgeInterface: the pods' bridge
    pod_interface_name_prefix: str = ""  # InterfaceNamePrefix: the pods' interfaces
    # What the Node itself says (filled in by :meth:`for_node` from the Plan's node):
    node_addresses: tuple[IPAddress, ...] = ()  # InternalIP then ExternalIP
    node_pod_cidrs: tuple[IPNetwork, ...] = ()  # spec.podCIDRs
    # What the cluster's ServiceCIDR objects say (filled in by :meth:`for_plan`):
    cluster_service_cidrs: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if self.detect_local_mode not in DETECT_LOCAL_MODES:
            raise ValueError(
                f"detect-local-mode must be one of {', '.join(DETECT_LOCAL_MODES)} "
                f"(got {self.detect_local_mode!r})"
            )
        if self.detect_local_mode == "BridgeInterface":
            check_interface(self.pod_bridge_interface, "pod-bridge-interface")
        if self.detect_local_mode == "InterfaceNamePrefix":
            check_interface(self.pod_interface_name_prefix, "pod-interface-name-prefix")

    def option(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.options:
            if k == key:
                return v
        return default

    def for_node(self, node: NodeInfo) -> BackendConfig:
        """This configuration with what ``node`` says about itself filled in (a backend
        renders with it; a change of the node's addresses means a full sync)."""
        config = replace(self, node_addresses=node.addresses, node_pod_cidrs=node.pod_cidrs)
        if config.nodeport_primary:
            config = replace(config, nodeport_addresses=config.primary_networks())
        return self if config == self else config

    def for_plan(self, plan: Plan) -> BackendConfig:
        """:meth:`for_node` of the Plan's node, with the cluster's ServiceCIDRs (the
        nftables backend's; the others render without them, as upstream's modes)."""
        config = self.for_node(plan.node)
        if config.cluster_service_cidrs == plan.service_cidrs:
            return config
        return replace(config, cluster_service_cidrs=plan.service_cidrs)

    def all_service_cidrs(self) -> tuple[IPNetwork, ...]:
        """The configured service CIDRs and the ServiceCIDR objects', each once."""
        return tuple(dict.fromkeys((*self.service_cidrs, *self.cluster_service_cidrs)))

    def primary_networks(self) -> tuple[IPNetwork, ...]:
        """The primary IPs as /32 and /128 networks (nodePortAddresses "primary")."""
        return tuple(ipaddress.ip_network(ip) for ip in self.primary_ips())

    def nodeport_networks(self, version: int) -> tuple[IPNetwork, ...] | None:
        """Where NodePorts of one IP family answer (see :func:`nodeport_networks`)."""
        return nodeport_networks(self.nodeport_addresses, self.nodeport_primary, version)

    def local_detector(self, version: int) -> LocalDetector:
        """How this node tells traffic from its pods, for one IP family."""
        mode = self.detect_local_mode
        if mode == "BridgeInterface":
            return LocalDetector(mode, interface=self.pod_bridge_interface)
        if mode == "InterfaceNamePrefix":
            return LocalDetector(mode, interface=self.pod_interface_name_prefix, prefix=True)
        cidrs = self.cluster_cidrs if mode == "ClusterCIDR" else self.node_pod_cidrs
        return LocalDetector(mode, cidrs=tuple(c for c in cidrs if c.version == version))

    def all_node_ips(self) -> tuple[IPAddress, ...]:
        """Every address of this node: the configured ones, then the Node's."""
        return tuple(dict.fromkeys((*self.node_ips, *self.node_addresses)))

    def primary_ips(self) -> tuple[IPAddress, ...]:
        """The primary IP of each family the node has (IPv4 first)."""
        return tuple(ip for v in (4, 6) if (ip := self.primary_ip(v)) is not None)

    def primary_ip(self, version: int) -> IPAddress | None:
        """The node's primary IP of one family (upstream's ``nodeIP``): the first
        configured one of that family, else the Node's first."""
        for ip in self.all_node_ips():
            if ip.version == version:
                return ip
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyResult:
    """What one apply did."""

    full_sync: bool
    ops: int  # kernel operations sent (rules/elements/netlink messages)
    size: int = 0  # bytes or lines of the transaction, backend-defined unit below
    size_unit: str = "bytes"
    detail: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceView:
    """One service port as a backend has it programmed, for ``kpy dump``.

    ``frontends`` are strings like ``10.96.0.10:53/UDP`` or ``*:30080/TCP`` (NodePort);
    ``endpoints`` like ``10.244.1.5:8080``; ``extra`` holds backend-specific facts
    (weights, probabilities, packet counters, active connections).
    """

    frontends: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Programmed:
    """What a backend really holds, read back from the kernel by ``observe()``.

    ``objects`` are the backend's keyed kernel objects (the same keys and values its
    render produces, so ``diff.compute`` between them shows drift); ``services`` maps
    ``str(ServicePortName)`` to what is programmed for it. A view whose ``extra`` has a
    ``"drift"`` entry says why the kernel differs from what was written (``kpy dump``
    flags it); a view keyed in parentheses, e.g. ``"(nftables tables)"``, is about the
    backend's shared objects rather than one service port.
    """

    backend: str
    objects: Mapping[str, object] = field(default_factory=dict)
    services: Mapping[str, ServiceView] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What every backend implements. See docs/architecture.md, "The backend contract".

    Optional: ``async def check(plan) -> str | None`` — a dry run that changes nothing
    (None: the kernel would take ``plan``'s service ports; else why not). With it the
    agent finds the ports to blame when a transaction is refused (kpy.agent.quarantine).
    ``async def dry_run(plan) -> str`` — the transaction ``apply(plan)`` would send,
    for ``kpy plan --backend``. ``async def differences(plan) -> tuple[str, ...]``
    — each object the kernel holds otherwise than this configuration renders for
    ``plan``, and why (read, never changed): ``kpy dump --backend`` shows them (the
    agent's node flags differ from the dump's, or the kernel drifted).
    """

    name: str

    def probe(self) -> str | None:
        """None when this backend can run on this host, else the reason it cannot."""
        ...

    async def apply(self, plan: Plan) -> ApplyResult:
        """Program the plan as one transaction; raise on failure (nothing recorded)."""
        ...

    async def observe(self) -> Programmed:
        """Read back what the kernel really holds."""
        ...

    async def cleanup(self) -> None:
        """Remove everything this backend owns, nothing else, and create nothing.

        Returns normally when it removed everything (or nothing of its kind can be
        there, e.g. its tools are not installed); raises :class:`BackendError` when it
        could not clean, so ``kpy cleanup`` exits non-zero.
        """
        ...


class BackendError(Exception):
    """An apply or cleanup failed; the runner retries with a full sync."""


BackendFactory = Callable[[BackendConfig], Backend]


@dataclass(frozen=True, slots=True)
class BackendEntry:
    name: str
    factory: BackendFactory | None
    error: str | None = None  # why the plugin could not be loaded


def _entry_points() -> metadata.EntryPoints:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry(ep: metadata.EntryPoint) -> BackendEntry:
    try:
        factory = ep.load()
    except Exception as exc:  # a broken plugin is reported, not fatal
        return BackendEntry(ep.name, None, f"{type(exc).__name__}: {exc}")
    if not callable(factory):
        return BackendEntry(ep.name, None, "entry point is not callable")
    return BackendEntry(ep.name, factory)


def load_backends(
    entry_points: Callable[[], metadata.EntryPoints] | None = None,
) -> dict[str, BackendEntry]:
    """Every backend registered under ``kpy.backends``; broken ones carry their error."""
    found = (entry_points or _entry_points)()
    return {ep.name: _load_entry(ep) for ep in sorted(found, key=lambda e: e.name)}


def create(name: str, config: BackendConfig) -> Backend:
    """Instantiate the named backend, or raise ``KeyError``/``BackendError`` with the reason.

    Only that backend's module is imported (the others' imports, e.g. pyroute2 for
    ipvs, would cost a cold start for nothing)."""
    found = _entry_points()
    chosen = [ep for ep in found if ep.name == name]
    if not chosen:
        known = ", ".join(sorted({ep.name for ep in found})) or "none"
        raise KeyError(f"unknown backend {name!r} (installed: {known})")
    entry = _load_entry(chosen[-1])  # the last one found, as in load_backends
    if entry.factory is None:
        raise BackendError(f"backend {name!r} failed to load: {entry.error}")
    try:
        return entry.factory(config)
    except ValueError as exc:  # a backend option it refuses, named in the message
        raise BackendError(f"backend {name!r}: {exc}") from exc


def split_values(values: Iterable[str]) -> tuple[str, ...]:
    """List values given repeatedly and/or comma separated (``--node-ip a --node-ip b,c``),
    merged in order, each once; empty parts dropped (``--cluster-cidr ""`` is none)."""
    parts = (part.strip() for value in values for part in value.split(","))
    return tuple(dict.fromkeys(part for part in parts if part))


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def frontend(address: IPAddress | None, port: int, protocol: str) -> str:
    """The canonical text of one frontend: ``10.96.0.1:80/TCP``, ``[fd00::1]:80/TCP``,
    ``*:30080/TCP`` for a NodePort on every node address."""
    if address is None:
        host = "*"
    elif address.version == 6:
        host = f"[{address}]"
    else:
        host = str(address)
    return f"{host}:{port}/{protocol}"


def desired_view(state: ServicePortState) -> ServiceView:
    """What a correct backend's ``observe()`` reports for one service port.

    Every backend's ``ServiceView`` must carry these frontends and endpoints (extra
    facts may be added); ``kpy dump`` flags any difference.
    """
    svc = state.service
    if not svc.has_vip:
        return ServiceView()
    proto = str(svc.protocol)
    fronts = [frontend(ip, svc.port, proto) for ip in svc.cluster_ips]
    fronts += [frontend(ip, svc.port, proto) for ip in svc.external_ips]
    fronts += [frontend(ip, svc.port, proto) for ip in svc.load_balancer_ips]
    if svc.node_port is not None:
        fronts.append(frontend(None, svc.node_port, proto))
    eps = {str(ep) for ep in state.internal} | {str(ep) for ep in state.external}
    return ServiceView(frontends=tuple(sorted(set(fronts))), endpoints=tuple(sorted(eps)))
