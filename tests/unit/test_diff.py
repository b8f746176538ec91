"""The keyed diff: exact, deterministic, and O(keys asked about)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kpy.core import diff

maps = st.dictionaries(st.text(max_size=4), st.integers(0, 5), max_size=30)


@given(maps)
def test_diff_of_a_map_with_itself_is_empty(a: dict[str, int]) -> None:
    assert not diff.compute(a, a)
    assert len(diff.compute(a, dict(a))) == 0


@given(maps, maps)
def test_applying_the_diff_gives_the_new_map(a: dict[str, int], b: dict[str, int]) -> None:
    assert diff.apply(a, diff.compute(a, b)) == b


@given(maps, maps)
def test_diff_is_deterministic_and_sorted(a: dict[str, int], b: dict[str, int]) -> None:
    first = diff.compute(a, b)
    again = diff.compute(dict(reversed(list(a.items()))), dict(reversed(list(b.items()))))
    assert first == again
    assert [k for k, _ in first.added] == sorted(k for k, _ in first.added)


def test_one_changed_key_is_one_change_at_any_size() -> None:
    for size in (10, 10_000):
        old = {f"k{i}": i for i in range(size)}
        new = dict(old)
        new["k7"] = -1
        change = diff.compute(old, new)
        assert change.changed == (("k7", 7, -1),)
        assert not change.added and not change.removed
        assert change.keys == frozenset({"k7"})


def test_compute_keys_looks_only_at_the_given_keys() -> None:
    old = {"a": 1, "b": 2, "c": 3}
    new = {"a": 1, "b": 20, "d": 4}
    change = diff.compute_keys(old, new, ["b", "c"])
    assert change.changed == (("b", 2, 20),)
    assert change.removed == (("c", 3),)
    assert change.added == ()
