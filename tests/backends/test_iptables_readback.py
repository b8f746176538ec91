"""The iptables backend when its read-back or its tools fail, with fake tools on PATH
(no kernel, no root): a crashing ``iptables-legacy-save`` never stops partial syncs,
errors name the exit status or signal, and a cancelled sync leaves no child behind."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from kpy_iptables import IptablesBackend, render
from structlog.testing import capture_logs

from kpy.agent.healthz import HealthServer
from kpy.core.backend import BackendConfig, BackendError
from kpy.testing import builders as b
from tests.agents import manifest, on_node_a, quick_agent, running, until


def tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake legacy tools, alone on PATH: save dies of SIGSEGV, restore appends its input
    to ``restored``, ``iptables-legacy -C`` finds nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prefix in ("iptables", "ip6tables"):
        tool(bin_dir, f"{prefix}-legacy-save", "kill -SEGV $$\n")
        tool(
            bin_dir,
            f"{prefix}-legacy-restore",
            f'[ "$1" = --version ] && exit 0\ncat >> "{tmp_path}/restored"\n',
        )
        tool(bin_dir, f"{prefix}-legacy", "exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")  # no /usr/sbin: no real iptables
    return tmp_path


def legacy_backend(clock: Callable[[], float] | None = None) -> IptablesBackend:
    config = BackendConfig(node_name="node-a", options=(("iptables_mode", "legacy"),))
    backend = IptablesBackend(config, clock=clock) if clock else IptablesBackend(config)
    # the fake host has legacy tables (the real one is not looked at)
    backend._kernel.legacy_tables = lambda family: {"nat", "filter"}  # type: ignore[method-assign]
    return backend


def sep(endpoint: str) -> str:
    return render.chain_name("SEP", "default/web:http/TCP", endpoint)


def test_crashing_save_never_stops_partial_syncs_and_health_stays_green(
    tools: Path, tmp_path: Path
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    web = manifests / "web.yaml"
    web.write_text(manifest(*on_node_a("10.244.1.5")))
    backend = legacy_backend()
    restored = tools / "restored"

    def written() -> str:
        return restored.read_text() if restored.exists() else ""

    async def main() -> None:
        # a periodic full sync every 50 ms: each one would read the kernel back
        agent = quick_agent(manifests, backend, full_interval=0.05)
        health = HealthServer(agent.status, timeout=5.0, stale_after=60.0)
        async with running(agent):
            await until(lambda: sep("10.244.1.5:8080") in written())
            syncs = agent.runner.syncs
            web.write_text(manifest(*on_node_a("10.244.1.5"), "{addresses: [10.244.1.6]}"))
            await until(lambda: sep("10.244.1.6:8080") in written())
            await until(lambda: backend.readback_failures >= 1)
            await until(lambda: agent.runner.syncs >= syncs + 5)  # full ones among them
            assert agent.status.sync_failures == 0
            assert health.answer("GET", "/livez").status == 200
            assert health.answer("GET", "/readyz").status == 200

    with capture_logs() as logs:
        asyncio.run(main())
    failed = [e for e in logs if e["event"] == "iptables_readback_failed"]
    assert failed, logs
    assert "killed by signal 11 (SIGSEGV)" in failed[0]["error"]
    # backing off: the many full syncs since tried the read once
    assert backend.readback_failures == 1
    assert not [e for e in logs if e["event"] == "sync_failed"]


def test_read_back_is_retried_after_the_backoff(tools: Path) -> None:
    now = [1000.0]
    backend = legacy_backend(clock=lambda: now[0])
    states = [b.state(b.service("web"), [b.endpoint("10.244.1.5")])]
    written: list[str] = []

    async def main() -> None:
        first = await backend.apply(b.plan(states))
        assert first.full_sync and first.detail["readback_failures"] == 1
        written.append((tools / "restored").read_text())
        await backend.apply(b.plan(states))  # within the backoff: not read
        assert backend.readback_failures == 1
        now[0] += 3600
        await backend.apply(b.plan(states))  # read again, fails again, still applied
        assert backend.readback_failures == 2

    asyncio.run(main())
    # the first sync wrote every chain (the dispatch chains whole), in both families
    assert written[0].count(":KPY-SERVICES - [0:0]") == 4
    assert "-A KPY-SERVICES -d 10.96.0.10/32" in written[0]
    # later full syncs work from the last written state: nothing left to change
    assert (tools / "restored").read_text() == written[0]


def test_restore_error_names_the_signal(tools: Path) -> None:
    tool(tools / "bin", "iptables-legacy-restore", "echo boom >&2; kill -KILL $$\n")
    backend = legacy_backend()
    with pytest.raises(BackendError, match=r"killed by signal 9 \(SIGKILL\)"):
        asyncio.run(backend.apply(b.plan([b.state(b.service("web"), [b.endpoint("10.0.0.1")])])))


def test_restore_error_names_the_exit_status(tools: Path) -> None:
    tool(tools / "bin", "iptables-legacy-restore", "echo 'line 3 failed' >&2; exit 2\n")
    backend = legacy_backend()
    with pytest.raises(BackendError, match=r"exit status 2\): line 3 failed"):
        asyncio.run(backend.apply(b.plan([b.state(b.service("web"), [b.endpoint("10.0.0.1")])])))


def test_a_cancelled_sync_kills_and_reaps_its_child(tools: Path) -> None:
    pidfile = tools / "pid"
    tool(tools / "bin", "iptables-legacy-restore", f'echo $$ > "{pidfile}"; exec sleep 60\n')
    backend = legacy_backend()

    async def main() -> int:
        task = asyncio.create_task(
            backend.apply(b.plan([b.state(b.service("web"), [b.endpoint("10.0.0.1")])]))
        )
        await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        pid = int(pidfile.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid

    pid = asyncio.run(main())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: not even a zombie is left


def test_probe_reads_no_ruleset(tools: Path) -> None:
    # save would crash: the probe does not run it, so the backend can run here
    assert legacy_backend().probe() is None


def test_probe_names_a_missing_tool(tools: Path) -> None:
    (tools / "bin" / "ip6tables-legacy-save").unlink()
    reason = legacy_backend().probe()
    assert reason is not None and "missing ip6tables-legacy-save" in reason
