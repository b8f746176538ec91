"""The agent's configuration: file, environment, flags — in that order of precedence, last wins.

The file is YAML with KubeProxyConfiguration's field names where they mean the same
thing (``clusterCIDR``, ``nodePortAddresses``, ``syncPeriod``, ``minSyncPeriod``,
``healthzBindAddress``, ``metricsBindAddress``, ``masqueradeAll``, ``hostnameOverride``,
``mode``), plus kpy's own (``source``, ``manifests``, ``backendOptions``, ...).
Unknown fields are rejected with a message naming them, as a typo in a production
configuration must not be silently ignored.

Environment variables are ``KPY_`` + the field name in upper snake case
(``KPY_CLUSTER_CIDR``, ``KPY_MODE``). Flags given on the command line override both.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kpy.agent.runner import RunnerTimes
from kpy.core.backend import DETECT_LOCAL_MODES, BackendConfig, split_values
from kpy.core.model import ConfigError, IPAddress, IPNetwork
from kpy.core.trace import PRIMARY, check_nodeport_addresses


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    mode: str = "nftables"  # the backend
    source: str = "manifests"  # manifests | kube
    manifests: tuple[str, ...] = ("examples",)
    hostname_override: str = ""  # the node name; default: the host name
    node_ips: tuple[str, ...] = ()
    cluster_cidr: tuple[str, ...] = ("10.244.0.0/16",)
    node_port_addresses: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()  # nftables: unallocated addresses in them are dropped
    masquerade_all: bool = False
    sync_period: float = 300.0  # periodic full sync (drift repair)
    min_sync_period: float = 1.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    kubeconfig: str = ""
    master: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    netns: str = ""
    backend_options: tuple[tuple[str, str], ...] = ()
    healthz_stale_after: float = 120.0  # API unreachable this long → health reports stale
    conntrack_cleanup: bool = True
    detect_local_mode: str = "ClusterCIDR"  # how traffic from this node's pods is told
    pod_bridge_interface: str = ""  # file: detectLocal.bridgeInterface
    pod_interface_name_prefix: str = ""  # file: detectLocal.interfaceNamePrefix
    iptables_localhost_nodeports: bool = True  # file: iptables.localhostNodePorts

    def node_name(self) -> str:
        return self.hostname_override or os.uname().nodename

    def backend_config(self) -> BackendConfig:
        try:
            return self._backend_config()
        except ValueError as exc:  # detect-local mode and interfaces (BackendConfig checks)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from None

    def _backend_config(self) -> BackendConfig:
        return BackendConfig(
            node_name=self.node_name(),
            node_ips=tuple(_ip(v, "nodeIPs") for v in self.node_ips),
            cluster_cidrs=tuple(_net(v, "clusterCIDR") for v in self.cluster_cidr),
            nodeport_addresses=self._nodeport_addresses(),
            nodeport_primary=self.node_port_addresses == (PRIMARY,),
            service_cidrs=tuple(_net(v, "serviceCIDRs") for v in self.service_cidrs),
            masquerade_all=self.masquerade_all,
            netns=self.netns or None,
            options=self.backend_options,
            detect_local_mode=self.detect_local_mode,
            pod_bridge_interface=self.pod_bridge_interface,
            pod_interface_name_prefix=self.pod_interface_name_prefix,
            localhost_nodeports=self.iptables_localhost_nodeports,
        )

    def _nodeport_addresses(self) -> tuple[IPNetwork, ...]:
        try:
            check_nodeport_addresses(self.node_port_addresses, "nodePortAddresses")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.node_port_addresses == (PRIMARY,):
            # known now when the node IPs are configured; else from the Node, at sync
            node_ips = tuple(_ip(v, "nodeIPs") for v in self.node_ips)
            return BackendConfig(node_ips=node_ips).primary_networks()
        return tuple(_net(v, "nodePortAddresses") for v in self.node_port_addresses)

    def runner_times(self) -> RunnerTimes:
        return RunnerTimes(min_interval=self.min_sync_period, full_interval=self.sync_period)

    def to_yaml(self) -> str:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "backend_options":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            if f.name in NESTED:
                section, key = NESTED[f.name]
                out.setdefault(section, {})[key] = value
                continue
            out[_camel(f.name)] = value
        return yaml.safe_dump(out, sort_keys=True)


def _camel(snake: str) -> str:
    special = {
        "cluster_cidr": "clusterCIDR",
        "node_ips": "nodeIPs",
        "service_cidrs": "serviceCIDRs",
    }
    if snake in special:
        return special[snake]
    head, *rest = snake.split("_")
    return head + "".join(p.capitalize() for p in rest)


# Address and CIDR lists: given as a list, a comma-separated string, repeated flags or
# any mix, merged in order (each value once).
LIST_FIELDS = frozenset({"node_ips", "cluster_cidr", "node_port_addresses", "service_cidrs"})
# Fields the file holds in a section, as KubeProxyConfiguration does (``detectLocal:``
# ``bridgeInterface``, ``iptables: localhostNodePorts``): field → (section, key).
NESTED = {
    "pod_bridge_interface": ("detectLocal", "bridgeInterface"),
    "pod_interface_name_prefix": ("detectLocal", "interfaceNamePrefix"),
    "iptables_localhost_nodeports": ("iptables", "localhostNodePorts"),
}
SECTIONS = frozenset(section for section, _ in NESTED.values())
FIELD_BY_KEY = {_camel(f.name): f for f in fields(AgentConfig) if f.name not in NESTED}
ENV_BY_NAME = {"KPY_" + f.name.upper(): f for f in fields(AgentConfig)}


def _ip(value: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an IP address") from None


def _net(value: str, what: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a CIDR") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object, what: str) -> float:
    """Seconds from ``30``, ``30s``, ``500ms``, ``1m``, ``1h`` (Go-style units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(f"{what}: {value!r} is not a duration (like 30s, 500ms, 1m)")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if seconds < 0:
        raise ConfigError(f"{what}: must not be negative")
    return seconds


def _coerce(name: str, value: object, what: str) -> object:
    f = next(x for x in fields(AgentConfig) if x.name == name)
    default = f.default
    if name == "backend_options":
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{what}: expected key=value pairs")
            return tuple(sorted((k.strip(), v.strip()) for k, v in pairs))
        if not isinstance(value, Mapping):
            raise ConfigError(f"{what}: expected a mapping of option to value")
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))
    if name in ("sync_period", "min_sync_period", "healthz_stale_after"):
        return parse_duration(value, what)
    if name == "detect_local_mode":
        if value not in DETECT_LOCAL_MODES:
            raise ConfigError(f"{what}: {value!r} is not one of {', '.join(DETECT_LOCAL_MODES)}")
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{what}: {value!r} is not a boolean")
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            if name in LIST_FIELDS:  # each item may itself be comma separated
                return split_values(value)
            return tuple(value)
        raise ConfigError(f"{what}: expected a list of strings")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{what}: {value!r} is not a string")
        return value
    return value


