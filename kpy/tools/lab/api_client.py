"""Talking to a real API server as a test or the lab does: a kubeconfig, a keep-alive client.

:func:`kubeconfig` writes credentials (a client certificate or a bearer token) for a
server; :class:`Client` sends one request at a time on a kept-alive HTTPS connection whose
socket was opened inside the control plane's network namespace
(:func:`kpy.kernel.netns.run_in_netns`), and is then used from any thread.
:func:`collection_path` and :func:`object_path` give an object's REST paths.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from pathlib import Path
from typing import Any

import yaml

from kpy.kernel.netns import run_in_netns


def kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    user: str = "user",
) -> Path:
    """Write a kubeconfig for ``server`` with a client certificate or a bearer token."""
    credentials: dict[str, str] = {}
    if cert is not None and key is not None:
        credentials = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        credentials["token"] = token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "kpy", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "kpy", "context": {"cluster": "kpy", "user": user}}],
        "current-context": "kpy",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o600)
    return path


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message", "") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"HTTP {status}: {message}")


class Client:
    """A keep-alive HTTPS client to the API server whose socket lives in ``netns``.

    Thread-safe (one request at a time); reconnects (inside the namespace) when the
    connection broke, e.g. across an API server restart.
    """

    def __init__(
        self,
        netns: str | None,
        host: str,
        port: int,
        context: ssl.SSLContext,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.netns = netns
        self.host = host
        self.port = port
        self.context = context
        self.headers = headers or {}
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
        try:
            run_in_netns(self.netns, conn.connect)
        except BaseException:
            conn.close()  # a failed TLS handshake leaves the plain socket open
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Any:
        """Send one request; the decoded JSON answer. Raises :class:`ApiError` otherwise."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.headers}
        if data is not None:
            headers["Content-Type"] = content_type
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None:
                    self._conn = self._connect()
                try:
                    self._conn.request(method, path, data, headers)
                    response = self._conn.getresponse()
                    raw = response.read()
                    break
                except (OSError, http.client.HTTPException):
                    self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        if response.status not in ok:
            raise ApiError(response.status, answer)
        return answer

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> Any:
        return self.request("POST", collection_path(obj) + ("?dryRun=All" if dry_run else ""), obj)

    def apply(
        self, obj: dict[str, Any], *, manager: str = "kpy-test", dry_run: bool = False
    ) -> Any:
        """Server-side apply (``kubectl apply --server-side``)."""
        query = f"?fieldManager={manager}&force=true" + ("&dryRun=All" if dry_run else "")
        return self.request(
            "PATCH",
            object_path(obj) + query,
            obj,
            content_type="application/apply-patch+yaml",
        )

    def delete(self, obj: dict[str, Any], *, grace: int | None = None) -> Any:
        query = "" if grace is None else f"?gracePeriodSeconds={grace}"
        return self.request("DELETE", object_path(obj) + query, ok=(200, 202, 404))

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> Any:
        return self.request(
            "PATCH",
            object_path(obj) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower + ("es" if lower.endswith("s") else "s")


def collection_path(obj: dict[str, Any]) -> str:
    api_version = obj["apiVersion"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = obj.get("metadata", {}).get("namespace")
    plural = {"NetworkPolicy": "networkpolicies"}.get(obj["kind"], _plural(obj["kind"]))
    if namespace:
        return f"{base}/namespaces/{namespace}/{plural}"
    return f"{base}/{plural}"


def object_path(obj: dict[str, Any]) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"
