"""The agent end to end with the manifests source and the FakeBackend."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from kpy.agent.agent import Agent
from kpy.testing.fake_backend import FakeBackend
from tests.agents import run_agent, until, write


def test_manifest_edits_reach_the_backend(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5"])
    backend = FakeBackend()

    async def scenario(agent: Agent) -> None:
        await until(lambda: "default/web:http/TCP" in backend.programmed)
        assert backend.plans[0].full_sync
        write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5", "10.244.1.6"])
        await until(lambda: len(backend.programmed["default/web:http/TCP"].endpoints) == 2)
        assert not backend.plans[-1].full_sync
        (tmp_path / "web.yaml").unlink()
        await until(lambda: not backend.programmed)

    run_agent(tmp_path, backend, scenario)


def test_bad_object_is_skipped_and_the_rest_is_served(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", "good", "10.96.0.10", ["10.244.1.5"])
    write(tmp_path / "bad.yaml", "bad", "10.96.0.999", ["10.244.1.6"])
    backend = FakeBackend()

    async def scenario(agent: Agent) -> None:
        await until(lambda: "default/good:http/TCP" in backend.programmed)
        assert "default/bad:http/TCP" not in backend.programmed
        assert agent.status.skipped_objects >= 1

    with capture_logs() as logs:
        run_agent(tmp_path, backend, scenario)
    skipped = [e for e in logs if e["event"] == "object_skipped"]
    assert skipped and skipped[0]["name"] == "bad" and "not an IP" in skipped[0]["reason"]


def test_broken_edit_keeps_what_is_programmed(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5"])
    backend = FakeBackend()

    async def scenario(agent: Agent) -> None:
        await until(lambda: "default/web:http/TCP" in backend.programmed)
        (tmp_path / "web.yaml").write_text("kind: Service\nmetadata: {name: [unclosed")
        await asyncio.sleep(0.2)
        assert "default/web:http/TCP" in backend.programmed

    run_agent(tmp_path, backend, scenario)


def test_failed_apply_is_retried_as_full_sync(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5"])
    backend = FakeBackend(fail_next=2)

    async def scenario(agent: Agent) -> None:
        await until(lambda: "default/web:http/TCP" in backend.programmed)
        assert backend.plans[0].full_sync
        assert agent.status.sync_failures == 2 and agent.status.first_full_sync_done

    run_agent(tmp_path, backend, scenario)