def from_mapping(data: Mapping[str, object], base: AgentConfig, where: str) -> AgentConfig:
    unknown = sorted(set(data) - set(FIELD_BY_KEY) - {"apiVersion", "kind"} - SECTIONS)
    if unknown:
        known = ", ".join(sorted([*FIELD_BY_KEY, *SECTIONS]))
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {known}")
    changes = {
        FIELD_BY_KEY[k].name: _coerce(FIELD_BY_KEY[k].name, v, f"{where}: {k}")
        for k, v in data.items()
        if k in FIELD_BY_KEY
    }
    for section in sorted(SECTIONS):
        body = data.get(section)
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: {section}: expected a mapping")
        by_key = {key: name for name, (sec, key) in NESTED.items() if sec == section}
        unknown = sorted(set(body) - set(by_key))
        if unknown:
            names = ", ".join(f"{section}.{k}" for k in unknown)
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"{where}: unknown field(s) {names}; known: {known}")
        for key, value in body.items():
            name = by_key[key]
            changes[name] = _coerce(name, value, f"{where}: {section}.{key}")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def from_file(path: Path, base: AgentConfig) -> AgentConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_mapping(data, base, str(path))


def from_env(env: Mapping[str, str], base: AgentConfig) -> AgentConfig:
    changes = {
        f.name: _coerce(f.name, env[key], key) for key, f in ENV_BY_NAME.items() if key in env
    }
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def resolve(file: Path | None, env: Mapping[str, str], flags: Mapping[str, object]) -> AgentConfig:
    """Defaults < file < environment < flags. ``flags`` holds only flags actually given."""
    config = AgentConfig()
    if file is not None:
        config = from_file(file, config)
    config = from_env(env, config)
    changes = {k: _coerce(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items()}
    config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
    config.backend_config()  # validates addresses and CIDRs now, not at first sync
    return config


__all__ = ["AgentConfig", "ConfigError", "parse_duration", "resolve"]
