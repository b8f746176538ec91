"""Faults against the real agent process and a real kernel: kill -9 and SIGTERM mid-sync.

``kpy run`` (the real command, as a subprocess) programs a namespace of its own with
enough Services that its first sync takes a while. It is killed with SIGKILL as soon as
it logs that its source has listed everything — its first sync under way — and started
again: the
restarted agent must complete the ruleset (every ClusterIP programmed). It is also sent
SIGTERM mid-sync: it must exit within the grace period and leave no child process
(``nft``, ``iptables-restore``) behind in the namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agents import FREE_PORTS, kpy_run

pytestmark = [pytest.mark.root, pytest.mark.slow]

SERVICES = 1500
GRACE = 30.0  # the DaemonSet's terminationGracePeriodSeconds


def _vip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + 10 + i)


def write_cluster(directory: Path) -> set[str]:
    docs = []
    for i in range(SERVICES):
        ep = ipaddress.IPv4Address("10.244.0.0") + 2 + i
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n"
            f"spec: {{clusterIP: {_vip(i)}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: s{i}-1, namespace: default,"
            f" labels: {{kubernetes.io/service-name: s{i}}}}}\n"
            "addressType: IPv4\nports: [{name: http, port: 8080}]\n"
            f"endpoints: [{{addresses: [{ep}], nodeName: node-a}}]\n"
        )
    (directory / "cluster.yaml").write_text("---\n".join(docs))
    return {_vip(i) for i in range(SERVICES)}


def start(netns: str, backend: str, manifests: Path, log: Path) -> subprocess.Popen[bytes]:
    args = kpy_run("--backend", backend, "--netns", netns, "--log-format", "json")
    args += FREE_PORTS
    if backend == "iptables":
        args += ["--iptables-mode", "nft"]
    env = {**os.environ, "KPY_NODE_IPS": "192.168.50.2", "KPY_MANIFESTS": str(manifests)}
    with log.open("ab") as err:
        return subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


def kernel_text(netns: str, backend: str) -> str:
    argv = ["nft", "list", "ruleset"] if backend == "nftables" else ["iptables-nft-save"]
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
    ).stdout


_ADDR = re.compile(r"10\.96\.\d+\.\d+")


def vips(netns: str, backend: str) -> set[str]:
    return set(_ADDR.findall(kernel_text(netns, backend)))


def syncing(log: Path) -> bool:
    """The agent has listed everything and starts its first sync (render and write)."""
    try:
        return '"source_synced"' in log.read_text()
    except OSError:
        return False


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pids_in(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    ).stdout
    return out.split()


@contextlib.contextmanager
def running(
    netns: str, backend: str, manifests: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start`; killed (its whole process group) if it still runs after the block."""
    proc = start(netns, backend, manifests, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> tuple[Path, Path, set[str]]:
    """The manifests directory with :func:`write_cluster`'s Services, the agent's log
    file, and the ClusterIPs."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    return manifests, tmp_path / "agent.log", write_cluster(manifests)


@pytest.fixture(params=["nftables", "iptables"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mid_first_sync(
    netns: str, cluster: tuple[Path, Path, set[str]], backend: str
) -> Iterator[subprocess.Popen[bytes]]:
    """The agent over ``cluster``, once its first sync has begun."""
    manifests, log, _ = cluster
    with running(netns, backend, manifests, log) as proc:
        wait_for(lambda: syncing(log), 120, "the first sync to start")
        yield proc


def test_kill_9_mid_first_sync_then_restart_completes_the_ruleset(
    netns: str,
    cluster: tuple[Path, Path, set[str]],
    backend: str,
    mid_first_sync: subprocess.Popen[bytes],
) -> None:
    manifests, log, want = cluster
    mid_first_sync.send_signal(signal.SIGKILL)  # no handler runs: whatever was in flight is cut
    mid_first_sync.wait()
    # A child the agent started may still be writing: it must finish or die on its own,
    # and whatever it left is the restarted agent's to complete.
    wait_for(lambda: not pids_in(netns), 120, "children of the killed agent to end")
    assert vips(netns, backend) < want  # the kill landed before the sync was complete
    with running(netns, backend, manifests, log):
        wait_for(lambda: vips(netns, backend) >= want, 300, "every ClusterIP after restart")


def test_sigterm_mid_first_sync_exits_in_time_and_leaves_no_child(
    netns: str, cluster: tuple[Path, Path, set[str]], mid_first_sync: subprocess.Popen[bytes]
) -> None:
    proc, log = mid_first_sync, cluster[1]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        raise AssertionError("kpy run did not exit within the grace period") from None
    took = time.monotonic() - sent
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert took < GRACE
    assert pids_in(netns) == []  # no nft / iptables-restore child outlives the agent
