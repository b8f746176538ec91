"""Kubernetes JSON → kpy's model, and nothing raises past here.

The API server validates what it stores, but a node agent must not trust that: a
manifest directory, an older or newer API, or a bug upstream can hand it anything.
Every function here takes the object as the API returns it (a dict parsed from JSON)
and returns model values plus a tuple of :class:`Problem` — one per thing skipped,
naming the object and the reason. The caller logs them; the core stays pure.

Rules, as kube-proxy applies them:
* Services labelled ``service.kubernetes.io/service-proxy-name`` belong to another proxy.
* ``clusterIP: None`` is headless: no VIP, kept with its endpoints for the dump.
* ExternalName: no VIP, kept with its CNAME target.
* EndpointSlices are matched to their Service by the ``kubernetes.io/service-name``
  label and to service ports by port name and protocol; only the first address of each
  endpoint is used; FQDN slices are ignored; unset conditions mean ready/serving.
* LoadBalancer ingress with ``ipMode: Proxy`` is not programmed (the LB proxies itself).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kpy.core.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    Protocol,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)

PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
LEGACY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
KPY_ANNOTATION_PREFIX = "kpy.io/"

MAX_PORTS = 256  # per Service or EndpointSlice; far above anything real (the API: 20,000 per slice)
MAX_ADDRESSES = 256  # external IPs, LB ingress, source ranges per Service
MAX_ENDPOINTS = 1000  # per EndpointSlice (the API caps slices at 1000)
MAX_ENDPOINT_ADDRESSES = 100  # per slice endpoint, as the API validates it
MAX_HINTS = 8  # forZones / forNodes per slice endpoint, as the API validates them
MAX_NAME = 253
MAX_LABEL = 63
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API's limit on all annotations of an object
MAX_SHOWN = 80  # characters of a bad value quoted in a Problem's reason

# Names as Kubernetes' apimachinery validates them (k8s.io/apimachinery/pkg/util/validation).
# Only these ever reach a backend: kpy's rule text is derived from them.
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(_LABEL)  # namespaces, port names, endpoint hostnames
DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")  # slices, nodes, ExternalName
DNS1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?")  # Service names

_RULES = {
    "dns-1123-label": (
        DNS1123_LABEL,
        MAX_LABEL,
        "a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a "
        f"letter or digit, at most {MAX_LABEL} characters)",
    ),
    "dns-1035-label": (
        DNS1035_LABEL,
        MAX_LABEL,
        "a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, ending "
        f"with a letter or digit, at most {MAX_LABEL} characters)",
    ),
    "dns-1123-subdomain": (
        DNS1123_SUBDOMAIN,
        MAX_NAME,
        f"a DNS-1123 subdomain (DNS-1123 labels joined by '.', at most {MAX_NAME} characters)",
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Something skipped, and why: logged by the shell as a structured warning."""

    kind: str
    namespace: str
    name: str
    reason: str

    def as_log(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A converted Service: its ports, each a :class:`ServicePort`."""

    name: ServiceName
    ports: tuple[ServicePort, ...]
    # metadata.creationTimestamp (RFC 3339, UTC, as the API server writes it; "" when
    # missing or malformed): the last tie-break between two Services claiming one frontend.
    created: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str
    family: IPFamily
    ports: tuple[SlicePort, ...]
    endpoints: tuple[tuple[Endpoint, ...], ...]  # per entry of ``ports``, in the same order


_EMPTY: frozenset[str] = frozenset()


class _Invalid(Exception):
    """Raised inside this module only; turned into a Problem at the boundary."""


# --------------------------------------------------------------------------- helpers


def show(value: Any) -> str:
    """A bad value as a reason quotes it: its repr, escaped to ASCII and cut short."""
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, str) and len(value) > MAX_SHOWN:
        return ascii(value[:MAX_SHOWN]) + f"... ({len(value)} characters)"
    text = ascii(value)
    return text if len(text) <= MAX_SHOWN * 2 else text[: MAX_SHOWN * 2] + "..."


def valid_name(value: str, rule: str) -> bool:
    """True when ``value`` is a name of the given kind (``dns-1123-label``,
    ``dns-1035-label`` or ``dns-1123-subdomain``) as the Kubernetes API accepts it."""
    pattern, limit, _ = _RULES[rule]
    return len(value) <= limit and pattern.fullmatch(value) is not None


def _name(value: Any, what: str, rule: str, *, required: bool = True) -> str:
    """A name Kubernetes would accept, or _Invalid saying what it must be."""
    if value is None or value == "":
        if required:
            raise _Invalid(f"{what} is missing")
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"{what} is {type(value).__name__}, not a string")
    if not valid_name(value, rule):
        raise _Invalid(f"{what} {show(value)} is not {_RULES[rule][2]}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{what} is {type(value).__name__}, not an object")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{what} is {type(value).__name__}, not a list: {show(value)}")
    if len(value) > limit:
        raise _Invalid(f"{what} has {len(value)} entries, more than {limit}")
    return value


def _str(value: Any, what: str, *, required: bool = False, limit: int = MAX_NAME) -> str | None:
    if value is None or value == "":
        if required:
            raise _Invalid(f"{what} is missing")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{what} is {type(value).__name__}, not a string")
    if len(value) > limit:
        raise _Invalid(f"{what} is longer than {limit} characters")
    return value


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what} {show(value)} is not an integer")
    if not 1 <= value <= 65535:
        raise _Invalid(f"{what} {value} is out of range 1-65535")
    return value


def _protocol(value: Any, what: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except (ValueError, TypeError):
        raise _Invalid(f"{what} {show(value)} is not TCP, UDP or SCTP") from None


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def _ipv4_fast(value: str) -> IPAddress | None:
    """Dotted-quad IPv4 without the stdlib's slow path (most addresses in a cluster)."""
    match = _IPV4.fullmatch(value)
    if match is None:
        return None
    a, b, c, d = match.groups()
    return ipaddress.IPv4Address((int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d))


def _ip(value: Any, what: str) -> IPAddress:
    if not isinstance(value, str):
        raise _Invalid(f"{what} {show(value)} is not a string")
    fast = _ipv4_fast(value)
    if fast is not None:
        return fast
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(f"{what} {show(value)} is not an IP address") from None


def _net(value: Any, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise _Invalid(f"{what} {show(value)} is not a string")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Invalid(f"{what} {show(value)} is not a CIDR") from None


def _annotations(value: Any) -> dict[str, str]:
    raw = _str_map(value, "metadata.annotations")
    size = sum(len(k) + len(v) for k, v in raw.items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise _Invalid(
            f"metadata.annotations hold {size} characters, more than {MAX_ANNOTATIONS_BYTES}"
        )
    return raw


def _str_map(value: Any, what: str) -> dict[str, str]:
    raw = _dict(value, what)
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


_NAME_RULES = {
    "Service": "dns-1035-label",
    "EndpointSlice": "dns-1123-subdomain",
    "Node": "dns-1123-subdomain",
    "ServiceCIDR": "dns-1123-subdomain",
}

_CLUSTER_SCOPED = frozenset({"Node", "ServiceCIDR"})


def _meta(obj: Any, kind: str) -> tuple[str, str, dict[str, Any]]:
    """(namespace, name, metadata) or _Invalid. Namespace is "" for cluster-scoped kinds.

    Names and namespaces are validated as the API server validates them: everything a
    backend writes into rule text derives from them.
    """
    if not isinstance(obj, dict):
        raise _Invalid(f"{kind} is {type(obj).__name__}, not an object")
    meta = _dict(obj.get("metadata"), "metadata")
    name = _name(meta.get("name"), "metadata.name", _NAME_RULES[kind])
    namespace = ""
    if kind not in _CLUSTER_SCOPED:
        namespace = _name(meta.get("namespace"), "metadata.namespace", "dns-1123-label")
    return namespace, name, meta


def identify(obj: Any) -> tuple[str, str]:
    """Best-effort (namespace, name) of any object, for naming it in a Problem.

    A name that is not a valid Kubernetes name is shown escaped and cut short (see
    :func:`show`), so a Problem never carries control characters or megabytes into a log.
    """
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        meta = obj["metadata"]
        ns, name = meta.get("namespace"), meta.get("name")
        return (_shown_name(ns, ""), _shown_name(name, "<unnamed>"))
    return ("", "<unnamed>")


def _shown_name(value: Any, missing: str) -> str:
    if not isinstance(value, str) or not value:
        return missing if value is None or value == "" else show(value)
    return value if valid_name(value, "dns-1123-subdomain") else show(value)


# --------------------------------------------------------------------------- Service


def _addresses(values: Iterable[Any], what: str, problems: list[str]) -> tuple[IPAddress, ...]:
    result: list[IPAddress] = []
    for value in values:
        try:
            ip = _ip(value, what)
        except _Invalid as exc:
            problems.append(str(exc))
            continue
        if ip not in result:
            result.append(ip)
    return tuple(result)


def service(obj: Any) -> tuple[Service | None, tuple[Problem, ...]]:
    """Convert a Service. None when it is skipped (another proxy's, or invalid)."""
    try:
        return _service(obj)
    except _Invalid as exc:
        namespace, name = identify(obj)  # only on error: it validates the names again
        return None, (Problem(kind="Service", namespace=namespace, name=name, reason=str(exc)),)
    except Exception as exc:  # the boundary: nothing raises past convert
        namespace, name = identify(obj)
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return None, (Problem(kind="Service", namespace=namespace, name=name, reason=reason),)


def is_managed_by_other_proxy(obj: Any) -> bool:
    """True when the Service is labelled for another proxy."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return False
    labels = obj["metadata"].get("labels")
    return isinstance(labels, dict) and PROXY_NAME_LABEL in labels


def _service(obj: Any) -> tuple[Service | None, tuple[Problem, ...]]:
    namespace, name, meta = _meta(obj, "Service")
    labels = _str_map(meta.get("labels"), "metadata.labels")
    svc_name = ServiceName(namespace=namespace, name=name)
    if PROXY_NAME_LABEL in labels:
        return None, ()
    annotations = _annotations(meta.get("annotations"))
    spec = _dict(obj.get("spec"), "spec")
    status = _dict(obj.get("status"), "status")
    notes: list[str] = []

    type_raw = spec.get("type") or "ClusterIP"
    try:
        svc_type = ServiceType(type_raw)
    except ValueError:
        raise _Invalid(f"spec.type {show(type_raw)} is not a Service type") from None

    external_name = None
    headless = False
    cluster_ips: tuple[IPAddress, ...] = ()
    if svc_type is ServiceType.EXTERNAL_NAME:
        external_name = _str(spec.get("externalName"), "spec.externalName", required=True)
        assert external_name is not None
        # A CNAME: may end in a dot (fully qualified).
        _name(external_name.removesuffix("."), "spec.externalName", "dns-1123-subdomain")
    else:
        raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs", 2) or (
            [spec["clusterIP"]] if spec.get("clusterIP") else []
        )
        if raw_ips and raw_ips[0] == "None":
            headless = True
        elif raw_ips:
            cluster_ips = tuple(_ip(v, "spec.clusterIPs entry") for v in raw_ips)
            if len({ip.version for ip in cluster_ips}) != len(cluster_ips):
                raise _Invalid("spec.clusterIPs holds two addresses of one family")
        else:
            headless = True  # no address allocated: nothing to program

    external_ips = _addresses(
        _list(spec.get("externalIPs"), "spec.externalIPs", MAX_ADDRESSES),
        "spec.externalIPs entry",
        notes,
    )
    lb_ips: tuple[IPAddress, ...] = ()
    source_ranges: tuple[IPNetwork, ...] = ()
    if svc_type is ServiceType.LOAD_BALANCER:
        lb = _dict(status.get("loadBalancer"), "status.loadBalancer")
        ingress = _list(lb.get("ingress"), "status.loadBalancer.ingress", MAX_ADDRESSES)
        raw_lb = [
            i.get("ip")
            for i in ingress
            if isinstance(i, dict) and i.get("ip") and i.get("ipMode") != "Proxy"
        ]
        lb_ips = _addresses(raw_lb, "status.loadBalancer.ingress ip", notes)
        raw_ranges = _list(
            spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges", MAX_ADDRESSES
        )
        if not raw_ranges and annotations.get(SOURCE_RANGES_ANNOTATION):
            raw_ranges = _list(
                annotations[SOURCE_RANGES_ANNOTATION].split(","),
                f"annotation {SOURCE_RANGES_ANNOTATION}",
                MAX_ADDRESSES,
            )
        source_ranges = tuple(_net(r, "loadBalancerSourceRanges entry") for r in raw_ranges)

    affinity = SessionAffinity.NONE
    timeout = DEFAULT_AFFINITY_TIMEOUT
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = SessionAffinity.CLIENT_IP
        cfg = _dict(
            _dict(spec.get("sessionAffinityConfig"), "sessionAffinityConfig").get("clientIP"),
            "clientIP",
        )
        raw_timeout = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if (
            isinstance(raw_timeout, bool)
            or not isinstance(raw_timeout, int)
            or not 1 <= raw_timeout <= 86400
        ):
            raise _Invalid(
                f"sessionAffinityConfig.clientIP.timeoutSeconds {show(raw_timeout)} is not 1-86400"
            )
        timeout = raw_timeout
    elif spec.get("sessionAffinity") not in (None, "None"):
        raise _Invalid(
            f"spec.sessionAffinity {show(spec.get('sessionAffinity'))} is not None or ClientIP"
        )

    etp = _policy(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy")
    itp = _policy(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy")
    hc_port = None
    if (
        etp is TrafficPolicy.LOCAL
        and svc_type is ServiceType.LOAD_BALANCER
        and spec.get("healthCheckNodePort")
    ):
        hc_port = _port(spec.get("healthCheckNodePort"), "spec.healthCheckNodePort")
    traffic_distribution = _str(spec.get("trafficDistribution"), "spec.trafficDistribution")
    topology_mode = annotations.get(TOPOLOGY_MODE_ANNOTATION) or annotations.get(
        LEGACY_HINTS_ANNOTATION
    )
    kpy_annotations = tuple(
        sorted((k, v) for k, v in annotations.items() if k.startswith(KPY_ANNOTATION_PREFIX))
    )

    raw_ports = _list(spec.get("ports"), "spec.ports", MAX_PORTS)
    if not raw_ports and (headless or external_name):
        raw_ports = [{"name": "", "port": None}]  # portless headless/ExternalName: still shown
    ports: list[ServicePort] = []
    seen: set[tuple[str, Protocol]] = set()
    seen_numbers: set[tuple[int, Protocol]] = set()
    for index, raw in enumerate(raw_ports):
        what = f"spec.ports[{index}]"
        try:
            p = _dict(raw, what)
            port_name = _name(p.get("name"), f"{what}.name", "dns-1123-label", required=False)
            protocol = _protocol(p.get("protocol"), f"{what}.protocol")
            number = (
                0
                if p.get("port") is None and (headless or external_name)
                else _port(p.get("port"), f"{what}.port")
            )
            if (port_name, protocol) in seen:
                raise _Invalid(f"{what} duplicates port name {show(port_name)}/{protocol}")
            if number and (number, protocol) in seen_numbers:
                raise _Invalid(f"{what} duplicates port {number}/{protocol}")
            target_raw = p.get("targetPort", number)
            target: int | str = (
                target_raw
                if isinstance(target_raw, (int, str)) and not isinstance(target_raw, bool)
                else number
            )
            node_port = None
            if svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) and p.get("nodePort"):
                node_port = _port(p.get("nodePort"), f"{what}.nodePort")
        except _Invalid as exc:
            notes.append(str(exc))
            continue
        seen.add((port_name, protocol))
        if number:
            seen_numbers.add((number, protocol))
        ports.append(
            ServicePort(
                name=ServicePortName(
                    namespace=namespace, name=name, port=port_name, protocol=protocol
                ),
                type=svc_type,
                cluster_ips=cluster_ips,
                headless=headless,
                external_name=external_name,
                port=number,
                protocol=protocol,
                target_port=target,
                node_port=node_port,
                external_ips=external_ips,
                load_balancer_ips=lb_ips,
                load_balancer_source_ranges=source_ranges,
                session_affinity=affinity,
                affinity_timeout=timeout,
                external_traffic_policy=etp,
                internal_traffic_policy=itp,
                health_check_node_port=hc_port,
                traffic_distribution=traffic_distribution,
                topology_mode=topology_mode,
                annotations=kpy_annotations,
            )
        )
    problems = tuple(
        Problem(kind="Service", namespace=namespace, name=name, reason=n) for n in notes
    )
    return Service(name=svc_name, ports=tuple(ports), created=_created(meta)), problems


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")


def _created(meta: Mapping[str, Any]) -> str:
    """metadata.creationTimestamp when it is a well-formed UTC timestamp, else ""."""
    value = meta.get("creationTimestamp")
    if isinstance(value, str) and len(value) <= 40 and _RFC3339.fullmatch(value):
        return value
    return ""


def _policy(value: Any, what: str) -> TrafficPolicy:
    if value in (None, "", "Cluster"):
        return TrafficPolicy.CLUSTER
    if value == "Local":
        return TrafficPolicy.LOCAL
    raise _Invalid(f"{what} {show(value)} is not Cluster or Local")


# --------------------------------------------------------------------------- EndpointSlice


def endpoint_slice(obj: Any) -> tuple[EndpointSlice | None, tuple[Problem, ...]]:
    """Convert an EndpointSlice. None when skipped (FQDN, no service label, invalid)."""
    try:
        return _endpoint_slice(obj)
    except _Invalid as exc:
        namespace, name = identify(obj)  # only on error: it validates the names again
        return None, (
            Problem(kind="EndpointSlice", namespace=namespace, name=name, reason=str(exc)),
        )
    except Exception as exc:
        namespace, name = identify(obj)
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return None, (Problem(kind="EndpointSlice", namespace=namespace, name=name, reason=reason),)


def slice_service(obj: Any) -> str | None:
    """The Service an EndpointSlice belongs to (its kubernetes.io/service-name label)."""
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        labels = obj["metadata"].get("labels")
        if isinstance(labels, dict) and isinstance(labels.get(SERVICE_NAME_LABEL), str):
            return str(labels[SERVICE_NAME_LABEL])
    return None


def _endpoint_slice(obj: Any) -> tuple[EndpointSlice | None, tuple[Problem, ...]]:
    namespace, name, meta = _meta(obj, "EndpointSlice")
    labels = _str_map(meta.get("labels"), "metadata.labels")
    service_name = _name(
        labels.get(SERVICE_NAME_LABEL), f"label {SERVICE_NAME_LABEL}", "dns-1035-label"
    )
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        return None, ()
    if address_type not in ("IPv4", "IPv6"):
        raise _Invalid(f"addressType {show(address_type)} is not IPv4 or IPv6")
    family = IPFamily(address_type)
    notes: list[str] = []
    ports: list[SlicePort] = []
    seen: set[tuple[str, Protocol]] = set()
    for index, raw in enumerate(_list(obj.get("ports"), "ports", MAX_PORTS)):
        what = f"ports[{index}]"
        try:
            p = _dict(raw, what)
            port = SlicePort(
                name=_name(p.get("name"), f"{what}.name", "dns-1123-label", required=False),
                port=_port(p.get("port"), f"{what}.port"),
                protocol=_protocol(p.get("protocol"), f"{what}.protocol"),
            )
            if (port.name, port.protocol) in seen:
                raise _Invalid(f"{what} duplicates port name {show(port.name)}/{port.protocol}")
        except _Invalid as exc:
            notes.append(str(exc))
            continue
        seen.add((port.name, port.protocol))
        ports.append(port)
    parsed: list[_Fields] = []
    for index, raw in enumerate(_list(obj.get("endpoints"), "endpoints", MAX_ENDPOINTS)):
        try:
            parsed.append(_slice_endpoint(raw, index, family))
        except _Invalid as exc:
            notes.append(str(exc))
    endpoints = tuple(
        tuple(
            Endpoint(
                ip=ip,
                port=sp.port,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=node_name,
                zone=zone,
                hints=zones,
                node_hints=nodes,
                hostname=hostname,
            )
            for ip, ready, serving, terminating, node_name, zone, zones, nodes, hostname in parsed
        )
        for sp in ports
    )
    problems = tuple(
        Problem(kind="EndpointSlice", namespace=namespace, name=name, reason=n) for n in notes
    )
    result = EndpointSlice(
        namespace=namespace,
        name=name,
        service=service_name,
        family=family,
        ports=tuple(ports),
        endpoints=endpoints,
    )
    return result, problems


def _bool(value: Any, what: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(f"{what} {show(value)} is not a boolean")
    return value


# An endpoint's fields but its port: ip, ready, serving, terminating, node name, zone,
# zone hints, node hints, hostname.
_Fields = tuple[
    IPAddress, bool, bool, bool, str | None, str | None, frozenset[str], frozenset[str], str | None
]

# Node names already found valid (a cluster has few; every endpoint names one).
_VALID_NODE_NAMES: set[str] = set()
_MAX_VALID_NODE_NAMES = 65536


def _slice_endpoint(raw: Any, index: int, family: IPFamily) -> _Fields:
    """The fields of one slice endpoint, shared by the Endpoint of every slice port.

    Hot path for a large initial list: the common well-typed shape is checked inline and
    error messages are formatted only when something is wrong.
    """
    what = f"endpoints[{index}]"
    raw = _dict(raw, what)
    addresses = raw.get("addresses")
    if type(addresses) is not list or not addresses or len(addresses) > MAX_ENDPOINT_ADDRESSES:
        _list(addresses, f"{what}.addresses", MAX_ENDPOINT_ADDRESSES)  # a wrong type, too many
        raise _Invalid(f"{what}.addresses is empty")
    first = addresses[0]
    ip = _ipv4_fast(first) if type(first) is str else None
    if ip is None:
        ip = _ip(first, f"{what}.addresses[0]")
    if (ip.version == 4) is not (family is IPFamily.IPV4):
        raise _Invalid(f"{what}.addresses[0] {ip} is not {family}")
    cond = raw.get("conditions")
    if cond is None:
        ready, serving, terminating = True, True, False
    else:
        cond = _dict(cond, f"{what}.conditions")
        r, sv, t = cond.get("ready"), cond.get("serving"), cond.get("terminating")
        if not all(v is None or v is True or v is False for v in (r, sv, t)):
            r = _bool(r, f"{what}.conditions.ready", True)
            sv = _bool(sv, f"{what}.conditions.serving", r)
            t = _bool(t, f"{what}.conditions.terminating", False)
        ready = True if r is None else r
        serving = ready if sv is None else sv
        terminating = bool(t)
    zones: frozenset[str] = _EMPTY
    nodes: frozenset[str] = _EMPTY
    if raw.get("hints") is not None:
        hints = _dict(raw.get("hints"), f"{what}.hints")
        zones = frozenset(
            z["name"]
            for z in _list(hints.get("forZones"), f"{what}.hints.forZones", MAX_HINTS)
            if isinstance(z, dict) and isinstance(z.get("name"), str)
        )
        nodes = frozenset(
            n["name"]
            for n in _list(hints.get("forNodes"), f"{what}.hints.forNodes", MAX_HINTS)
            if isinstance(n, dict) and isinstance(n.get("name"), str)
        )
    node_name, zone, hostname = raw.get("nodeName"), raw.get("zone"), raw.get("hostname")
    if zone is not None and (type(zone) is not str or len(zone) > MAX_NAME):
        _str(zone, f"{what}.zone")
    if node_name is not None and node_name not in _VALID_NODE_NAMES:
        if type(node_name) is not str or not valid_name(node_name, "dns-1123-subdomain"):
            _name(node_name, f"{what}.nodeName", "dns-1123-subdomain", required=False)
        elif len(_VALID_NODE_NAMES) < _MAX_VALID_NODE_NAMES:
            _VALID_NODE_NAMES.add(node_name)
    if hostname is not None and (
        type(hostname) is not str or not valid_name(hostname, "dns-1123-label")
    ):
        _name(hostname, f"{what}.hostname", "dns-1123-label", required=False)
    return (
        ip,
        ready,
        serving,
        terminating,
        node_name or None,
        zone or None,
        zones,
        nodes,
        hostname or None,
    )


def _rank(ep: Endpoint) -> tuple[bool, bool, bool]:
    return (ep.ready, ep.serving, not ep.terminating)


def endpoints_for(port: ServicePort, slices: Iterable[EndpointSlice]) -> tuple[Endpoint, ...]:
    """The merged, de-duplicated endpoints of one service port over all its slices."""
    # Keyed by the sort key, which names the (address, port) pair too: no second key
    # computation to sort, and no hashing of address objects.
    found: dict[tuple[int, int, int], Endpoint] = {}
    want_name, want_proto = port.name.port, port.protocol
    for s in slices:
        for sp, endpoints in zip(s.ports, s.endpoints, strict=True):
            if sp.name != want_name or sp.protocol is not want_proto:
                continue
            for ep in endpoints:
                key = ep.sort_key()
                old = found.get(key)
                if old is None or _rank(ep) > _rank(old):
                    found[key] = ep
    return tuple(found[key] for key in sorted(found))


# --------------------------------------------------------------------------- Node


def node(obj: Any) -> tuple[NodeInfo | None, tuple[Problem, ...]]:
    """Convert a Node. Invalid addresses are skipped with a Problem each."""
    namespace, name = identify(obj)
    try:
        _, name, meta = _meta(obj, "Node")
        labels = _str_map(meta.get("labels"), "metadata.labels")
        spec = _dict(obj.get("spec"), "spec")
        status = _dict(obj.get("status"), "status")
        notes: list[str] = []
        addresses: list[IPAddress] = []
        raw_addresses = _list(status.get("addresses"), "status.addresses", 64)
        for wanted in ("InternalIP", "ExternalIP"):
            for a in raw_addresses:
                if isinstance(a, dict) and a.get("type") == wanted:
                    for ip in _addresses([a.get("address")], f"status.addresses {wanted}", notes):
                        if ip not in addresses:
                            addresses.append(ip)
        cidrs_raw = _list(spec.get("podCIDRs"), "spec.podCIDRs", 2) or (
            [spec["podCIDR"]] if spec.get("podCIDR") else []
        )
        cidrs = []
        for c in cidrs_raw:
            try:
                cidrs.append(_net(c, "spec.podCIDRs entry"))
            except _Invalid as exc:
                notes.append(str(exc))
        info = NodeInfo(
            name=name,
            addresses=tuple(addresses),
            zone=labels.get(ZONE_LABEL),
            pod_cidrs=tuple(cidrs),
            labels=tuple(sorted(labels.items())),
        )
        return info, tuple(Problem(kind="Node", namespace="", name=name, reason=n) for n in notes)
    except _Invalid as exc:
        return None, (Problem(kind="Node", namespace=namespace, name=name, reason=str(exc)),)
    except Exception as exc:
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return None, (Problem(kind="Node", namespace=namespace, name=name, reason=reason),)


# --------------------------------------------------------------------------- ServiceCIDR

MAX_SERVICE_CIDRS = 2  # spec.cidrs: one per family, as the API validates it


def service_cidr(obj: Any) -> tuple[tuple[IPNetwork, ...] | None, tuple[Problem, ...]]:
    """Convert a ServiceCIDR (networking.k8s.io/v1): its ``spec.cidrs``, validated as
    the API server validates them — one or two CIDRs, each a network address (no host
    bits), two of different families. None (and a Problem) when any of that fails: a
    bad ServiceCIDR costs only itself.

    One being deleted (``metadata.deletionTimestamp`` set) still counts, as upstream
    kube-proxy counts it: the API server keeps it while Services hold addresses in it,
    and addresses in it that no Service has are still no one's."""
    name = identify(obj)[1]
    try:
        _, name, _ = _meta(obj, "ServiceCIDR")
        spec = _dict(obj.get("spec"), "spec")
        raw = _list(spec.get("cidrs"), "spec.cidrs", MAX_SERVICE_CIDRS)
        if not raw:
            raise _Invalid("spec.cidrs is empty: at least one CIDR is required")
        cidrs: list[IPNetwork] = []
        for index, value in enumerate(raw):
            what = f"spec.cidrs[{index}]"
            if not isinstance(value, str):
                raise _Invalid(f"{what} {show(value)} is not a string")
            try:
                net = ipaddress.ip_network(value, strict=True)
            except ValueError:
                raise _Invalid(
                    f"{what} {show(value)} is not a CIDR with its network address "
                    "(e.g. 10.96.0.0/16 or fd00:96::/108)"
                ) from None
            cidrs.append(net)
        if len(cidrs) == 2 and cidrs[0].version == cidrs[1].version:
            raise _Invalid(
                f"spec.cidrs {show(raw[0])} and {show(raw[1])} are of one family: "
                "at most one CIDR per IP family"
            )
        return tuple(cidrs), ()
    except _Invalid as exc:
        return None, (Problem(kind="ServiceCIDR", namespace="", name=name, reason=str(exc)),)
    except Exception as exc:
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return None, (Problem(kind="ServiceCIDR", namespace="", name=name, reason=reason),)


def services_by_name(services: Iterable[Service]) -> Mapping[ServiceName, Service]:
    return {s.name: s for s in services}
