"""A directory (or files) of YAML/JSON manifests as a source: labs, demos, tests, offline use.

Service, EndpointSlice and Node objects, alone, as multi-document YAML, or inside a
``List``; other kinds are ignored. The files are re-read when their modification time
or size changes (polling: no inotify dependency, works on every filesystem), and the
difference to the previous read is emitted as events — the same events the ``kube``
source emits. A file that fails to parse keeps its previous objects (a half-saved edit
never removes working Services) and is reported with a structured warning.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from kpy.sources import Event, EventType, Kind, Sink

log = structlog.get_logger("kpy.sources.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = {k.value: k for k in Kind}

ObjectKey = tuple[Kind, str, str]


@dataclass(frozen=True, slots=True)
class FileError:
    path: str
    reason: str


def _documents(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [json.loads(text)]
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _objects(docs: Iterable[Any]) -> Iterable[dict[str, Any]]:
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if (
            isinstance(doc.get("kind"), str)
            and doc["kind"].endswith("List")
            and isinstance(doc.get("items"), list)
        ):
            list_kind = doc["kind"][: -len("List")]
            for item in doc["items"]:
                if isinstance(item, dict):
                    item.setdefault("kind", list_kind)
                    yield item
        else:
            yield doc


def files_in(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.exists():
            found.append(p)
    return found


def read_file(path: Path) -> dict[ObjectKey, dict[str, Any]]:
    """The Services, EndpointSlices and Nodes in one file (raises on parse errors)."""
    result: dict[ObjectKey, dict[str, Any]] = {}
    for obj in _objects(_documents(path)):
        kind = KINDS.get(str(obj.get("kind", "")))
        meta = obj.get("metadata")
        if kind is None or not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            continue
        namespace = "" if kind is Kind.NODE else str(meta.get("namespace") or "default")
        if kind is not Kind.NODE:
            meta["namespace"] = namespace
        result[(kind, namespace, meta["name"])] = obj
    return result


def load(paths: Iterable[Path]) -> tuple[dict[ObjectKey, dict[str, Any]], list[FileError]]:
    """Read everything once: the objects and the files that failed."""
    objects: dict[ObjectKey, dict[str, Any]] = {}
    errors: list[FileError] = []
    for f in files_in(paths):
        try:
            objects.update(read_file(f))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            errors.append(FileError(str(f), f"{type(exc).__name__}: {exc}"))
    return objects, errors


class ManifestSource:
    """Emits the objects of ``paths`` and their changes; polls every ``interval`` seconds."""

    def __init__(self, paths: Iterable[Path | str], interval: float = 1.0) -> None:
        self.paths = [Path(p) for p in paths]
        self.interval = interval
        self._stamps: dict[Path, tuple[float, int]] = {}
        self._by_file: dict[Path, dict[ObjectKey, dict[str, Any]]] = {}
        self._emitted: dict[ObjectKey, dict[str, Any]] = {}

    def scan(self, sink: Sink) -> int:
        """Re-read changed files and emit the differences; returns the events emitted."""
        files = files_in(self.paths)
        current = set(files)
        for gone in set(self._by_file) - current:
            del self._by_file[gone]
            self._stamps.pop(gone, None)
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            stamp = (st.st_mtime, st.st_size)
            if self._stamps.get(f) == stamp:
                continue
            try:
                self._by_file[f] = read_file(f)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                log.warning(
                    "manifest_unreadable",
                    path=str(f),
                    error=str(exc),
                    note="keeping this file's previous objects",
                )
            self._stamps[f] = stamp
        merged: dict[ObjectKey, dict[str, Any]] = {}
        for objs in self._by_file.values():
            merged.update(objs)
        count = 0
        for key, obj in merged.items():
            if self._emitted.get(key) != obj:
                kind, ns, name = key
                sink.event(
                    Event(kind=kind, type=EventType.UPSERT, namespace=ns, name=name, obj=obj)
                )
                count += 1
        for key in set(self._emitted) - set(merged):
            kind, ns, name = key
            sink.event(
                Event(
                    kind=kind,
                    type=EventType.DELETE,
                    namespace=ns,
                    name=name,
                    obj=self._emitted[key],
                )
            )
            count += 1
        self._emitted = merged
        return count

    async def run(self, sink: Sink) -> None:
        self.scan(sink)
        sink.synced()
        while True:
            await asyncio.sleep(self.interval)
            count = self.scan(sink)
            if count:
                log.info("manifests_changed", events=count)
