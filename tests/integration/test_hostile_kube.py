"""The kube source against API responses no real API server would send: objects
nested past the JSON decoder's recursion (in a list and in a watch), and one watch
event far larger than any object. Each is skipped with a warning; the agent keeps
serving and later changes still arrive."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import structlog

from kpy.agent.agent import Agent
from kpy.agent.runner import RunnerTimes
from kpy.sources import kube, manifests
from kpy.sources.kube import ApiTarget, BackoffPolicy, KubeSource
from kpy.sources.kube import http as kube_http
from kpy.testing.apiserver import FakeApiServer, RawJSON
from kpy.testing.apiserver import command as apiserver_command
from kpy.testing.fake_backend import FakeBackend
from tests.hostile import corpus

DEEP = "[" * 100_000 + "]" * 100_000


def test_split_list_finds_items_without_decoding_them() -> None:
    items = [b'{"metadata":{"name":"a,]}"}}', b'{"spec":' + DEEP.encode() + b"}", b"[1, {}]"]
    data = b'{"kind":"ServiceList","metadata":{"resourceVersion":"7"},"items":[%s]}' % (
        b",".join(items)
    )
    meta, raw = kube.split_list(data)
    assert meta == {"resourceVersion": "7"} and raw == items
    assert kube.split_list(b'{"metadata":{},"items":[]}') == ({}, [])
    with pytest.raises(ValueError, match="not a list"):
        kube.split_list(b'{"items":[1]}')


def test_deep_and_huge_objects_are_skipped_and_the_agent_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kube_http, "MAX_EVENT_BYTES", 1 << 20)  # the guard, at a test's scale

    async def main() -> list[str]:
        async with FakeApiServer() as api:
            for obj in corpus.GOOD:
                api.create(obj)
            api.create(corpus.service("deep-listed", "10.96.100.1") | {"spec": RawJSON(DEEP)})
            backend = FakeBackend()
            agent = Agent(
                node_name=corpus.NODE,
                source=KubeSource(
                    ApiTarget.from_url(api.url), corpus.NODE, backoff=BackoffPolicy(initial=0.02)
                ),
                backend=backend,
                times=RunnerTimes(min_interval=0.01, full_interval=3600),
            )

            async def until(keys: set[str]) -> None:
                deadline = time.monotonic() + 30
                while not keys <= set(backend.programmed):
                    assert not task.done(), task
                    assert time.monotonic() < deadline, sorted(backend.programmed)
                    await asyncio.sleep(0.02)

            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(agent.run())
                try:
                    await until(set(corpus.GOOD_PORTS))
                    api.create(
                        corpus.service("deep-watched", "10.96.100.2") | {"spec": RawJSON(DEEP)}
                    )
                    huge = corpus.service("huge", "10.96.100.3")
                    huge["metadata"]["annotations"] = {"a": "x" * (2 << 20)}
                    api.create(huge)
                    api.create(corpus.service("good-d", "10.96.0.104"))
                    await until({"default/good-d:http/TCP"})
                    assert not task.done()
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        return [str(e["event"]) for e in logs if e.get("log_level") == "warning"]

    warnings = asyncio.run(main())
    assert "kube_object_undecodable" in warnings  # the listed one
    assert "kube_watch_event_malformed" in warnings  # the watched one
    assert "kube_event_too_large" in warnings
    assert json.dumps(warnings)


def test_serving_manifests_skips_what_json_cannot_carry(tmp_path: Path) -> None:
    (tmp_path / "odd.yaml").write_text(
        "kind: Service\nmetadata: {name: when, namespace: default}\nspec: {at: 2024-01-01}\n"
        "---\nkind: Service\nmetadata: {name: ok, namespace: default}\n"
    )
    server = FakeApiServer()
    with structlog.testing.capture_logs() as logs:
        manifests.ManifestSource([tmp_path]).scan(apiserver_command.ServerSink(server))
    assert [o["metadata"]["name"] for o in server.objects("Service")] == ["ok"]
    assert [e["name"] for e in logs if e["event"] == "manifest_not_served"] == ["when"]
