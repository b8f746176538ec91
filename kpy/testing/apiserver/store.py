"""The object store: resourceVersions, history for watches, continue tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kpy.testing.apiserver.objects import JSON, RESOURCES, ApiError, ObjectKey, Resource, _not_found
from kpy.testing.apiserver.selectors import Selector


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write: what a watch from an older resourceVersion replays."""

    rv: int
    resource: Resource
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON  # the new object (DELETED: the last state, carrying the deletion's rv)
    old: JSON | None  # the previous object (None for ADDED)


@dataclass(slots=True)
class _Control:
    """A queued instruction to one watch stream (fault injection, bookmarks)."""

    what: str  # "bookmark" | "cut" | "cut_next" | "expire"
    rv: int = 0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip(obj: JSON) -> JSON:
    """The object without server-maintained metadata (to detect no-op updates)."""
    meta = {
        k: v
        for k, v in (obj.get("metadata") or {}).items()
        if k not in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation")
    }
    return {**obj, "metadata": meta}


class _Watch:
    """One open watch stream's subscription."""

    def __init__(self, resource: Resource, selector: Selector) -> None:
        self.resource = resource
        self.selector = selector
        self.queue: asyncio.Queue[Change | _Control] = asyncio.Queue()


class Store:
    """Objects, the global resourceVersion, a bounded history and the open watches."""

    def __init__(self, history_size: int, rv_base: int = 1) -> None:
        self.history_size = history_size
        self.objects: dict[Resource, dict[ObjectKey, JSON]] = {r: {} for r in RESOURCES}
        self.rv = rv_base
        self.history: deque[Change] = deque()
        self.oldest_rv = rv_base  # a watch may start from any rv >= this
        self.watches: set[_Watch] = set()
        self._snapshots: dict[tuple[Resource, int], tuple[list[ObjectKey], list[JSON]]] = {}

    # -- writes

    def _commit(self, resource: Resource, type: str, obj: JSON, old: JSON | None) -> Change:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        change = Change(self.rv, resource, type, obj, old)
        self.history.append(change)
        while len(self.history) > self.history_size:
            self.oldest_rv = self.history.popleft().rv
        for w in self.watches:
            if w.resource is resource:
                w.queue.put_nowait(change)
        return change

    def create(self, resource: Resource, obj: JSON, namespace: str = "") -> JSON:
        obj = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: Required")
        if resource.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request",
                )
            meta["namespace"] = namespace or body_ns or "default"
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), name)
        objects = self.objects[resource]
        if key in objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.plural} "{name}" already exists',
                details={"name": name, "group": resource.group, "kind": resource.plural},
            )
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.pop("resourceVersion", None)
        objects[key] = obj
        self._commit(resource, "ADDED", obj, None)
        return obj

    def get(self, resource: Resource, namespace: str, name: str) -> JSON:
        obj = self.objects[resource].get((namespace if resource.namespaced else "", name))
        if obj is None:
            raise _not_found(resource, name)
        return obj

    def update(
        self, resource: Resource, obj: JSON, namespace: str = "", *, subresource: str = ""
    ) -> JSON:
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise ApiError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: Required")
        ns = (namespace or meta.get("namespace") or "default") if resource.namespaced else ""
        current = self.get(resource, ns, meta["name"])
        sent_rv = meta.get("resourceVersion")
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{meta["name"]}": the object '
                "has been modified; please apply your changes to the latest version and try again",
                details={"name": meta["name"], "group": resource.group, "kind": resource.plural},
            )
        new = copy.deepcopy(obj)
        if subresource == "status":  # only the status changes through /status
            new = {**copy.deepcopy(current), "status": new.get("status", {})}
        new["kind"], new["apiVersion"] = resource.kind, resource.api_version
        new_meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp"):
            new_meta[k] = current["metadata"][k]
        if resource.namespaced:
            new_meta["namespace"] = ns
        new_meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if _strip(new) == _strip(current):
            return current  # a no-op update writes nothing and sends no event
        self.objects[resource][(ns, meta["name"])] = new
        self._commit(resource, "MODIFIED", new, current)
        return new

    def patch(self, resource: Resource, namespace: str, name: str, patch: JSON) -> JSON:
        current = self.get(resource, namespace, name)
        merged = merge_patch(current, patch)
        merged.setdefault("metadata", {})["name"] = name
        if "resourceVersion" not in (patch.get("metadata") or {}):
            merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.update(resource, merged, namespace)

    def delete(self, resource: Resource, namespace: str, name: str) -> JSON:
        ns = namespace if resource.namespaced else ""
        current = self.get(resource, ns, name)
        del self.objects[resource][(ns, name)]
        last = copy.deepcopy(current)
        self._commit(resource, "DELETED", last, current)
        return last

    # -- reads

    def list_at(self, resource: Resource, rv: int) -> list[JSON]:
        """The objects as they were at ``rv`` (which must still be in history)."""
        state = dict(self.objects[resource])
        for change in reversed(self.history):
            if change.rv <= rv:
                break
            if change.resource is not resource:
                continue
            meta = change.obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if change.old is None:
                state.pop(key, None)
            else:
                state[key] = change.old
        return [state[k] for k in sorted(state)]

    def snapshot(self, resource: Resource, rv: int) -> tuple[list[ObjectKey], list[JSON]]:
        """Sorted keys and objects at ``rv`` (in history), cached: pages of one list share it.

        Objects are never changed in place (a write stores a new dict), so a snapshot at a
        resourceVersion stays true; the API server serves pages from its cache likewise.
        """
        cached = self._snapshots.get((resource, rv))
        if cached is None:
            if rv == self.rv:
                pairs = sorted(self.objects[resource].items())
                cached = ([k for k, _ in pairs], [o for _, o in pairs])
            else:
                objects = self.list_at(resource, rv)
                cached = ([_key_of(o) for o in objects], objects)
            self._snapshots[(resource, rv)] = cached
            while len(self._snapshots) > 8:
                del self._snapshots[next(iter(self._snapshots))]
        return cached

    def changes_since(self, resource: Resource, rv: int) -> list[Change]:
        return [c for c in self.history if c.rv > rv and c.resource is resource]


def _key_of(obj: JSON) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", "") or "", meta.get("name", "") or "")


def _encode_continue(rv: int, last: ObjectKey) -> str:
    """An opaque token like the API server's (base64 JSON of version, rv and start key)."""
    data = {"v": "meta.k8s.io/v1", "rv": rv, "start": f"{last[0]}/{last[1]}\x00"}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode_continue(token: str) -> tuple[int, ObjectKey]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        start = data["start"].rstrip("\x00")
        namespace, _, name = start.partition("/")
        if data.get("v") != "meta.k8s.io/v1" or not isinstance(data["rv"], int):
            raise ValueError(token)
        return data["rv"], (namespace, name)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise ApiError(400, "BadRequest", f"invalid continue token {token!r}") from None
