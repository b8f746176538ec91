"""A real Kubernetes control plane in a network namespace: etcd, kube-apiserver, controllers.

The upstream binaries come from ``scripts/build-upstream.sh`` (built once from Go modules,
cached under ``~/.cache/kpy/upstream/<release>/bin``). :class:`ControlPlane` starts

* etcd (``--unsafe-no-fsync``: a test cluster, not a durable one) on 127.0.0.1:2379,
* kube-apiserver on https://127.0.0.1:6443 and the namespace's advertise address:
  TLS from a CA made here (``openssl``), ``--authorization-mode=Node,RBAC``, a
  ServiceAccount signing key, dual-stack service CIDRs (ServiceCIDR objects),
* kube-controller-manager with the controllers Service networking needs (EndpointSlice,
  EndpointSlice mirroring, ServiceCIDR, ServiceAccounts and their tokens, namespaces,
  garbage collection) and none that would act for a missing kubelet (no node lifecycle,
  no pod GC),

all inside one network namespace it creates, on that namespace's loopback — nothing is
added to the machine's own namespace. Readiness is waited for on each component's
health endpoint with a deadline that scales with the machine's load. :meth:`stop` kills
the processes, deletes the namespace and the working directory, also after a failed
start.

Clients reach the API server from inside the namespace: :class:`Client` opens its
connection there (:func:`kpy.kernel.netns.run_in_netns`) and then uses it from any
thread; asyncio code (the ``kube`` source) runs on a thread that entered the namespace
(:meth:`ControlPlane.run_async`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kpy.kernel.netns import NETNS_DIR, run_in_netns
from kpy.kernel.proc import in_netns, start_detached
from kpy.tools.lab.api_client import ApiError, Client, kubeconfig

T = TypeVar("T")

KUBE_VERSION = "v1.36.5"  # scripts/build-upstream.sh builds this release (kept in step by a test)
ETCD_VERSION = "v3.6.8"
SERVICE_CIDRS = ("10.96.0.0/12", "fd00:96::/108")
API_PORT = 6443
ETCD_PORT = 2379
KCM_PORT = 10257
ADVERTISE_ADDRESS = "10.255.255.1"  # on the namespace's lo: the `kubernetes` Service's endpoint
CONTROLLERS = (
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "service-cidr-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
)
REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "scripts" / "build-upstream.sh"


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (the message says which part and why)."""


def bindir() -> Path:
    """Where ``scripts/build-upstream.sh`` puts the binaries (``$KPY_UPSTREAM_DIR/bin``)."""
    root = os.environ.get("KPY_UPSTREAM_DIR")
    if root:
        return Path(root) / "bin"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kpy" / "upstream" / KUBE_VERSION / "bin"


def missing_binaries(
    names: tuple[str, ...] = ("etcd", "kube-apiserver", "kube-controller-manager"),
) -> list[str]:
    """The binaries not built yet (``scripts/build-upstream.sh`` builds them)."""
    return [n for n in names if not os.access(bindir() / n, os.X_OK)]


