"""Pure properties of :func:`kpy_nftables.render.transaction`'s script."""

from __future__ import annotations

from kpy_nftables import render

from kpy.backend import BackendConfig
from kpy.testing import builders as b


def _want(n: int) -> dict[str, render.Obj]:
    config = BackendConfig(node_name="node-a")
    want = dict(render.base_objects(config))
    for state in b.synthetic_states(n):
        want.update(render.port_objects(state, config))
    return want


def test_grouped_elements_are_the_same_elements_in_fewer_commands() -> None:
    want = _want(300)  # 1,500 endpoints: more than one group in service-endpoints
    single = render.transaction(want, {}, want)
    grouped = render.transaction(want, {}, want, group=True)
    assert grouped.ops == single.ops

    def elements(lines: tuple[str, ...]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in lines:
            if line.startswith("add element "):
                head, _, body = line.partition(" { ")
                found.setdefault(head, []).extend(body.removesuffix(" }").split(", "))
        return found

    assert elements(grouped.lines) == elements(single.lines)
    endpoints = [ln for ln in grouped.lines if ln.startswith("add element ip kpy service-endp")]
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
    assert deletions and all(", " in ln for ln in deletions if " service-endpoints " in ln)
