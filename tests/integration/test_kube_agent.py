"""`kpy run --source kube` end to end: the real command against the fake API server.

The agent runs as a subprocess (``python -m kpy run --source kube --master URL``), the
way an operator starts it; the fake API server runs in this process on loopback. The
backend keeps its "kernel" in a JSON file (registered through the ``kpy.backends``
entry-point group from a throw-away distribution on PYTHONPATH, as any third-party
backend is), so what was programmed — and when — is read from outside the agent.

What a production cluster does, in order: the Node cannot be listed yet (nothing may
be programmed), it can (everything is), an EndpointSlice changes, the API server goes
away while a Service is deleted and the history is compacted (the rules stay, health
turns stale), it comes back (the relist removes the Service), and SIGTERM (exit 0).
The agent also posts its ``Starting`` Event through the API.

With root, the same path drives the real nftables backend inside a network namespace,
and the oracle is a real TCP connection to the Service's ClusterIP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kpy.agent.agent import Agent as KpyAgent
from kpy.sources.kube import BackoffPolicy
from kpy.testing.apiserver import FakeApiServer
from kpy.testing.fake_backend import FakeBackend
from kpy.testing.objects import endpoint_slice, node, service, service_cidr
from tests.agents import QUICK_RUN, backend_plugin, kube_agent
from tests.conftest import require_root

PLUGIN = '''
"""A backend whose "kernel" is a JSON file, rewritten atomically on every apply."""
import json, os
from kpy.core.backend import ApplyResult, Programmed, desired_view

class FileBackend:
    name = "filestate"

    def __init__(self, config):
        self.path = os.environ["KPY_TEST_STATE"]
        self.views = {}

    def probe(self):
        return None

    async def apply(self, plan):
        if plan.full_sync:
            self.views = {}
        for removed in plan.removed:
            self.views.pop(str(removed), None)
        for key, state in plan.services.items():
            self.views[str(key)] = sorted(desired_view(state).endpoints)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.views, f)
        os.replace(self.path + ".tmp", self.path)
        return ApplyResult(full_sync=plan.full_sync, ops=len(self.views))

    async def observe(self):
        return Programmed(backend=self.name)

    async def cleanup(self):
        os.unlink(self.path)
'''

NODE = "node-a"
WEB = "default/web:http/TCP"
GONE = "default/gone:http/TCP"


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    return backend_plugin(tmp_path / "plugin", "kpy_kube_agent_probe", PLUGIN, "filestate")


def programmed(state: Path) -> dict[str, list[str]] | None:
    """What the backend holds; None before its first apply."""
    try:
        data: dict[str, list[str]] = json.loads(state.read_text())
    except FileNotFoundError:
        return None
    return data


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Agent:
    """The ``kpy run`` subprocess and the JSON log lines it wrote to stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.logs: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            try:
                self.logs.append(json.loads(line))
            except ValueError:
                self.logs.append({"event": "raw", "line": line.decode(errors="replace")})

    def port(self, server: str) -> int | None:
        for entry in self.logs:
            if entry.get("event") == "http_serving" and entry.get("server") == server:
                return int(entry["port"])
        return None

    def text(self) -> str:
        return "\n".join(json.dumps(e) for e in self.logs[-60:])


