"""Read ``nft -j list`` output back into the keys and values render produces.

Pure parsing of the JSON nftables prints (or :mod:`kpy_nftables.netlink_read` yields);
reading the kernel is the callers' job. A chain's value is the fingerprint its
``fingerprints`` element holds (see :mod:`kpy_nftables.render`) — unless the rules the
kernel holds in it (their count and digest, read over netlink:
:meth:`kpy_nftables.netlink_read.NetlinkReader.rules`) say otherwise: a chain holding
another number of rules than its fingerprint records gets a value no render produces,
so the next full sync rewrites it. Set and map elements are read exactly, and the
dump's endpoints come from ``service-endpoints``.

:func:`parse` also checks what the kernel holds against itself, for ``kpy dump`` (which
has no record of what the agent wrote): rule counts against fingerprints, chains
against fingerprints, every endpoint's hairpin element, every external frontend's
masquerade element, every firewall chain's element. What it finds is reported per
service port (``extra["drift"]`` of its view) and for the node (the view
:data:`NODE_VIEW`).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kpy.core.backend import ServiceView, frontend
from kpy_nftables import render

JSON = dict[str, Any]
# (rule count, digest) per (family, table, chain): what NetlinkReader.rules() reads
RuleCounts = Mapping[tuple[str, str, str], tuple[int, bytes]]
NO_RULES = (0, b"")  # a chain the rule dump did not mention holds no rule
NODE_VIEW = "(nftables tables)"  # the dump's row for drift outside any service port


@dataclass
class Observed:
    """What the kernel holds in kpy's tables."""

    values: dict[str, str] = field(default_factory=dict)  # key → value, as render keys them
    frontends: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    endpoints: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    rejecting: dict[str, str] = field(default_factory=dict)  # frontend → "reject"/"drop"
    tables: set[str] = field(default_factory=set)  # families with a kpy base table
    # chain key → (rule count, digest) the kernel holds, when rules were read
    rules: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    # str(ServicePortName), or NODE_VIEW → what differs from what kpy writes
    drift: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # for the consistency checks: (family, table) of every table seen, per-port counts
    seen_tables: set[tuple[str, str]] = field(default_factory=set)
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    endpoint_ips: list[tuple[str, str, str]] = field(default_factory=list)
    fw_targets: set[tuple[str, str]] = field(default_factory=set)  # (family, chain)
    chain_ids: list[tuple[str, str, str, str]] = field(default_factory=list)  # + its key


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


def rule_count(fingerprint: str) -> int | None:
    """The number of rules a chain fingerprint (``kpy:<hash>:<n>``) records."""
    _, _, count = fingerprint.rpartition(":")
    return int(count) if count.isdigit() else None


def parse(documents: Iterable[JSON], rules: RuleCounts | None = None) -> Observed:
    """Merge ``nft -j list …`` outputs (chains, set and map definitions, elements) of
    the base and shard tables; other tables are ignored. With ``rules`` (what the
    kernel's chains hold), a chain whose rule count differs from its fingerprint's is
    given a value no render produces (drift)."""
    result = Observed()
    chains: set[tuple[str, str, str]] = set()
    fingerprints: dict[tuple[str, str], str] = {}
    for doc in documents:
        for item in doc.get("nftables", []):
            if "table" in item:
                t = item["table"]
                if t.get("family") in render.FAMILIES and render.is_kpy_table(t.get("name", "")):
                    result.seen_tables.add((t["family"], t["name"]))
                    if t["name"] == render.TABLE:
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
    unclaimed = set(fingerprints)
    for family, table, name in sorted(chains):
        if table == render.TABLE:
            result.tables.add(family)
        result.seen_tables.add((family, table))
        key = render.Chain(family, name, (), table=table).key
        fp_key = (family, render.fingerprint_key(key))
        unclaimed.discard(fp_key)
        fingerprint = fingerprints.get(fp_key)
        value = fingerprint or render.CHAIN_ONLY
        owner = render.parse_chain_label(name) or NODE_VIEW
        if fingerprint is None:
            result.drift[owner].append(f"{key}: no fingerprint")
        if (
            name.startswith("firewall-")
            and owner != NODE_VIEW
            and (family, name) not in result.fw_targets
        ):
            result.drift[owner].append(f"{key}: no firewall-ips element uses it")
        result.values[key] = value
        result.chain_ids.append((family, table, name, key))
    _check(result, unclaimed)
    if rules is not None:
        check_rules(result, rules)
    return result


