"""The Kubernetes API as a source: list + watch Services, EndpointSlices and this node's Node.

One reflector per resource, with the semantics a production node agent needs
(Kubernetes API concepts, "Efficient detection of changes"):

* list, then watch from the list's resourceVersion with ``allowWatchBookmarks=true``;
  the newest resourceVersion seen (event or BOOKMARK) is where a re-watch starts;
* ``410 Gone`` (an HTTP 410 or an ERROR event with code 410) means the history is gone:
  relist and reconcile — objects missing from the new list are emitted as DELETE, so
  Services deleted while disconnected disappear;
* connection errors, 5xx and 429 are retried with jittered exponential backoff
  (``Retry-After`` respected); a watch is renewed before the server closes it
  (``timeoutSeconds`` below the server's limit) and abandoned if it goes silent past
  its deadline;
* ``sink.synced()`` only after Services, EndpointSlices and the Node have each been
  listed once (and the Node exists, or ``node_grace`` has passed), so a partial view is
  never programmed; losing the API server only reports ``sink.connection(False, ...)``
  — nothing is deleted because the API is gone;
* an object without usable metadata is skipped with a structured warning naming it;
* Services and EndpointSlices are selected as kube-proxy selects them
  (:data:`IGNORED_LABEL_SELECTOR`): another proxy's, and headless Services' slices, are
  left out by the API server, and one that gains such a label is DELETED by the watch.

Configuration comes from the official ``kubernetes`` client (in-cluster service
account, a kubeconfig, or an explicit ``--master``); the HTTP is kpy's own, on asyncio
streams (lists on a kept-alive connection per reflector, each watch on its own), and
objects are decoded as raw JSON — see docs/decisions/kube-transport.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import json
import os
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import structlog
import yaml

from kpy import __version__
from kpy.core.model import ConfigError
from kpy.sources import Event, EventType, Kind, Sink, SourceMetrics

log = structlog.get_logger("kpy.sources.kube")

JSON = dict[str, Any]

# What the agent needs from RBAC: (apiGroup, resource, verbs). The deploy manifests'
# ClusterRole is checked against this.
REQUIRED_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "services", ("list", "watch")),
    ("discovery.k8s.io", "endpointslices", ("list", "watch")),
    ("", "nodes", ("list", "watch")),
    ("", "events", ("create", "patch")),
)

SERVICES_PATH = "/api/v1/services"
ENDPOINT_SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
NODES_PATH = "/api/v1/nodes"
USER_AGENT = f"kpy/{__version__}"
# What kube-proxy asks the API server to leave out of its Services and EndpointSlices
# (cmd/kube-proxy/app/server.go): another proxy's objects, and the EndpointSlices of
# headless Services. The selector is evaluated server-side, on lists and watches alike; an
# object that gains one of these labels arrives as DELETED. kpy.core.convert still checks the
# proxy name itself.
IGNORED_LABEL_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

# Size guards. The API server stores objects up to ~1.5 MiB (etcd's request limit) and
# lists in pages (``page_size`` objects): anything far beyond is not a Kubernetes answer.
MAX_EVENT_BYTES = 16 << 20  # one watch event; a longer one is skipped with a warning
MAX_LIST_BYTES = 1 << 30  # one list page


class KubeConfigError(ConfigError):
    """No usable API server configuration; the message says what was tried or what failed."""


class ApiStatusError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: bytes, retry_after: float | None) -> None:
        self.status = status
        self.retry_after = retry_after
        self.reason, self.message = _status_reason(body)
        super().__init__(f"HTTP {status} {self.reason}: {self.message}")


class ProtocolError(Exception):
    """The response was not valid HTTP/1.1 or not the JSON expected."""


def _status_reason(body: bytes) -> tuple[str, str]:
    try:
        status = json.loads(body)
        return str(status.get("reason", "")), str(status.get("message", ""))
    except (ValueError, AttributeError):
        return "", body[:200].decode("utf-8", "replace")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiTarget:
    """Where and how to reach the API server: taken from a client Configuration."""

    scheme: str
    host: str
    port: int
    base_path: str = ""
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    auth: Callable[[], dict[str, str]] = field(default=lambda: {})
    auth_may_block: bool = False  # token refresh may read a file or run an exec plugin

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ApiTarget:
        if "://" not in url:
            url = "https://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KubeConfigError(f"not an API server address: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            **kwargs,
        )

    @classmethod
    def from_configuration(cls, configuration: Any) -> ApiTarget:
        """From a ``kubernetes.client.Configuration`` (TLS files, token, basic auth)."""
        context: ssl.SSLContext | None = None
        if configuration.host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif getattr(configuration, "assert_hostname", None) is False:
                context.check_hostname = False

        def auth() -> dict[str, str]:
            headers: dict[str, str] = {}
            for setting in configuration.auth_settings().values():  # refreshes tokens
                if setting.get("in") == "header" and setting.get("value"):
                    headers[str(setting["key"]).title()] = str(setting["value"])
            if not headers and (configuration.username or configuration.password):
                headers["Authorization"] = configuration.get_basic_auth_token()
            return headers

        return cls.from_url(
            configuration.host,
            ssl_context=context,
            server_hostname=getattr(configuration, "tls_server_name", None) or None,
            auth=auth,
            auth_may_block=configuration.refresh_api_key_hook is not None,
        )


def load_target(
    *,
    kubeconfig: str = "",
    master: str = "",
    environ: Mapping[str, str] | None = None,
    token_file: str = IN_CLUSTER_TOKEN,
    ca_file: str = IN_CLUSTER_CA,
) -> ApiTarget:
    """The API server to use, like kube-proxy: kubeconfig, else in-cluster, else master.

    ``master`` overrides the address from a kubeconfig or the in-cluster environment
    (credentials are kept): without kube-proxy the ``kubernetes`` Service VIP is not
    programmed yet, so the agent must reach the API server directly. So does setting
    ``KUBERNETES_SERVICE_HOST``/``PORT`` in the DaemonSet, which in-cluster reads.
    """
    env = os.environ if environ is None else environ
    # The client is needed for configuration only (and its functions are untyped: the
    # modules are held as Any, so nothing untyped leaks past this function).
    client: Any = importlib.import_module("kubernetes.client")
    config: Any = importlib.import_module("kubernetes.config")

    configuration = client.Configuration()
    where = "in-cluster configuration"
    try:
        if kubeconfig:
            where = kubeconfig
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        elif env.get("KUBERNETES_SERVICE_HOST") and os.path.exists(token_file):
            loader = config.incluster_config.InClusterConfigLoader(
                token_filename=token_file, cert_filename=ca_file, environ=env
            )
            loader.load_and_set(configuration)
        elif master:
            configuration.host = master if "://" in master else f"https://{master}"
        else:
            where = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if not os.path.exists(where.split(os.pathsep)[0]):
                raise KubeConfigError(
                    "no API server: not in a cluster (no KUBERNETES_SERVICE_HOST and service "
                    "account token), no --kubeconfig, no --master, and no default kubeconfig"
                )
            config.load_kube_config(config_file=where, client_configuration=configuration)
        if master:
            where = f"--master {master}"
            configuration.host = master if "://" in master else f"https://{master}"
        return ApiTarget.from_configuration(configuration)
    except (config.ConfigException, yaml.YAMLError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, KubeConfigError):
            raise
        raise KubeConfigError(f"{where}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- HTTP/1.1


class Response:
    """A response whose body is read as a whole (lists) or as lines (watch streams)."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer
        self._pool = pool
        self._complete = False  # the body was read to its end: the connection may be reused

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            return max(0.0, parsed.timestamp() - time.time()) if parsed else None

    async def _chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                if size > MAX_EVENT_BYTES:  # read in pieces, never buffered whole
                    async for piece in self._read(size):
                        yield piece
                    if await reader.readexactly(2) != b"\r\n":
                        raise ProtocolError("chunk not terminated by CRLF")
                    continue
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    self._complete = True
                    return
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise ProtocolError("chunk not terminated by CRLF")
                yield data[:-2]
        elif "content-length" in self.headers:
            async for piece in self._read(int(self.headers["content-length"])):
                yield piece
            self._complete = True
        else:
            while data := await reader.read(1 << 20):
                yield data

    async def _read(self, remaining: int) -> AsyncIterator[bytes]:
        """Exactly ``remaining`` bytes, in pieces of at most 1 MiB."""
        while remaining > 0:
            data = await self._reader.read(min(remaining, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body; one longer than ``limit`` bytes (default
        :data:`MAX_LIST_BYTES`) raises ProtocolError."""
        limit = MAX_LIST_BYTES if limit is None else limit
        chunks, size = [], 0
        async for chunk in self._chunks():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"response larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def lines(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """Newline-delimited records; a partial last record (a cut stream) raises. A
        record longer than ``limit`` bytes (default :data:`MAX_EVENT_BYTES`) is skipped
        with a warning, and not buffered."""
        limit = MAX_EVENT_BYTES if limit is None else limit
        pending = b""
        dropping = False
        async for chunk in self._chunks():
            if dropping:
                end = chunk.find(b"\n")
                if end < 0:
                    continue
                chunk, dropping = chunk[end + 1 :], False
            pending += chunk
            if b"\n" in chunk:
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    if len(line) > limit:
                        log.warning("kube_event_too_large", bytes=len(line), note="skipped")
                    elif line.strip():
                        yield line
            if len(pending) > limit:
                log.warning("kube_event_too_large", bytes=f">{limit}", note="skipped")
                pending, dropping = b"", True
        if pending.strip():
            raise ProtocolError("stream ended in the middle of an event")

    def close(self) -> None:
        """Give the connection back to its pool if the body was read to its end and the
        server keeps it open; otherwise close it."""
        pool, self._pool = self._pool, None
        reusable = (
            pool is not None
            and self._complete
            and self.headers.get("connection", "").lower() != "close"
            and not self._writer.is_closing()
        )
        if pool is not None and reusable:
            pool.release(self._reader, self._writer)
        else:
            self._writer.transport.abort()


class ConnectionPool:
    """Kept-alive HTTP/1.1 connections to one API server, for requests other than watches.

    A request takes an idle connection (one the server has closed meanwhile is
    dropped) or opens one; a response read to its end gives it back. At most
    ``max_idle`` are kept. A watch never uses the pool: it holds its own connection.
    """

    def __init__(self, max_idle: int = 2) -> None:
        self.max_idle = max_idle
        self.opened = 0  # connections opened for the pool's requests
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.transport.abort()  # closed by the server meanwhile: drop it
                continue
            return reader, writer
        return None

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._idle) >= self.max_idle:
            writer.transport.abort()
        else:
            self._idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self._idle:
            writer.transport.abort()
        self._idle.clear()


def _keepalive(sock: socket.socket | None) -> None:
    """TCP keepalive: a dead peer (node rebooted, network gone) is noticed in ~1 min."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


async def _connect(
    target: ApiTarget, connect_timeout: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.ssl_context,
                server_hostname=(target.server_hostname or target.host)
                if target.ssl_context
                else None,
                limit=1 << 22,
            )
    except TimeoutError:
        raise TimeoutError(
            f"no connection to {target.host}:{target.port} within {connect_timeout} s"
        ) from None
    _keepalive(writer.get_extra_info("socket"))
    return reader, writer


class _ClosedBeforeAnswer(Exception):
    """A kept-alive connection ended before any byte of the response."""


async def request(
    target: ApiTarget,
    method: str,
    path: str,
    params: Mapping[str, str] | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    *,
    connect_timeout: float | None = None,
    pool: ConnectionPool | None = None,
) -> Response:
    """Send one request and read the status line and headers.

    Without ``pool``, on a new connection that ends with the response (``Connection:
    close``: watches). With one, on a kept-alive connection from it; if a reused
    connection turns out closed by the server before any byte of the answer (its idle
    timeout raced the request), a ``GET`` is sent once more on a new connection.

    ``connect_timeout`` bounds the TCP connect and the TLS handshake (a black-holed
    address or a peer that never answers the handshake); the caller reads the body,
    closes the response (which gives a pooled connection back) and bounds the rest.
    """
    headers = await asyncio.to_thread(target.auth) if target.auth_may_block else target.auth()
    query = f"?{urlencode(params)}" if params else ""
    host = f"[{target.host}]" if ":" in target.host else target.host
    lines = [
        f"{method} {target.base_path}{quote(path)}{query} HTTP/1.1",
        f"Host: {host}:{target.port}",
        f"User-Agent: {USER_AGENT}",
        "Accept: application/json",
        "Connection: keep-alive" if pool is not None else "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    kept = pool.take() if pool is not None else None
    if kept is not None:
        try:
            return await _exchange(kept, data, pool, reused=True)
        except _ClosedBeforeAnswer:
            if method != "GET":
                raise ConnectionResetError("the kept-alive connection was closed") from None
    connection = await _connect(target, connect_timeout)
    if pool is not None:
        pool.opened += 1
    try:
        return await _exchange(connection, data, pool, reused=False)
    except _ClosedBeforeAnswer:
        raise ConnectionResetError("the server closed the connection without answering") from None


async def _exchange(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    data: bytes,
    pool: ConnectionPool | None,
    *,
    reused: bool,
) -> Response:
    reader, writer = connection
    try:
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClosedBeforeAnswer from None
            raise
        except ConnectionError:
            if reused:
                raise _ClosedBeforeAnswer from None
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.1 response: {status_line[:60]!r}")
        response_headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                response_headers[k.strip().lower()] = v.strip()
        if parts[0] == "HTTP/1.0":
            response_headers.setdefault("connection", "close")
        return Response(int(parts[1]), response_headers, reader, writer, pool)
    except BaseException:
        writer.transport.abort()
        raise


# --------------------------------------------------------------------------- backoff


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffPolicy:
    """Jittered exponential backoff (client-go's reflector uses 800 ms → 30 s)."""

    initial: float = 0.8
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5  # ± this fraction
    max_retry_after: float = 300.0  # a Retry-After above this is capped


class Backoff:
    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._attempt = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._attempt = 0

    def next(self, retry_after: float | None = None) -> float:
        p = self.policy
        base = min(p.maximum, p.initial * p.factor**self._attempt)
        self._attempt = min(self._attempt + 1, 64)
        delay = base * (1 + self._rng.uniform(-p.jitter, p.jitter))
        if retry_after is not None:
            # The server said when: wait that long (plus a little jitter, so a fleet of
            # agents throttled together does not come back together).
            delay = min(retry_after, p.max_retry_after) + self._rng.uniform(0, p.initial / 4)
        return delay


# --------------------------------------------------------------------------- lists

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def split_list(data: bytes) -> tuple[Any, list[bytes]]:
    """A list response's ``metadata`` (decoded) and its ``items`` (each still raw JSON),
    found without decoding the items: for a list whose items nest too deep to decode
    at once. Iterative; raises ValueError when the text is not a list response."""
    depth = 0
    items: list[bytes] = []
    metadata: Any = None
    key = b""
    start = -1  # where the current item (depth 2 inside "items") starts
    in_items = False
    for token in _TOKEN.finditer(data):
        text = token.group()
        if text[:1] == b'"':
            if depth == 1:
                key = text
            continue
        if text in (b"[", b"{"):
            depth += 1
            if depth == 2 and key == b'"items"' and text == b"[":
                in_items, start = True, token.end()
            elif depth == 2 and key == b'"metadata"' and text == b"{":
                start = token.start()
        elif text in (b"]", b"}"):
            if depth == 2 and in_items and text == b"]":
                if data[start : token.start()].strip():
                    items.append(data[start : token.start()])
                in_items = False
            elif depth == 2 and key == b'"metadata"' and text == b"}":
                metadata = json.loads(data[start : token.end()])
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced brackets")
        elif text == b"," and depth == 2 and in_items:
            items.append(data[start : token.start()])
            start = token.end()
    if depth != 0 or not isinstance(metadata, dict):
        raise ValueError("not a list response")
    return metadata, items


# --------------------------------------------------------------------------- reflector

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
    ) -> None:
        self.source = source
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
        elif self.kind is not Kind.NODE and (not isinstance(namespace, str) or not namespace):
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
        return ((namespace if self.kind is not Kind.NODE else ""), name), rv  # type: ignore[return-value]

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
        if self.kind is not Kind.NODE:
            meta["namespace"] = key[0]
        return {"kind": str(self.kind), "metadata": meta}

    def _delete(self, key: ObjectKey, obj: JSON) -> None:
        if self.known.pop(key, None) is None:
            return
        self.source.emit(
            Event(kind=self.kind, type=EventType.DELETE, namespace=key[0], name=key[1], obj=obj)
        )

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

    async def _list_page(self, params: dict[str, str]) -> tuple[Sequence[Any], dict[str, Any]]:
        """One list request: its items and its list metadata."""
        async with asyncio.timeout(self.source.timeouts.list):
            response = await request(
                self.source.target,
                "GET",
                self.path,
                params,
                connect_timeout=self.source.timeouts.connect,
                pool=self.pool,
            )
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
            response = await request(
                self.source.target,
                "GET",
                self.path,
                params,
                connect_timeout=self.source.timeouts.connect,
            )
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
                    "kube_request_failed",
                    kind=str(self.kind),
                    status=exc.status,
                    reason=exc.reason,
                    message=exc.message,
                    retry_after=exc.retry_after,
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


# --------------------------------------------------------------------------- the source


class KubeSource:
    """The ``kube`` source: three reflectors, one sync gate, one connection state."""

    def __init__(
        self,
        target: ApiTarget,
        node_name: str,
        *,
        backoff: BackoffPolicy | None = None,
        timeouts: Timeouts | None = None,
        node_grace: float = 30.0,
        node_log_interval: float = 60.0,
        page_size: int = 500,
        metrics: SourceMetrics | None = None,
    ) -> None:
        self.target = target
        self.page_size = page_size  # list in pages of this many objects (0: all at once)
        self.metrics = metrics
        self.node_name = node_name
        self.backoff = backoff or BackoffPolicy()
        self.timeouts = timeouts or Timeouts()
        self.node_grace = node_grace
        self.node_log_interval = node_log_interval
        self.services = Reflector(
            self, Kind.SERVICE, SERVICES_PATH, label_selector=IGNORED_LABEL_SELECTOR
        )
        self.endpoint_slices = Reflector(
            self, Kind.ENDPOINT_SLICE, ENDPOINT_SLICES_PATH, label_selector=IGNORED_LABEL_SELECTOR
        )
        self.node = Reflector(
            self, Kind.NODE, NODES_PATH, field_selector=f"metadata.name={node_name}"
        )
        self.reflectors = (self.services, self.endpoint_slices, self.node)
        self.pool = ConnectionPool(max_idle=1)  # for the Events the agent posts
        self.healthy = True
        self.is_synced = False
        self._sink: Sink | None = None
        self._node_seen = asyncio.Event()

    @classmethod
    def from_config(cls, config: Any) -> KubeSource:
        """From the agent's configuration (``kpy.agent.config.AgentConfig``)."""
        target = load_target(kubeconfig=config.kubeconfig, master=config.master)
        # With node IPs given by flags the Node is not needed to program anything.
        grace = 0.0 if config.node_ips else 30.0
        return cls(target, config.node_name(), node_grace=grace)

    def set_metrics(self, metrics: SourceMetrics | None) -> None:
        """Report watch reconnects and relists here (``kpy.agent.observers.attach`` calls it)."""
        self.metrics = metrics

    # -- called by reflectors

    def emit(self, event: Event) -> None:
        if event.kind is Kind.NODE and event.name == self.node_name:
            if event.type is EventType.UPSERT:
                self._node_seen.set()
            else:
                self._node_seen.clear()
                log.error(
                    "node_object_deleted",
                    node=self.node_name,
                    note="keeping the last known node state; watching for it",
                )
        assert self._sink is not None
        self._sink.event(event)

    def report(self, reflector: Reflector, healthy: bool, reason: str = "") -> None:
        reflector.healthy = healthy
        now = all(r.healthy for r in self.reflectors)
        if now != self.healthy:
            self.healthy = now
            assert self._sink is not None
            self._sink.connection(now, "" if now else reason)

    # -- running

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        log.info("kube_source_starting", server=self.target.url, node=self.node_name)
        try:
            async with asyncio.TaskGroup() as tasks:
                for r in self.reflectors:
                    tasks.create_task(r.run(), name=f"reflector-{r.kind}")
                tasks.create_task(self._gate(sink), name="kube-sync-gate")
        finally:
            for pool in (self.pool, *(r.pool for r in self.reflectors)):
                pool.close()

    async def _gate(self, sink: Sink) -> None:
        """Call ``synced()`` once all three are listed and the Node exists (or grace ends)."""
        for r in self.reflectors:
            await r.listed.wait()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.node_grace
        while not self._node_seen.is_set():
            remaining = give_up - loop.time()
            log.error(
                "node_object_missing",
                node=self.node_name,
                note="no Node object with this name: check --node / the host name; watching for it",
                programming="waiting" if remaining > 0 else "without node addresses",
            )
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._node_seen.wait(), timeout=min(remaining, self.node_log_interval)
                )
        self.is_synced = True
        sink.synced()
        while True:  # keep saying so while this node has no Node object
            await asyncio.sleep(self.node_log_interval)
            if not self._node_seen.is_set():
                log.error("node_object_missing", node=self.node_name, note="still missing")

    # -- other API calls the agent makes (events)

    async def post(self, path: str, body: Mapping[str, Any]) -> JSON:
        """POST a JSON object (e.g. an Event); raises :class:`ApiStatusError` on failure."""
        return await self._call("POST", path, json.dumps(body).encode(), "application/json")

    async def patch(self, path: str, body: Mapping[str, Any]) -> JSON:
        """Merge-patch an object."""
        return await self._call(
            "PATCH", path, json.dumps(body).encode(), "application/merge-patch+json"
        )

    async def _call(self, method: str, path: str, body: bytes, content_type: str) -> JSON:
        async with asyncio.timeout(self.timeouts.list):
            response = await request(
                self.target,
                method,
                path,
                None,
                body,
                content_type,
                connect_timeout=self.timeouts.connect,
                pool=self.pool,
            )
            try:
                data = await response.body()
            finally:
                response.close()
        if response.status >= 300:
            raise ApiStatusError(response.status, data, response.retry_after)
        result = json.loads(data)
        return result if isinstance(result, dict) else {}
