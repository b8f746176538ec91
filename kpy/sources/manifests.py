"""A directory (or files) of YAML/JSON manifests as a source: labs, demos, tests, offline use.

Service, EndpointSlice, Node and ServiceCIDR objects, alone, as multi-document YAML, or
inside a ``List``; other kinds are ignored. The files are re-read when their modification time
or size changes (polling: no inotify dependency, works on every filesystem), and the
difference to the previous read is emitted as events — the same events the ``kube``
source emits. A file that fails to parse keeps its previous objects (a half-saved edit
never removes working Services) and is reported with a structured warning.

Nothing in a file can stop the source: a file larger than :data:`MAX_FILE_BYTES` is not
read, invalid UTF-8, syntax errors, documents nested deeper than :data:`MAX_DEPTH`,
recursive YAML aliases and alias "bombs" that would expand past :data:`MAX_NODES` are
each one warning naming the file, and the file is skipped (YAML is checked as a node
graph, before it is turned into objects). A YAML list longer than :mod:`kpy.core.convert`
accepts (:data:`SEQUENCE_LIMITS`) is counted, not built. What is in the objects is
:mod:`kpy.core.convert`'s business.
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

from kpy.core import convert
from kpy.sources import CLUSTER_SCOPED, Event, EventType, Kind, Sink

log = structlog.get_logger("kpy.sources.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = {k.value: k for k in Kind}

# Above the API server's ~1.5 MiB per object; a larger manifest is split into files.
# What a file costs to parse is bounded by this (docs/reliability.md: a few seconds for
# 2 MiB of small objects on a busy 2-core machine).
MAX_FILE_BYTES = 2 << 20
MAX_DEPTH = 64  # nesting; a Service, EndpointSlice or Node is about 8 deep
MAX_NODES = 2_000_000  # values in one document, aliases expanded (a 2 MiB file has fewer)

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ObjectKey = tuple[Kind, str, str]


@dataclass(frozen=True, slots=True)
class FileError:
    path: str
    reason: str


class ManifestError(ValueError):
    """A file kpy will not read: too large, too deep, or an alias bomb."""


def _children(value: Any) -> list[Any]:
    """The values inside a YAML node or a decoded JSON value."""
    if isinstance(value, yaml.MappingNode):
        return [v for pair in value.value for v in pair]
    if isinstance(value, yaml.SequenceNode):
        return list(value.value)
    if isinstance(value, dict):
        return [v for pair in value.items() for v in pair]
    if isinstance(value, list):
        return value
    return []


def check_shape(root: Any) -> None:
    """Raise :class:`ManifestError` for a document nested deeper than ``MAX_DEPTH``, one
    that holds itself (a recursive alias), or one that holds more than ``MAX_NODES``
    values once its aliases are expanded. Iterative: deep input cannot overflow the
    stack here, and a shared (aliased) value is measured once."""
    sizes: dict[int, tuple[int, int]] = {}  # id → (values, height), aliases expanded
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        value, done = stack.pop()
        key = id(value)
        if done:
            open_.discard(key)
            count, height = 1, 1
            for child in _children(value):
                c, h = sizes.get(id(child), (1, 1))
                count += c
                height = max(height, h + 1)
            if count > MAX_NODES:
                raise ManifestError(f"more than {MAX_NODES} values once aliases are expanded")
            if height > MAX_DEPTH:
                raise ManifestError(f"nested deeper than {MAX_DEPTH}")
            sizes[key] = (count, height)
            continue
        if key in sizes:
            continue
        if key in open_:
            raise ManifestError("a value holds itself (recursive alias)")
        children = _children(value)
        if not children:
            continue
        open_.add(key)
        stack.append((value, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _read_text(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"larger than {MAX_FILE_BYTES} bytes")
    return data.decode("utf-8")  # UnicodeDecodeError is a ValueError


# Lists kpy.core.convert refuses above these lengths (the API's limits, or kpy's where it is
# stricter). A YAML sequence under one of these keys that is longer is not built at all:
# counting its items in libyaml's event stream is about ten times cheaper than building
# it, and an object holding it is refused the same either way.
SEQUENCE_LIMITS = {
    "endpoints": convert.MAX_ENDPOINTS,
    "ports": convert.MAX_PORTS,
    "addresses": convert.MAX_ENDPOINT_ADDRESSES,  # a Node's: fewer still (convert checks)
    "externalIPs": convert.MAX_ADDRESSES,
    "ingress": convert.MAX_ADDRESSES,
    "loadBalancerSourceRanges": convert.MAX_ADDRESSES,
    "forZones": convert.MAX_HINTS,
    "forNodes": convert.MAX_HINTS,
}


@dataclass(frozen=True, slots=True)
class _Cut:
    key: str
    count: int
    start: int  # the end of the key: ``: [...]`` is replaced
    end: int  # the end of the sequence
    column: int  # where what follows the sequence starts


def _oversized(text: str) -> list[_Cut]:
    """The sequences under :data:`SEQUENCE_LIMITS` keys longer than their limit, found
    in the event stream (nothing is built). Each frame: [is_mapping, expecting_key,
    key, key_end, counted_items (None: not counted)]."""
    cuts: list[_Cut] = []
    loader = _Loader(text)
    stack: list[list[Any]] = []
    try:
        while loader.check_event():
            event: Any = loader.get_event()  # type: ignore[no-untyped-call]
            parent = stack[-1] if stack else None
            starts = isinstance(
                event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)
            )
            key: str | None = None
            key_end = 0
            if starts and parent is not None:
                if parent[0]:  # a mapping: keys and values alternate
                    if parent[1]:
                        parent[1] = False
                        parent[2] = event.value if isinstance(event, yaml.ScalarEvent) else None
                        parent[3] = event.end_mark.index
                        if isinstance(event, yaml.CollectionStartEvent):
                            stack.append(
                                [isinstance(event, yaml.MappingStartEvent), True, None, 0, None]
                            )
                        continue
                    parent[1] = True
                    key, key_end = parent[2], parent[3]
                elif parent[4] is not None:
                    parent[4] += 1
            if isinstance(event, yaml.MappingStartEvent):
                stack.append([True, True, None, key_end, None])
            elif isinstance(event, yaml.SequenceStartEvent):
                counted = 0 if key in SEQUENCE_LIMITS else None
                stack.append([False, False, key, key_end, counted])
            elif isinstance(event, yaml.CollectionEndEvent):
                frame = stack.pop()
                end = event.end_mark
                if (
                    end is not None
                    and not frame[0]
                    and frame[4] is not None
                    and frame[4] > SEQUENCE_LIMITS[frame[2]]
                ):
                    cuts.append(_Cut(frame[2], frame[4], frame[3], end.index, end.column))
    finally:
        loader.dispose()
    return cuts


def _without(text: str, cuts: list[_Cut], notes: list[str]) -> str:
    """``text`` with each cut sequence replaced by a string saying what it was."""
    for cut in sorted(cuts, key=lambda c: c.start, reverse=True):
        limit = SEQUENCE_LIMITS[cut.key]
        what = f"{cut.count} entries, more than {limit}: not read"
        notes.append(f"{cut.key} has {what}")
        span = text[cut.start : cut.end]
        tail = "\n" + " " * cut.column if "\n" in span else ""
        text = f'{text[: cut.start]}: "{what}"{tail}{text[cut.end :]}'
    return text


def _documents(path: Path, notes: list[str] | None = None) -> list[Any]:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except RecursionError:
            raise ManifestError(f"nested deeper than {MAX_DEPTH}") from None
        check_shape(doc)
        return [doc]
    cuts = _oversized(text)
    if cuts:
        text = _without(text, cuts, notes if notes is not None else [])
    loader = _Loader(text)
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            check_shape(node)  # before any value is built from it
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
        return docs
    finally:
        loader.dispose()


def _objects(docs: Iterable[Any], notes: list[str]) -> Iterable[dict[str, Any]]:
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        kind = doc.get("kind")
        if not isinstance(kind, str):
            notes.append(
                "a document without kind"
                if kind is None
                else f"kind is {type(kind).__name__}, not a string"
            )
            continue
        if kind.endswith("List") and "items" in doc:
            items = doc["items"]
            if not isinstance(items, list):
                notes.append(f"a {kind} whose items are {type(items).__name__}, not a list")
                continue
            list_kind = kind[: -len("List")]
            for index, item in enumerate(items):
                if isinstance(item, dict):
                    item.setdefault("kind", list_kind)
                    yield item
                else:
                    notes.append(f"{kind} item {index} is {type(item).__name__}, not an object")
        else:
            yield doc


def files_in(paths: Iterable[Path]) -> list[Path]:
    """The manifest files under ``paths``; a directory that cannot be listed is skipped
    with a warning (the next scan tries again)."""
    found: list[Path] = []
    for p in paths:
        try:
            if p.is_dir():
                found.extend(
                    sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
                )
            elif p.exists():
                found.append(p)
        except OSError as exc:
            log.warning("manifest_path_unreadable", path=str(p), error=_reason(exc))
    return found


def read_file(path: Path, notes: list[str] | None = None) -> dict[ObjectKey, dict[str, Any]]:
    """The Services, EndpointSlices, Nodes and ServiceCIDRs in one file (raises on a file
    it cannot read: see :data:`READ_ERRORS`). What is skipped inside a readable file is
    added to ``notes``: documents that are not objects, objects of a served kind without a name."""
    result: dict[ObjectKey, dict[str, Any]] = {}
    skipped = notes if notes is not None else []
    docs = _documents(path, skipped)
    for index, doc in enumerate(docs):
        if not isinstance(doc, dict):
            skipped.append(f"document {index + 1} is {type(doc).__name__}, not an object")
    for obj in _objects(docs, skipped):
        raw_kind = obj.get("kind", "")
        kind = KINDS.get(raw_kind) if isinstance(raw_kind, str) else None
        if kind is None:
            continue
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            skipped.append(f"a {kind} without metadata.name")
            continue
        cluster_scoped = kind in CLUSTER_SCOPED
        namespace = "" if cluster_scoped else str(meta.get("namespace") or "default")
        if not cluster_scoped:
            meta["namespace"] = namespace
        result[(kind, namespace, meta["name"])] = obj
    return result


# Everything reading one file may raise: I/O, decoding, syntax, the shape checks, and
# whatever a parser or constructor raises on input nobody foresaw (MemoryError
# included). One file never stops the source.
READ_ERRORS = (Exception,)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line: parser messages span several
    if len(text) > 500:
        text = text[:500] + "..."
    return f"{type(exc).__name__}: {text}"


def load(paths: Iterable[Path]) -> tuple[dict[ObjectKey, dict[str, Any]], list[FileError]]:
    """Read everything once: the objects and the files that failed."""
    objects: dict[ObjectKey, dict[str, Any]] = {}
    errors: list[FileError] = []
    for f in files_in(paths):
        try:
            objects.update(read_file(f))
        except READ_ERRORS as exc:
            errors.append(FileError(str(f), _reason(exc)))
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
        self.refresh()
        return self.emit(sink)

    def refresh(self) -> None:
        """Re-read the files that changed (no events: :meth:`emit` sends them). Touches
        nothing but this source, so the agent runs it in a thread: parsing a large
        file does not hold up the event loop."""
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
            notes: list[str] = []
            try:
                self._by_file[f] = read_file(f, notes)
            except READ_ERRORS as exc:
                log.warning(
                    "manifest_unreadable",
                    path=str(f),
                    error=_reason(exc),
                    note="keeping this file's previous objects",
                )
            for note in notes:
                log.warning("manifest_document_skipped", path=str(f), reason=note)
            self._stamps[f] = stamp

    def emit(self, sink: Sink) -> int:
        """Emit what differs from the objects last emitted; returns how many events."""
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
        await asyncio.to_thread(self.refresh)
        self.emit(sink)
        sink.synced()
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.refresh)
            count = self.emit(sink)
            if count:
                log.info("manifests_changed", events=count)