def check_rules(result: Observed, rules: RuleCounts) -> None:
    """Record what every chain of ``result`` holds (``rules``: read after, or while,
    the rest was), and give a chain holding another number of rules than its
    fingerprint records a value no render produces (drift)."""
    for family, table, name, key in result.chain_ids:
        count, digest = rules.get((family, table, name), NO_RULES)
        result.rules[key] = (count, digest)
        value = result.values[key]
        want = rule_count(value) if value != render.CHAIN_ONLY else None
        if want is not None and count != want:
            result.values[key] = f"{value} but {count} rules"
            owner = render.parse_chain_label(name) or NODE_VIEW
            result.drift[owner].append(f"{key}: {count} of {want} rules")


def _check(result: Observed, unclaimed: set[tuple[str, str]]) -> None:
    """What the kernel holds, checked against itself (see the module docstring)."""
    if unclaimed:
        result.drift[NODE_VIEW].append(
            f"{len(unclaimed)} chains recorded in the fingerprints sets are missing"
        )
    for family, table in sorted(result.seen_tables):
        if table != render.TABLE and family not in result.tables:
            result.drift[NODE_VIEW].append(f"{family} {table} without the base table")
            break
    for family, label, ip in result.endpoint_ips:
        where = family  # the hairpin set is in the base table
        if f"{where} element {render.HAIRPIN} {ip} . {ip}" not in result.values:
            result.drift[label].append(f"{family}: no hairpin element for {ip}")
    counts = result.counts
    for family, label, what in list(counts):
        if what != "to-service-ips":
            continue
        masq = counts[(family, label, render.MASQ_IPS)]
        if masq != counts[(family, label, what)] - 1:
            result.drift[label].append(f"{family}: {masq} {render.MASQ_IPS} elements")
    for family, label, what in list(counts):
        if what == "to-service-nodeports":
            masq = counts[(family, label, render.MASQ_NODEPORTS)]
            if masq != counts[(family, label, what)]:
                result.drift[label].append(f"{family}: {masq} {render.MASQ_NODEPORTS} elements")
        elif what in (render.MASQ_IPS, render.MASQ_NODEPORTS):
            dispatch = "to-service-ips" if what == render.MASQ_IPS else "to-service-nodeports"
            if (family, label, dispatch) not in counts:
                result.drift[label].append(
                    f"{family}: {counts[(family, label, what)]} {what} elements"
                )


def _parse_endpoint(result: Observed, family: str, element: str, comment: str) -> None:
    """Record ``10.244.1.5 . 8080 . <hash>`` (a ``service-endpoints`` element) for the dump."""
    parts = [p.strip() for p in element.split(" . ")]
    label = render.parse_label(comment)
    if len(parts) != 3 or label is None:
        return
    host = f"[{parts[0]}]" if family == "ip6" else parts[0]
    result.endpoints[label].add(f"{host}:{parts[1]}")
    result.endpoint_ips.append((family, label, parts[0]))


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
            elif name in (render.MASQ_IPS, render.MASQ_NODEPORTS):
                label = render.parse_label(comment)
                if label is not None:
                    result.counts[(family, label, name)] += 1
            result.values[f"{where} element {name} {element}"] = f" # {comment}"
            continue
        if not isinstance(entry, list) or len(entry) != 2:
            continue
        element, comment = _element(entry[0])
        verdict = _verdict(entry[1]) if isinstance(entry[1], dict) else str(entry[1])
        result.values[f"{where} element {name} {element}"] = f"{verdict} # {comment}"
        label = render.parse_label(comment)
        if name == render.FIREWALL_IPS and verdict.startswith("goto "):
            result.fw_targets.add((family, verdict.removeprefix("goto ")))
        if label is not None and verdict.startswith("goto service-"):
            if name == render.SERVICE_IPS:
                result.counts[(family, label, "to-service-ips")] += 1
            elif name == render.SERVICE_NODEPORTS:
                result.counts[(family, label, "to-service-nodeports")] += 1
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
    """``kpy dump``'s view per service port (and :data:`NODE_VIEW` for drift outside
    any port); ``extra["drift"]`` says what differs from what kpy writes."""
    result: dict[str, ServiceView] = {}
    drift = {k: v for k, v in observed.drift.items() if v}
    for label in sorted(set(observed.frontends) | set(observed.endpoints) | set(drift)):
        fronts = tuple(sorted(observed.frontends.get(label, ())))
        extra = {fe: observed.rejecting[fe] for fe in fronts if fe in observed.rejecting}
        if label in drift:
            extra["drift"] = "; ".join(drift[label])
        result[label] = ServiceView(
            frontends=fronts,
            endpoints=tuple(sorted(observed.endpoints.get(label, ()))),
            extra=extra,
        )
    return result
