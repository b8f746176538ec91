"""kpy's own kubeconfig and in-cluster loading (kpy.sources.kubeconfig) against the
official client's loader it replaces on the start path: the same server, TLS settings
and Authorization header for every form kpy reads; client certificates proven by a real
TLS handshake with a server that requires one; exec plugins still through the client."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kpy.sources import kubeconfig as kc
from kpy.sources.kube import ApiTarget, KubeConfigError, load_target
from kpy.sources.kube import config as kube_config
from kpy.testing.apiserver import TlsFiles, make_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, Path, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate (CN kpy-node)."""
    d = tmp_path_factory.mktemp("pki")
    tls = make_tls(d)
    ext = d / "client.ext"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    key, cert, csr = d / "client.key", d / "client.crt", d / "client.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["openssl", "req", *ec, "-subj", "/CN=kpy-node", "-keyout", str(key), "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(tls.ca), "-CAkey",
         str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out",
         str(cert)],
    ):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    return tls, cert, key


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write(path: Path, cluster: dict[str, Any], user: dict[str, Any] | None) -> Path:
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    if user is not None:
        config["users"] = [{"name": "u", "user": user}]
    path.write_text(json.dumps(config))
    return path


CASES: dict[str, Callable[[TlsFiles, Path, Path, Path], tuple[dict[str, Any], Any]]] = {
    # name: (pki, client cert, client key, directory) → (cluster, user)
    "token-ca-file-relative": lambda t, c, k, d: (
        {"server": "https://127.0.0.1:6443", "certificate-authority": os.path.relpath(t.ca, d)},
        {"token": "abc"},
    ),
    "token-file-ca-data": lambda t, c, k, d: (
        {"server": "https://127.0.0.1:6443/", "certificate-authority-data": b64(t.ca)},
        {"tokenFile": "token"},
    ),
    "client-cert-files": lambda t, c, k, d: (
        {"server": "https://127.0.0.1:6443", "certificate-authority": str(t.ca)},
        {"client-certificate": str(c), "client-key": str(k)},
    ),
    "client-cert-data": lambda t, c, k, d: (
        {"server": "https://127.0.0.1:6443", "certificate-authority-data": b64(t.ca)},
        {"client-certificate-data": b64(c), "client-key-data": b64(k)},
    ),
    "insecure": lambda t, c, k, d: (
        {"server": "https://10.0.0.1", "insecure-skip-tls-verify": True},
        {"token": "abc"},
    ),
    "tls-server-name": lambda t, c, k, d: (
        {
            "server": "https://10.0.0.1:443",
            "certificate-authority": str(t.ca),
            "tls-server-name": "kubernetes.default",
        },
        {"token": "abc"},
    ),
    "basic-auth": lambda t, c, k, d: (
        {"server": "https://10.0.0.1:6443", "certificate-authority": str(t.ca)},
        {"username": "admin", "password": "pa:ss"},
    ),
    "empty-token-then-basic": lambda t, c, k, d: (
        {"server": "https://10.0.0.1:6443", "certificate-authority": str(t.ca)},
        {"token": "", "username": "admin", "password": "x"},
    ),
    "plain-http": lambda t, c, k, d: (
        {"server": "http://127.0.0.1:8080", "certificate-authority": "/no/such/ca"},
        {"token": "abc", "client-certificate": "/no/such/cert"},  # not read for http
    ),
    "no-user": lambda t, c, k, d: ({"server": "https://[fd00::1]:6443"}, None),
}


@pytest.fixture
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kubeconfig")
    (d / "token").write_text("from-a-file")
    return d


def context_view(target: ApiTarget) -> tuple[Any, ...]:
    context = target.ssl_context
    if context is None:
        return (None,)
    cas = sorted(json.dumps(c, sort_keys=True) for c in context.get_ca_certs())
    return (context.verify_mode, context.check_hostname, cas)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_target_as_the_official_client(
    case: str, pki: tuple[TlsFiles, Path, Path], directory: Path
) -> None:
    tls, cert, key = pki
    cluster, user = CASES[case](tls, cert, key, directory)
    path = write(directory / "config", cluster, user)
    ours = load_target(kubeconfig=str(path), environ={})
    theirs = kube_config._load_with_client(str(path), "")
    assert ours.url == theirs.url
    assert ours.server_hostname == theirs.server_hostname
    assert ours.auth() == theirs.auth()
    assert context_view(ours) == context_view(theirs)
    # --master keeps the credentials and TLS settings, replaces the address
    moved = load_target(kubeconfig=str(path), master="10.9.9.9:443", environ={})
    assert moved.url == "https://10.9.9.9:443" and moved.auth() == ours.auth()


