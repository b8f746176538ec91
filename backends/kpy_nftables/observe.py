"""What the kernel holds, as the keys and values render produces (:class:`Observed`).

Pure: :class:`Reading` takes the kernel's objects one by one — tables, chains, set and
map definitions, elements — and :meth:`Reading.finish` makes the :class:`Observed`.
:meth:`kpy_nftables.netlink_read.NetlinkReader.observe` feeds it straight from netlink
messages; :func:`parse` from the JSON ``nft -j list`` prints (the backend with
``nftables_writer=nft``). Reading the kernel is the callers' job.

A chain's value is the fingerprint its ``fingerprints`` element holds (see
:mod:`kpy_nftables.render`) — unless the rules the kernel holds in it (their count and
digest, read over netlink: :meth:`kpy_nftables.netlink_read.NetlinkReader.rules`) say
otherwise: a chain holding another number of rules than its fingerprint records gets a
value no render produces, so the next full sync rewrites it. Set and map elements are
read exactly, and the dump's endpoints come from ``service-endpoints``.

:meth:`Reading.finish` also checks what the kernel holds against itself, for
``kpy dump`` (which has no record of what the agent wrote): rule counts against fingerprints,
chains against fingerprints, every endpoint's hairpin element, every external frontend's
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


def rule_count(fingerprint: str) -> int | None:
    """The number of rules a chain fingerprint (``kpy:<hash>:<n>``) records."""
    _, _, count = fingerprint.rpartition(":")
    return int(count) if count.isdigit() else None


class Reading:
    """What the kernel holds, read object by object into an :class:`Observed`: tables,
    chains, set and map definitions and their elements, in any order (a set's elements
    after its definition), then :meth:`finish`. Objects outside kpy's tables (another
    family or table name) are ignored. Both readers feed one: :func:`parse` from
    ``nft -j`` documents, :meth:`kpy_nftables.netlink_read.NetlinkReader.observe` from
    netlink messages.

    Without ``views`` only what a sync compares is made — keys, values, rule counts —
    not the dump's per-port views nor the checks of the kernel against itself (at
    100,000 Services they cost a third of the read and ~100 MB). Equal values are kept
    once either way."""

    __slots__ = ("chains", "fingerprints", "result", "texts", "views")

    def __init__(self, *, views: bool = True) -> None:
        self.result = Observed()
        self.chains: set[tuple[str, str, str]] = set()
        self.fingerprints: dict[tuple[str, str], str] = {}
        self.views = views
        self.texts: dict[str, str] = {}  # one copy of each value

    def table(self, family: str, name: str) -> None:
        if family in render.FAMILIES and render.is_kpy_table(name):
            self.result.seen_tables.add((family, name))
            if name == render.TABLE:
                self.result.tables.add(family)

    def chain(self, family: str, table: str, name: str) -> None:
        if family in render.FAMILIES and render.is_kpy_table(table):
            self.chains.add((family, table, name))

    def set(
        self, kind: str, family: str, table: str, name: str, type_: str, timeout: int | None
    ) -> SetReading | None:
        """A set's (``kind`` "set") or map's definition: ``type_`` as render writes it
        (``"ipv4_addr . inet_proto . inet_service"``), ``timeout`` in seconds. Returns
        what reads its elements, None when they are not read (not kpy's, or an affinity
        set: kpy's only sets with a timeout, whose elements are clients the kernel
        added, not state)."""
        if family not in render.FAMILIES or not render.is_kpy_table(table):
            return None
        where = family if table == render.TABLE else f"{family} {table}"
        dynamic = kind == "set" and timeout is not None
        self.result.values[f"{where} {kind} {name}"] = render.set_value(
            type_, timeout if dynamic else None
        )
        return None if dynamic else SetReading(self, kind, family, where, name)

    def finish(self, rules: RuleCounts | None = None) -> Observed:
        """Everything read: each chain's value from its fingerprint, the checks of what
        the kernel holds against itself, and with ``rules`` (what the kernel's chains
        hold) a chain whose rule count differs from its fingerprint's given a value no
        render produces (drift)."""
        result = self.result
        unclaimed = set(self.fingerprints)
        for family, table, name in sorted(self.chains):
            if table == render.TABLE:
                result.tables.add(family)
            result.seen_tables.add((family, table))
            key = render.Chain(family, name, (), table=table).key
            fp_key = (family, render.fingerprint_key(key))
            unclaimed.discard(fp_key)
            fingerprint = self.fingerprints.get(fp_key)
            value = fingerprint or render.CHAIN_ONLY
            result.values[key] = value
            result.chain_ids.append((family, table, name, key))
            if not self.views:
                continue
            owner = render.parse_chain_label(name) or NODE_VIEW
            if fingerprint is None:
                result.drift[owner].append(f"{key}: no fingerprint")
            if (
                name.startswith("firewall-")
                and owner != NODE_VIEW
                and (family, name) not in result.fw_targets
            ):
                result.drift[owner].append(f"{key}: no firewall-ips element uses it")
        if self.views:
            _check(result, unclaimed)
        if rules is not None:
            check_rules(result, rules)
        return result


class SetReading:
    """The elements of one set or map, each read by :meth:`element`."""

    __slots__ = ("family", "kind", "name", "prefix", "reading")

    def __init__(self, reading: Reading, kind: str, family: str, where: str, name: str) -> None:
        self.reading = reading
        self.kind = kind
        self.family = family
        self.name = name
        self.prefix = f"{where} element {name} "

    def element(self, element: str, comment: str, verdict: str | None) -> None:
        """One element: its key as render writes it (``"10.96.0.1 . tcp . 80"``; a
        ``fingerprints`` key exploded), its comment ("" for none), its verdict in a map
        (``"goto service-…"``, ``"drop"``)."""
        reading = self.reading
        result = reading.result
        name = self.name
        family = self.family
        if self.kind == "set":
            value = f" # {comment}"
            result.values[self.prefix + element] = reading.texts.setdefault(value, value)
            if name == render.FINGERPRINTS:
                reading.fingerprints[(family, element)] = comment
            elif not reading.views:
                return
            elif name == render.SERVICE_ENDPOINTS:
                _parse_endpoint(result, family, element, comment)
            elif name in (render.MASQ_IPS, render.MASQ_NODEPORTS):
                label = render.parse_label(comment)
                if label is not None:
                    result.counts[(family, label, name)] += 1
            return
        if verdict is None:
            return  # a map element without data: not render's
        value = f"{verdict} # {comment}"
        result.values[self.prefix + element] = reading.texts.setdefault(value, value)
        if not reading.views:
            return
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
            return
        result.frontends[label].add(fe)
        if name in (render.NO_EP_SERVICES, render.NO_EP_NODEPORTS):
            result.rejecting[fe] = "reject" if verdict.endswith(render.REJECT) else verdict


def parse(documents: Iterable[JSON], rules: RuleCounts | None = None) -> Observed:
    """Merge ``nft -j list …`` outputs (chains, set and map definitions, elements) of
    the base and shard tables; other tables are ignored. With ``rules`` (what the
    kernel's chains hold), a chain whose rule count differs from its fingerprint's is
    given a value no render produces (drift)."""
    reading = Reading()
    for doc in documents:
        for item in doc.get("nftables", []):
            if "table" in item:
                t = item["table"]
                reading.table(t.get("family", ""), t.get("name", ""))
            elif "chain" in item:
                c = item["chain"]
                reading.chain(c.get("family", ""), c.get("table", ""), c.get("name", ""))
            elif "set" in item or "map" in item:
                kind = "set" if "set" in item else "map"
                _parse_set(reading, kind, item[kind])
    return reading.finish(rules)


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


def _parse_set(reading: Reading, kind: str, s: JSON) -> None:
    """A set or map of ``nft -j`` output, with the elements it lists."""
    type_ = s.get("type", "")
    type_text = " . ".join(type_) if isinstance(type_, list) else str(type_)
    timeout = s.get("timeout")
    elements = reading.set(
        kind,
        s.get("family", ""),
        s.get("table", ""),
        s.get("name", ""),
        type_text,
        int(timeout) if timeout is not None else None,
    )
    if elements is None:
        return
    for entry in s.get("elem", []):
        if kind == "set":
            element, comment = _element(entry)
            if elements.name == render.FINGERPRINTS:
                element = ipaddress.IPv6Address(element).exploded
            elements.element(element, comment, None)
        elif isinstance(entry, list) and len(entry) == 2:
            element, comment = _element(entry[0])
            verdict = _verdict(entry[1]) if isinstance(entry[1], dict) else str(entry[1])
            elements.element(element, comment, verdict)


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
