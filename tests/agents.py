"""The agent over manifest files, for tests: the files written, an agent with quick
timers, the agent running for the length of a block, and waiting on a condition."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from kpy.agent import quarantine
from kpy.agent.agent import Agent
from kpy.agent.runner import RunnerTimes
from kpy.core.backend import Backend
from kpy.sources.kube import ApiTarget, BackoffPolicy, KubeSource
from kpy.sources.manifests import ManifestSource
from kpy.testing.apiserver import FakeApiServer
from kpy.testing.fake_backend import FakeBackend

KPY = Path(sys.executable).with_name("kpy")


def kpy_run(*flags: str) -> list[str]:
    """The ``kpy run`` command of node-a over manifests (the environment's KPY_MANIFESTS
    names them), with ``flags``."""
    return [str(KPY), "run", "--node", "node-a", "--source", "manifests", *flags]


# ``kpy run`` flags for a test: the health and metrics servers on free loopback ports
FREE_PORTS = ("--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0")
# and syncs 50 ms apart at the most, logs as JSON lines
QUICK_RUN = ("--min-sync-period", "50ms", *FREE_PORTS, "--log-format", "json")

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:{spec}
  clusterIP: {ip}
  ports: [{{name: http, port: 80, targetPort: 8080{node_port}}}]
"""
SLICE = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{eps}]
"""


def manifest(
    *endpoints: str,
    name: str = "web",
    ip: str = "10.96.0.10",
    node_port: int | None = None,
    local: bool = False,
) -> str:
    """The Service ``name`` (ClusterIP ``ip``, port http 80 to 8080; of type NodePort on
    ``node_port`` if given, of externalTrafficPolicy Local if ``local``) and its one
    EndpointSlice, whose endpoints are the YAML flow mappings ``endpoints``."""
    spec = "\n  type: NodePort" if node_port is not None else ""
    spec += "\n  externalTrafficPolicy: Local" if local else ""
    port = f", nodePort: {node_port}" if node_port is not None else ""
    service = SERVICE.format(name=name, ip=ip, spec=spec, node_port=port)
    return service + "---" + SLICE.format(name=name, eps=", ".join(endpoints))


def on_node_a(*addresses: str) -> list[str]:
    """One endpoint each, on node-a (this node), as YAML flow mappings."""
    return [f"{{addresses: [{a}], nodeName: node-a}}" for a in addresses]


def write(path: Path, name: str, ip: str, endpoints: list[str]) -> None:
    """:func:`manifest` at ``path``, with ``endpoints`` (addresses) on node-a."""
    path.write_text(manifest(*on_node_a(*endpoints), name=name, ip=ip))


def quick_agent(
    directory: Path,
    backend: Backend,
    *,
    interval: float = 0.02,
    min_interval: float = 0.01,
    full_interval: float = 3600,
    isolate: quarantine.Attempt | None = None,
) -> Agent:
    """The agent of node-a over the manifests in ``directory``, reading them every
    ``interval`` seconds and syncing at most every ``min_interval`` (its backoff too)."""
    return Agent(
        node_name="node-a",
        source=ManifestSource([directory], interval=interval),
        backend=backend,
        times=RunnerTimes(
            min_interval=min_interval, full_interval=full_interval, backoff_initial=min_interval
        ),
        isolate=isolate,
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """``agent`` running for the length of the block; cancelled and awaited after."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def kube_agent(
    api: FakeApiServer | ApiTarget, node: str, backoff: BackoffPolicy, **source_options: Any
) -> AsyncIterator[tuple[Agent, FakeBackend, asyncio.Task[None]]]:
    """The agent of ``node`` on a kube source against ``api`` (the fake API server, or
    any target; retrying by ``backoff``) with a FakeBackend, running for the length of
    the block."""
    target = api if isinstance(api, ApiTarget) else ApiTarget.from_url(api.url)
    source = KubeSource(target, node, backoff=backoff, **source_options)
    backend = FakeBackend()
    agent = Agent(
        node_name=node,
        source=source,
        backend=backend,
        times=RunnerTimes(min_interval=0.01, full_interval=3600),
    )
    async with running(agent) as task:
        yield agent, backend, task


def run_agent(
    directory: Path,
    backend: Backend,
    scenario: Callable[[Agent], Awaitable[None]],
    isolate: quarantine.Attempt | None = None,
) -> None:
    """:func:`quick_agent` running while ``scenario`` runs."""

    async def main() -> None:
        agent = quick_agent(directory, backend, isolate=isolate)
        async with running(agent):
            await scenario(agent)

    asyncio.run(main())


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def backend_plugin(root: Path, module: str, source: str, name: str) -> Path:
    """A throw-away distribution in ``root`` (put it on PYTHONPATH): the module
    ``module`` of ``source``, whose class ``FileBackend`` is registered as the backend
    ``name`` in the ``kpy.backends`` entry-point group, as any third-party backend is."""
    dist_name = module.replace("_", "-")
    dist = root / f"{module}-0.dist-info"
    dist.mkdir(parents=True)
    (root / f"{module}.py").write_text(source)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[kpy.backends]\n{name} = {module}:FileBackend\n")
    return root
