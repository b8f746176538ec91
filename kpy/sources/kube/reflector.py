"""One resource's list + watch: resume, 410 relists, bookmarks, pages, timeouts."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from kpy.sources import CLUSTER_SCOPED, Event, EventType, Kind
from kpy.sources.kube.api import JSON, ApiStatusError, ProtocolError, _status_reason
from kpy.sources.kube.backoff import Backoff
from kpy.sources.kube.http import ConnectionPool, Response, request
from kpy.sources.kube.lists import split_list

if TYPE_CHECKING:
    from kpy.sources.kube.source import KubeSource

log = structlog.get_logger("kpy.sources.kube")


ObjectKey = tuple[str, str]


class _Expired(Exception):
    """The watch's resourceVersion is too old: relist."""


class _Interrupted(Exception):
    """An open watch stream broke (cut mid-event, reset): re-watch from the last rv."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Client-side limits (seconds)."""

    watch: float = 300.0  # timeoutSeconds asked for; randomised up to twice this
    watch_grace: float = 30.0  # a watch silent this long past its timeout is abandoned
    list: float = 120.0  # a list (or other request) that takes longer is retried
    connect: float = 10.0  # TCP connect + TLS handshake


class Reflector:
    """Keeps one resource's objects in step with the API server and emits their changes."""

    def __init__(
        self,
        source: KubeSource,
        kind: Kind,
        path: str,
        *,
        field_selector: str = "",
        label_selector: str = "",
        optional: bool = False,
    ) -> None:
        self.source = source
        # An optional kind the API server does not serve (404: no ServiceCIDR API) or
        # that the ClusterRole does not grant (403: an older DaemonSet) counts as none:
        # listed empty, the source stays healthy, a warning says so, and the list is
        # retried with backoff. Upstream kube-proxy's ServiceCIDR informer likewise
        # never holds up its Services.
        self.optional = optional
        self.unavailable = ""  # why an optional kind is not served, "" when it is
        self.kind = kind
        self.path = path
        self.field_selector = field_selector
        self.label_selector = label_selector
        # Every object's resourceVersion, not the object: what a relist compares with.
        # (Kept whole, the decoded JSON was ~8 kB per Service and its EndpointSlice: 780
        # MB at 100,000 Services; the agent keeps the converted model, not the JSON.)
        self.known: dict[ObjectKey, str] = {}
        self.resource_version = ""
        self.listed = asyncio.Event()
        self.healthy = True
        self.lists = 0
        # After a 410 the next list is a consistent read (resourceVersion unset), as
        # client-go's reflector does once its last resourceVersion is unavailable.
        self.consistent_list = False
        self.watches = 0  # watches the server accepted
        self.watch_attempts = 0  # watch requests sent
        self.pool = ConnectionPool()  # for lists; each watch has its own connection
        self._backoff = Backoff(source.backoff)

    # -- emitting

    def _key(self, obj: Any) -> tuple[ObjectKey, str] | None:
        """(namespace, name) and resourceVersion, or None (warned) for a malformed object."""
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        namespace = meta.get("namespace", "") if isinstance(meta, dict) else ""
        rv = meta.get("resourceVersion", "") if isinstance(meta, dict) else ""
        problem = ""
        if not isinstance(meta, dict):
            problem = "no metadata"
        elif not isinstance(name, str) or not name:
            problem = "metadata.name missing"
        elif self.kind not in CLUSTER_SCOPED and (not isinstance(namespace, str) or not namespace):
            problem = "metadata.namespace missing"
        elif not isinstance(rv, str):
            problem = "metadata.resourceVersion is not a string"
        if problem:
            log.warning(
                "kube_object_malformed",
                kind=str(self.kind),
                namespace=namespace if isinstance(namespace, str) else "",
                name=name if isinstance(name, str) else "",
                reason=problem,
                note="skipped",
            )
            return None
        scoped = self.kind not in CLUSTER_SCOPED
        return ((namespace if scoped else ""), name), rv  # type: ignore[return-value]

    def _upsert(self, obj: JSON, key: ObjectKey, rv: str) -> None:
        if rv and self.known.get(key) == rv:
            return  # unchanged (a relist repeats what we have)
        obj.setdefault("kind", str(self.kind))
        self.known[key] = rv
        self.source.emit(
            Event(kind=self.kind, type=EventType.UPSERT, namespace=key[0], name=key[1], obj=obj)
        )

    def _gone(self, key: ObjectKey, rv: str) -> JSON:
        """The object a relist found deleted, as far as kpy knows it: kind and identity."""
        meta = {"name": key[1], "resourceVersion": rv}
        if self.kind not in CLUSTER_SCOPED:
            meta["namespace"] = key[0]
        return {"kind": str(self.kind), "metadata": meta}

    def _delete(self, key: ObjectKey, obj: JSON) -> None:
        if self.known.pop(key, None) is None:
            return
        self.source.emit(
            Event(kind=self.kind, type=EventType.DELETE, namespace=key[0], name=key[1], obj=obj)
        )

    def _refusal(self, exc: ApiStatusError) -> dict[str, object]:
        """The log fields of a request the API server refused."""
        return {
            "kind": str(self.kind),
            "status": exc.status,
            "reason": exc.reason,
            "message": exc.message,
        }

    def _unavailable(self, exc: ApiStatusError) -> None:
        """An optional kind cannot be listed: none of it counts (see ``optional``)."""
        reason = f"HTTP {exc.status} {exc.reason}".strip()
        if reason != self.unavailable:
            log.warning(
                "kube_kind_unavailable",
                **self._refusal(exc),
                path=self.path,
                note="not served (404) or not allowed (403: check the ClusterRole); "
                "counted as none, retried with backoff",
            )
        self.unavailable = reason
        for key in list(self.known):  # what was listed before is no longer known
            self._delete(key, self._gone(key, self.known[key]))
        self.listed.set()

    # -- list

    def _params(self) -> dict[str, str]:
        params = {"fieldSelector": self.field_selector} if self.field_selector else {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    async def list(self) -> None:
        """List everything, emit the differences to what is known, remember the rv.

        In pages of ``page_size`` (``limit``/``continue``, as client-go's pager), so the
        API server never builds, and kpy never decodes, one huge response; every page is
        from the first page's resourceVersion. A 410 on a later page (the snapshot left
        the server's history) raises :class:`ApiStatusError`; the caller lists again.

        The first list asks with ``resourceVersion=0``: the API server answers from its
        watch cache instead of a read from etcd (client-go's reflector does the same, so
        a fleet of agents starting together does not load etcd). The cache may ignore
        ``limit`` and answer everything at once; an answer without ``continue`` is the
        last page either way. After a 410 the list is a consistent read
        (``resourceVersion`` unset): the cache may be as far behind as what expired.
        """
        metrics = self.source.metrics
        if metrics is not None:
            metrics.relisted(self.path.rsplit("/", 1)[1])
        seen: set[ObjectKey] = set()
        rv = ""
        count = 0
        first = self._page_params("")
        if self.lists == 0 and not self.consistent_list:
            first["resourceVersion"] = "0"  # only on the first page: never with continue
        fetch: asyncio.Task[tuple[Sequence[Any], dict[str, Any]]] | None = asyncio.create_task(
            self._list_page(first)
        )
        try:
            while fetch is not None:
                items, meta = await fetch
                fetch = None
                if not rv:
                    rv = meta.get("resourceVersion", "")
                    if not isinstance(rv, str) or not rv:
                        raise ProtocolError("list without metadata.resourceVersion")
                token = meta.get("continue") or ""
                if isinstance(token, str) and token:
                    # Ask for the next page now: the server builds it while this one is
                    # converted (the token is all the next request needs).
                    fetch = asyncio.create_task(self._list_page(self._page_params(token)))
                for obj in items:
                    found = self._key(obj)
                    if found is not None:
                        seen.add(found[0])
                        self._upsert(obj, *found)
                    count += 1
                    if count % 100 == 0:
                        await asyncio.sleep(0)  # the fetch and the other reflectors go on
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        for key in [k for k in self.known if k not in seen]:
            # Gone while we were not watching: the relist is the only news of it. Its
            # DELETE names it and its last resourceVersion (its body is not kept).
            self._delete(key, self._gone(key, self.known[key]))
        self.resource_version = rv
        self.lists += 1
        if self.unavailable:
            log.info("kube_kind_available", kind=str(self.kind), was=self.unavailable)
            self.unavailable = ""
        log.info(
            "kube_listed",
            kind=str(self.kind),
            objects=count,
            resource_version=rv,
            relist=self.lists > 1,
        )
        self.listed.set()

    def _page_params(self, token: str) -> dict[str, str]:
        params = self._params()
        if self.source.page_size > 0:
            params["limit"] = str(self.source.page_size)
        if token:
            params["continue"] = token
        return params

    async def _get(self, params: dict[str, str], pool: ConnectionPool | None = None) -> Response:
        """A GET of this kind's path (on ``pool``'s kept-alive connections if given)."""
        return await request(
            self.source.target,
            "GET",
            self.path,
            params,
            connect_timeout=self.source.timeouts.connect,
            pool=pool,
        )

    async def _list_page(self, params: dict[str, str]) -> tuple[Sequence[Any], dict[str, Any]]:
        """One list request: its items and its list metadata."""
        async with asyncio.timeout(self.source.timeouts.list):
            response = await self._get(params, self.pool)
            try:
                data = await response.body()
            finally:
                response.close()
        if response.status != 200:
            raise ApiStatusError(response.status, data, response.retry_after)
        self.source.report(self, True)
        try:
            listing = json.loads(data)
        except ValueError as exc:
            raise ProtocolError(f"list is not JSON: {exc}") from None
        except RecursionError:
            # Some item nests deeper than the decoder recurses: decode item by item
            # and skip the ones that fail, so one such object does not hide the rest.
            listing = self._decode_items_apart(data)
        del data
        items = listing.get("items") if isinstance(listing, dict) else None
        meta = listing.get("metadata") if isinstance(listing, dict) else None
        if items is None and isinstance(meta, dict):
            items = []  # an empty list may omit "items" (omitempty)
        if not isinstance(items, list) or not isinstance(meta, dict):
            raise ProtocolError("list without items or metadata")
        return items, meta

    def _decode_items_apart(self, data: bytes) -> Any:
        try:
            metadata, raw_items = split_list(data)
        except ValueError as exc:
            raise ProtocolError(f"list is not JSON: {exc}") from None
        items = []
        for raw in raw_items:
            try:
                items.append(json.loads(raw))
            except (ValueError, RecursionError) as exc:
                log.warning(
                    "kube_object_undecodable",
                    kind=str(self.kind),
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    bytes=len(raw),
                    note="skipped",
                )
        return {"metadata": metadata, "items": items}

    # -- watch

    async def watch(self) -> bool:
        """Watch from the current rv until the stream ends cleanly.

        False for a "very short watch" (client-go's term): it ended within a second
        without a single object event — a server or proxy closing watches at once, to be
        backed off from rather than hammered. Raises :class:`_Expired` when the rv is too
        old.
        """
        timeouts = self.source.timeouts
        seconds = max(1, int(timeouts.watch * (1 + random.random())))
        params = {
            **self._params(),
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        objects = 0
        started = time.monotonic()
        metrics = self.source.metrics
        if metrics is not None and self.watch_attempts > 0:
            metrics.watch_reconnected(self.path.rsplit("/", 1)[1])
        self.watch_attempts += 1
        async with asyncio.timeout(seconds + timeouts.watch_grace):
            response = await self._get(params)
            try:
                if response.status != 200:
                    body = await response.body()
                    if response.status == 410:
                        raise _Expired(_status_reason(body)[1])
                    raise ApiStatusError(response.status, body, response.retry_after)
                self.source.report(self, True)
                self.watches += 1
                try:
                    async for line in response.lines():
                        objects += self._on_line(line)
                except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
            finally:
                response.close()
        lasted = time.monotonic() - started
        if objects or lasted > 5:
            self._backoff.reset()
        return objects > 0 or lasted >= 1.0

    def _on_line(self, line: bytes) -> bool:
        """Apply one watch event; True if it was an object event (not a BOOKMARK)."""
        try:
            event = json.loads(line)
            etype, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning(
                "kube_watch_event_malformed",
                kind=str(self.kind),
                line=line[:200].decode("utf-8", "replace"),
                note="skipped",
            )
            return False
        if etype == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            reason = obj.get("reason", "") if isinstance(obj, dict) else ""
            message = obj.get("message", "") if isinstance(obj, dict) else ""
            if code == 410 or reason in ("Expired", "Gone"):
                raise _Expired(str(message))
            raise ApiStatusError(int(code or 500), json.dumps(obj).encode(), None)
        if etype == "BOOKMARK":
            rv = (
                (obj.get("metadata") or {}).get("resourceVersion")
                if isinstance(obj, dict)
                else None
            )
            if isinstance(rv, str) and rv:
                self.resource_version = rv
            return False
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("kube_watch_event_unknown", kind=str(self.kind), type=str(etype))
            return False
        found = self._key(obj)
        if found is None:
            return True  # an object event, skipped (warned)
        key, rv = found
        if etype == "DELETED":
            self._delete(key, obj)
        else:
            self._upsert(obj, key, rv)
        if rv:
            self.resource_version = rv
        return True

    # -- the loop

    async def run(self) -> None:
        """List and watch until cancelled, relisting on 410 and backing off on errors."""
        need_list = True
        while True:
            delay: float | None = None
            try:
                if need_list:
                    await self.list()
                    need_list = False
                    self._backoff.reset()
                if not await self.watch():
                    log.warning(
                        "kube_watch_short",
                        kind=str(self.kind),
                        note="the server ended the watch at once without changes; backing off",
                    )
                    delay = self._backoff.next()
                # Otherwise a clean end (the server's timeout): re-watch at once from the
                # last rv.
            except _Expired as exc:
                log.info(
                    "kube_watch_expired",
                    kind=str(self.kind),
                    resource_version=self.resource_version,
                    reason=str(exc),
                    note="relisting",
                )
                need_list = True
                self.consistent_list = True
            except ApiStatusError as exc:
                if exc.status == 410:
                    need_list = True
                    self.consistent_list = True
                    continue
                if self.optional and exc.status in (403, 404):
                    self._unavailable(exc)  # on a list, or a watch (access revoked)
                    need_list = True
                    await asyncio.sleep(self._backoff.next(exc.retry_after))
                    continue
                # A throttled server is alive and says when to come back; anything else
                # (5xx, or credentials/RBAC refused: 401/403) means no updates arrive.
                if exc.status >= 500:
                    self.source.report(self, False, f"API server error: HTTP {exc.status}")
                elif exc.status in (401, 403):
                    self.source.report(
                        self,
                        False,
                        f"API server refused access: HTTP {exc.status} {exc.reason} "
                        "(check the credentials and the ClusterRole)",
                    )
                elif exc.status != 429:
                    self.source.report(
                        self, False, f"API server rejected the request: HTTP {exc.status}"
                    )
                log.warning(
                    "kube_request_failed", **self._refusal(exc), retry_after=exc.retry_after
                )
                delay = self._backoff.next(exc.retry_after)
            except _Interrupted as exc:
                # The stream broke mid-event: whatever was cut is sent again when we
                # re-watch from the last complete event's rv.
                log.info("kube_watch_interrupted", kind=str(self.kind), error=str(exc))
                delay = self._backoff.next()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.source.report(self, False, f"API server unreachable: {reason}")
                log.warning(
                    "kube_unreachable",
                    kind=str(self.kind),
                    server=self.source.target.url,
                    error=reason,
                )
                delay = self._backoff.next()
            if delay is not None:
                await asyncio.sleep(delay)
