"""SIGTERM and SIGINT during an iptables sync: ``kpy run`` exits and no iptables
process outlives it. The restore tool is a stand-in on PATH that records its pid and
hangs (as ``iptables-nft-save`` did on a 10,000-Service ruleset), run through
``nsenter`` in a namespace of the test's own.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.agents import FREE_PORTS, kpy_run, write

pytestmark = pytest.mark.root


def tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_no_iptables_child_outlives_kpy_run(
    tmp_path: Path, netns: str, sig: signal.Signals
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pidfile = tmp_path / "pid"
    for prefix in ("iptables", "ip6tables"):
        tool(bin_dir, f"{prefix}-legacy-save", "exit 0\n")
        tool(bin_dir, f"{prefix}-legacy", "exit 1\n")
        tool(
            bin_dir,
            f"{prefix}-legacy-restore",
            f'[ "$1" = --version ] && exit 0\necho $$ > "{pidfile}"\nexec sleep 300\n',
        )
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "web.yaml", "web", "10.96.0.10", ["10.244.1.5"])
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin",
        "KPY_MANIFESTS": str(manifests),
        "KPY_NODE_IPS": "192.168.50.2",
    }
    proc = subprocess.Popen(
        kpy_run(
            "--backend", "iptables", "--iptables-mode", "legacy", "--netns", netns, *FREE_PORTS
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the restore never started"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert alive(child)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not alive(child), "iptables-legacy-restore outlived kpy run"
