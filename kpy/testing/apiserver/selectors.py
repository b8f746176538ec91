"""Label and field selectors, parsed and matched as the API server does."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kpy.testing.apiserver.objects import JSON, ApiError


@dataclass(frozen=True, slots=True)
class Requirement:
    """One label-selector requirement: ``key op values``."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" also match objects without the label.
        return self.key not in labels or labels[self.key] not in self.values


_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQ_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS_RE = re.compile(rf"^\s*(?P<neg>!)?\s*(?P<key>{_KEY})\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` → two requirements)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a label selector; raises :class:`ApiError` 400 on a malformed one."""
    if not text.strip():
        return ()
    result = []
    for part in _split_top_level(text):
        if m := _SET_RE.match(part):
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            if not all(re.fullmatch(_VALUE, v) for v in values):
                raise _bad_selector(text)
            result.append(Requirement(m["key"], m["op"], values))
        elif m := _EQ_RE.match(part):
            op = "!=" if m["op"] == "!=" else "="
            result.append(Requirement(m["key"], op, frozenset({m["value"]})))
        elif m := _EXISTS_RE.match(part):
            result.append(Requirement(m["key"], "!" if m["neg"] else "exists"))
        else:
            raise _bad_selector(text)
    return tuple(result)


def _bad_selector(text: str) -> ApiError:
    return ApiError(400, "BadRequest", f"unable to parse requirement: invalid selector {text!r}")


FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str) -> tuple[tuple[str, bool, str], ...]:
    """``metadata.name=x,metadata.namespace!=y`` → ((field, equal, value), ...)."""
    if not text.strip():
        return ()
    result = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-zA-Z.]+)\s*(==|=|!=)\s*([^,]*?)\s*", part)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {text!r}")
        if m[1] not in FIELDS:
            raise ApiError(400, "BadRequest", f'field label not supported: "{m[1]}"')
        result.append((m[1], m[2] != "!=", m[3]))
    return tuple(result)


@dataclass(frozen=True, slots=True)
class Selector:
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()
    namespace: str = ""  # "" = all namespaces (from the URL)
    name: str = ""  # from the URL of a single object watch

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace and meta.get("namespace", "") != self.namespace:
            return False
        if self.name and meta.get("name") != self.name:
            return False
        for fld, equal, value in self.fields:
            actual = meta.get(fld.split(".", 1)[1], "") or ""
            if (actual == value) != equal:
                return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels) for r in self.labels)
