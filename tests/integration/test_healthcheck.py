"""healthCheckNodePort servers inside a node namespace answer 200/503 as endpoints change."""

from __future__ import annotations

import asyncio
import json
import os
from types import MappingProxyType

from kpy.agent.service_health import HealthCheckServers
from kpy.core.backend import ApplyResult
from kpy.core.model import Plan, ServicePortState
from kpy.testing import builders as b

PORT = 31000 + os.getpid() % 1000
RESULT = ApplyResult(full_sync=False, ops=1)


async def probe(netns: str | None, port: int, host: str = "127.0.0.1") -> tuple[int, object]:
    """What a load balancer's probe sees: (HTTP code or 0 when refused, JSON body)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        "curl",
        "-s",
        "-m",
        "3",
        "-w",
        "\n%{http_code}",
        f"http://{host}:{port}/",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code), json.loads(body) if body else None


def web(*endpoints: object, port_name: str = "http", port: int = 80) -> ServicePortState:
    svc = b.service(
        type="LoadBalancer",
        node_port=30080 + port - 80,
        lb_ips=("172.18.0.10",),
        etp_local=True,
        health_check_node_port=PORT,
        port_name_=port_name,
        port=port,
    )
    return b.state(svc, endpoints)  # type: ignore[arg-type]


def partial(states: list[ServicePortState], removed: tuple[ServicePortState, ...] = ()) -> Plan:
    return b.plan(
        states,
        full_sync=False,
        changed=[s.name for s in states],
        removed=[s.name for s in removed],
    )


def test_health_check_node_port_follows_local_endpoints(netns: str) -> None:
    local = b.endpoint("10.244.1.5")
    local2 = b.endpoint("10.244.1.6")
    remote = b.endpoint("10.244.2.5", node="node-b")
    not_ready = b.endpoint("10.244.1.5", ready=False)
    terminating = b.endpoint("10.244.1.5", ready=False, serving=True, terminating=True)
    servers = HealthCheckServers(netns=netns)

    async def main() -> None:
        task = asyncio.create_task(servers.run())
        try:
            servers.plan_applied(b.plan([web(local, remote)], full_sync=True), RESULT, 0)
            await asyncio.wait_for(servers.settled(), 5)
            code, body = await probe(netns, PORT)
            assert code == 200
            assert body == {
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 1,
                "serviceProxyHealthy": True,
            }
            # The socket lives in the node namespace, not in the test's.
            assert (await probe(None, PORT))[0] == 0

            # A second port of the same Service shares the health check; pods count once.
            https = web(local, local2, remote, port_name="https", port=443)
            servers.plan_applied(partial([https]), RESULT, 0)
            code, body = await probe(netns, PORT)
            assert (code, body["localEndpoints"]) == (200, 2)  # type: ignore[index]

            servers.plan_applied(
                partial([web(not_ready, remote), web(remote, port_name="https", port=443)]),
                RESULT,
                0,
            )
            code, body = await probe(netns, PORT)
            assert (code, body["localEndpoints"]) == (503, 0)  # type: ignore[index]

            # Only a terminating local endpoint: still 503, so the load balancer drains.
            servers.plan_applied(partial([web(terminating, remote)]), RESULT, 0)
            assert (await probe(netns, PORT))[0] == 503

            servers.plan_applied(partial([web(local, remote)]), RESULT, 0)
            assert (await probe(netns, PORT))[0] == 200

            # Removing one port keeps the server; removing the last closes it.
            gone = web(remote, port_name="https", port=443)
            servers.plan_applied(partial([], removed=(gone,)), RESULT, 0)
            await asyncio.wait_for(servers.settled(), 5)
            assert servers.serving() == {PORT}
            plan = Plan(
                node=b.node(),
                services=MappingProxyType({}),
                removed=frozenset({web(local).name}),
            )
            servers.plan_applied(plan, RESULT, 0)
            await asyncio.wait_for(servers.settled(), 5)
            assert servers.serving() == frozenset()
            assert (await probe(netns, PORT))[0] == 0
        finally:
            task.cancel()

    asyncio.run(main())


def test_cluster_policy_services_get_no_server(netns: str) -> None:
    servers = HealthCheckServers(netns=netns)
    svc = b.service(type="NodePort", node_port=30080, health_check_node_port=PORT)
    servers.plan_applied(b.plan([b.state(svc, [b.endpoint("10.244.1.5")])]), RESULT, 0)
    assert servers.wanted() == {}


def test_port_taken_is_retried(netns: str) -> None:
    servers = HealthCheckServers(netns=netns, retry_after=0.1)

    async def main() -> None:
        blocker = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            netns,
            "socat",
            f"TCP-LISTEN:{PORT},reuseaddr",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        task = asyncio.create_task(servers.run())
        try:
            await asyncio.sleep(0.3)  # let socat listen
            servers.plan_applied(b.plan([web(b.endpoint("10.244.1.5"))]), RESULT, 0)
            await asyncio.sleep(0.3)
            assert servers.serving() == frozenset()
            blocker.kill()
            await blocker.wait()
            async with asyncio.timeout(5):
                while servers.serving() != {PORT}:
                    await asyncio.sleep(0.05)
            assert (await probe(netns, PORT))[0] == 200
        finally:
            task.cancel()
            if blocker.returncode is None:
                blocker.kill()
                await blocker.wait()

    asyncio.run(main())
