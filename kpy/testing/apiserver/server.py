"""The HTTP server: lists, watches, writes, and the faults a test can inject."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import json
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from kpy.testing.apiserver.objects import (
    BY_KIND,
    JSON,
    RESOURCES,
    VERSION_INFO,
    ApiError,
    ObjectKey,
    Resource,
    _expired,
    dumps,
)
from kpy.testing.apiserver.selectors import Selector, parse_field_selector, parse_label_selector
from kpy.testing.apiserver.store import (
    Change,
    Store,
    _Control,
    _decode_continue,
    _encode_continue,
    _key_of,
    _Watch,
)

log = structlog.get_logger("kpy.testing.apiserver")


class _Cut(Exception):
    """The connection was cut on purpose."""


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Faults:
    """Pending injected failures."""

    fail_count: int = 0
    fail_status: int = 500
    fail_retry_after: float | None = None
    fail_paths: tuple[str, ...] = ()  # only requests whose path starts with one of these
    # Close this many connections on a request that is not their first, without an
    # answer (an idle timeout racing the client's next request on a kept-alive one).
    drop_reused: int = 0
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    # Resources (plurals) answered 404 as if the server had no such API (an older
    # cluster), or 403 as if the client's ClusterRole did not grant them.
    unserved: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)


@dataclass
class Stats:
    """What clients did: for tests that assert on the client's behaviour."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    request_connections: list[int] = field(default_factory=list)  # per request: its connection
    connections: int = 0  # connections accepted
    dropped: int = 0  # requests dropped by Faults.drop_reused
    watches_started: int = 0
    lists: int = 0
    failed: int = 0


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_ERROR_REASONS = {
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _namespace_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("namespace") or "") if isinstance(meta, dict) else ""


def _kind_of(obj: Mapping[str, Any]) -> Resource:
    kind = obj.get("kind")
    if kind not in BY_KIND:
        raise ValueError(f"the fake API server does not serve kind {kind!r}")
    return BY_KIND[str(kind)]


