"""The health server over real loopback sockets: kube-proxy's /healthz, /livez, /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kpy.agent import healthz as health
from kpy.agent import http
from kpy.agent.agent import AgentStatus


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def serving(server: health.HealthServer, scenario: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(server.serve("127.0.0.1:0", bound=bound.set_result))
        try:
            await scenario(await asyncio.wait_for(bound, 5))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def make(status: AgentStatus, clock: Clock, **kw: Any) -> health.HealthServer:
    return health.HealthServer(status, timeout=60, stale_after=120, clock=clock, **kw)


@pytest.mark.parametrize(
    ("pending_age", "last_ok_age", "expected"),
    [
        pytest.param(None, None, 200, id="nothing-pending-never-synced"),
        pytest.param(None, 3600, 200, id="idle-for-an-hour"),
        pytest.param(10, 3600, 200, id="change-just-arrived-after-idle-hour"),
        pytest.param(61, 3600, 503, id="pending-too-long-no-recent-sync"),
        pytest.param(61, None, 503, id="pending-too-long-never-synced"),
        pytest.param(61, 5, 200, id="pending-long-but-syncs-still-succeed"),
        pytest.param(60, 3600, 200, id="exactly-at-threshold"),
    ],
)
def test_proxy_health_rule(
    pending_age: float | None, last_ok_age: float | None, expected: int
) -> None:
    clock = Clock()
    status = AgentStatus(
        pending_since=None if pending_age is None else clock.now - pending_age,
        last_sync_ok=None if last_ok_age is None else clock.now - last_ok_age,
    )
    server = make(status, clock)
    assert server.answer("GET", "/livez").status == expected
    assert server.answer("GET", "/healthz").status == expected


def test_endpoints_over_http() -> None:
    clock = Clock()
    status = AgentStatus(last_sync_ok=clock.now - 5)
    answers: list[tuple[str, int]] = []
    server = make(status, clock, on_answer=lambda p, c: answers.append((p, c)))

    async def scenario(port: int) -> None:
        code, headers, body = await get(port, "/readyz")
        assert code == 503  # no full sync yet
        status.first_full_sync_done = True
        code, headers, body = await get(port, "/readyz")
        assert code == 200
        code, headers, body = await get(port, "/healthz?verbose=1")
        assert code == 200
        assert headers["Content-Type"] == "application/json"
        data = json.loads(body)
        assert data["lastUpdated"] == "2023-11-14T22:13:15Z"
        assert data["currentTime"] == "2023-11-14T22:13:20Z"
        assert data["nodeEligible"] is True
        assert data["stale"] is False
        status.pending_since = clock.now - 1000
        clock.now += 100  # last success is now 105 s old, the change 1100 s
        assert (await get(port, "/livez"))[0] == 503
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/healthz", method="POST"))[0] == 405
        code, headers, body = await get(port, "/healthz", method="HEAD")
        assert code == 503 and body == b"" and int(headers["Content-Length"]) > 0

    serving(server, scenario)
    assert answers == [
        ("/readyz", 503),
        ("/readyz", 200),
        ("/healthz", 200),
        ("/livez", 503),
        ("/healthz", 503),
    ]


def test_node_not_eligible_fails_healthz_but_not_livez() -> None:
    clock = Clock()
    server = make(AgentStatus(), clock, node_eligible=lambda: False)
    assert server.answer("GET", "/healthz").status == 503
    assert server.answer("GET", "/livez").status == 200
    assert json.loads(server.answer("GET", "/livez").body)["nodeEligible"] is False


def test_stale_source_is_reported_but_keeps_serving() -> None:
    clock = Clock()
    status = AgentStatus(last_sync_ok=clock.now)
    server = make(status, clock)
    status.source_healthy = False
    status.source_reason = "GET https://10.0.0.1:6443/api/v1/services: connection refused"
    server.note_source()  # the watcher notices the disconnection now
    clock.now += 119
    body = json.loads(server.answer("GET", "/healthz").body)
    assert body["stale"] is False and body["sourceConnected"] is False
    clock.now += 2
    response = server.answer("GET", "/healthz")
    body = json.loads(response.body)
    assert body["stale"] is True
    assert body["disconnectedSeconds"] == 121
    # The reason names the API server: it is for the logs, not for whoever reaches the port.
    assert "sourceReason" not in body and "10.0.0.1" not in response.body.decode()
    assert response.status == 200  # rules still serve the last known state
    status.source_healthy = True
    assert json.loads(server.answer("GET", "/healthz").body)["stale"] is False


def test_garbage_and_slow_requests_do_not_break_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.2)
    server = make(AgentStatus(), Clock())

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        assert raw.startswith(b"HTTP/1.1 400")
        writer.close()
        # An oversized head is cut off, a silent client times out: both just close.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"a" * 20000)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert (await get(port, "/livez"))[0] == 200

    serving(server, scenario)


def test_handler_exception_answers_500() -> None:
    def broken(method: str, path: str) -> http.Response:
        raise RuntimeError("boom")

    async def main() -> None:
        from kpy.kernel import netns as netns_socket

        sock = netns_socket.listening_socket("127.0.0.1", 0)
        server = await http.start_http(broken, sock)
        port = sock.getsockname()[1]
        async with server:
            assert (await get(port, "/x"))[0] == 500

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:10256", ("0.0.0.0", 10256)),
        ("[::]:10256", ("::", 10256)),
        (":10249", ("", 10249)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_bind_address(text: str, expected: tuple[str, int]) -> None:
    assert http.parse_bind_address(text) == expected


@pytest.mark.parametrize("text", ["10256", "host:", "1.2.3.4:99999", "a:b"])
def test_parse_bind_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="address:port"):
        http.parse_bind_address(text)


def test_bind_conflict_retries_until_free() -> None:
    async def main() -> None:
        from kpy.kernel import netns as netns_socket

        blocker = netns_socket.listening_socket("127.0.0.1", 0)
        port = blocker.getsockname()[1]
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            http.serve_forever(
                "t",
                lambda m, p: http.Response.text(200, "ok"),
                f"127.0.0.1:{port}",
                bound=bound.set_result,
                retry_after=0.05,
            )
        )
        await asyncio.sleep(0.2)
        assert not bound.done()
        blocker.close()
        assert await asyncio.wait_for(bound, 5) == port
        assert (await get(port, "/"))[0] == 200
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())