@contextlib.asynccontextmanager
async def started(*argv: str, env: dict[str, str]) -> AsyncIterator[Agent]:
    """``argv`` (a ``kpy run``) started with ``env``; killed if it still runs after."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    agent = Agent(proc)
    try:
        yield agent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await agent.reader


def seed(api: FakeApiServer) -> None:
    """This node, and the Service web with one endpoint (10.244.0.5) on it."""
    api.create(node(pod_cidr="10.244.0.0/24"))
    api.create(service("web", ip="10.96.0.10"))
    api.create(endpoint_slice("web-1", "web", ["10.244.0.5"]))


async def until(check: Callable[[], bool], agent: Agent, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if agent.proc.returncode is not None:
            raise AssertionError(f"kpy exited ({agent.proc.returncode}):\n{agent.text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{agent.text()}")
        await asyncio.sleep(0.05)


def _running_agent(
    api: FakeApiServer,
) -> contextlib.AbstractAsyncContextManager[tuple[KpyAgent, FakeBackend, asyncio.Task[None]]]:
    """The real Agent on a kube source against ``api``, with a FakeBackend; stopped after."""
    return kube_agent(api, NODE, BackoffPolicy(initial=0.02, maximum=0.2))


def test_api_changes_become_the_right_plans() -> None:
    """In process: the real Agent on the kube source; the Plans the backend receives."""

    async def main() -> None:
        async with FakeApiServer() as api:
            seed(api)
            api.create(service("gone", ip="10.96.0.11"))

            async def plans(n: int) -> None:
                deadline = time.monotonic() + 10
                while len(backend.plans) < n:
                    assert not task.done(), task
                    assert time.monotonic() < deadline, backend.plans
                    await asyncio.sleep(0.01)

            def names(keys: frozenset[Any]) -> set[str]:
                return {str(k) for k in keys}

            async with _running_agent(api) as (_agent, backend, task):
                await plans(1)
                first = backend.plans[0]
                assert first.full_sync and names(frozenset(first.services)) == {WEB, GONE}
                assert first.node.name == NODE and [str(a) for a in first.node.addresses] == [
                    "192.168.50.2"
                ]
                web = next(s for k, s in first.services.items() if str(k) == WEB)
                assert [str(e.ip) for e in web.endpoints] == ["10.244.0.5"]

                api.update(endpoint_slice("web-1", "web", ["10.244.0.5", "10.244.0.7"]))
                await plans(2)
                second = backend.plans[1]
                assert not second.full_sync
                assert names(second.changed) == {WEB} and not second.removed
                web = next(s for k, s in second.services.items() if str(k) == WEB)
                assert sorted(str(e.ip) for e in web.endpoints) == ["10.244.0.5", "10.244.0.7"]

                api.delete("Service", "default", "gone")
                await plans(3)
                third = backend.plans[2]
                assert names(third.removed) == {GONE} and names(frozenset(third.services)) == {WEB}

                api.create(service("new", ip="10.96.0.12"))
                await plans(4)
                assert names(backend.plans[3].changed) == {"default/new:http/TCP"}
                assert set(backend.programmed) == {WEB, "default/new:http/TCP"}

    asyncio.run(main())


def test_service_cidr_changes_reach_the_next_plan() -> None:
    """ServiceCIDRs added, extended, invalid and deleted on the API server: each change
    makes a sync whose Plan carries the new union, and changes no service port."""

    async def main() -> None:
        async with FakeApiServer() as api:
            api.create(node(pod_cidr="10.244.0.0/24"))
            api.create(service("web", ip="10.96.0.10"))
            api.create(service_cidr("kubernetes", "10.96.0.0/16", "fd00:96::/108"))

            async def cidrs(*want: str) -> Any:
                deadline = time.monotonic() + 10
                while not backend.plans or [str(c) for c in backend.plans[-1].service_cidrs] != [
                    *want
                ]:
                    assert not task.done(), task
                    assert time.monotonic() < deadline, backend.plans[-1:]
                    await asyncio.sleep(0.01)
                return backend.plans[-1]

            async with _running_agent(api) as (agent, backend, task):
                first = await cidrs("10.96.0.0/16", "fd00:96::/108")
                assert first.full_sync and len(backend.plans) == 1
                api.create(service_cidr("extra", "10.100.0.0/24"))
                plan = await cidrs("10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108")
                assert not plan.full_sync and not plan.changed and not plan.removed
                both = {"spec": {"cidrs": ["10.100.0.0/24", "fd00:100::/64"]}}
                api.patch("ServiceCIDR", "", "extra", both)
                await cidrs("10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108", "fd00:100::/64")
                # an invalid one counts for nothing, and is named in a warning
                api.create(service_cidr("bad", "10.200.0.1/24"))
                deadline = time.monotonic() + 10
                while agent.status.skipped_objects == 0:
                    assert time.monotonic() < deadline, "the invalid ServiceCIDR was not seen"
                    await asyncio.sleep(0.01)
                assert agent.status.skipped_objects == 1 and not agent.tracker.pending
                assert [str(c) for c in agent.tracker.service_cidrs] == [
                    "10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108", "fd00:100::/64"
                ]  # fmt: skip
                api.delete("ServiceCIDR", "", "extra")
                api.delete("ServiceCIDR", "", "kubernetes")
                await cidrs()

    asyncio.run(main())


def kpy_run(api_url: str, backend: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kpy",
        "run",
        "--source",
        "kube",
        "--master",
        api_url,
        "--node",
        NODE,
        "--backend",
        backend,
        *QUICK_RUN,
        "--no-conntrack-cleanup",
        *extra,
    ]


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KPY_")},
        "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"),
        **extra,
    }


def test_kpy_run_source_kube_end_to_end(tmp_path: Path, plugin: Path) -> None:
    state = tmp_path / "state.json"

    async def main() -> None:
        async with FakeApiServer() as api:
            seed(api)
            api.create(service("gone", ip="10.96.0.11"))
            api.create(endpoint_slice("gone-1", "gone", ["10.244.0.6"]))
            # The Node cannot be listed yet: Services and slices can.
            api.fail_next(1000, 500, paths=("/api/v1/nodes",))
            env = agent_env(tmp_path, PYTHONPATH=str(plugin), KPY_TEST_STATE=str(state))
            argv = kpy_run(api.url, "filestate", "--healthz-stale-after", "1s")
            async with started(*argv, env=env) as agent:
                await run_scenario(api, agent, state)

    asyncio.run(main())


async def run_scenario(api: FakeApiServer, agent: Agent, state: Path) -> None:
    def listed(path: str) -> bool:
        return any(m == "GET" and p == path and "watch" not in q for m, p, q in api.stats.requests)

    # 1. No programming before the first list of all three resources.
    await until(lambda: api.stats.failed >= 2, agent, "two failed Node lists")
    assert listed("/api/v1/services") and listed("/apis/discovery.k8s.io/v1/endpointslices")
    await until(lambda: agent.port("healthz") is not None, agent, "health server")
    health = agent.port("healthz")
    assert health is not None
    code, _ = await asyncio.to_thread(http_get, health, "/readyz")
    assert code == 503
    assert programmed(state) is None, "programmed before the Node was listed"

    # 2. The Node lists: the first sync programs everything at once.
    api.fail_next(0)
    await until(lambda: programmed(state) is not None, agent, "first sync", timeout=30)
    assert programmed(state) == {WEB: ["10.244.0.5:8080"], GONE: ["10.244.0.6:8080"]}
    code, _ = await asyncio.to_thread(http_get, health, "/readyz")
    assert code == 200

    # 3. A watch event reaches the kernel.
    api.update(endpoint_slice("web-1", "web", ["10.244.0.5", "10.244.0.7"]))
    await until(
        lambda: (programmed(state) or {}).get(WEB) == ["10.244.0.5:8080", "10.244.0.7:8080"],
        agent,
        "endpoint added",
    )

    # 4. The API server goes away; meanwhile "gone" is deleted and history compacted.
    await api.stop()
    api.delete("Service", "default", "gone")
    api.delete("EndpointSlice", "default", "gone-1")
    api.expire()
    before = programmed(state)

    async def health_says_stale(stale: bool) -> None:
        deadline = time.monotonic() + 20
        while True:
            code, body = await asyncio.to_thread(http_get, health, "/healthz")
            # Stale or not, the answer stays 200: the rules keep serving (kpy/agent/healthz.py).
            assert code == 200, body
            if json.loads(body)["stale"] is stale:
                return
            assert time.monotonic() < deadline, f"stale never became {stale}:\n{agent.text()}"
            await asyncio.sleep(0.2)

    await health_says_stale(True)
    _, body = await asyncio.to_thread(http_get, health, "/healthz")
    assert json.loads(body)["sourceConnected"] is False
    assert programmed(state) == before, "rules changed while the API server was away"
    assert any(e.get("event") == "kube_unreachable" for e in agent.logs)
    metrics = agent.port("metrics")
    assert metrics is not None
    _, text = await asyncio.to_thread(http_get, metrics, "/metrics")
    assert "kpy_source_connected 0.0" in text

    # 5. It comes back: the relist removes what was deleted meanwhile.
    await api.start()
    await until(lambda: GONE not in (programmed(state) or {GONE: []}), agent, "relist", 40)
    assert programmed(state) == {WEB: ["10.244.0.5:8080", "10.244.0.7:8080"]}
    await health_says_stale(False)
    _, text = await asyncio.to_thread(http_get, metrics, "/metrics")
    assert 'kpy_source_relists_total{resource="services"} 2.0' in text
    assert 'kpy_source_watch_reconnects_total{resource="services"}' in text

    # 6. The Starting event was posted on the Node through the API.
    events = api.objects("Event")
    assert any(
        e.get("reason") == "Starting" and e["involvedObject"]["name"] == NODE for e in events
    ), events

    # 7. SIGTERM: exit 0, rules kept.
    agent.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(agent.proc.wait(), 10) == 0
    assert programmed(state) == {WEB: ["10.244.0.5:8080", "10.244.0.7:8080"]}


# --------------------------------------------------------------------------- real kernel


def nftables_unavailable() -> str | None:
    from kpy.core import backend

    entry = backend.load_backends().get("nftables")
    if entry is None or entry.factory is None:
        return "the nftables backend is not installed"
    return entry.factory(backend.BackendConfig()).probe()


def in_ns(ns: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *command]


def ask(ns: str, address: str = "10.96.0.10") -> str:
    """Connect to the ClusterIP (or ``address``) from inside the node's namespace; the
    endpoint's (or listener's) name."""
    result = subprocess.run(
        in_ns(ns, "socat", "-T", "2", "-", f"TCP:{address}:80,connect-timeout=2"),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    return result.stdout.strip() if result.returncode == 0 else f"failed: {result.stderr.strip()}"


@pytest.mark.root
def test_kpy_run_source_kube_programs_nftables_in_a_namespace(tmp_path: Path) -> None:
    require_root()
    reason = nftables_unavailable()
    if reason is not None:
        pytest.skip(f"nftables backend cannot run here: {reason}")
    ns = f"kpy-ka{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "192.168.50.2/32", "dev", "lo"],
            ["ip", "addr", "add", "10.244.0.5/32", "dev", "lo"],
            ["ip", "addr", "add", "10.244.0.6/32", "dev", "lo"],
            # The node's own traffic to a ClusterIP needs a route before DNAT (as a
            # real node's default route provides).
            ["ip", "route", "add", "10.96.0.0/12", "dev", "lo"],
            # Listeners on addresses no Service has: one in a ServiceCIDR created
            # later, one outside it.
            ["ip", "addr", "add", "10.200.0.7/32", "dev", "lo"],
            ["ip", "addr", "add", "10.201.0.7/32", "dev", "lo"],
        ):
            subprocess.run(in_ns(ns, *command), check=True)
        for address, name, port in (
            ("10.244.0.5", "pod-a", 8080),
            ("10.244.0.6", "pod-b", 8080),
            ("10.200.0.7", "inside", 80),
            ("10.201.0.7", "outside", 80),
        ):
            listen = f"TCP-LISTEN:{port},bind={address},reuseaddr,fork"
            servers.append(
                subprocess.Popen(
                    in_ns(ns, "socat", listen, f"SYSTEM:echo {name}"),
                    start_new_session=True,
                )
            )
        asyncio.run(_nftables_scenario(tmp_path, ns))
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


async def _nftables_scenario(tmp_path: Path, ns: str) -> None:
    async with FakeApiServer() as api:
        seed(api)
        env = agent_env(tmp_path)
        argv = kpy_run(api.url, "nftables", "--netns", ns)
        async with started(*argv, env=env) as agent:
            proc = agent.proc
            answers: list[str] = []

            async def answered(expected: str, address: str = "10.96.0.10") -> None:
                async def check() -> bool:
                    answers.append(await asyncio.to_thread(ask, ns, address))
                    return answers[-1].startswith(expected)

                deadline = time.monotonic() + 30
                while not await check():
                    assert proc.returncode is None, agent.text()
                    assert time.monotonic() < deadline, f"{answers[-5:]}\n{agent.text()}"
                    await asyncio.sleep(0.1)

            await answered("pod-a")
            api.update(endpoint_slice("web-1", "web", ["10.244.0.6"]))
            await answered("pod-b")
            # A ServiceCIDR created at runtime: its address no Service has is dropped
            # from the next sync on (the node's own connection times out), an address
            # outside it still answers; deleted, the address answers again.
            assert await asyncio.to_thread(ask, ns, "10.200.0.7") == "inside"
            cidr = service_cidr("extra", "10.200.0.0/24")
            api.create(cidr)
            await answered("failed", "10.200.0.7")
            assert await asyncio.to_thread(ask, ns, "10.201.0.7") == "outside"
            assert await asyncio.to_thread(ask, ns) == "pod-b"
            api.delete("ServiceCIDR", "", "extra")
            await answered("inside", "10.200.0.7")
            # The API server goes away and the Service is deleted meanwhile: the rules
            # stay exactly as they were.
            await api.stop()
            api.delete("Service", "default", "web")
            api.delete("EndpointSlice", "default", "web-1")
            api.expire()
            await until(
                lambda: any(e.get("event") == "kube_unreachable" for e in agent.logs),
                agent,
                "unreachable",
            )
            await asyncio.sleep(1.0)
            assert await asyncio.to_thread(ask, ns) == "pod-b"
            # Back: the relist deletes the Service, and its ClusterIP stops answering.
            await api.start()
            deadline = time.monotonic() + 40
            while (answer := await asyncio.to_thread(ask, ns)) == "pod-b":
                assert time.monotonic() < deadline, agent.text()
                await asyncio.sleep(0.2)
            assert answer.startswith("failed"), answer
            agent.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_unusable_kubeconfig_fails_with_a_message(tmp_path: Path, plugin: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    env = agent_env(tmp_path, PYTHONPATH=str(plugin), KPY_TEST_STATE=str(tmp_path / "s"))
    result = subprocess.run(
        [*kpy_run("http://127.0.0.1:1", "filestate"), "--kubeconfig", str(kubeconfig)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {kubeconfig}: ") and "current-context" in result.stderr
    assert "Traceback" not in result.stderr


# Modules `kpy run --source kube` must not import on its way to the first sync: each
# costs a cold start tenths of a second (the official client: ~0.2 s) and none is used
# there. The kubernetes client stays the fallback for exec plugins and auth providers.
NOT_ON_THE_START_PATH = (
    "kubernetes",
    "pyroute2",
    "jsonschema",
    "kpy.tools.check",
    "kpy.tools.lab.lab",
    "kpy.testing.apiserver",
)


def test_kpy_run_source_kube_starts_without_the_kubernetes_client(
    tmp_path: Path, plugin: Path
) -> None:
    """The real command with a kubeconfig (a token; an http server), to its first sync;
    at exit the process writes down every module it holds (``importlib.import_module``
    included, which ``-X importtime`` does not show)."""
    import kpy

    state, modules = tmp_path / "state.json", tmp_path / "modules.json"
    tree = Path(kpy.__file__).parent.parent  # this kpy, not whichever is installed
    kubeconfig = tmp_path / "kubeconfig"
    wrapper = (
        "import atexit, json, runpy, sys\n"
        "out = sys.argv.pop(1)\n"
        "def dump():\n"
        "    held = {'modules': sorted(sys.modules), 'kpy': sys.modules['kpy'].__file__}\n"
        "    open(out, 'w').write(json.dumps(held))\n"
        "atexit.register(dump)\n"
        "sys.argv[0] = 'kpy'\n"
        "runpy.run_module('kpy', run_name='__main__', alter_sys=True)\n"
    )

    async def main() -> None:
        async with FakeApiServer(token="s3cret") as api:
            seed(api)
            kubeconfig.write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                        "users": [{"name": "u", "user": {"token": "s3cret"}}],
                        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                        "current-context": "x",
                    }
                )
            )
            argv = kpy_run(api.url, "filestate")
            master = argv.index("--master")
            argv[master : master + 2] = ["--kubeconfig", str(kubeconfig)]
            assert argv[1:3] == ["-m", "kpy"]
            path = os.pathsep.join([str(plugin), str(tree), str(tree / "backends")])
            env = agent_env(tmp_path, PYTHONPATH=path, KPY_TEST_STATE=str(state))
            async with started(argv[0], "-c", wrapper, str(modules), *argv[3:], env=env) as agent:
                await until(lambda: programmed(state) is not None, agent, "first sync", 30)
                assert programmed(state) == {WEB: ["10.244.0.5:8080"]}  # through the token
                agent.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(agent.proc.wait(), 10) == 0

    asyncio.run(main())
    held = json.loads(modules.read_text())
    imported = set(held["modules"])
    assert {"kpy.sources.kube", "kpy_kube_agent_probe"} <= imported
    assert Path(held["kpy"]).is_relative_to(tree)
    found = sorted(
        m for m in imported for n in NOT_ON_THE_START_PATH if m == n or m.startswith(n + ".")
    )
    assert not found, f"imported on kpy run's start path: {found}"
