"""Metrics: per-agent registries, the observer hooks, and /metrics over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kpy.agent import http
from kpy.agent import observers as operations
from kpy.agent.agent import Agent
from kpy.agent.config import AgentConfig
from kpy.agent.metrics import Metrics
from kpy.core.backend import ApplyResult, BackendError
from kpy.sources.manifests import ManifestSource
from kpy.testing import builders as b
from kpy.testing.fake_backend import FakeBackend
from tests.agents import manifest, on_node_a, quick_agent
from tests.unit.test_health import get


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def test_registries_are_independent() -> None:
    one, two = Metrics(backend="a"), Metrics(backend="b")
    one.sync_failed(b.plan([]), BackendError("x"), 0.1)
    assert value(one, "kpy_sync_proxy_rules_failures_total") == 1
    assert value(two, "kpy_sync_proxy_rules_failures_total") == 0
    assert value(one, "kpy_build_info", version="0.1.0", backend="a") == 1


def test_plan_applied_records_durations_ops_and_programming_latency() -> None:
    now = 1_700_000_000.0
    m = Metrics(backend="fake", clock=lambda: now)
    svc = b.state(b.service())
    full = b.plan([svc], full_sync=True)
    m.plan_applied(full, ApplyResult(full_sync=True, ops=120, detail={"rules": 40}), 0.25)
    partial = b.plan([svc], full_sync=False)
    partial = type(partial)(
        node=partial.node,
        services=partial.services,
        changed=partial.changed,
        full_sync=False,
        trigger_times=(now - 2.0, now - 0.3, now + 5),  # the last one from a skewed clock
    )
    m.plan_applied(partial, ApplyResult(full_sync=False, ops=3), 0.004)
    assert value(m, "kpy_sync_proxy_rules_duration_seconds_count", sync="full") == 1
    assert value(m, "kpy_sync_proxy_rules_duration_seconds_sum", sync="full") == 0.25
    assert value(m, "kpy_sync_proxy_rules_duration_seconds_bucket", sync="partial", le="0.004") == 1
    assert value(m, "kpy_sync_proxy_rules_duration_seconds_bucket", sync="partial", le="0.002") == 0
    assert value(m, "kpy_sync_proxy_rules_total", sync="partial") == 1
    assert value(m, "kpy_sync_proxy_rules_last_timestamp_seconds") == now
    assert value(m, "kpy_sync_proxy_rules_ops_sum") == 123
    assert value(m, "kpy_sync_proxy_rules_last_ops") == 3
    assert value(m, "kpy_backend_objects", backend="fake", kind="rules") == 40
    assert value(m, "kpy_sync_proxy_rules_service_changes_total", change="changed") == 2
    assert value(m, "kpy_network_programming_duration_seconds_count") == 3
    assert value(m, "kpy_network_programming_duration_seconds_bucket", le="0.25") == 1  # 0 s
    assert value(m, "kpy_network_programming_duration_seconds_bucket", le="0.5") == 2
    assert value(m, "kpy_network_programming_duration_seconds_bucket", le="2.0") == 3
    assert value(m, "kpy_network_programming_duration_seconds_sum") == pytest.approx(2.3)


def test_source_metrics_interface() -> None:
    m = Metrics()
    m.watch_reconnected("services")
    m.watch_reconnected("services")
    m.relisted("endpointslices")
    assert value(m, "kpy_source_watch_reconnects_total", resource="services") == 2
    assert value(m, "kpy_source_relists_total", resource="endpointslices") == 1


def test_agent_with_operations_serves_metrics_and_health(tmp_path: Path) -> None:
    endpoints = (*on_node_a("10.244.1.5"), "{addresses: [10.244.2.5]}")
    (tmp_path / "web.yaml").write_text(manifest(*endpoints))
    backend = FakeBackend(fail_next=1)
    config = AgentConfig(
        healthz_bind_address="127.0.0.1:0",
        metrics_bind_address="127.0.0.1:0",
        conntrack_cleanup=False,
    )

    async def main() -> None:
        agent = quick_agent(tmp_path, backend)
        ops = operations.attach(agent, config)
        assert ops.metrics in agent.observers
        tasks = [asyncio.create_task(ops.run()), asyncio.create_task(agent.run())]
        try:
            ports = await asyncio.wait_for(ops.listening(), 5)
            async with asyncio.timeout(5):
                while not agent.status.first_full_sync_done:
                    await asyncio.sleep(0.01)
            code, headers, body = await get(ports["metrics"], "/metrics")
            assert code == 200 and headers["Content-Type"].startswith("text/plain")
            text = body.decode()
            assert "kpy_sync_proxy_rules_failures_total 1.0" in text  # the injected failure
            assert 'kpy_sync_proxy_rules_total{sync="full"} 1.0' in text
            assert "kpy_services_programmed 1.0" in text
            assert "kpy_endpoints_programmed 2.0" in text
            assert "kpy_ready 1.0" in text
            assert (await get(ports["metrics"], "/proxyMode"))[2] == b"fake"
            assert (await get(ports["healthz"], "/readyz"))[0] == 200
            code, _, _ = await get(ports["healthz"], "/healthz")
            assert code == 200
            text = (await get(ports["metrics"], "/metrics"))[2].decode()
            assert 'kpy_proxy_healthz_total{code="200",path="/healthz"} 1.0' in text
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        # Stopped cleanly: nothing listens any more.
        for port in ops.ports.values():
            try:
                await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                continue
            raise AssertionError(f"port {port} still open")

    asyncio.run(main())


def test_metrics_404() -> None:
    assert Metrics().answer("GET", "/other") == http.Response.text(404, "not found\n")


def test_a_backend_counting_failed_read_backs_is_exported() -> None:
    backend = FakeBackend()
    agent = Agent(node_name="node-a", source=ManifestSource([]), backend=backend)
    assert "kpy_backend_readback_failures" not in Metrics(agent).exposition().decode()
    backend.readback_failures = 3  # type: ignore[attr-defined]  # as the iptables backend
    text = Metrics(agent).exposition().decode()
    assert "kpy_backend_readback_failures_total 3.0" in text
