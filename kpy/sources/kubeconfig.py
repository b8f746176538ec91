"""API server settings from a kubeconfig file or the in-cluster service account.

What the official ``kubernetes`` client's loaders give kpy, read directly: importing that
client costs ~0.2 s of a cold start, and kpy only needs its configuration, never its API
classes. Handled here, as the client handles them:

* in-cluster: ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`` (IPv6 in
  brackets), the service account's CA and token; the token file is read again when
  the last read is a minute old (projected tokens rotate);
* a kubeconfig file: its ``current-context``; the cluster's ``server``,
  ``certificate-authority`` / ``-data``, ``insecure-skip-tls-verify``,
  ``tls-server-name``; the user's ``token`` / ``tokenFile``, ``client-certificate`` /
  ``-data`` and ``client-key`` / ``-data`` (used only with an ``https`` server, as
  the client does), ``username`` + ``password``. Relative paths are relative to the
  kubeconfig's directory; a ``-data`` field wins over its file field.

:func:`from_file` returns ``None`` for what it leaves to the official client: a user
with an ``exec`` plugin or an ``auth-provider`` (tokens that expire and are fetched
again), and a list of files to merge (``a:b``, as ``KUBECONFIG`` may be).

Errors are ``ValueError`` (:class:`KubeconfigInvalid`) or ``OSError`` with a message
naming the field or file; the caller adds which configuration it was reading.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

TOKEN_REREAD_SECONDS = 60.0  # the client's in-cluster token refresh period


class KubeconfigInvalid(ValueError):
    """A kubeconfig (or the in-cluster environment) that cannot be used as written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How to reach the API server: the client ``Configuration`` fields kpy uses."""

    host: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None  # PEM, from client-certificate-data
    key_data: bytes | None = None
    verify: bool = True
    tls_server_name: str | None = None
    auth: Callable[[], dict[str, str]] = field(default=lambda: {})
    auth_may_block: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an ``https`` host: CA, client certificate and verification as configured."""
        if not self.host.startswith("https"):
            return None
        context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.cert_data is not None:
            _load_cert_data(context, self.cert_data, self.key_file, self.key_data)
        elif self.cert_file and self.key_data is not None:
            _load_cert_data(context, None, self.key_file, self.key_data, self.cert_file)
        elif self.cert_file:  # without a certificate a key is ignored, as by the client
            context.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _load_cert_data(
    context: ssl.SSLContext,
    cert_data: bytes | None,
    key_file: str | None,
    key_data: bytes | None,
    cert_file: str | None = None,
) -> None:
    """``load_cert_chain`` reads files only: inline data goes through a private temporary
    directory (mode 0700) that is removed as soon as the context holds the key."""
    with tempfile.TemporaryDirectory(prefix="kpy-kubeconfig-") as tmp:
        if cert_data is not None:
            cert_file = os.path.join(tmp, "cert.pem")
            with open(cert_file, "wb") as f:
                f.write(cert_data)
        if key_data is not None:
            key_file = os.path.join(tmp, "key.pem")
            with open(key_file, "wb") as f:
                f.write(key_data)
        assert cert_file is not None
        context.load_cert_chain(cert_file, key_file)


def static_auth(value: str | None) -> Callable[[], dict[str, str]]:
    headers = {"Authorization": value} if value else {}
    return lambda: dict(headers)


# --------------------------------------------------------------------------- in-cluster


