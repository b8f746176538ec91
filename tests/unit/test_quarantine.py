"""Poison pills: a service port the backend refuses costs only that port.

Before, one refused port failed every transaction: no good Service was programmed, the
runner retried forever and health turned red. Here the backends are FakeBackends told to
refuse one port's state, as ``nft``/``iptables-restore`` refuse text they cannot parse.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from kpy.agent import quarantine
from kpy.agent.agent import Agent
from kpy.agent.metrics import Metrics
from kpy.core.backend import BackendConfig, BackendError
from kpy.core.model import Plan, ServicePortState
from kpy.testing import builders as b
from kpy.testing.fake_backend import FakeBackend
from tests.agents import run_agent, until, write


def poisoned(state: ServicePortState) -> str | None:
    """Refuse any port whose endpoints include 10.244.66.6 (the poison)."""
    if any(str(ep.ip) == "10.244.66.6" for ep in state.endpoints):
        return "syntax error, unexpected junk"
    return None


class Attempts:
    """Scratch attempts with a fresh FakeBackend each, counted."""

    def __init__(self, refuse: object = poisoned, base_refused: bool = False) -> None:
        self.refuse = refuse
        self.base_refused = base_refused
        self.sizes: list[int] = []

    async def __call__(self, plan: Plan) -> str | None:
        self.sizes.append(len(plan.services))
        assert plan.full_sync  # every attempt is a cold start somewhere harmless
        if self.base_refused:
            return "nft: command not found"
        backend = FakeBackend(refuse=poisoned)
        try:
            await backend.apply(plan)
        except BackendError as exc:
            return str(exc)
        return None


def _endpoints(backend: FakeBackend, name: str) -> tuple[str, ...]:
    """A port's programmed endpoints (() while a rewritten manifest is read half-written)."""
    view = backend.programmed.get(name)
    return view.endpoints if view is not None else ()


GOOD = 20


def _write_cluster(tmp_path: Path, poison_eps: list[str]) -> None:
    for i in range(GOOD):
        write(tmp_path / f"s{i}.yaml", f"s{i}", f"10.96.0.{10 + i}", [f"10.244.1.{i + 1}"])
    write(tmp_path / "poison.yaml", "poison", "10.96.1.1", poison_eps)


def test_one_refused_port_on_the_first_sync_costs_only_that_port(tmp_path: Path) -> None:
    _write_cluster(tmp_path, ["10.244.66.6"])
    backend = FakeBackend(refuse=poisoned)
    attempts = Attempts()

    async def scenario(agent: Agent) -> None:
        await until(lambda: len(backend.programmed) == GOOD, timeout=60)
        assert "default/poison:http/TCP" not in backend.programmed
        assert agent.status.first_full_sync_done and agent.status.refused == 1
        assert agent.runner.failures == 0 and agent.status.sync_failures == 0
        last = backend.plans[-1]
        assert set(map(str, last.refused)) == {"default/poison:http/TCP"}
        # Bounded work: the bare plan, then a bisection down to the one bad port.
        n = GOOD + 1
        assert len(attempts.sizes) <= 2 + 2 * math.ceil(math.log2(n))
        assert sum(attempts.sizes) <= 3 * n
        assert attempts.sizes[0] == 0
        exposition = Metrics(agent).exposition().decode()
        assert "kpy_service_ports_refused 1.0" in exposition
        assert "kpy_service_port_refusals 1.0" in exposition
        # Later changes to good Services keep flowing, as partial syncs.
        write(tmp_path / "s3.yaml", "s3", "10.96.0.13", ["10.244.1.4", "10.244.1.99"])
        await until(lambda: len(_endpoints(backend, "default/s3:http/TCP")) == 2, timeout=60)
        assert not backend.plans[-1].full_sync

    run_agent(tmp_path, backend, scenario, attempts)


def test_a_refused_update_keeps_the_last_good_state_until_fixed(tmp_path: Path) -> None:
    _write_cluster(tmp_path, ["10.244.7.7"])
    backend = FakeBackend(refuse=poisoned)
    attempts = Attempts()
    name = "default/poison:http/TCP"

    async def scenario(agent: Agent) -> None:
        await until(lambda: len(backend.programmed) == GOOD + 1, timeout=60)
        assert not attempts.sizes  # nothing refused, nothing searched
        write(tmp_path / "poison.yaml", "poison", "10.96.1.1", ["10.244.7.7", "10.244.66.6"])
        await until(lambda: agent.status.refused == 1, timeout=60)
        assert backend.programmed[name].endpoints == ("10.244.7.7:8080",)  # last good kept
        # A later full sync keeps holding it (the tracker still has the refused state).
        agent.runner.request(full=True)
        fulls = sum(p.full_sync for p in backend.plans)
        await until(lambda: sum(p.full_sync for p in backend.plans) > fulls, timeout=60)
        assert backend.programmed[name].endpoints == ("10.244.7.7:8080",)
        # The object is fixed: its new state gets its chance and is programmed.
        write(tmp_path / "poison.yaml", "poison", "10.96.1.1", ["10.244.8.8"])
        await until(lambda: _endpoints(backend, name) == ("10.244.8.8:8080",), timeout=60)
        await until(lambda: agent.status.refused == 0, timeout=60)
        assert not backend.plans[-1].refused

    run_agent(tmp_path, backend, scenario, attempts)


