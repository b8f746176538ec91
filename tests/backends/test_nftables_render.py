"""Pure properties of render's transactions (:func:`kpy_nftables.render.transaction`)
and rules."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
from kpy_nftables import render

from kpy.core import trace as ex
from kpy.core.backend import BackendConfig
from kpy.testing import builders as b
from tests.backends.test_nftables_netlink import CASES
from tests.backends.test_parity_detect_local import MODES


def _want(n: int) -> dict[str, render.Obj]:
    config = BackendConfig(node_name="node-a")
    want = dict(render.base_objects(config))
    for state in b.synthetic_states(n):
        want.update(render.port_objects(state, config))
    return want


def test_grouped_elements_are_the_same_elements_in_fewer_commands() -> None:
    want = _want(300)  # 1,500 endpoints: more than one group in hairpin
    single = render.transaction(want, {}, want)
    grouped = render.transaction(want, {}, want, group=True)
    assert grouped.ops == single.ops
    assert (grouped.line_count, single.line_count) == (len(grouped.lines), len(single.lines))

    def elements(lines: tuple[str, ...]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in lines:
            if line.startswith("add element "):
                head, _, body = line.partition(" { ")
                found.setdefault(head, []).extend(body.removesuffix(" }").split(", "))
        return found

    assert elements(grouped.lines) == elements(single.lines)
    endpoints = [ln for ln in grouped.lines if ln.startswith("add element ip kpy hairpin ")]
    assert len(endpoints) == 2  # 1,500 IPv4 elements: 1,000 + 500
    assert max(ln.count(", ") + 1 for ln in endpoints) == render.GROUP
    commands = [ln for ln in grouped.lines if ln.startswith("add element ")]
    per_set = elements(single.lines)
    assert len(commands) == sum(-(-len(v) // render.GROUP) for v in per_set.values())
    # everything but the elements is unchanged, in the same order
    rest = [ln for ln in single.lines if not ln.startswith("add element ")]
    assert [ln for ln in grouped.lines if not ln.startswith("add element ")] == rest


def test_removals_are_grouped_too() -> None:
    want = _want(50)
    have = {key: obj.value for key, obj in want.items()}
    gone = render.transaction({}, have, have, group=True)
    deletions = [ln for ln in gone.lines if ln.startswith("delete element ")]
    assert gone.line_count == len(gone.lines)
    assert deletions and all(", " in ln for ln in deletions if " hairpin " in ln)


def test_a_fresh_sync_writes_every_object_once_and_elements_after_chains() -> None:
    config = BackendConfig(node_name="node-a")
    n = b.node()
    a = b.state(
        b.service("a", cluster_ip="10.96.1.1", affinity=True), [b.endpoint("10.244.1.5")], n
    )
    shared = b.state(b.service("b", cluster_ip="10.96.1.2"), [b.endpoint("10.244.1.5")], n)
    ports = [render.port_objects(s, config) for s in (a, shared)]
    base = dict(render.base_objects(config))
    fresh = render.Fresh(render.transaction(base, {}, base, group=True), iter(ports))
    lines = list(fresh.iter_lines())
    assert fresh.line_count == len(lines)
    # the ordinary transaction of the same objects adds the same things
    everything = {**base, **ports[0], **ports[1]}
    assert fresh.ops == render.transaction(everything, {}, everything).ops == len(everything)
    hairpin = [ln for ln in lines if " hairpin { " in ln and ln.startswith("add element")]
    assert len(hairpin) == 1 and hairpin[0].count("10.244.1.5 . 10.244.1.5") == 1
    last_definition = max(
        i for i, ln in enumerate(lines) if ln.startswith(("add chain", "add rule", "add set"))
    )
    first_port_element = min(
        i for i, ln in enumerate(lines) if ln.startswith("add element") and "10.96.1." in ln
    )
    assert last_definition < first_port_element


def test_the_halves_of_a_fresh_sync_split_it_by_table_in_order() -> None:
    config = BackendConfig(node_name="node-a")
    ports = [render.port_objects(s, config) for s in b.synthetic_states(40)]
    base = dict(render.base_objects(config))

    def fresh() -> render.Fresh:
        return render.Fresh(render.transaction(base, {}, base, group=True), iter(ports))

    whole = list(fresh().iter_lines())
    first, second = (list(h) for h in fresh().halves())
    assert sorted(first + second) == sorted(whole)
    assert [ln for ln in whole if ln in set(first)] == first  # order kept in each half

    def tables(lines: list[str]) -> set[str]:
        return {ln.split()[3] for ln in lines}

    split = render.SHARDS_WITH_BASE
    assert 0 < split < render.SHARDS
    assert tables(first) == {"kpy", *(f"kpy-{i}" for i in range(split))}
    assert tables(second) == {f"kpy-{i}" for i in range(split, render.SHARDS)}


# Every chain's fingerprint over the netlink writer's cases and every detect-local mode,
# as the version that rendered rules as text wrote them: a restarted agent adopts the
# chains a previous version wrote only while their fingerprints stay the same.
FINGERPRINTS_DIGEST = "015ee997a822159053ce30eb93ffe47bb31792b986cbe81d64c043cea631ed09"


def test_typed_rules_keep_the_fingerprints_text_rules_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(render, "SHARDS", 16)  # the keys name shard tables: the count then
    digest = hashlib.sha256()
    configs = [c.config for c in CASES] + [ex.options_config(b.NODE, o) for o in MODES.values()]
    chains = 0
    for config in configs:
        objs = dict(render.base_objects(config))
        for case in CASES:
            for state in case.after:
                objs.update(render.port_objects(state, config))
        for key in sorted(objs):
            obj = objs[key]
            if isinstance(obj, render.Chain):
                chains += 1
                assert all(isinstance(r, render.Rule) and r.statements for r in obj.rules)
                digest.update(f"{key} {obj.value}\n".encode())
    assert chains > 1000
    assert digest.hexdigest() == FINGERPRINTS_DIGEST


def test_a_rule_is_its_statements_text() -> None:
    rule = render.rule(
        render.L4Proto("tcp"),
        render.Numgen(2),
        render.Update("ip6", "affinity-x"),
        render.Dnat("ip6", "fd00::5", 8080),
    )
    text = "meta l4proto tcp numgen random mod 2 == 0 update @affinity-x { ip6 saddr } "
    assert rule == text + "dnat to [fd00::5]:8080"
    assert rule.nft() == rule and type(rule.nft()) is str
    for copied in (copy.deepcopy(rule), pickle.loads(pickle.dumps(rule))):
        assert type(copied) is render.Rule and copied.statements == rule.statements
