"""``kpy lab up --control-plane real`` end to end, with nftables and with iptables.

etcd, kube-apiserver and kube-controller-manager run in the lab's ``-cp`` namespace; the
examples are real objects; EndpointSlices come from the real controller; the agents run
in their node namespaces with the token of ``deploy/daemonset.yaml``'s ServiceAccount.
``kpy check`` passes every check; then the lab's "kubelet" makes pods unready, deletes
them (terminating, then gone) and brings them back, and the checks — derived from the
API server's objects at that moment — keep passing once the agents have followed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kpy.core import backend as backends
from kpy.tools import check
from kpy.tools.lab import control_plane as realcluster
from kpy.tools.lab import lab
from tests.conftest import require_root

pytestmark = [pytest.mark.root, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PREFIX = f"kpy-r{os.getpid()}"
PORTS = 24000 + (os.getpid() % 400) * 10


@pytest.fixture(params=["nftables", "iptables"])
def real_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[lab.LabState]:
    require_root()
    backend = str(request.param)
    missing = realcluster.missing_binaries()
    if missing:
        pytest.skip(f"not built: {', '.join(missing)} (scripts/build-upstream.sh)")
    reason = backends.create(backend, backends.BackendConfig()).probe()
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")
    state_dir = tmp_path / "lab"
    try:
        state = lab.up(
            backend=backend,
            manifests=EXAMPLES,
            state_dir=state_dir,
            prefix=PREFIX,
            health_base=PORTS,
            metrics_base=PORTS + 100,
            control_plane="real",
            timeout=60 * realcluster.load_factor(),
        )
        yield state
    finally:
        lab.down(state_dir, prefix=PREFIX)
        assert not [n for n in os.listdir("/run/netns") if n.startswith(PREFIX + "-")]


def checks_pass(state_dir: Path, timeout: float = 30.0) -> list[check.Result]:
    """Run the catalog until every check passes (the agents follow the API within a
    sync); fail with the last failures after ``timeout``."""
    deadline = time.monotonic() + timeout * realcluster.load_factor()
    while True:
        results = check.check_lab(state_dir=state_dir)
        failed = [r for r in results if r.status != "pass"]
        if not failed:
            return results
        if time.monotonic() > deadline:
            raise AssertionError("\n" + check.table(failed))
        time.sleep(0.2)


def endpoints(state: lab.LabState, service: str) -> dict[str, dict[str, bool]]:
    return {
        ep["targetRef"]["name"]: ep["conditions"]
        for obj in lab.api_objects(state)
        if obj["kind"] == "EndpointSlice"
        and obj["metadata"]["labels"].get("kubernetes.io/service-name") == service
        for ep in obj.get("endpoints") or []
    }


def wait_for(
    what: str, predicate: Callable[[], bool], timeout: float = 30.0, show: object = None
) -> None:
    deadline = time.monotonic() + timeout * realcluster.load_factor()
    while not predicate():
        if time.monotonic() > deadline:
            seen = show() if callable(show) else ""
            raise AssertionError(f"timed out waiting for {what} {seen}")
        time.sleep(0.05)


def test_real_control_plane_lab(real_lab: lab.LabState, tmp_path: Path) -> None:
    state = real_lab
    state_dir = tmp_path / "lab"
    status = lab.status(state_dir)
    cp = status["control_plane"]
    assert cp["ready"] and all(c["alive"] for c in cp["components"].values()), cp
    assert set(cp["components"]) == {"etcd", "kube-apiserver", "kube-controller-manager"}

    # every Service's slices are the controller's, none from the examples' files
    slices = [o for o in lab.api_objects(state) if o["kind"] == "EndpointSlice"]
    assert slices and all(
        o["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
        == "endpointslice-controller.k8s.io"
        for o in slices
    )
    first = checks_pass(state_dir)
    assert len(first) >= 60

    # the CLI shows the control plane; kpy check from another process passes
    env = {**os.environ, "KPY_LAB_STATE_DIR": str(state_dir)}
    shown = subprocess.run(
        [sys.executable, "-m", "kpy", "lab", "status", "-o", "json"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert json.loads(shown.stdout)["control_plane"]["url"] == "https://192.168.100.2:6443"

    # unready: pod-2a leaves every Service (checks derived now expect the others only;
    # web-external, whose only endpoint it is, now refuses). Not pod-2b: with pod-1a gone
    # too, web-dual's IPv6 would have no endpoint, and the iptables backend's IPv6 reject
    # answers the first SYN only after its retransmission (~1 s; docs/real-control-plane.md)
    lab.kubelet_set_ready(state, "pod-2a", False)
    wait_for("pod-2a unready", lambda: not endpoints(state, "web")["pod-2a"]["ready"])
    checks_pass(state_dir)

    # deleted with a grace period: terminating and serving, then gone
    lab.kubelet_delete_pod(state, "pod-1a", grace=30)
    wait_for(
        "pod-1a terminating",
        lambda: (
            endpoints(state, "web").get("pod-1a")
            == {"ready": False, "serving": True, "terminating": True}
        ),
    )
    checks_pass(state_dir)
    lab.kubelet_finish_pod(state, "pod-1a")
    wait_for("pod-1a gone", lambda: "pod-1a" not in endpoints(state, "web"))
    checks_pass(state_dir)

    # back: a new Pod for pod-1a, and pod-2a ready again
    lab.kubelet_start_pod(state, "pod-1a")
    lab.kubelet_set_ready(state, "pod-2a", True)
    wait_for(
        "all four ready",
        lambda: (
            {n for n, c in endpoints(state, "web").items() if c["ready"]}
            == {"pod-1a", "pod-1b", "pod-2a", "pod-2b"}
        ),
    )
    again = checks_pass(state_dir)
    assert len(again) == len(first)