def load_factor() -> float:
    """How much slower than idle this machine is now: scales every readiness deadline."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


# --------------------------------------------------------------------------- PKI


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Pki:
    """A CA, the API server's serving certificate, client certificates, the SA key pair."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @classmethod
    def create(cls, directory: Path, server_ips: tuple[str, ...]) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req", "-x509", *ec, "-keyout", str(pki.key("ca")), "-out", str(pki.ca),
            "-days", "3650", "-subj", "/CN=kpy-test-ca",
        )  # fmt: skip
        names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"]
        sans = [f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in server_ips]
        leaves = {
            "apiserver": ("/CN=kube-apiserver", "serverAuth", ",".join(sans)),
            "admin": ("/O=system:masters/CN=kpy-admin", "clientAuth", ""),
            "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", ""),
            "apiserver-etcd": ("/CN=kube-apiserver-etcd-client", "clientAuth", ""),
        }
        for name, (subject, usage, san) in leaves.items():
            ext = ["-addext", "basicConstraints=critical,CA:FALSE"]
            ext += ["-addext", f"extendedKeyUsage={usage}"]
            if san:
                ext += ["-addext", f"subjectAltName={san}"]
            _openssl(
                "req", "-x509", *ec, "-keyout", str(pki.key(name)), "-out", str(pki.cert(name)),
                "-days", "365", "-subj", subject, "-CA", str(pki.ca), "-CAkey", str(pki.key("ca")),
                *ext,
            )  # fmt: skip
        _openssl("genpkey", "-algorithm", "RSA", "-out", str(pki.key("sa")))
        _openssl("pkey", "-in", str(pki.key("sa")), "-pubout", "-out", str(pki.dir / "sa.pub"))
        return pki


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """In the child: be killed when the thread that started us ends (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_spawn_queue: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        fn, future = _spawn_queue.get()
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed back to the caller
            future.set_exception(exc)


def on_spawner(fn: Callable[[], T]) -> T:
    """Run ``fn`` (a Popen) on one thread that lives as long as this process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, so children
    started from a short-lived thread (``asyncio.to_thread``, :func:`run_in_netns`) would
    die with it; started here, they die only with this process.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawner_loop, name="kpy-spawner", daemon=True)
            _spawner.start()
    future: Future[T] = Future()
    _spawn_queue.put((fn, future))
    return future.result()


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0  # a detached process (no Popen: it outlives this one)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.pid > 0 and _pid_alive(self.pid)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop_process(proc: Process, grace: float = 10.0) -> None:
    pid = proc.popen.pid if proc.popen is not None else proc.pid
    if not proc.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    delay = 0.02
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if proc.popen is not None:
        proc.popen.wait(timeout=grace)


