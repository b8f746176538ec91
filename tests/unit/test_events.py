"""Node Events: body shape, rate limits, and posting over real HTTP to a local API stand-in.

The fake API server (kpy.testing.apiserver) had not landed when this was written; a
tiny local handler that accepts POSTs of Events and answers 201 as the API server does
stands in for it, and the poster speaks plain HTTP/1.1 with a JSON body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from kpy.agent import events
from kpy.core.backend import BackendError
from kpy.testing import builders as b


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class ApiStandIn:
    """Accepts ``POST /api/v1/namespaces/<ns>/events``; records bodies; 201 Created."""

    def __init__(self, fail: bool = False) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, path, _ = lines[0].split(" ")
        headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)}
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        ok = (
            method == "POST"
            and path.startswith("/api/v1/namespaces/")
            and path.endswith("/events")
            and headers.get("content-type") == "application/json"
            and not self.fail
        )
        if ok:
            self.received.append((path, body))
            status, answer = "201 Created", {**body, "metadata": {"name": "x.1"}}
        else:
            status, answer = "500 Internal Server Error", {"kind": "Status"}
        data = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()

    async def poster(self, path: str, body: Mapping[str, Any]) -> object:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        raw = await reader.read()
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        if status >= 300:
            raise RuntimeError(f"API answered {status}")
        return json.loads(raw.partition(b"\r\n\r\n")[2])


def with_api(api: ApiStandIn, recorder: events.EventRecorder, scenario: Any) -> None:
    async def main() -> None:
        server = await asyncio.start_server(api.handle, "127.0.0.1", 0)
        api.port = server.sockets[0].getsockname()[1]
        task = asyncio.create_task(recorder.run())
        try:
            async with server:
                scenario()
                await asyncio.wait_for(recorder.flush(), 5)
        finally:
            task.cancel()

    asyncio.run(main())


def test_starting_event_reaches_the_api_as_a_core_v1_event() -> None:
    api = ApiStandIn()
    clock = Clock()
    recorder = events.EventRecorder("node-a", api.poster, clock=clock)
    with_api(api, recorder, lambda: recorder.starting("nftables"))
    assert recorder.posted == 1
    [(path, body)] = api.received
    assert path == "/api/v1/namespaces/default/events"
    assert body["apiVersion"] == "v1" and body["kind"] == "Event"
    assert body["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": "node-a",
        "uid": "node-a",
    }
    assert body["metadata"] == {"generateName": "node-a.", "namespace": "default"}
    assert body["type"] == "Normal" and body["reason"] == "Starting"
    assert body["message"] == "Starting kpy with backend nftables."
    assert body["source"] == {"component": "kpy", "host": "node-a"}
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2023-11-14T22:13:20Z"
    assert body["count"] == 1


def test_sync_failures_are_rate_limited_and_repeats_counted() -> None:
    api = ApiStandIn()
    clock = Clock()
    recorder = events.EventRecorder(
        "node-a", api.poster, clock=clock, repeat_interval=60, burst=3, refill_seconds=10
    )
    observer = events.SyncEvents(recorder, "nftables")
    plan = b.plan([])

    def storm() -> None:
        for _ in range(100):  # one failure a second for 100 s
            observer.sync_failed(plan, BackendError("nft: syntax error"), 0.01)
            clock.now += 1
        observer.plan_applied(plan, None, 0.01)  # type: ignore[arg-type]

    with_api(api, recorder, storm)
    reasons = [(body["reason"], body["count"]) for _, body in api.received]
    # The first, then one per repeat interval carrying the suppressed repeats, then recovery.
    assert reasons == [("SyncFailed", 1), ("SyncFailed", 60), ("SyncRecovered", 1)]
    assert api.received[0][1]["type"] == "Warning"
    assert "nft: syntax error" in api.received[0][1]["message"]
    second = api.received[1][1]
    assert second["firstTimestamp"] == "2023-11-14T22:13:21Z"  # the first suppressed one
    assert second["lastTimestamp"] == "2023-11-14T22:14:20Z"


def test_token_bucket_limits_distinct_events() -> None:
    clock = Clock()
    api = ApiStandIn()
    recorder = events.EventRecorder("n", api.poster, clock=clock, burst=2, refill_seconds=30)
    results = [recorder.record("Warning", "R", f"message {i}") for i in range(5)]
    assert results == [True, True, False, False, False]
    clock.now += 30
    assert recorder.record("Warning", "R", "message 9") is True
    assert recorder.record("Warning", "R", "message 10") is False


def test_failed_posts_are_logged_not_fatal() -> None:
    api = ApiStandIn(fail=True)
    recorder = events.EventRecorder("node-a", api.poster, clock=Clock())
    with_api(api, recorder, lambda: recorder.starting("iptables"))
    assert recorder.failed == 1 and recorder.posted == 0


def test_no_poster_records_nothing() -> None:
    recorder = events.EventRecorder("node-a", None)
    assert recorder.starting("nftables") is False


def test_refused_ports_and_frontend_conflicts_become_warnings_once() -> None:
    import dataclasses

    from kpy.core.model import Conflict

    api = ApiStandIn()
    clock = Clock()
    recorder = events.EventRecorder("node-a", api.poster, clock=clock, burst=10)
    observer = events.SyncEvents(recorder, "nftables")
    web, evil = b.state(b.service("web"), ()), b.state(b.service("evil", cluster_ip="10.96.0.9"))
    conflict = Conflict(
        frontend="10.96.0.10:80/TCP", claimed_as="ExternalIP", held_by=web.name, held_as="ClusterIP"
    )
    plan = dataclasses.replace(
        b.plan([web, evil]),
        conflicts={evil.name: (conflict,)},
        refused={web.name: "nft --check exited 1: value too large"},
    )

    def syncs() -> None:
        for _ in range(3):  # the same state over three syncs: reported once
            observer.plan_applied(plan, None, 0.01)  # type: ignore[arg-type]
            clock.now += 1

    with_api(api, recorder, syncs)
    reasons = sorted(body["reason"] for _, body in api.received)
    assert reasons == ["FrontendConflict", "ServicePortRefused"]
    messages = " ".join(body["message"] for _, body in api.received)
    assert "default/web:http/TCP" in messages and "10.96.0.10:80/TCP" in messages
    assert all(body["type"] == "Warning" for _, body in api.received)