class FakeApiServer:
    """A Kubernetes API server fake on ``host:port`` (``port=0``: any free port).

    Use as ``async with FakeApiServer() as api:`` or ``await api.start()`` /
    ``await api.stop()``; drive it with :meth:`create`, :meth:`update`, :meth:`patch`,
    :meth:`delete` (or over HTTP); inject faults with the methods below.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_size: int = 1000,
        bookmark_interval: float = 60.0,
        max_watch_seconds: float = 1800.0,
        expired_watch_as_http_410: bool = False,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        unpaged_cached_lists: bool = False,
    ) -> None:
        self.host = host
        # A list with resourceVersion=0 is served from the watch cache, which (in older
        # API servers) ignores ``limit``: with True, such a list is answered unpaged.
        self.unpaged_cached_lists = unpaged_cached_lists
        self.ssl_context = ssl_context  # serve HTTPS with this (server-side) context
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        # A real API server answers a watch from a too-old resourceVersion with 200 and
        # an ERROR event (the watch cache); with True, an HTTP 410 (etcd-direct paths).
        self.expired_watch_as_http_410 = expired_watch_as_http_410
        self.token = token  # when set, requests need "Authorization: Bearer <token>"
        self.store = Store(history_size)
        self.faults = Faults()
        self.faults.resumed.set()
        self.stats = Stats()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle: set[asyncio.StreamWriter] = set()  # between requests
        self._connection_ids: dict[asyncio.StreamWriter, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (again: on the same port after a :meth:`stop`)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve_connection,
            self.host,
            self.port,
            reuse_address=True,
            limit=1 << 20,
            ssl=self.ssl_context,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("fake_apiserver_listening", url=self.url)

    async def stop(self) -> None:
        """Stop listening and drop every connection (clients see connection refused)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def close_idle(self) -> int:
        """Close the kept-alive connections that wait for a request (as an API server's
        idle timeout does); returns how many."""
        idle = list(self._idle)
        for w in idle:
            w.close()
        return len(idle)

    def _drop_connections(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    # ------------------------------------------------------------------ objects

    def create(self, obj: Mapping[str, Any]) -> JSON:
        """Create ``obj`` (its ``kind`` picks the resource); returns the stored object."""
        resource = _kind_of(obj)
        ns = _namespace_of(obj)
        return copy.deepcopy(self.store.create(resource, dict(obj), ns))

    def update(self, obj: Mapping[str, Any]) -> JSON:
        """Replace an object (as PUT). Without ``metadata.resourceVersion`` it always wins."""
        resource = _kind_of(obj)
        ns = _namespace_of(obj)
        return copy.deepcopy(self.store.update(resource, dict(obj), ns))

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Create or replace (for tests and the manifests loader)."""
        try:
            return self.create(obj)
        except ApiError as exc:
            if exc.code != 409:
                raise
            meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
            return self.update({**obj, "metadata": meta})

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> JSON:
        return copy.deepcopy(self.store.patch(BY_KIND[kind], namespace, name, dict(patch)))

    def delete(self, kind: str, namespace: str, name: str) -> JSON:
        return self.store.delete(BY_KIND[kind], namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> JSON:
        return copy.deepcopy(self.store.get(BY_KIND[kind], namespace, name))

    def objects(self, kind: str) -> list[JSON]:
        return [copy.deepcopy(o) for _, o in sorted(self.store.objects[BY_KIND[kind]].items())]

    @property
    def resource_version(self) -> str:
        return str(self.store.rv)

    def load(self, objects: Iterable[Mapping[str, Any]]) -> int:
        """Create many objects fast (one resourceVersion each); returns how many."""
        count = 0
        for obj in objects:
            meta = obj.get("metadata") or {}
            self.store.create(_kind_of(obj), dict(obj), str(meta.get("namespace") or ""))
            count += 1
        return count

    # ------------------------------------------------------------------ faults

    def _broadcast(self, control: _Control) -> None:
        for w in self.store.watches:
            w.queue.put_nowait(control)

    def bookmark(self) -> None:
        """Send a BOOKMARK now to every watch that allowed bookmarks."""
        self._broadcast(_Control("bookmark", self.store.rv))

    def cut_streams(self, *, at_next_event: bool = False) -> int:
        """Cut every open watch in the middle of an event; returns how many were open.

        ``at_next_event``: deliver half of the next real event first (the client must not
        apply it, and must get it again by re-watching from its last resourceVersion).
        """
        self._broadcast(_Control("cut_next" if at_next_event else "cut"))
        return len(self.store.watches)

    def stall(self) -> None:
        """Stop answering: open watches send nothing, new requests wait (until resume)."""
        self.faults.resumed.clear()

    def resume(self) -> None:
        self.faults.resumed.set()

    def fail_next(
        self,
        count: int,
        status: int = 500,
        *,
        retry_after: float | None = None,
        paths: tuple[str, ...] = (),
    ) -> None:
        """Answer the next ``count`` resource requests with ``status`` (500, 429, 503...)."""
        self.faults.fail_count = count
        self.faults.fail_status = status
        self.faults.fail_retry_after = retry_after
        self.faults.fail_paths = paths

    def expire(self, *, end_watches: bool = True) -> None:
        """Compact history: every resourceVersion so far is too old to watch from.

        ``end_watches``: open watches get an ERROR 410 event and end, as when the server
        drops a watcher that fell behind its window.
        """
        self.store.history.clear()
        self.store.oldest_rv = self.store.rv
        if end_watches:
            self._broadcast(_Control("expire"))

    async def restart(self, *, rv_jump: int = 1000, down_for: float = 0.0) -> None:
        """Restart: connections drop, history is lost and resourceVersions jump ahead."""
        await self.stop()
        store = self.store
        store.history.clear()
        store.rv += rv_jump
        store.oldest_rv = store.rv
        store.watches.clear()
        if down_for:
            await asyncio.sleep(down_for)
        await self.start()

    # ------------------------------------------------------------------ HTTP serving

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._server is None:
            # Accepted just before stop() (its TLS handshake ended after it): a stopped
            # server serves nothing, or a client would keep a watch on a dead server.
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.stats.connections += 1
        self._connection_ids[writer] = self.stats.connections
        served = 0
        try:
            while True:
                self._idle.add(writer)
                request = await self._read_request(reader)
                self._idle.discard(writer)
                if request is None:
                    break
                if served and self.faults.drop_reused > 0:
                    self.faults.drop_reused -= 1
                    self.stats.dropped += 1
                    writer.transport.abort()
                    break
                served += 1
                keep_alive = await self._dispatch(request, writer)
                if not keep_alive:
                    break
        except (_Cut, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels these tasks; ending quietly keeps asyncio's
            # connection callback from reporting the cancellation as an error.
            pass
        finally:
            self._writers.discard(writer)
            self._idle.discard(writer)
            self._connection_ids.pop(writer, None)
            self._tasks.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        return _Request(method.upper(), url.path.rstrip("/") or "/", query, headers, body)

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: JSON | str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = dumps(body), "application/json"
        head = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}", f"Content-Type: {ctype}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append(f"Content-Length: {len(data)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    async def _dispatch(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        self.stats.requests.append((req.method, req.path, dict(req.query)))
        self.stats.request_connections.append(self._connection_ids.get(writer, 0))
        await self.faults.resumed.wait()
        keep_alive = req.headers.get("connection", "").lower() != "close"
        try:
            if self.token is not None and req.headers.get("authorization", "").lower() != (
                f"bearer {self.token}".lower()
            ):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if req.path in ("/healthz", "/livez", "/readyz"):
                await self._respond(writer, 200, "ok")
                return keep_alive
            discovery = self._discovery(req.path)
            if discovery is not None:
                await self._respond(writer, 200, discovery)
                return keep_alive
            route = self._route(req.path)
            if route[0].plural in self.faults.unserved:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if route[0].plural in self.faults.forbidden:
                resource = route[0]
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{resource.plural}.{resource.group} is forbidden: User "kpy" cannot list '
                    f'resource "{resource.plural}" in API group "{resource.group}" at the '
                    "cluster scope",
                )
            self._maybe_fail(req)
            return await self._resource(req, writer, *route) and keep_alive
        except ApiError as exc:
            await self._respond(writer, exc.code, exc.status(), exc.headers)
            return keep_alive

    def _maybe_fail(self, req: _Request) -> None:
        f = self.faults
        if f.fail_count <= 0:
            return
        if f.fail_paths and not req.path.startswith(f.fail_paths):
            return
        f.fail_count -= 1
        self.stats.failed += 1
        headers = {}
        if f.fail_retry_after is not None:
            headers["Retry-After"] = str(max(0, round(f.fail_retry_after)))
        code = f.fail_status
        reason = _ERROR_REASONS.get(code, "InternalError")
        message = {
            429: "Too many requests, please try again later.",
            503: "the server is currently unable to handle the request",
        }.get(code, "an error on the server has prevented the request from succeeding")
        raise ApiError(code, reason, message, headers=headers)

    def _discovery(self, path: str) -> JSON | None:
        if path == "/version":
            return dict(VERSION_INFO)
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        if path == "/apis":
            groups = sorted({r.group for r in RESOURCES if r.group})
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                        "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"},
                    }
                    for g in groups
                ],
            }
        for prefix in sorted({r.prefix for r in RESOURCES}):
            if path == prefix:
                return {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": prefix.removeprefix("/apis/").removeprefix("/api/"),
                    "resources": [
                        {
                            "name": r.plural,
                            "singularName": r.kind.lower(),
                            "namespaced": r.namespaced,
                            "kind": r.kind,
                            "verbs": [
                                "create",
                                "delete",
                                "get",
                                "list",
                                "patch",
                                "update",
                                "watch",
                            ],
                        }
                        for r in RESOURCES
                        if r.prefix == prefix
                    ],
                }
        return None

    def _route(self, path: str) -> tuple[Resource, str, str, str, bool]:
        """(resource, namespace, name, subresource, legacy /watch/ path) or 404."""
        for r in RESOURCES:
            if not path.startswith(r.prefix + "/"):
                continue
            rest = path[len(r.prefix) + 1 :].split("/")
            legacy_watch = rest[0] == "watch"
            if legacy_watch:
                rest = rest[1:]
            namespace = ""
            if len(rest) >= 3 and rest[0] == "namespaces" and r.namespaced:
                namespace, rest = rest[1], rest[2:]
            if not rest or rest[0] != r.plural or len(rest) > 3:
                continue
            name = rest[1] if len(rest) >= 2 else ""
            sub = rest[2] if len(rest) == 3 else ""
            if sub not in ("", "status"):
                continue
            return r, namespace, name, sub, legacy_watch
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    async def _resource(
        self,
        req: _Request,
        writer: asyncio.StreamWriter,
        resource: Resource,
        namespace: str,
        name: str,
        sub: str,
        legacy_watch: bool,
    ) -> bool:
        store = self.store
        if req.method == "GET":
            if legacy_watch or req.query.get("watch", "").lower() in ("1", "true"):
                return await self._watch(req, writer, resource, namespace, name)
            if name:
                await self._respond(writer, 200, store.get(resource, namespace, name))
            else:
                await self._respond(writer, 200, self._list(req, resource, namespace))
            return True
        body = self._body(req)
        if req.method == "POST" and not name:
            await self._respond(writer, 201, store.create(resource, body, namespace))
        elif req.method == "PUT" and name:
            body.setdefault("metadata", {}).setdefault("name", name)
            if body["metadata"]["name"] != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
            await self._respond(
                writer, 200, store.update(resource, body, namespace, subresource=sub)
            )
        elif req.method == "PATCH" and name:
            ctype = req.headers.get("content-type", "").split(";")[0].strip()
            if ctype not in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/merge-patch+json, application/strategic-merge-patch+json",
                )
            await self._respond(writer, 200, store.patch(resource, namespace, name, body))
        elif req.method == "DELETE" and name:
            deleted = store.delete(resource, namespace, name)
            meta = deleted["metadata"]
            await self._respond(
                writer,
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": name,
                        "group": resource.group,
                        "kind": resource.plural,
                        "uid": meta.get("uid", ""),
                    },
                },
            )
        else:
            raise ApiError(405, "MethodNotAllowed", f"{req.method} is not supported here")
        return True

    @staticmethod
    def _body(req: _Request) -> JSON:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        return body

    def _selector(self, req: _Request, namespace: str, name: str) -> Selector:
        return Selector(
            labels=parse_label_selector(req.query.get("labelSelector", "")),
            fields=parse_field_selector(req.query.get("fieldSelector", "")),
            namespace=namespace,
            name=name,
        )

    def _rv_param(self, req: _Request) -> int | None:
        text = req.query.get("resourceVersion", "")
        if text in ("", "0"):
            return None
        try:
            return int(text)
        except ValueError:
            raise ApiError(
                400, "BadRequest", f"invalid resource version {text!r}: not an integer"
            ) from None

    def _list(self, req: _Request, resource: Resource, namespace: str) -> JSON:
        store = self.store
        self.stats.lists += 1
        selector = self._selector(req, namespace, "")
        rv = self._rv_param(req)
        match = req.query.get("resourceVersionMatch", "")
        if rv is not None and rv > store.rv:
            raise ApiError(504, "Timeout", f"Too large resource version: {rv}, current: {store.rv}")
        limit = self._limit_param(req)
        token = req.query.get("continue", "")
        if self.unpaged_cached_lists and req.query.get("resourceVersion") == "0" and not token:
            limit = 0
        after: ObjectKey | None = None
        if token:
            if rv is not None:
                raise ApiError(
                    400,
                    "BadRequest",
                    "specifying resource version is not allowed when using continue",
                )
            list_rv, after = _decode_continue(token)
            if list_rv < store.oldest_rv:
                raise _expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter."
                )
        elif match == "Exact" and rv is not None:
            if rv < store.oldest_rv:
                raise _expired(f"too old resource version: {rv} ({store.oldest_rv})")
            list_rv = rv
        else:
            list_rv = store.rv
        keys, objects = store.snapshot(resource, list_rv)
        start = bisect.bisect_right(keys, after) if after is not None else 0
        items: list[JSON] = []
        meta: JSON = {"resourceVersion": str(list_rv)}
        for i in range(start, len(objects)):
            obj = objects[i]
            if not selector.matches(obj):
                continue
            if limit and len(items) == limit:
                # More matching objects follow: hand out a token to the rest.
                last = _key_of(items[-1])
                meta["continue"] = _encode_continue(list_rv, last)
                if selector == Selector():
                    # As the API server: with a selector the count is unknown (counting
                    # would cost the rest of the list for every page) and not sent.
                    meta["remainingItemCount"] = len(objects) - i
                break
            item = dict(obj)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            items.append(item)
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": meta,
            "items": items,
        }

    @staticmethod
    def _limit_param(req: _Request) -> int:
        text = req.query.get("limit", "")
        if not text:
            return 0
        try:
            limit = int(text)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid limit {text!r}: not an integer") from None
        return max(limit, 0)  # limit <= 0 means no limit

    # ------------------------------------------------------------------ watch

    async def _watch(
        self,
        req: _Request,
        writer: asyncio.StreamWriter,
        resource: Resource,
        namespace: str,
        name: str,
    ) -> bool:
        store = self.store
        selector = self._selector(req, namespace, name)
        rv = self._rv_param(req)
        bookmarks = req.query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        try:
            timeout = float(req.query.get("timeoutSeconds", "") or self.max_watch_seconds)
        except ValueError:
            raise ApiError(400, "BadRequest", "timeoutSeconds must be a number") from None
        if timeout <= 0:  # 0 means "the server's default", as an absent timeoutSeconds
            timeout = self.max_watch_seconds
        timeout = min(timeout, self.max_watch_seconds)
        if rv is not None and rv > store.rv:
            raise ApiError(504, "Timeout", f"Too large resource version: {rv}, current: {store.rv}")
        expired = rv is not None and rv < store.oldest_rv
        if expired and self.expired_watch_as_http_410:
            raise _expired(f"too old resource version: {rv} ({store.oldest_rv})")
        self.stats.watches_started += 1
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if expired:
            status = _expired(f"too old resource version: {rv} ({store.oldest_rv})").status()
            await self._send(writer, {"type": "ERROR", "object": status})
            await self._end(writer)
            return True
        watch = _Watch(resource, selector)
        # Snapshot and subscribe with no await in between: nothing can slip through.
        if rv is None:
            initial = [
                Change(int(o["metadata"]["resourceVersion"]), resource, "ADDED", o, None)
                for _, o in sorted(store.objects[resource].items())
            ]
        else:
            initial = store.changes_since(resource, rv)
        for change in initial:
            watch.queue.put_nowait(change)
        store.watches.add(watch)
        try:
            ended = await self._stream(writer, watch, bookmarks, timeout)
        finally:
            store.watches.discard(watch)
        if ended:
            await self._end(writer)
        return ended

    async def _stream(
        self, writer: asyncio.StreamWriter, watch: _Watch, bookmarks: bool, seconds: float
    ) -> bool:
        """Send events until the timeout (True) or a fault ends the stream (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        next_bookmark = loop.time() + self.bookmark_interval
        cut_next = False
        while True:
            now = loop.time()
            if now >= deadline:
                # Changes committed before the end are delivered first, so the final
                # BOOKMARK's resourceVersion never claims an event the client did not get.
                while not watch.queue.empty():
                    item = watch.queue.get_nowait()
                    if isinstance(item, Change):
                        event = self._event_for(watch.selector, item)
                        if event is not None:
                            await self._send(writer, event)
                if bookmarks:
                    await self._send(writer, self._bookmark(watch.resource, self.store.rv))
                return True
            wait = min(deadline, next_bookmark if bookmarks else deadline) - now
            try:
                item = await asyncio.wait_for(watch.queue.get(), timeout=max(wait, 0))
            except TimeoutError:
                if bookmarks and loop.time() >= next_bookmark and watch.queue.empty():
                    # Only with nothing queued: every change up to rv has been sent.
                    await self.faults.resumed.wait()
                    await self._send(writer, self._bookmark(watch.resource, self.store.rv))
                    next_bookmark = loop.time() + self.bookmark_interval
                continue
            await self.faults.resumed.wait()
            if isinstance(item, _Control):
                if item.what == "bookmark":
                    if bookmarks:
                        await self._send(writer, self._bookmark(watch.resource, item.rv))
                elif item.what == "cut":
                    await self._cut(writer, b'{"type":"MODIFIED","object":{"kind":')
                elif item.what == "cut_next":
                    cut_next = True
                elif item.what == "expire":
                    status = _expired("The resourceVersion for the provided watch is too old.")
                    await self._send(writer, {"type": "ERROR", "object": status.status()})
                    return True
                continue
            event = self._event_for(watch.selector, item)
            if event is None:
                continue
            if cut_next:
                data = json.dumps(event, separators=(",", ":")).encode()
                await self._cut(writer, data[: len(data) // 2])
            await self._send(writer, event)

    @staticmethod
    def _event_for(selector: Selector, change: Change) -> JSON | None:
        """The event a watcher with ``selector`` sees for ``change`` (None: nothing)."""
        now = selector.matches(change.obj)
        before = change.old is not None and selector.matches(change.old)
        if change.type == "DELETED":
            return {"type": "DELETED", "object": change.obj} if before else None
        if change.type == "ADDED":
            return {"type": "ADDED", "object": change.obj} if now else None
        if now and before:
            return {"type": "MODIFIED", "object": change.obj}
        if now:
            return {"type": "ADDED", "object": change.obj}
        if before:
            return {"type": "DELETED", "object": change.obj}
        return None

    @staticmethod
    def _bookmark(resource: Resource, rv: int) -> JSON:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": resource.kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
            },
        }

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, event: JSON) -> None:
        data = dumps(event) + b"\n"
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()

    @staticmethod
    async def _end(writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _cut(writer: asyncio.StreamWriter, partial: bytes) -> None:
        """Announce a chunk longer than what follows, send part of it, and drop the line."""
        writer.write(b"%x\r\n%s" % (len(partial) * 2 + 2, partial))
        writer.close()  # flushes what was written (abort() would discard it), then FIN
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        raise _Cut
