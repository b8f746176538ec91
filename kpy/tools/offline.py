"""Plans computed offline: what a node's agent would apply, with no backend behind it
(``kpy plan``, ``kpy dump``, ``kpy explain``, ``kpy check``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kpy.agent.agent import Agent
from kpy.core import backend as backends
from kpy.core.model import NodeInfo, Plan
from kpy.sources.manifests import ManifestSource


class NoBackend:
    """The backend of an agent that only computes Plans: applying one is an error."""

    name = "none"

    def probe(self) -> str | None:
        return None

    async def apply(self, plan: Plan) -> backends.ApplyResult:
        raise backends.BackendError("offline: nothing is applied")

    async def observe(self) -> backends.Programmed:
        return backends.Programmed(backend=self.name)

    async def cleanup(self) -> None:
        return None


def manifest_plan(
    manifests: Sequence[Path],
    node: str,
    node_override: Callable[[NodeInfo], NodeInfo] | None = None,
) -> Plan:
    """Read ``manifests`` once: the Plan the agent of ``node`` would apply (its Node as
    ``node_override`` makes it)."""
    source = ManifestSource(list(manifests))
    agent = Agent(node_name=node, source=source, backend=NoBackend(), node_override=node_override)
    source.scan(agent)
    return agent.tracker.checkout()
