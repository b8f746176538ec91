"""The keyed diff: what changed between two maps of hashable values.

Used by the tracker over service port states and by every backend over its rendered
kernel objects (chains, map elements, IPVS services). A diff is a value: sorted and
deterministic, so two runs over the same input produce the same transaction.

``compute`` is O(len(old) + len(new)); ``compute_keys`` only looks at the keys it is
given, which is how a partial sync stays O(change) in a cluster of any size.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Diff(Generic[K, V]):
    """Keys added, changed (old value, new value) and removed, each sorted by key."""

    added: tuple[tuple[K, V], ...] = ()
    changed: tuple[tuple[K, V, V], ...] = ()
    removed: tuple[tuple[K, V], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def __len__(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)

    @property
    def keys(self) -> frozenset[K]:
        return frozenset(
            [k for k, _ in self.added]
            + [k for k, _, _ in self.changed]
            + [k for k, _ in self.removed]
        )


def _sort_key(key: object) -> tuple[str, str]:
    # Keys of mixed types still sort deterministically.
    return (type(key).__name__, repr(key) if not isinstance(key, str) else key)


def compute(old: Mapping[K, V], new: Mapping[K, V]) -> Diff[K, V]:
    """Every difference between ``old`` and ``new``."""
    return compute_keys(old, new, set(old) | set(new))


def compute_keys(old: Mapping[K, V], new: Mapping[K, V], keys: Iterable[K]) -> Diff[K, V]:
    """The differences between ``old`` and ``new`` restricted to ``keys``."""
    added: list[tuple[K, V]] = []
    changed: list[tuple[K, V, V]] = []
    removed: list[tuple[K, V]] = []
    missing = object()
    for key in sorted(set(keys), key=_sort_key):
        before = old.get(key, missing)
        after = new.get(key, missing)
        if before is missing:
            if after is not missing:
                added.append((key, after))  # type: ignore[arg-type]
        elif after is missing:
            removed.append((key, before))  # type: ignore[arg-type]
        elif before != after:
            changed.append((key, before, after))  # type: ignore[arg-type]
    return Diff(tuple(added), tuple(changed), tuple(removed))


def apply(old: Mapping[K, V], change: Diff[K, V]) -> dict[K, V]:
    """``old`` with ``change`` applied: ``apply(a, compute(a, b)) == b``."""
    result = dict(old)
    for key, value in change.added:
        result[key] = value
    for key, _, value in change.changed:
        result[key] = value
    for key, _ in change.removed:
        del result[key]
    return result