def in_cluster(environ: Mapping[str, str], token_file: str, ca_file: str) -> Settings:
    """The service account's settings (the client's ``InClusterConfigLoader``)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if host is None or port is None:
        raise KubeconfigInvalid("Service host/port is not set.")
    if not host or not port:
        raise KubeconfigInvalid("Service host/port is set but empty.")
    if ":" in host or "%" in host:
        host = f"[{host}]"
    if not os.path.isfile(token_file):
        raise KubeconfigInvalid("Service token file does not exist.")
    token = TokenFile(token_file, "bearer ")
    token.read()
    if not os.path.isfile(ca_file):
        raise KubeconfigInvalid("Service certification file does not exist.")
    with open(ca_file) as f:
        if not f.read():
            raise KubeconfigInvalid("Cert file exists but empty.")
    return Settings(
        host=f"https://{host}:{port}", ca_file=ca_file, auth=token.auth, auth_may_block=True
    )


class TokenFile:
    """A bearer token read from a file, read again once the last read is a minute old.

    ``auth`` runs in a worker thread (``auth_may_block``): a lock keeps two requests
    from reading at once. A file that became unreadable or empty is an ``OSError``,
    which the source treats as a failed request and retries.
    """

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._value = ""
        self._read_at = -TOKEN_REREAD_SECONDS
        self._lock = threading.Lock()

    def read(self) -> str:
        with open(self.path) as f:
            content = f.read()
        if not content:
            raise KubeconfigInvalid("Token file exists but empty.")
        self._value = self.prefix + content
        self._read_at = time.monotonic()
        return self._value

    def auth(self) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._read_at >= TOKEN_REREAD_SECONDS:
                try:
                    self.read()
                except KubeconfigInvalid as exc:
                    raise OSError(f"{self.path}: {exc}") from exc
            return {"Authorization": self._value}


# --------------------------------------------------------------------------- kubeconfig


def from_file(path: str) -> Settings | None:
    """The current context of the kubeconfig at ``path``; ``None``: use the client."""
    if os.pathsep in path:
        return None  # several files to merge
    with open(path) as f:
        document = yaml.safe_load(f)
    if not document:
        raise KubeconfigInvalid("Invalid kube-config file. No configuration found.")
    config = _mapping(document, "the kubeconfig")
    current = config.get("current-context")
    if not current:
        raise KubeconfigInvalid(f"Invalid kube-config file. Expected key current-context in {path}")
    context = _mapping(_required(config, "contexts", str(current)).get("context"), "context")
    if "cluster" not in context:
        raise KubeconfigInvalid(
            f"Invalid kube-config file. Expected key cluster in context {current}"
        )
    cluster = _mapping(
        _required(config, "clusters", str(context["cluster"])).get("cluster"), "cluster"
    )
    user: Mapping[str, Any] = {}
    if context.get("user") and config.get("users"):
        named = _named(config, "users", str(context["user"]))
        if named is not None:
            user = _mapping(named.get("user") or {}, "user")
    if "exec" in user or "auth-provider" in user:
        return None
    base = os.path.dirname(os.path.abspath(path))
    server = cluster.get("server")
    if not server:
        raise KubeconfigInvalid(f"cluster {context['cluster']!r} has no server")
    host = str(server).rstrip("/")
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise KubeconfigInvalid(f"insecure-skip-tls-verify: not true or false: {insecure!r}")
    name = cluster.get("tls-server-name")
    settings = Settings(
        host=host,
        verify=not insecure,
        tls_server_name=str(name) if name else None,
        auth=static_auth(_authorization(user, base)),
    )
    if not host.startswith("https"):
        return settings
    ca_file, ca_data = _file_or_data(cluster, "certificate-authority", base)
    cert_file, cert_data = _file_or_data(user, "client-certificate", base)
    key_file, key_data = _file_or_data(user, "client-key", base)
    return Settings(
        host=host,
        ca_file=ca_file,
        ca_data=None if ca_data is None else ca_data.decode("ascii", "replace"),
        cert_file=cert_file,
        key_file=key_file,
        cert_data=cert_data,
        key_data=key_data,
        verify=settings.verify,
        tls_server_name=settings.tls_server_name,
        auth=settings.auth,
    )


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise KubeconfigInvalid(f"Invalid kube-config file. {what} is not a mapping")
    return value


def _required(config: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    found = _named(config, key, name)
    if found is None:
        raise KubeconfigInvalid(
            f"Invalid kube-config file. Expected object with name {name} in {key} list"
        )
    return found


def _named(config: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any] | None:
    entries = config.get(key) or []
    if not isinstance(entries, list):
        raise KubeconfigInvalid(f"Invalid kube-config file. {key} is not a list")
    found = [e for e in entries if isinstance(e, Mapping) and e.get("name") == name]
    if len(found) > 1:
        raise KubeconfigInvalid(
            f"Invalid kube-config file. Expected only one object with name {name} in {key} list"
        )
    return found[0] if found else None


def _file_or_data(
    section: Mapping[str, Any], key: str, base: str
) -> tuple[str | None, bytes | None]:
    """``key-data`` (base64, wins when present) or the file ``key`` names."""
    if f"{key}-data" in section:
        data = section[f"{key}-data"]
        if not data:
            return None, None
        try:
            return None, base64.b64decode(str(data))  # as the client: not validated
        except binascii.Error as exc:
            raise KubeconfigInvalid(f"{key}-data: not base64: {exc}") from exc
    if section.get(key):
        path = os.path.normpath(os.path.join(base, str(section[key])))
        if not os.path.isfile(path):
            raise KubeconfigInvalid(f"File does not exist: {path}")
        return path, None
    return None, None


def _authorization(user: Mapping[str, Any], base: str) -> str | None:
    """The Authorization header: a token (inline or ``tokenFile``), else basic auth."""
    token: str | None = None
    if "token" in user:
        token = str(user["token"]) if user["token"] else None
    elif user.get("tokenFile"):
        with open(os.path.normpath(os.path.join(base, str(user["tokenFile"])))) as f:
            token = f.read()
    if token:
        return f"Bearer {token}"
    if "username" in user and "password" in user:
        pair = f"{user['username']}:{user['password']}".encode()
        return "Basic " + base64.b64encode(pair).decode()
    return None