def test_a_failure_no_object_explains_is_not_blamed_on_objects(tmp_path: Path) -> None:
    _write_cluster(tmp_path, ["10.244.7.7"])
    backend = FakeBackend(fail_next=3)
    attempts = Attempts(base_refused=True)

    async def scenario(agent: Agent) -> None:
        await until(lambda: len(backend.programmed) == GOOD + 1, timeout=60)
        assert agent.status.sync_failures == 3 and agent.status.refused_total == 0
        assert attempts.sizes == [0, 0, 0]  # the bare plan, refused each time: the node's fault

    run_agent(tmp_path, backend, scenario, attempts)


def test_without_isolation_the_old_behaviour_stays(tmp_path: Path) -> None:
    # The offline tools and nodes that cannot make scratch namespaces: fail and retry.
    write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.66.6"])
    backend = FakeBackend(refuse=poisoned)

    async def scenario(agent: Agent) -> None:
        await until(lambda: agent.status.sync_failures >= 2, timeout=60)
        assert not backend.programmed

    run_agent(tmp_path, backend, scenario)


def test_find_refused_finds_every_bad_port() -> None:
    states = [b.state(b.service(f"s{i}"), ()) for i in range(37)]
    bad = {states[3].name, states[17].name, states[36].name}
    plan = b.plan(states, full_sync=True)

    async def attempt(p: Plan) -> str | None:
        hit = sorted(str(n) for n in p.services if n in bad)
        return f"refused {hit}" if hit else None

    found = asyncio.run(quarantine.find_refused(plan, sorted(plan.services), attempt))
    assert found is not None and set(found) == bad
    assert all("refused" in r for r in found.values())


def test_find_refused_gives_up_when_nearly_everything_is_refused() -> None:
    states = [b.state(b.service(f"s{i}"), ()) for i in range(8)]
    plan = b.plan(states, full_sync=True)

    async def attempt(p: Plan) -> str | None:
        return "refused" if p.services else None

    assert asyncio.run(quarantine.find_refused(plan, sorted(plan.services), attempt)) is None


def test_scratch_namespaces_create_apply_and_delete() -> None:
    commands: list[Sequence[str]] = []
    made: list[FakeBackend] = []

    async def run_cmd(argv: Sequence[str]) -> int:
        commands.append(tuple(argv))
        return 0

    def make(config: BackendConfig) -> FakeBackend:
        backend = FakeBackend(config=config, refuse=poisoned)
        made.append(backend)
        return backend

    scratch = quarantine.ScratchNamespaces(make, BackendConfig(netns="node-ns"), run=run_cmd)
    good = b.state(b.service("good"), (b.endpoint("10.244.1.1"),))
    bad = b.state(b.service("bad"), (b.endpoint("10.244.66.6"),))
    assert asyncio.run(scratch(b.plan([good], full_sync=True))) is None
    reason = asyncio.run(scratch(b.plan([good, bad], full_sync=True)))
    assert reason is not None and "syntax error" in reason
    names = [c[3] for c in commands]
    assert [c[:3] for c in commands] == [("ip", "netns", "add"), ("ip", "netns", "delete")] * 2
    assert names[0] == names[1] != names[2] == names[3] and names[0].startswith("kpy-scratch-")
    assert [m.config.netns for m in made] == [names[0], names[2]]  # never the node's own
    assert all(not m.programmed for m in made)  # cleaned up after each attempt


@pytest.mark.parametrize("hidden", [True, False])
def test_overlay_hides_or_replaces(hidden: bool) -> None:
    a, c = b.state(b.service("a"), ()), b.state(b.service("c"), ())
    base = {a.name: a, c.name: c}
    replacement = None if hidden else b.state(b.service("a", cluster_ip="10.96.9.9"), ())
    view = quarantine.Overlay(base, {a.name: replacement})
    if hidden:
        assert list(view) == [c.name] and len(view) == 1 and a.name not in view
    else:
        assert view[a.name] is replacement and len(view) == 2