@pytest.fixture
def tls_server(pki: tuple[TlsFiles, Path, Path]) -> Iterator[int]:
    """127.0.0.1:port, TLS requiring a client certificate from the CA; answers its CN."""
    tls, _, _ = pki
    context = tls.server_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(tls.ca)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as s:
                    peer: Any = s.getpeercert()
                    subject = {k: v for ((k, v),) in peer["subject"]}
                    s.sendall(subject["commonName"].encode())
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=5)


@pytest.mark.parametrize("case", ["client-cert-files", "client-cert-data"])
def test_client_certificate_is_presented(
    case: str, pki: tuple[TlsFiles, Path, Path], directory: Path, tls_server: int
) -> None:
    tls, cert, key = pki
    cluster, user = CASES[case](tls, cert, key, directory)
    cluster["server"] = f"https://127.0.0.1:{tls_server}"
    target = load_target(kubeconfig=str(write(directory / "config", cluster, user)), environ={})
    assert target.ssl_context is not None
    with (
        socket.create_connection(("127.0.0.1", tls_server), timeout=10) as raw,
        target.ssl_context.wrap_socket(raw, server_hostname=target.host) as s,
    ):
        assert s.recv(64) == b"kpy-node"
    assert not list(directory.glob("kpy-kubeconfig-*"))  # no key left on disk


def test_exec_plugin_goes_through_the_official_client(directory: Path) -> None:
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": "from-exec"},
    }
    plugin = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "command": sys.executable,
        "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
    }
    path = write(directory / "config", {"server": "http://127.0.0.1:8080"}, {"exec": plugin})
    assert kc.from_file(str(path)) is None  # left to the client
    target = load_target(kubeconfig=str(path), environ={})
    assert target.auth() == {"Authorization": "Bearer from-exec"} and target.auth_may_block


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        (
            {"server": "https://h", "certificate-authority": "missing.crt"},
            {},
            "File does not exist",
        ),
        ({"server": "https://h", "insecure-skip-tls-verify": "yes"}, {}, "insecure-skip"),
        ({"certificate-authority": "/x"}, {}, "has no server"),
    ],
    ids=["missing-ca", "insecure-not-bool", "no-server"],
)
def test_unusable_kubeconfig_names_the_file_and_field(
    directory: Path, cluster: dict[str, Any], user: dict[str, Any], message: str
) -> None:
    path = write(directory / "config", cluster, user)
    with pytest.raises(KubeConfigError, match=message) as info:
        load_target(kubeconfig=str(path), environ={})
    assert str(info.value).startswith(f"{path}: ")


def test_in_cluster_as_the_official_client(
    pki: tuple[TlsFiles, Path, Path], directory: Path
) -> None:
    import importlib

    client: Any = importlib.import_module("kubernetes.client")  # untyped: held as Any
    config: Any = importlib.import_module("kubernetes.config")
    tls, _, _ = pki
    token = directory / "sa-token"
    token.write_text("t0")
    for host in ("10.96.0.1", "fd00::1"):
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "443"}
        ours = load_target(environ=env, token_file=str(token), ca_file=str(tls.ca))
        configuration = client.Configuration()
        config.incluster_config.InClusterConfigLoader(
            token_filename=str(token), cert_filename=str(tls.ca), environ=env
        ).load_and_set(configuration)
        theirs = ApiTarget.from_configuration(configuration)
        assert (ours.url, ours.auth(), context_view(ours)) == (
            theirs.url,
            theirs.auth(),
            context_view(theirs),
        )
        assert ours.auth_may_block


def test_in_cluster_token_is_read_again_after_a_minute(
    pki: tuple[TlsFiles, Path, Path], directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, _, _ = pki
    token = directory / "sa-token"
    token.write_text("first")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    target = load_target(environ=env, token_file=str(token), ca_file=str(tls.ca))
    token.write_text("rotated")
    assert target.auth() == {"Authorization": "bearer first"}  # read less than a minute ago
    monkeypatch.setattr(kc, "TOKEN_REREAD_SECONDS", 0.0)
    assert target.auth() == {"Authorization": "bearer rotated"}
    token.write_text("")
    with pytest.raises(OSError, match="empty"):  # the source retries a failed request
        target.auth()


@pytest.mark.parametrize(
    ("env", "files", "message"),
    [
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, ("t", "ca"), "host/port is not set"),
        ({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": ""}, ("t", "ca"), "empty"),
        ({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}, ("", "ca"), "Token"),
        ({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}, ("t", ""), "Cert"),
    ],
    ids=["no-port", "empty-port", "empty-token", "empty-ca"],
)
def test_unusable_in_cluster_configuration(
    directory: Path, env: dict[str, str], files: tuple[str, str], message: str
) -> None:
    token, ca = directory / "t", directory / "ca"
    token.write_text(files[0])
    ca.write_text(files[1])
    with pytest.raises(KubeConfigError, match=message) as info:
        load_target(environ=env, token_file=str(token), ca_file=str(ca))
    assert str(info.value).startswith("in-cluster configuration: ")
