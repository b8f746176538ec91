"""A poison pill against a real kernel: one service port the kernel refuses costs only it.

The poison is a Service that kpy's convert would have refused (a session-affinity
timeout of 2^62 seconds: ``nft`` says "value too large", ``iptables-restore`` "out of
range"), put straight into the agent's tracker — as a Service convert accepted but the
kernel refuses would be. Before, every transaction failed from then on: no good Service
was programmed and health went red. Now the backend's dry run (``nft --check``,
``iptables-restore --test``) finds the port to blame, everything else is programmed and
the refused port keeps its last programmed state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from kpy_iptables import IptablesBackend
from kpy_nftables import NftablesBackend

from kpy.core import convert
from kpy.core.backend import Backend, BackendConfig
from kpy.core.model import ServiceName, SessionAffinity
from tests.agents import quick_agent, running, write

pytestmark = [pytest.mark.root, pytest.mark.slow]

GOOD = 12
POISON = "default/poison:http/TCP"


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def _backend(kind: str, netns: str) -> Backend:
    config = BackendConfig(node_name="node-a", netns=netns)
    if kind == "nftables":
        return NftablesBackend(config)
    return IptablesBackend(dataclasses.replace(config, options=(("iptables_mode", "nft"),)))


def _poisoned(service: convert.Service) -> convert.Service:
    ports = tuple(
        dataclasses.replace(p, session_affinity=SessionAffinity.CLIENT_IP, affinity_timeout=2**62)
        for p in service.ports
    )
    return dataclasses.replace(service, ports=ports)


@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_a_refused_port_costs_only_itself(netns: str, tmp_path: Path, kind: str) -> None:
    for i in range(GOOD):
        write(tmp_path / f"s{i}.yaml", f"s{i}", f"10.96.0.{10 + i}", [f"10.244.1.{i + 1}"])
    write(tmp_path / "poison.yaml", "poison", "10.96.1.1", ["10.244.7.7"])
    backend = _backend(kind, netns)
    check = getattr(backend, "check")  # noqa: B009 - the optional dry run under test

    async def programmed() -> dict[str, tuple[str, ...]]:
        seen = await backend.observe()
        return {k: tuple(sorted(v.endpoints)) for k, v in seen.services.items()}

    async def main() -> None:
        agent = quick_agent(tmp_path, backend, interval=0.05, min_interval=0.05, isolate=check)
        async with running(agent):
            await until(lambda: _count(programmed, GOOD + 1))
            before = await programmed()
            assert before[POISON] == ("10.244.7.7:8080",)
            # The poisoned update arrives together with a good change in the same sync.
            name = ServiceName(namespace="default", name="poison")
            good = agent.tracker._services[name]
            agent.tracker.set_service(name, _poisoned(good))
            write(tmp_path / "s3.yaml", "s3", "10.96.0.13", ["10.244.1.4", "10.244.1.99"])
            await until(lambda: _is(lambda: agent.status.refused == 1))
            await until(lambda: _has(programmed, "default/s3:http/TCP", 2))
            now = await programmed()
            assert now[POISON] == before[POISON]  # last good state kept, not lost
            assert len(now) == GOOD + 1
            assert agent.runner.failures == 0 and agent.status.sync_failures == 0
            # A full sync (the periodic repair) keeps holding it and still succeeds.
            syncs = agent.runner.syncs
            agent.runner.request(full=True)
            await until(lambda: _is(lambda: agent.runner.syncs > syncs))
            assert (await programmed())[POISON] == before[POISON]
            assert agent.runner.failures == 0
            # The object is fixed: its new state is programmed, the refusal is over.
            agent.tracker.set_service(name, good)
            write(tmp_path / "poison.yaml", "poison", "10.96.1.1", ["10.244.8.8"])
            await until(lambda: _has(programmed, POISON, 1, "10.244.8.8:8080"))
            await until(lambda: _is(lambda: agent.status.refused == 0))

    asyncio.run(main())


async def _count(programmed: Callable[[], Awaitable[dict[str, tuple[str, ...]]]], n: int) -> bool:
    return len(await programmed()) == n


async def _has(
    programmed: Callable[[], Awaitable[dict[str, tuple[str, ...]]]],
    name: str,
    n: int,
    endpoint: str | None = None,
) -> bool:
    eps = (await programmed()).get(name, ())
    return len(eps) == n and (endpoint is None or endpoint in eps)


async def _is(check: Callable[[], bool]) -> bool:
    return check()
