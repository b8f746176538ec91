"""Read ``nft -j list`` output back into the keys and values render produces.

Pure parsing of the JSON nftables prints; running ``nft`` is :mod:`kpy_nftables.apply`'s
job. No rule is read (the kernel is slow to list them): a chain's value is the
fingerprint its ``fingerprints`` element holds (see :mod:`kpy_nftables.render`), set and
map elements are read exactly, and the dump's endpoints come from ``service-endpoints``.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kpy.backend import ServiceView, frontend
from kpy_nftables import render

JSON = dict[str, Any]


@dataclass
class Observed:
    """What the kernel holds in kpy's tables."""

    values: dict[str, str] = field(default_factory=dict)  # key → value, as render keys them
    frontends: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    endpoints: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    rejecting: dict[str, str] = field(default_factory=dict)  # frontend → "reject"/"drop"
    tables: set[str] = field(default_factory=set)  # families with a kpy base table


def _verdict(data: JSON) -> str:
    for word in ("goto", "jump"):
        if word in data:
            return f"{word} {data[word]['target']}"
    return next(iter(data))  # "drop", "accept", "return"


def _element_text(value: Any) -> str:
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(str(v) for v in value["concat"])
    return str(value)


def _frontend(map_name: str, element: str) -> str | None:
    parts = [p.strip() for p in element.split(" . ")]
    if map_name in (render.SERVICE_NODEPORTS, render.NO_EP_NODEPORTS) and len(parts) == 2:
        return frontend(None, int(parts[1]), parts[0].upper())
    if len(parts) == 3:
        return frontend(ipaddress.ip_address(parts[0]), int(parts[2]), parts[1].upper())
    return None


def _ours(obj: JSON) -> bool:
    """In one of kpy's tables: the base or a shard table of family ip or ip6 (an
    ``inet kpy`` or ``netdev kpy-1`` table is someone else's)."""
    return obj.get("family") in render.FAMILIES and render.is_kpy_table(obj.get("table", ""))


def parse(documents: Iterable[JSON]) -> Observed:
    """Merge ``nft -j list …`` outputs (chains, set and map definitions, elements) of
    the base and shard tables; other tables are ignored."""
    result = Observed()
    chains: set[tuple[str, str, str]] = set()
    fingerprints: dict[tuple[str, str], str] = {}
    for doc in documents:
        for item in doc.get("nftables", []):
            if "table" in item:
                t = item["table"]
                if t.get("name") == render.TABLE and t.get("family") in render.FAMILIES:
                    result.tables.add(t["family"])
            elif "chain" in item:
                c = item["chain"]
                if _ours(c):
                    chains.add((c["family"], c["table"], c["name"]))
            elif "set" in item or "map" in item:
                kind = "set" if "set" in item else "map"
                s = item[kind]
                if _ours(s):
                    _parse_set(result, kind, s, fingerprints)
    for family, table, name in sorted(chains):
        if table == render.TABLE:
            result.tables.add(family)
        key = render.Chain(family, name, (), table=table).key
        fingerprint = fingerprints.get((family, render.fingerprint_key(key)))
        result.values[key] = fingerprint or render.CHAIN_ONLY
    return result


def _parse_endpoint(result: Observed, family: str, element: str, comment: str) -> None:
    """Record ``10.244.1.5 . 8080 . <hash>`` (a ``service-endpoints`` element) for the dump."""
    parts = [p.strip() for p in element.split(" . ")]
    label = render.parse_label(comment)
    if len(parts) != 3 or label is None:
        return
    host = f"[{parts[0]}]" if family == "ip6" else parts[0]
    result.endpoints[label].add(f"{host}:{parts[1]}")


def _parse_set(
    result: Observed, kind: str, s: JSON, fingerprints: dict[tuple[str, str], str]
) -> None:
    family, name = s["family"], s["name"]
    where = family if s["table"] == render.TABLE else f"{family} {s['table']}"
    type_ = s["type"]
    type_text = " . ".join(type_) if isinstance(type_, list) else str(type_)
    timeout = s.get("timeout")
    result.values[f"{where} {kind} {name}"] = render.set_value(
        type_text, int(timeout) if timeout is not None and kind == "set" else None
    )
    if kind == "set" and timeout is not None:
        # an affinity set (kpy's only sets with a timeout; nft -j does not print their
        # "dynamic" flag): its elements are clients the kernel added, not state
        return
    for entry in s.get("elem", []):
        if kind == "set":
            element, comment = _element(entry)
            if name == render.FINGERPRINTS:
                element = ipaddress.IPv6Address(element).exploded
                fingerprints[(family, element)] = comment
            elif name == render.SERVICE_ENDPOINTS:
                _parse_endpoint(result, family, element, comment)
            result.values[f"{where} element {name} {element}"] = f" # {comment}"
            continue
        if not isinstance(entry, list) or len(entry) != 2:
            continue
        element, comment = _element(entry[0])
        verdict = _verdict(entry[1]) if isinstance(entry[1], dict) else str(entry[1])
        result.values[f"{where} element {name} {element}"] = f"{verdict} # {comment}"
        label = render.parse_label(comment)
        fe = _frontend(name, element)
        if label is None or fe is None or name == render.FIREWALL_IPS:
            continue
        result.frontends[label].add(fe)
        if name in (render.NO_EP_SERVICES, render.NO_EP_NODEPORTS):
            result.rejecting[fe] = "reject" if verdict.endswith(render.REJECT) else verdict


def _element(data: Any) -> tuple[str, str]:
    """An element's key text and comment."""
    if isinstance(data, dict) and "elem" in data:
        return _element_text(data["elem"]["val"]), str(data["elem"].get("comment", ""))
    return _element_text(data), ""


def views(observed: Observed) -> Mapping[str, ServiceView]:
    """``kpy dump``'s view per service port."""
    result: dict[str, ServiceView] = {}
    for label in sorted(set(observed.frontends) | set(observed.endpoints)):
        fronts = tuple(sorted(observed.frontends.get(label, ())))
        extra = {fe: observed.rejecting[fe] for fe in fronts if fe in observed.rejecting}
        result[label] = ServiceView(
            frontends=fronts,
            endpoints=tuple(sorted(observed.endpoints.get(label, ()))),
            extra=extra,
        )
    return result
