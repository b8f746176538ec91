"""``kpy lab``: a multi-node cluster in network namespaces on one machine, no Kubernetes.

``up`` builds the :class:`~kpy.tools.lab.topology.Cluster` under the fixed prefix
``kpy-lab`` (node, pod, client and underlay namespaces), starts every pod's echo
server, and starts one kpy agent per node::

    python -m kpy run --source manifests --manifests DIR --backend NAME \\
        --netns kpy-lab-node-1 --node node-1 --node-ip 192.168.100.11 ...

The agent process lives in the machine's namespace but programs its backend only
inside ``--netns`` (every kernel command enters that namespace); its health server
listens on loopback (``127.0.0.1:19250+i``), which is how ``status`` and ``up`` tell
that it is ready. The agents watch the manifests directory, so editing a file there
changes the rules while the lab runs.

Everything the lab made is recorded in ``/run/kpy-lab/state.json``; ``down`` reads it
from any process, stops the agents and echo servers, and deletes every ``kpy-lab-*``
namespace — also after a crash (without a state file it finds the leftovers by name)
and as often as it is called. Nothing is ever created in the machine's own namespace
except the agents' loopback health and metrics listeners.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpy.core import backend as backends
from kpy.kernel.netns import NETNS_DIR, run_in_netns
from kpy.kernel.proc import in_netns, start_detached
from kpy.tools.lab import topology as topo
from kpy.tools.lab.topology import Cluster, EchoPorts

PREFIX = "kpy-lab"
STATE_DIR = Path("/run/kpy-lab")
HEALTH_PORT_BASE = 19250
METRICS_PORT_BASE = 19350
ECHO_PORTS = EchoPorts(tcp=(8080,), udp=(5353,), http=(80,))


class LabError(RuntimeError):
    """The lab could not be brought up (the message says why)."""


@dataclass
class LabState:
    """What ``up`` made; written to ``state.json`` so any process can inspect or remove it."""

    prefix: str
    nodes: int
    pods_per_node: int
    backend: str
    manifests: str
    source: str = "manifests"
    agents: dict[str, int] = field(default_factory=dict)  # node name → pid
    started: float = 0.0
    health_base: int = HEALTH_PORT_BASE  # node i's health server: 127.0.0.1:<base + i>
    metrics_base: int = METRICS_PORT_BASE
    api_pid: int | None = None  # --source kube: the fake API server serving the manifests
    control_plane: str = "none"  # "real": etcd + kube-apiserver + kube-controller-manager
    control_plane_pids: dict[str, int] = field(default_factory=dict)
    control_plane_dir: str = ""  # its PKI, kubeconfigs, data and logs

    @property
    def api_port(self) -> int:
        return self.health_base  # node indexes start at 1: base + 0 is free

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def real(self) -> bool:
        return self.control_plane == "real"

    @property
    def control_plane_netns(self) -> str:
        return f"{self.prefix}-cp"

    def cluster(self) -> Cluster:
        """The lab's cluster description (built already; nothing is created by this)."""
        return Cluster(self.nodes, self.pods_per_node, prefix=self.prefix, echo=ECHO_PORTS)

    def health_port(self, index: int) -> int:
        return self.health_base + index

    def metrics_port(self, index: int) -> int:
        return self.metrics_base + index


def state_file(state_dir: Path = STATE_DIR) -> Path:
    return state_dir / "state.json"