# --------------------------------------------------------------------------- the control plane


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in the network namespace ``netns``.

    ``netns`` is created by :meth:`start` unless ``create_netns`` is False (an existing
    lab namespace). ``detached`` processes outlive this Python process (the lab);
    otherwise they are killed when it dies.
    """

    netns: str
    workdir: Path | None = None
    create_netns: bool = True
    detached: bool = False
    advertise_address: str = ADVERTISE_ADDRESS
    advertise_on_lo: bool = True  # False: the address is on an interface already
    extra_apiserver_args: tuple[str, ...] = ()
    processes: dict[str, Process] = field(default_factory=dict)
    _own_workdir: bool = False
    _netns_created: bool = False
    _admin: Client | None = None

    # -- paths

    @property
    def dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    @property
    def pki(self) -> Pki:
        return Pki(self.dir / "pki")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{API_PORT}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{ETCD_PORT}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    # -- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        """Create the namespace, PKI and configuration; start and wait for each component."""
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError(
                f"not built: {', '.join(missing)} in {bindir()} (run scripts/build-upstream.sh)"
            )
        try:
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="kpy-cp-"))
                self._own_workdir = True
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.create_netns:
                _ip("netns", "add", self.netns)
                self._netns_created = True
                _ip("-n", self.netns, "link", "set", "lo", "up")
            if self.advertise_on_lo:
                address = f"{self.advertise_address}/32"
                _ip("-n", self.netns, "addr", "replace", address, "dev", "lo")
            Pki.create(self.dir / "pki", ("127.0.0.1", self.advertise_address, "10.96.0.1"))
            pki = self.pki
            kubeconfig(
                self.admin_kubeconfig, self.url, pki.ca,
                cert=pki.cert("admin"), key=pki.key("admin"), user="kpy-admin",
            )  # fmt: skip
            kubeconfig(
                self.dir / "controller-manager.kubeconfig", self.url, pki.ca,
                cert=pki.cert("controller-manager"), key=pki.key("controller-manager"),
                user="system:kube-controller-manager",
            )  # fmt: skip
            self.start_etcd(timeout)
            self.start_apiserver(timeout)
            self.start_controller_manager(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str]) -> Process:
        log = self.dir / f"{name}.log"
        proc = Process(name, argv, log)
        self.processes[name] = proc
        if self.detached:
            proc.pid = start_detached(in_netns(self.netns, argv), log, "kpy-cp", ControlPlaneError)
            return proc
        with log.open("ab") as out:
            proc.popen = on_spawner(
                lambda: subprocess.Popen(
                    in_netns(self.netns, argv),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            )
        return proc

    def _wait(self, proc: Process, probe: Callable[[], bool], timeout: float) -> None:
        """Wait until ``probe()`` holds; fail at once when the process exits."""
        deadline = time.monotonic() + timeout * load_factor()
        delay = 0.05
        while True:
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException, ApiError):
                pass
            if not proc.alive():
                raise ControlPlaneError(f"{proc.name} exited:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{proc.name} not ready in time:\n{proc.tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def start_etcd(self, timeout: float = 60.0) -> None:
        data = self.dir / "etcd"
        peer = "http://127.0.0.1:2380"
        proc = self._spawn(
            "etcd",
            [
                str(bindir() / "etcd"),
                "--name", "kpy",
                "--data-dir", str(data),
                "--listen-client-urls", self.etcd_url,
                "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"kpy={peer}",
                "--unsafe-no-fsync",
                "--log-level", "warn",
            ],
        )  # fmt: skip
        self._wait(proc, lambda: self._http_ok(f"{self.etcd_url}/health"), timeout)

    def apiserver_argv(self) -> list[str]:
        pki = self.pki
        return [
            str(bindir() / "kube-apiserver"),
            "--etcd-servers", self.etcd_url,
            "--bind-address", "0.0.0.0",
            "--secure-port", str(API_PORT),
            "--advertise-address", self.advertise_address,
            "--service-cluster-ip-range", ",".join(SERVICE_CIDRS),
            "--authorization-mode", "Node,RBAC",
            "--client-ca-file", str(pki.ca),
            "--tls-cert-file", str(pki.cert("apiserver")),
            "--tls-private-key-file", str(pki.key("apiserver")),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(pki.dir / "sa.pub"),
            "--service-account-signing-key-file", str(pki.key("sa")),
            "--allow-privileged=true",
            "--etcd-compaction-interval", "1m",
            "--profiling=false",
            "--cert-dir", str(self.dir / "apiserver-certs"),
            *self.extra_apiserver_args,
        ]  # fmt: skip

    def start_apiserver(self, timeout: float = 90.0) -> None:
        proc = self._spawn("kube-apiserver", self.apiserver_argv())
        self._wait(proc, lambda: self._readyz(), timeout)

    def _readyz(self) -> bool:
        self.admin().get("/readyz")
        return True

    def start_controller_manager(self, timeout: float = 60.0) -> None:
        pki = self.pki
        config = str(self.dir / "controller-manager.kubeconfig")
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(bindir() / "kube-controller-manager"),
                "--kubeconfig", config,
                "--authentication-kubeconfig", config,
                "--authorization-kubeconfig", config,
                "--bind-address", "127.0.0.1",
                "--secure-port", str(KCM_PORT),
                "--cert-dir", str(self.dir / "kcm-certs"),
                "--controllers", ",".join(CONTROLLERS),
                "--use-service-account-credentials=true",
                "--service-account-private-key-file", str(pki.key("sa")),
                "--root-ca-file", str(pki.ca),
                "--service-cluster-ip-range", ",".join(SERVICE_CIDRS),
                "--leader-elect=false",
                "--profiling=false",
            ],
        )  # fmt: skip
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        def healthy() -> bool:
            return self._http_ok(f"https://127.0.0.1:{KCM_PORT}/healthz", insecure)

        self._wait(proc, healthy, timeout)
        # The controllers work once the default ServiceAccount exists (pods need it).
        self._wait(
            proc,
            lambda: bool(self.admin().get("/api/v1/namespaces/default/serviceaccounts/default")),
            timeout,
        )

    def _http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        import urllib.request

        def get() -> bool:
            with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                return bool(answer.status == 200)

        return run_in_netns(self.netns, get)

    def stop_apiserver(self) -> None:
        proc = self.processes.get("kube-apiserver")
        if proc is not None:
            _stop_process(proc)
        if self._admin is not None:
            self._admin.close()

    def restart_apiserver(self, timeout: float = 90.0) -> None:
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def stop(self) -> None:
        """Stop every component (controllers first), delete the namespace and the workdir."""
        if self._admin is not None:
            self._admin.close()
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.processes.get(name)
            if proc is not None:
                _stop_process(proc)
        if self._netns_created:
            kill_in_netns(self.netns)
            subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)
            self._netns_created = False
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- clients

    def context(self, *, admin: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if admin:
            context.load_cert_chain(self.pki.cert("admin"), self.pki.key("admin"))
        return context

    def admin(self) -> Client:
        """A client with cluster-admin rights (system:masters), reused."""
        if self._admin is None:
            self._admin = Client(self.netns, "127.0.0.1", API_PORT, self.context())
        return self._admin

    def token_client(self, token: str) -> Client:
        return Client(
            self.netns,
            "127.0.0.1",
            API_PORT,
            self.context(admin=False),
            {"Authorization": f"Bearer {token}"},
        )

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token for ServiceAccount ``namespace/name`` (the TokenRequest API, as kubelet)."""
        answer = self.admin().request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return str(answer["status"]["token"])

    def run_async(self, coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run an asyncio program on a thread inside the namespace (its sockets live there)."""
        return run_in_netns(self.netns, lambda: asyncio.run(coro()))

    # -- etcd

    def etcd(self, endpoint: str, body: dict[str, Any]) -> Any:
        """Call etcd's JSON gateway (``/v3/kv/range``, ``/v3/kv/compaction`` …)."""
        import urllib.request

        def post() -> Any:
            request = urllib.request.Request(
                f"{self.etcd_url}{endpoint}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())

        return run_in_netns(self.netns, post)

    def etcd_revision(self) -> int:
        answer = self.etcd("/v3/kv/range", {"key": base64.b64encode(b"/registry").decode()})
        return int(answer["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (physically); that revision."""
        revision = self.etcd_revision()
        self.etcd("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def kill_in_netns(netns: str) -> None:
    """SIGKILL whatever still runs inside ``netns`` (``ip netns pids``)."""
    done = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


# --------------------------------------------------------------------------- a cuttable link


class Partition:
    """A TCP forwarder inside ``netns`` (``127.0.0.1:port`` → the API server) that a test
    can cut, as a network partition between an agent and its API server would."""

    def __init__(self, netns: str, port: int, target: tuple[str, int]) -> None:
        self.netns = netns
        self.port = port
        self.target = target
        self.open = True
        self.accepted = 0  # connections forwarded: how many a client opened
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = run_in_netns(
            netns, lambda: socket.create_server(("127.0.0.1", port), backlog=64)
        )
        self._thread = threading.Thread(target=self._accept, daemon=True, name="partition")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = run_in_netns(
                    self.netns, lambda: socket.create_connection(self.target, timeout=5)
                )
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if not self.open:  # cut while this one was being connected: it is cut too
                    client.close()
                    upstream.close()
                    continue
                self._sockets |= {client, upstream}
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every connection and refuse new ones (closed at once)."""
        with self._lock:
            self.open = False
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self._listener.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def control_plane(netns: str, **kwargs: Any) -> Iterator[ControlPlane]:
    """A started :class:`ControlPlane`, stopped (namespace deleted) on exit."""
    plane = ControlPlane(netns, **kwargs)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


# --------------------------------------------------------------------------- objects


__all__ = [
    "KUBE_VERSION",
    "ControlPlane",
    "ControlPlaneError",
    "Partition",
    "Pki",
    "bindir",
    "control_plane",
    "kill_in_netns",
    "missing_binaries",
]
