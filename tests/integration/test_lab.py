"""``kpy lab`` end to end with a real backend: up, every check passes, live edits, down.

The lab here runs beside any lab a developer has up: its own namespace prefix, state
directory and health ports. The backend is nftables (the default); the test skips
with the reason when it cannot run here — which counts as a failure under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kpy.core import backend as backends
from kpy.tools import check
from kpy.tools.lab import lab
from tests.conftest import require_root

pytestmark = [pytest.mark.root, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BACKEND = "nftables"
PREFIX = f"kpy-l{os.getpid()}"
PORTS = 20000 + (os.getpid() % 400) * 10


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix + "-")]


def kpy(*argv: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KPY_LAB_STATE_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "kpy", *argv], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lab-state")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("lab") / "manifests"
    shutil.copytree(EXAMPLES, copy)
    return copy


@pytest.fixture(scope="module")
def running(state_dir: Path, manifests: Path) -> Iterator[lab.LabState]:
    require_root()
    try:
        reason = backends.create(BACKEND, backends.BackendConfig()).probe()
    except (KeyError, backends.BackendError) as exc:
        reason = str(exc)
    if reason is not None:
        pytest.skip(f"backend {BACKEND} cannot run here: {reason}")
    try:
        yield lab.up(
            nodes=2,
            backend=BACKEND,
            manifests=manifests,
            state_dir=state_dir,
            prefix=PREFIX,
            health_base=PORTS,
            metrics_base=PORTS + 5,
        )
    finally:
        lab.down(state_dir, prefix=PREFIX)
    assert namespaces(PREFIX) == []


def results_by(results: list[check.Result]) -> dict[tuple[str, str, str], check.Result]:
    return {(r.service.split(":")[0], r.check, r.source): r for r in results}


def test_status_reports_nodes_pods_and_ready_agents(running: lab.LabState, state_dir: Path) -> None:
    data = lab.status(state_dir)
    assert data["up"] and data["backend"] == BACKEND and not data["missing_namespaces"]
    assert [n["name"] for n in data["nodes"]] == ["node-1", "node-2"]
    assert all(n["ready"] and n["agent_alive"] for n in data["nodes"])
    assert all(p["echo_running"] for n in data["nodes"] for p in n["pods"])
    # the rules live in the node namespaces
    tables = subprocess.run(
        ["ip", "netns", "exec", f"{PREFIX}-node-1", "nft", "list", "tables"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "table ip kpy" in tables


def test_every_check_passes_and_covers_every_semantic(
    running: lab.LabState, state_dir: Path
) -> None:
    results = check.check_lab(state_dir=state_dir)
    failed = [r for r in results if r.status == "fail"]
    assert not failed, check.table(failed)
    kinds = {r.check for r in results}
    assert kinds == {
        "cluster-ip", "udp", "no-endpoints", "load-spread", "session-affinity", "node-port",
        "source-ip-kept", "load-balancer", "source-ranges", "external-ip", "headless",
        "external-name",
    }  # fmt: skip
    by = results_by(results)
    # internalTrafficPolicy Local: each node's pod only reaches its own node's endpoint
    assert (
        by[("default/local-internal", "cluster-ip", "pod-2a (node-2)")].reason
        == "answered by pod-2a"
    )
    # externalTrafficPolicy Local: node-2 has no endpoint and drops
    assert "dropped" in by[("default/local-external", "node-port", "client → node-2")].reason
    # both families of the dual-stack Service, from a pod on each node and each node itself
    dual = {r.source for r in results if r.service.startswith("default/web-dual")}
    assert {"pod-1a (node-1)", "node-1", "pod-2a (node-2)", "node-2"} <= dual
    assert len([r for r in results if r.command.endswith("http://[fd00:96::20]:80/")]) == 4


def test_check_cli_json_matches_the_documented_shape(
    running: lab.LabState, state_dir: Path
) -> None:
    done = kpy("check", "-o", "json", "--service", "web-lb", state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"results"}
    assert data["results"]
    for row in data["results"]:
        assert set(row) == {"service", "check", "source", "status", "reason"}
        assert row["status"] == "pass"


def test_the_shown_commands_themselves_pass(running: lab.LabState, state_dir: Path) -> None:
    """Each check once more, as the real curl / nc command run inside the namespace."""
    results = check.check_lab(state_dir=state_dir, run_commands=True)
    assert len(results) > 50
    assert all(r.status == "pass" for r in results), check.table(results)


def test_cluster_mode_from_api_objects_through_a_pod_shell(
    running: lab.LabState, state_dir: Path, manifests: Path, tmp_path: Path
) -> None:
    """``kpy check --kubeconfig`` without a cluster: the objects come from the fake API
    server through the kubernetes client, and pod-1a stands in for the netshoot pod (its
    shell runs the commands); only creating the pod and exec are not exercised."""
    port = PORTS + 400
    server = subprocess.Popen(
        [sys.executable, "-m", "kpy", "testing", "apiserver", "--from", str(manifests),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stderr is not None
        assert "fake Kubernetes API server" in server.stderr.readline().decode()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "lab", "user": {}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
        }))  # fmt: skip
        client = check.kube_client(str(kubeconfig))
        try:
            objects = check.list_objects(client)
        finally:
            client.close()
        assert {o["kind"] for o in objects} == {"Node", "Service", "EndpointSlice"}
        cluster = running.cluster()
        pod = cluster.pod("pod-1a")
        shell = check.lab_shell(cluster)
        netshoot = check.PodInfo("pod-1a", "node-1", (pod.ip, pod.ip6))
        checks = [
            c
            for c in check.cluster_catalog(objects, netshoot, shell)
            if c.check not in {"headless", "external-name"}  # the lab has no cluster DNS
        ]
        assert {c.check for c in checks} == {"cluster-ip", "udp", "no-endpoints"}
        assert {c.source for c in checks} == {"pod-1a"}
        results = check.run_checks(checks, check.ShellExecutor(shell))
        assert all(r.status == "pass" for r in results), check.table(results)
        # internalTrafficPolicy Local still holds from the pod's node: only pod-1a answers
        itp = [c for c in checks if c.service.startswith("default/local-internal")]
        assert itp and all(
            r.reason == "answered by pod-1a"
            for r in check.run_checks(itp, check.ShellExecutor(shell))
        )
    finally:
        server.terminate()
        server.wait()
        assert server.stderr is not None
        server.stderr.close()


def test_a_broken_node_fails_the_checks_with_reasons(
    running: lab.LabState, state_dir: Path
) -> None:
    # hand-made damage on node-2: nothing repairs it before the agent's next sync (an
    # event, or the periodic full sync) — the next test's edit triggers one
    ns = ["ip", "netns", "exec", f"{PREFIX}-node-2"]
    tables = subprocess.run([*ns, "nft", "list", "tables"], capture_output=True, text=True)
    for line in tables.stdout.splitlines():  # "table ip kpy", "table ip kpy-3", …
        _, family, name = line.split()
        if family == "ip" and (name == "kpy" or name.startswith("kpy-")):
            subprocess.run([*ns, "nft", "delete", "table", "ip", name], check=True)
    done = kpy("check", "--service", "web-nodeport", state_dir=state_dir)
    assert done.returncode == 1
    assert "FAIL" in done.stdout and "client → node-2" in done.stdout
    assert "expected an answer, got refused" in done.stdout


def test_editing_a_manifest_changes_the_rules(
    running: lab.LabState, state_dir: Path, manifests: Path
) -> None:
    path = manifests / "11-web-nodeport.yaml"
    original = path.read_text()
    # pod-1a leaves the Service: its EndpointSlice keeps only pod-2a
    docs = list(yaml.safe_load_all(original))
    for doc in docs:
        if doc["kind"] == "EndpointSlice":
            doc["endpoints"] = [e for e in doc["endpoints"] if e["addresses"] != ["10.244.1.2"]]
    edited = yaml.safe_dump_all(docs)
    path.write_text(edited)
    try:
        deadline = time.monotonic() + 15
        while True:
            results = check.check_lab(state_dir=state_dir, only=["web-nodeport"])
            spread = next(r for r in results if r.check == "load-spread") if any(
                r.check == "load-spread" for r in results) else None  # fmt: skip
            if spread is None and all(r.status == "pass" for r in results):
                break  # one endpoint left: no spread check, and every check passes
            assert time.monotonic() < deadline, check.table(results)
            time.sleep(0.5)
        assert {r.reason for r in results if r.check == "node-port"} == {"answered by pod-2a"}
    finally:
        path.write_text(original)
    deadline = time.monotonic() + 15  # back: both endpoints again
    while not any(
        r.check == "load-spread" and r.status == "pass"
        for r in check.check_lab(state_dir=state_dir, only=["web-nodeport"])
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_down_from_another_process_is_complete_and_idempotent(
    running: lab.LabState, state_dir: Path
) -> None:
    agents = list(running.agents.values())
    first = kpy("lab", "down", state_dir=state_dir)
    assert first.returncode == 0 and "removed 8 namespaces" in first.stdout, first.stderr
    assert namespaces(PREFIX) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in agents)
    second = kpy("lab", "down", state_dir=state_dir)
    assert second.returncode == 0 and "nothing to remove" in second.stdout
    assert kpy("lab", "status", state_dir=state_dir).returncode == 1


def test_down_after_a_crash_finds_the_leftovers_by_name(tmp_path: Path, manifests: Path) -> None:
    require_root()
    prefix = f"kpy-c{os.getpid()}"
    state = lab.up(
        nodes=1, pods_per_node=1, backend=BACKEND, manifests=manifests, state_dir=tmp_path,
        prefix=prefix, health_base=PORTS + 100, metrics_base=PORTS + 105,
    )  # fmt: skip
    (tmp_path / "state.json").unlink()  # the record is lost
    removed = lab.down(tmp_path, prefix=prefix)
    assert len(removed) == 4 and namespaces(prefix) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in state.agents.values())


def test_the_kube_source_through_the_fake_api_server(tmp_path: Path, manifests: Path) -> None:
    """The agents list+watch a fake API server serving the manifests; edits travel as
    watch events."""
    require_root()
    prefix = f"kpy-k{os.getpid()}"
    state_dir = tmp_path / "state"
    state = lab.up(
        nodes=2, backend=BACKEND, manifests=manifests, source="kube", state_dir=state_dir,
        prefix=prefix, health_base=PORTS + 200, metrics_base=PORTS + 205,
    )  # fmt: skip
    api_pid = state.api_pid
    try:
        assert api_pid is not None and lab.status(state_dir)["source"] == "kube"
        results = check.check_lab(state_dir=state_dir, only=["local-external", "web-dual"])
        assert results and all(r.status == "pass" for r in results), check.table(results)
        path = manifests / "19-no-endpoints.yaml"
        original = path.read_text()
        docs = list(yaml.safe_load_all(original))
        for doc in docs:
            if doc["kind"] == "EndpointSlice":
                doc["endpoints"] = [{"addresses": ["10.244.2.3"], "nodeName": "node-2"}]
        path.write_text(yaml.safe_dump_all(docs))
        try:
            deadline = time.monotonic() + 15
            while True:
                results = check.check_lab(state_dir=state_dir, only=["no-endpoints"])
                # the catalog follows the file at once, the rules once the watch delivers it
                if {r.check for r in results} == {"cluster-ip"} and all(
                    r.status == "pass" for r in results
                ):
                    break
                assert time.monotonic() < deadline, check.table(results)
                time.sleep(0.5)
            assert all(r.reason == "answered by pod-2b" for r in results), check.table(results)
        finally:
            path.write_text(original)
    finally:
        lab.down(state_dir, prefix=prefix)
    assert namespaces(prefix) == []
    assert not Path(f"/proc/{api_pid}").exists()


def test_the_backend_is_a_flag_iptables_passes_the_same_checks(
    tmp_path: Path, manifests: Path
) -> None:
    require_root()
    reason = backends.create("iptables", backends.BackendConfig()).probe()
    if reason is not None:
        pytest.skip(f"backend iptables cannot run here: {reason}")
    prefix = f"kpy-i{os.getpid()}"
    state = lab.up(
        nodes=2, backend="iptables", manifests=manifests, state_dir=tmp_path, prefix=prefix,
        health_base=PORTS + 300, metrics_base=PORTS + 305,
    )  # fmt: skip
    try:
        assert state.backend == "iptables"
        results = check.check_lab(state_dir=tmp_path)
        assert len(results) > 30
        assert all(r.status == "pass" for r in results), check.table(results)
        rules = subprocess.run(
            ["ip", "netns", "exec", f"{prefix}-node-1", "iptables-save", "-t", "nat"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "KPY-" in rules
    finally:
        lab.down(tmp_path, prefix=prefix)
    assert namespaces(prefix) == []