def load(state_dir: Path = STATE_DIR) -> LabState | None:
    """The running lab's state, or None when no lab is recorded."""
    try:
        data = json.loads(state_file(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return LabState(**data)


def _save(state: LabState, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    tmp.replace(state_file(state_dir))


def agent_argv(state: LabState, node: topo.Node, *, log_level: str = "info") -> list[str]:
    """The command line of one node's agent.

    With the real control plane the agent runs inside its node's namespace (as kube-proxy
    runs in the node's host network) and reaches the API server over the underlay with
    the ServiceAccount token of ``deploy/daemonset.yaml``'s RBAC.
    """
    if state.real:
        where = in_netns(node.netns.name, [])
        api = ["--kubeconfig", str(Path(state.control_plane_dir) / "agent.kubeconfig")]
    else:
        where = []
        api = ["--master", state.api_url] if state.source == "kube" else []
    return [
        *where, sys.executable, "-m", "kpy", "run",
        "--source", state.source,
        *(api or ["--manifests", state.manifests]),
        "--backend", state.backend,
        "--netns", node.netns.name,
        "--node", node.name,
        "--node-ip", str(node.ip),
        "--node-ip", str(node.ip6),
        "--cluster-cidr", f"{topo.CLUSTER_CIDR},{topo.CLUSTER_CIDR6}",
        "--healthz-bind-address", f"127.0.0.1:{state.health_port(node.index)}",
        "--metrics-bind-address", f"127.0.0.1:{state.metrics_port(node.index)}",
        "--min-sync-period", "200ms",
        "--log-format", "json",
        "--log-level", log_level,
    ]  # fmt: skip


def _wait_port(port: int, pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if not _alive(pid) or time.monotonic() > deadline:
                raise LabError(f"the fake API server did not listen on port {port}") from None
            time.sleep(0.1)


def ready(state: LabState) -> dict[str, bool]:
    """Node name → whether its agent answers /readyz with 200 (first sync done).

    With the real control plane an agent's loopback is its node's: asked from there.
    """
    result = {}
    for node in state.cluster().nodes:
        url = f"http://127.0.0.1:{state.health_port(node.index)}/readyz"

        def get(url: str = url) -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    return bool(answer.status == 200)
            except urllib.error.HTTPError as exc:  # 503 until synced: an answer to close
                exc.close()
                return False

        try:
            result[node.name] = run_in_netns(node.netns.name, get) if state.real else get()
        except (OSError, urllib.error.URLError):
            result[node.name] = False
    return result


def wait_ready(state: LabState, timeout: float = 30.0, state_dir: Path = STATE_DIR) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = ready(state)
        if all(status.values()):
            return
        for node, pid in state.agents.items():
            if not _alive(pid):
                log_path = state_dir / f"{node}.log"
                raise LabError(f"the agent of {node} exited: {_last_line(log_path)} ({log_path})")
        if time.monotonic() > deadline:
            waiting = ", ".join(n for n, ok in status.items() if not ok)
            raise LabError(f"agents not ready after {timeout:.0f}s: {waiting}")
        time.sleep(0.2)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _probe(backend: str) -> str | None:
    """Why ``backend`` cannot run on this host, or None."""
    try:
        return backends.create(backend, backends.BackendConfig()).probe()
    except (KeyError, backends.BackendError) as exc:
        return str(exc).strip("'\"")


def up(
    *,
    nodes: int = 2,
    pods_per_node: int = 2,
    backend: str = "nftables",
    manifests: Path = Path("examples"),
    source: str = "manifests",
    state_dir: Path = STATE_DIR,
    timeout: float = 30.0,
    prefix: str = PREFIX,
    health_base: int = HEALTH_PORT_BASE,
    metrics_base: int = METRICS_PORT_BASE,
    control_plane: str = "none",
) -> LabState:
    """Build the lab, start echo servers and agents, wait until every agent has synced.

    ``source`` "kube" puts the fake Kubernetes API server (kpy.testing.apiserver) in
    front of the manifests, so the agents run the real ``kube`` source (list + watch).

    ``control_plane`` "real" starts etcd, kube-apiserver and kube-controller-manager in
    ``<prefix>-cp`` on the underlay (192.168.100.2), applies the manifests as real
    objects with the lab playing kubelet for its pods, and runs the agents with the
    ServiceAccount token of ``deploy/daemonset.yaml``'s RBAC (implies ``source`` kube).

    ``prefix``, ``state_dir`` and the port bases let a second lab (a test) run beside one.
    """
    if control_plane == "real":
        source = "kube"
        from kpy.tools.lab import control_plane as realcluster

        missing = realcluster.missing_binaries()
        if missing:
            raise LabError(
                f"not built: {', '.join(missing)} in {realcluster.bindir()} "
                "(run scripts/build-upstream.sh)"
            )
    if load(state_dir) is not None or any(p.name.startswith(prefix + "-") for p in _netns_dir()):
        raise LabError("a lab is already up (kpy lab status; kpy lab down)")
    if not manifests.exists():
        raise LabError(f"manifests {manifests} not found")
    reason = _probe(backend)
    if reason is not None:
        raise LabError(f"backend {backend} cannot run here: {reason} (kpy backends lists them)")
    state = LabState(
        prefix=prefix,
        health_base=health_base,
        metrics_base=metrics_base,
        nodes=nodes,
        pods_per_node=pods_per_node,
        backend=backend,
        manifests=str(manifests.resolve()),
        source=source,
        started=time.time(),
        control_plane=control_plane,
    )
    cluster = state.cluster()
    _save(state, state_dir)  # first: a crash from here on leaves something `down` finds
    try:
        cluster.build()
        cluster.start_echo(ECHO_PORTS, log_dir=state_dir)
        if state.real:
            _start_control_plane(state, cluster, state_dir)
        elif source == "kube":
            argv = [sys.executable, "-m", "kpy", "testing", "apiserver", "--from", state.manifests,
                    "--host", "127.0.0.1", "--port", str(state.api_port)]  # fmt: skip
            state.api_pid = start_detached(argv, state_dir / "apiserver.log", "kpy-api", LabError)
            _save(state, state_dir)
            _wait_port(state.api_port, state.api_pid)
        for node in cluster.nodes:
            log_path = state_dir / f"{node.name}.log"
            state.agents[node.name] = start_detached(
                agent_argv(state, node), log_path, "kpy-agent", LabError
            )
            _save(state, state_dir)
        wait_ready(state, timeout, state_dir)
    except BaseException:
        down(state_dir)
        raise
    return state


# --------------------------------------------------------------------------- real control plane

CONTROL_PLANE_IP = "192.168.100.2"  # on the underlay, beside the nodes
CONTROL_PLANE_IP6 = "fd00:100::2"
DAEMONSET = Path(__file__).resolve().parents[3] / "deploy" / "daemonset.yaml"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}


def _run_ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def _start_control_plane(state: LabState, cluster: Cluster, state_dir: Path) -> None:
    """etcd, kube-apiserver and kube-controller-manager in ``<prefix>-cp``; then RBAC, the
    agents' kubeconfig, and the manifests as real objects (the lab plays kubelet)."""
    from kpy.tools.lab import api_client as api
    from kpy.tools.lab import cluster_objects as objects_
    from kpy.tools.lab import control_plane as rc

    netns, net = state.control_plane_netns, cluster.underlay.name
    _run_ip("netns", "add", netns)
    _run_ip("-n", netns, "link", "set", "lo", "up")
    _run_ip("-n", net, "link", "add", "cp", "type", "veth", "peer", "name", "eth0",
            "netns", netns)  # fmt: skip
    _run_ip("-n", net, "link", "set", "cp", "master", "br0", "up")
    _run_ip("-n", netns, "addr", "add", f"{CONTROL_PLANE_IP}/24", "dev", "eth0")
    _run_ip("-n", netns, "addr", "add", f"{CONTROL_PLANE_IP6}/64", "dev", "eth0", "nodad")
    _run_ip("-n", netns, "link", "set", "eth0", "up")
    workdir = state_dir / "control-plane"
    shutil.rmtree(workdir, ignore_errors=True)
    state.control_plane_dir = str(workdir)
    _save(state, state_dir)
    plane = rc.ControlPlane(
        netns,
        workdir=workdir,
        create_netns=False,
        detached=True,
        advertise_address=CONTROL_PLANE_IP,
        advertise_on_lo=False,
    )
    try:
        plane.start()
    except rc.ControlPlaneError as exc:
        raise LabError(f"control plane: {exc}") from None
    finally:
        state.control_plane_pids = {n: p.pid for n, p in plane.processes.items() if p.pid}
        _save(state, state_dir)
    admin = plane.admin()
    try:
        for obj in objects_.load_manifests(DAEMONSET):
            if obj["kind"] in RBAC_KINDS:
                admin.apply(obj)
        token = plane.service_account_token("kube-system", "kpy", seconds=7 * 86400)
        api.kubeconfig(
            workdir / "agent.kubeconfig",
            f"https://{CONTROL_PLANE_IP}:6443",
            plane.pki.ca,
            token=token,
            user="system:serviceaccount:kube-system:kpy",
        )
        _apply_lab_objects(state, cluster, admin, workdir)
    except api.ApiError as exc:
        raise LabError(f"the API server refused the lab's objects: {exc}") from None
    finally:
        admin.close()


def _apply_lab_objects(state: LabState, cluster: Cluster, admin: Any, workdir: Path) -> None:
    from kpy.tools.lab import cluster_objects as objects_

    pods = {pod.name: pod.node for pod in cluster.pods}
    objects = objects_.lab_objects(objects_.load_manifests(Path(state.manifests)), pods)
    for note in objects.notes:
        print(f"note: {note}", file=sys.stderr)
    nodes = {obj["metadata"]["name"]: obj for obj in objects.nodes}
    for node in cluster.nodes:
        nodes.setdefault(
            node.name,
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}, "status": {
                "addresses": [{"type": "InternalIP", "address": str(node.ip)},
                              {"type": "InternalIP", "address": str(node.ip6)},
                              {"type": "Hostname", "address": node.name}]}},
        )  # fmt: skip
    for obj in nodes.values():  # kubelet registers its Node and reports it ready
        status = dict(obj.get("status") or {})
        admin.create({k: v for k, v in obj.items() if k != "status"})
        status["conditions"] = [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        admin.patch_status(obj, status)
    namespaces = {o["metadata"].get("namespace", "default") for o in objects.services}
    for ns in sorted(namespaces - {"default", "kube-system"}):
        admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for svc in objects.services:
        status = svc.pop("status", None)
        admin.create(svc)
        if status and (status.get("loadBalancer") or {}).get("ingress"):
            admin.patch_status(svc, status)  # what a cloud controller would write
    for obj in objects.slices:
        admin.create(obj)
    (workdir / "pods.json").write_text(json.dumps(objects.pods, indent=1), encoding="utf-8")
    for obj in objects.pods:
        kubelet_start_pod(state, obj["metadata"]["name"], admin=admin)


def _pod_objects(state: LabState) -> dict[str, dict[str, Any]]:
    path = Path(state.control_plane_dir) / "pods.json"
    return {o["metadata"]["name"]: o for o in json.loads(path.read_text(encoding="utf-8"))}


def api_client(state: LabState) -> Any:
    """An admin client of the lab's API server (its socket opened in ``<prefix>-cp``)."""
    from kpy.tools.lab import api_client as api
    from kpy.tools.lab import control_plane as rc

    if not state.real:
        raise LabError("the lab has no real control plane (kpy lab up --control-plane real)")
    pki = rc.Pki(Path(state.control_plane_dir) / "pki")
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.cert("admin"), pki.key("admin"))
    return api.Client(state.control_plane_netns, "127.0.0.1", 6443, context)


def api_objects(state: LabState) -> list[dict[str, Any]]:
    """The lab's Services, EndpointSlices and Nodes as the API server has them, without
    ``default/kubernetes`` (its endpoint is the API server, not a lab pod)."""
    from kpy.tools.lab import cluster_objects as objects_

    client = api_client(state)
    try:
        objects = objects_.list_objects(client)
    finally:
        client.close()

    def lab_owned(obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        if meta.get("namespace") != "default":
            return True
        if obj["kind"] == "Service":
            return bool(meta["name"] != "kubernetes")
        return (meta.get("labels") or {}).get("kubernetes.io/service-name") != "kubernetes"

    return [o for o in objects if lab_owned(o)]


def _lab_pod(state: LabState, name: str) -> topo.Pod:
    for pod in state.cluster().pods:
        if pod.name == name:
            return pod
    raise LabError(f"no lab pod {name}")


def kubelet_start_pod(state: LabState, name: str, *, admin: Any = None) -> None:
    """Create lab pod ``name``'s Pod (bound to its node) and report it running and ready."""
    from kpy.tools.lab import cluster_objects as objects_

    client = admin or api_client(state)
    try:
        obj = _pod_objects(state)[name]
        pod = _lab_pod(state, name)
        node_ip = str(next(n.ip for n in state.cluster().nodes if n.name == pod.node))
        client.create(obj)
        client.patch_status(obj, objects_.running_status([str(pod.ip), str(pod.ip6)], node_ip))
    finally:
        if admin is None:
            client.close()


def kubelet_set_ready(state: LabState, name: str, ready: bool) -> None:
    """Report lab pod ``name`` ready or not (its readiness probe passing or failing)."""
    from kpy.tools.lab import cluster_objects as objects_

    client = api_client(state)
    try:
        pod = _lab_pod(state, name)
        node_ip = str(next(n.ip for n in state.cluster().nodes if n.name == pod.node))
        status = objects_.running_status([str(pod.ip), str(pod.ip6)], node_ip, ready=ready)
        client.patch_status(_pod_objects(state)[name], status)
    finally:
        client.close()


def kubelet_delete_pod(state: LabState, name: str, *, grace: int = 30) -> None:
    """Delete lab pod ``name`` as a user would: with ``grace`` > 0 it is terminating
    (its endpoint serving but not ready) until :func:`kubelet_finish_pod`."""
    client = api_client(state)
    try:
        client.delete(_pod_objects(state)[name], grace=grace)
    finally:
        client.close()


def kubelet_finish_pod(state: LabState, name: str) -> None:
    """The pod's containers have stopped: kubelet removes the Pod object."""
    kubelet_delete_pod(state, name, grace=0)


def control_plane_status(state: LabState) -> dict[str, Any]:
    components = {
        name: {"pid": pid, "alive": _alive(pid) and name in " ".join(_cmdline(pid))}
        for name, pid in state.control_plane_pids.items()
    }
    ready_ = False
    with contextlib.suppress(Exception):
        client = api_client(state)
        try:
            ready_ = client.get("/readyz") == "ok"
        finally:
            client.close()
    return {
        "netns": state.control_plane_netns,
        "url": f"https://{CONTROL_PLANE_IP}:6443",
        "components": components,
        "ready": ready_,
        "dir": state.control_plane_dir,
    }


def _netns_dir() -> list[Path]:
    return sorted(NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _lab_agents(prefix: str) -> list[int]:
    """Agents of this lab found by their command line (``--netns <prefix>-node-…``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if "run" in argv and "--netns" in argv:
            netns = argv[argv.index("--netns") + 1] if argv.index("--netns") + 1 < len(argv) else ""
            if netns.startswith(prefix + "-node-") and any("kpy" in a for a in argv):
                found.append(int(entry.name))
    return found


def _stop(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def down(state_dir: Path = STATE_DIR, prefix: str | None = None) -> list[str]:
    """Stop the agents and echo servers, delete every lab namespace; the names removed.

    Idempotent, and works without the state file (after a crash) by name (``prefix``,
    default ``kpy-lab``).
    """
    state = load(state_dir)
    prefix = prefix or (state.prefix if state is not None else PREFIX)
    recorded = list(state.agents.values()) if state is not None else []
    pids = sorted({p for p in recorded if _is_agent(p, prefix)} | set(_lab_agents(prefix)))
    if state is not None and state.api_pid is not None and "apiserver" in _cmdline(state.api_pid):
        pids.append(state.api_pid)
    _stop(pids)
    if state is not None and state.control_plane_pids:
        # controllers first, etcd last; whatever is left dies with the namespace below
        order = ("kube-controller-manager", "kube-apiserver", "etcd")
        for name in order:
            pid = state.control_plane_pids.get(name)
            if pid is not None and any(name in a for a in _cmdline(pid)):
                _stop([pid], grace=10.0)
    removed = topo.remove_stale(prefix)
    if state is not None and state.control_plane_dir:
        shutil.rmtree(state.control_plane_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_file(state_dir).unlink()
    return removed


def _is_agent(pid: int, prefix: str) -> bool:
    argv = _cmdline(pid)
    return any(a.startswith(prefix + "-node-") for a in argv)


def status(state_dir: Path = STATE_DIR) -> dict[str, Any]:
    """What is up: namespaces, agents (alive, ready), echo servers."""
    state = load(state_dir)
    prefix = state.prefix if state is not None else PREFIX
    leftovers = [p.name for p in _netns_dir() if p.name.startswith(prefix + "-")]
    if state is None:
        return {"up": False, "leftover_namespaces": leftovers}
    cluster = state.cluster()
    readiness = ready(state)
    nodes = []
    for node in cluster.nodes:
        pid = state.agents.get(node.name)
        nodes.append(
            {
                "name": node.name,
                "netns": node.netns.name,
                "ip": str(node.ip),
                "ip6": str(node.ip6),
                "pod_cidrs": [str(node.pod_cidr), str(node.pod_cidr6)],
                "agent_pid": pid,
                "agent_alive": pid is not None and _alive(pid),
                "ready": readiness.get(node.name, False),
                "health": f"http://127.0.0.1:{state.health_port(node.index)}/healthz",
                "pods": [
                    {
                        "name": pod.name,
                        "netns": pod.netns.name,
                        "ip": str(pod.ip),
                        "ip6": str(pod.ip6),
                        "echo_running": bool(pod.netns.exists() and pod.netns.pids()),
                    }
                    for pod in node.pods
                ],
            }
        )
    return {
        "up": True,
        "backend": state.backend,
        "source": state.source,
        "manifests": state.manifests,
        "client": {
            "netns": cluster.client.name,
            "ip": str(cluster.client_ip),
            "ip6": str(cluster.client_ip6),
            "outside_ip": str(cluster.client_outside_ip),
        },
        "nodes": nodes,
        "missing_namespaces": [ns.name for ns in cluster.namespaces() if not ns.exists()],
        "control_plane": control_plane_status(state) if state.real else None,
    }


def render_status(data: dict[str, Any]) -> str:
    if not data["up"]:
        extra = data["leftover_namespaces"]
        return "no lab is up" + (f" (leftover namespaces: {', '.join(extra)})" if extra else "")
    lines = [
        f"lab up: backend {data['backend']}, source {data['source']}, "
        f"manifests {data['manifests']}",
        f"client   {data['client']['netns']:<22} {data['client']['ip']}, "
        f"{data['client']['ip6']} (outside: {data['client']['outside_ip']})",
    ]
    for node in data["nodes"]:
        state = "ready" if node["ready"] else ("running" if node["agent_alive"] else "DOWN")
        lines.append(
            f"{node['name']:<8} {node['netns']:<22} {node['ip']}, {node['ip6']}  "
            f"pods {', '.join(node['pod_cidrs'])}  agent pid {node['agent_pid']} {state}"
        )
        for pod in node["pods"]:
            echo = "echo up" if pod["echo_running"] else "echo DOWN"
            lines.append(f"  {pod['name']:<6} {pod['netns']:<22} {pod['ip']}, {pod['ip6']}  {echo}")
    cp = data.get("control_plane")
    if cp:
        parts = ", ".join(
            f"{name} {c['pid']} {'up' if c['alive'] else 'DOWN'}"
            for name, c in cp["components"].items()
        )
        lines.append(
            f"control plane {cp['netns']} {cp['url']} {'ready' if cp['ready'] else 'NOT READY'}"
            f": {parts}"
        )
    if data["missing_namespaces"]:
        lines.append(f"missing namespaces: {', '.join(data['missing_namespaces'])}")
    return "\n".join(lines)


def command() -> Any:
    """The ``kpy lab`` click group (added to the CLI by kpy.cli)."""
    import click

    @click.group("lab")
    @click.option(
        "--state-dir",
        envvar="KPY_LAB_STATE_DIR",
        default=str(STATE_DIR),
        show_default=True,
        type=click.Path(path_type=Path),
        help="Where the lab records what it made.",
    )
    @click.pass_context
    def lab(ctx: click.Context, state_dir: Path) -> None:
        """A multi-node cluster in network namespaces on this machine (no Kubernetes)."""
        ctx.obj = state_dir

    @lab.command("up")
    @click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 9))
    @click.option("--pods-per-node", default=2, show_default=True, type=click.IntRange(1, 26))
    @click.option(
        "--backend", default="nftables", show_default=True, help="kpy backends lists them."
    )
    @click.option(
        "--manifests",
        default="examples",
        show_default=True,
        type=click.Path(path_type=Path, exists=True),
        help="Services, EndpointSlices and Nodes the agents watch (edit them live).",
    )
    @click.option(
        "--source",
        type=click.Choice(["manifests", "kube"]),
        default="manifests",
        show_default=True,
        help="kube: the agents list+watch a fake API server that serves the manifests.",
    )
    @click.option(
        "--control-plane",
        type=click.Choice(["none", "real"]),
        default="none",
        show_default=True,
        help="real: etcd, kube-apiserver and kube-controller-manager in the lab "
        "(scripts/build-upstream.sh builds them); implies --source kube.",
    )
    @click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for ready.")
    @click.pass_obj
    def up_cmd(
        state_dir: Path,
        nodes: int,
        pods_per_node: int,
        backend: str,
        manifests: Path,
        source: str,
        control_plane: str,
        timeout: float,
    ) -> None:
        """Build the namespaces, start the pods' echo servers and one agent per node."""
        if os.geteuid() != 0:
            raise click.ClickException("kpy lab needs root (network namespaces)")
        try:
            up(
                nodes=nodes,
                pods_per_node=pods_per_node,
                backend=backend,
                manifests=manifests,
                source=source,
                timeout=timeout,
                state_dir=state_dir,
                control_plane=control_plane,
            )
        except LabError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(render_status(status(state_dir)))

    @lab.command("status")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
    @click.pass_obj
    def status_cmd(state_dir: Path, output: str) -> None:
        """What is up: namespaces, addresses, agents, echo servers."""
        data = status(state_dir)
        click.echo(json.dumps(data, indent=2) if output == "json" else render_status(data))
        if not data["up"]:
            sys.exit(1)

    @lab.command("down")
    @click.pass_obj
    def down_cmd(state_dir: Path) -> None:
        """Stop the agents and echo servers and delete every lab namespace (idempotent)."""
        removed = down(state_dir)
        click.echo(f"removed {len(removed)} namespaces" if removed else "nothing to remove")

    return lab


__all__ = [
    "PREFIX",
    "STATE_DIR",
    "LabError",
    "LabState",
    "agent_argv",
    "command",
    "down",
    "load",
    "ready",
    "render_status",
    "status",
    "up",
    "wait_ready",
]
