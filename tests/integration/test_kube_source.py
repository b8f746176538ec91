"""The kube source against the fake API server over real loopback sockets.

What a production cluster does to a node agent — disconnects, compaction (410), throttling,
restarts, a missing Node, thousands of objects — and what the source must make of it:
the sink's view converges to the server's objects, with no lost or repeated final state
and no deletions invented because the API went away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from kpy.sources import Event, EventType, Kind
from kpy.sources.kube import (
    REQUIRED_PERMISSIONS,
    ApiTarget,
    BackoffPolicy,
    KubeSource,
    Timeouts,
    load_target,
)
from kpy.testing import objects
from kpy.testing.apiserver import FakeApiServer, make_tls
from kpy.testing.objects import service_cidr

FAST = BackoffPolicy(initial=0.02, maximum=0.2)
NODE = "node-a"

Key = tuple[Kind, str, str]


class RecordingSink:
    """A Sink that keeps the state the events describe, and every call it received."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.state: dict[Key, dict[str, Any]] = {}
        self.synced_count = 0
        self.connections: list[tuple[bool, str]] = []

    def event(self, event: Event) -> None:
        self.events.append(event)
        key = (event.kind, event.namespace, event.name)
        if event.type is EventType.UPSERT:
            self.state[key] = event.obj
        else:
            assert key in self.state, f"DELETE of an object never upserted: {key}"
            del self.state[key]

    def synced(self) -> None:
        self.synced_count += 1

    def connection(self, healthy: bool, reason: str = "") -> None:
        self.connections.append((healthy, reason))

    def versions(self) -> dict[Key, str]:
        return {k: v["metadata"]["resourceVersion"] for k, v in self.state.items()}


def server_versions(api: FakeApiServer) -> dict[Key, str]:
    out: dict[Key, str] = {}
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE, Kind.SERVICE_CIDR):
        for obj in api.objects(str(kind)):
            meta = obj["metadata"]
            if kind is Kind.NODE and meta["name"] != NODE:
                continue
            out[(kind, meta.get("namespace", ""), meta["name"])] = meta["resourceVersion"]
    return out


def service(name: str, ns: str = "default", ip: str = "10.96.0.10") -> dict[str, Any]:
    return objects.service(name, ns, ip=ip, ports=[{"port": 80}])


def endpoint_slice(name: str, service: str, ns: str = "default", n: int = 2) -> dict[str, Any]:
    addresses = [f"10.244.0.{i + 1}" for i in range(n)]
    return objects.endpoint_slice(
        name, service, addresses, namespace=ns, node=None, ports=[{"port": 8080, "protocol": "TCP"}]
    )


def node(name: str = NODE) -> dict[str, Any]:
    return objects.node(name, address="192.168.0.2")


async def until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


Test = Callable[[FakeApiServer, KubeSource, RecordingSink], Awaitable[None]]


@contextlib.asynccontextmanager
async def watching(kube: KubeSource, sink: RecordingSink) -> AsyncIterator[asyncio.Task[None]]:
    """``kube`` running into ``sink`` for the length of the block; cancelled after."""
    task = asyncio.create_task(kube.run(sink))
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(
    test: Test,
    *,
    server: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    setup: Callable[[FakeApiServer], None] | None = None,
) -> None:
    async def main() -> None:
        async with FakeApiServer(**(server or {})) as api:
            if setup is not None:
                setup(api)
            options: dict[str, Any] = {"backoff": FAST, "node_grace": 0.0, **(source or {})}
            kube = KubeSource(ApiTarget.from_url(api.url), NODE, **options)
            sink = RecordingSink()
            async with watching(kube, sink) as task:
                await test(api, kube, sink)
            assert task.cancelled(), task  # it ran until stopped, never failed

    asyncio.run(main())


def basic(api: FakeApiServer) -> None:
    api.create(node())
    api.create(service("web"))
    api.create(endpoint_slice("web-abc", "web"))


def basic_and_services(*names: str) -> Callable[[FakeApiServer], None]:
    """A setup: :func:`basic`, and a Service of each of ``names``."""

    def setup(api: FakeApiServer) -> None:
        basic(api)
        for name in names:
            api.create(service(name))

    return setup


# --------------------------------------------------------------------------- events


def test_create_update_delete_become_events() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        assert sink.versions() == server_versions(api)
        assert all(e.type is EventType.UPSERT for e in sink.events)
        n = len(sink.events)
        api.create(service("db", "data", "10.96.0.20"))
        api.patch("Service", "default", "web", {"spec": {"clusterIP": "10.96.0.11"}})
        api.update(endpoint_slice("web-abc", "web", n=3))
        api.delete("EndpointSlice", "default", "web-abc")
        await until(lambda: len(sink.events) == n + 4, what="four events")
        got = [(e.type, e.kind, e.namespace, e.name) for e in sink.events[n:]]
        assert got == [
            (EventType.UPSERT, Kind.SERVICE, "data", "db"),
            (EventType.UPSERT, Kind.SERVICE, "default", "web"),
            (EventType.UPSERT, Kind.ENDPOINT_SLICE, "default", "web-abc"),
            (EventType.DELETE, Kind.ENDPOINT_SLICE, "default", "web-abc"),
        ] or sorted(got) == sorted(
            [
                (EventType.UPSERT, Kind.SERVICE, "data", "db"),
                (EventType.UPSERT, Kind.SERVICE, "default", "web"),
                (EventType.UPSERT, Kind.ENDPOINT_SLICE, "default", "web-abc"),
                (EventType.DELETE, Kind.ENDPOINT_SLICE, "default", "web-abc"),
            ]
        )
        assert sink.state[(Kind.SERVICE, "default", "web")]["spec"]["clusterIP"] == "10.96.0.11"
        deleted = sink.events[-1] if sink.events[-1].type is EventType.DELETE else None
        assert deleted is not None and len(deleted.obj["endpoints"]) == 3  # its last state
        assert sink.versions() == server_versions(api)
        assert sink.synced_count == 1

    run(test, setup=basic)


def test_other_nodes_are_not_watched() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        api.create(node("node-b"))
        api.create(service("after"))
        await until(lambda: (Kind.SERVICE, "default", "after") in sink.state)
        assert (Kind.NODE, "", "node-b") not in sink.state
        node_lists = [q for m, p, q in api.stats.requests if p == "/api/v1/nodes"]
        assert node_lists and all(q["fieldSelector"] == f"metadata.name={NODE}" for q in node_lists)

    run(test, setup=basic)


def test_watch_starts_from_the_list_with_bookmarks() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: kube.services.watches >= 1)
        watches = [q for m, p, q in api.stats.requests if p == "/api/v1/services" and "watch" in q]
        assert watches[0]["resourceVersion"] == kube.services.resource_version
        assert watches[0]["allowWatchBookmarks"] == "true"
        # The watch is renewed before the server would close it.
        assert 0 < int(watches[0]["timeoutSeconds"]) <= 2 * kube.timeouts.watch

    run(test, setup=basic)


# --------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize("at_next_event", [False, True], ids=["idle-cut", "mid-event-cut"])
def test_disconnect_storm_converges_without_loss_or_duplicates(at_next_event: bool) -> None:
    rng = random.Random(4)

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        names = [f"s{i}" for i in range(30)]
        for round_ in range(40):
            for _ in range(5):
                name = rng.choice(names)
                exists = any(o["metadata"]["name"] == name for o in api.objects("Service"))
                if not exists:
                    api.create(service(name))
                    api.create(endpoint_slice(f"{name}-x", name))
                elif rng.random() < 0.3:
                    api.delete("Service", "default", name)
                    api.delete("EndpointSlice", "default", f"{name}-x")
                else:
                    api.patch(
                        "Service", "default", name, {"metadata": {"labels": {"r": str(round_)}}}
                    )
            api.cut_streams(at_next_event=at_next_event)
            await asyncio.sleep(rng.uniform(0, 0.03))
        await until(lambda: sink.versions() == server_versions(api), what="convergence")
        # Every (object, resourceVersion) was delivered once: nothing replayed twice.
        seen = [
            (e.kind, e.namespace, e.name, e.obj["metadata"]["resourceVersion"])
            for e in sink.events
            if e.type is EventType.UPSERT
        ]
        assert len(seen) == len(set(seen))
        assert kube.services.watches >= 5  # the storm really cut the watches
        assert kube.services.lists == 1  # cuts re-watch from the last rv; no relist needed

    run(test, setup=basic)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_relist_after_410_deletes_what_vanished_while_disconnected(as_http: bool) -> None:
    setup = basic_and_services(*(f"s{i}" for i in range(5)))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        await api.stop()
        api.delete("Service", "default", "s1")
        api.delete("Service", "default", "s3")
        api.delete("EndpointSlice", "default", "web-abc")
        api.patch("Service", "default", "s2", {"spec": {"clusterIP": "10.96.0.99"}})
        api.create(service("new"))
        api.expire()  # the deletions fall out of the history
        await api.start()
        await until(lambda: sink.versions() == server_versions(api), what="convergence")
        deletes = {(e.kind, e.name) for e in sink.events if e.type is EventType.DELETE}
        assert deletes == {
            (Kind.SERVICE, "s1"),
            (Kind.SERVICE, "s3"),
            (Kind.ENDPOINT_SLICE, "web-abc"),
        }
        assert kube.services.lists == 2 and kube.endpoint_slices.lists == 2
        assert sink.synced_count == 1

    run(test, setup=setup, server={"expired_watch_as_http_410": as_http})


def test_expired_mid_stream_relists() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: kube.services.watches == 1)
        api.expire()  # open watches get ERROR 410
        api.delete("Service", "default", "web")
        await until(lambda: kube.services.lists == 2)
        await until(lambda: sink.versions() == server_versions(api))

    run(test, setup=basic)


def test_server_restart_with_new_resource_versions() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        await api.restart(rv_jump=10_000, down_for=0.2)
        api.create(service("after-restart"))
        await until(lambda: sink.versions() == server_versions(api))
        assert int(kube.services.resource_version) > 10_000

    run(test, setup=basic)


def test_unreachable_api_keeps_state_and_reports_connection() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        before = dict(sink.versions())
        n = len(sink.events)
        await api.stop()
        await until(lambda: bool(sink.connections) and not sink.connections[-1][0], what="down")
        assert "unreachable" in sink.connections[-1][1]
        await asyncio.sleep(0.5)  # several failed retries
        assert len(sink.events) == n and sink.versions() == before  # nothing deleted
        await api.start()
        await until(lambda: sink.connections[-1][0], what="up again")
        api.create(service("later"))
        await until(lambda: sink.versions() == server_versions(api))

    run(test, setup=basic)


def test_stalled_watch_is_abandoned_and_renewed() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: kube.services.watches == 1)
        api.stall()
        api.create(service("during-stall"))
        await asyncio.sleep(1.5)  # past the watch's timeout + grace
        api.resume()
        await until(lambda: (Kind.SERVICE, "default", "during-stall") in sink.state)
        assert kube.services.watches >= 2

    run(test, setup=basic, source={"timeouts": Timeouts(watch=0.5, watch_grace=0.3)})


# --------------------------------------------------------------------------- backoff


def test_watches_closed_at_once_are_backed_off_not_hammered() -> None:
    """A server (or a proxy) that ends every watch immediately, with only a BOOKMARK."""

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        started = kube.services.watch_attempts
        await asyncio.sleep(1.0)
        # Backoff 0.05 s doubling: a handful of attempts a second, not hundreds.
        assert 2 <= kube.services.watch_attempts - started <= 10
        api.create(service("later"))  # still delivered by the next short watch
        await until(lambda: sink.versions() == server_versions(api), what="convergence")

    run(
        test,
        setup=basic,
        server={"max_watch_seconds": 0},
        source={"backoff": BackoffPolicy(initial=0.05, maximum=0.4)},
    )


def test_server_errors_are_retried_with_backoff() -> None:
    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.fail_next(6, 500)

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        assert api.stats.failed == 6
        assert sink.connections[0][0] is False and "500" in sink.connections[0][1]
        assert sink.connections[-1] == (True, "")
        assert sink.versions() == server_versions(api)

    run(test, setup=setup)


def test_too_many_requests_respects_retry_after() -> None:
    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.fail_next(1, 429, retry_after=1, paths=("/api/v1/services",))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        started = time.monotonic()
        await until(lambda: sink.synced_count == 1)
        # Retry-After: 1 was honoured, although the backoff alone would retry in ~20 ms.
        assert time.monotonic() - started >= 0.95
        assert [h for h, _ in sink.connections] == []  # throttled is not unreachable

    run(test, setup=setup)


# --------------------------------------------------------------------------- scale


def test_startup_with_20000_objects() -> None:
    def setup(api: FakeApiServer) -> None:
        api.create(node())
        api.load(
            service(f"s{i}", f"ns{i % 20}", f"10.96.{i // 250}.{i % 250}") for i in range(10_000)
        )
        api.load(endpoint_slice(f"s{i}-x", f"s{i}", f"ns{i % 20}") for i in range(10_000))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1, timeout=60)
        assert len(sink.state) == 20_001
        assert sink.versions() == server_versions(api)
        api.delete("Service", "ns3", "s3")
        await until(lambda: (Kind.SERVICE, "ns3", "s3") not in sink.state)

    run(test, setup=setup)


# --------------------------------------------------------------------------- the Node


def test_missing_node_is_a_clear_error_and_syncs_once_created() -> None:
    def setup(api: FakeApiServer) -> None:
        api.create(service("web"))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        with capture_logs() as logs:
            await until(lambda: all(r.listed.is_set() for r in kube.reflectors))
            await asyncio.sleep(0.3)
            assert sink.synced_count == 0  # still waiting for the Node
            missing = [e for e in logs if e["event"] == "node_object_missing"]
            assert missing and missing[0]["log_level"] == "error"
            assert missing[0]["node"] == NODE
            api.create(node())
            await until(lambda: sink.synced_count == 1, what="synced after the Node appeared")
        assert (Kind.NODE, "", NODE) in sink.state

    run(test, setup=setup, source={"node_grace": 30.0, "node_log_interval": 0.1})


def test_missing_node_after_grace_syncs_without_it() -> None:
    def setup(api: FakeApiServer) -> None:
        api.create(service("web"))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        with capture_logs() as logs:
            await until(lambda: sink.synced_count == 1)
        assert any(e["event"] == "node_object_missing" for e in logs)
        api.create(node())
        await until(lambda: (Kind.NODE, "", NODE) in sink.state)

    run(test, setup=setup, source={"node_grace": 0.2})


# --------------------------------------------------------------------------- bookmarks


def test_bookmarks_advance_the_resource_version() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: kube.services.watches == 1)
        listed_at = kube.services.resource_version
        for i in range(5):  # writes to other resources move the global rv
            api.create(endpoint_slice(f"other-{i}", "web"))
        api.bookmark()
        await until(lambda: kube.services.resource_version == api.resource_version)
        assert kube.services.resource_version != listed_at
        # History up to now is compacted; thanks to the bookmark the Service watch
        # resumes from a still-valid rv instead of relisting everything.
        api.expire(end_watches=False)
        api.cut_streams()
        api.create(service("after"))
        await until(lambda: (Kind.SERVICE, "default", "after") in sink.state)
        assert kube.services.lists == 1

    run(test, setup=basic)


# --------------------------------------------------------------------------- malformed


def test_malformed_objects_are_skipped_with_a_warning() -> None:
    from kpy.testing.apiserver import SERVICES

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        with capture_logs() as logs:
            await until(lambda: kube.services.watches == 1)
            api.store._commit(SERVICES, "ADDED", {"metadata": {"namespace": "x"}}, None)
            api.create(service("fine"))
            await until(lambda: (Kind.SERVICE, "default", "fine") in sink.state)
        warned = [e for e in logs if e["event"] == "kube_object_malformed"]
        assert warned and warned[0]["kind"] == "Service" and warned[0]["namespace"] == "x"
        assert "metadata.name" in warned[0]["reason"]

    run(test, setup=basic)


# --------------------------------------------------------------------------- ServiceCIDRs


def test_service_cidrs_are_listed_and_watched_cluster_wide() -> None:
    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.create(service_cidr("kubernetes", "10.96.0.0/16", "fd00:96::/108"))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        key = (Kind.SERVICE_CIDR, "", "kubernetes")
        assert sink.state[key]["spec"]["cidrs"] == ["10.96.0.0/16", "fd00:96::/108"]
        assert sink.state[key]["kind"] == "ServiceCIDR"
        await until(lambda: kube.service_cidrs.watches >= 1, what="watching")
        asked = [q for _, p, q in api.stats.requests if p == kube.service_cidrs.path]
        assert {"watch" if "watch" in q else "list" for q in asked} == {"list", "watch"}
        assert all("labelSelector" not in q and "fieldSelector" not in q for q in asked)

        api.create(service_cidr("extra", "10.100.0.0/24"))
        await until(lambda: (Kind.SERVICE_CIDR, "", "extra") in sink.state, what="added")
        api.patch("ServiceCIDR", "", "extra", {"spec": {"cidrs": ["10.100.0.0/24", "fd00::/64"]}})
        await until(
            lambda: len(sink.state[(Kind.SERVICE_CIDR, "", "extra")]["spec"]["cidrs"]) == 2,
            what="changed",
        )
        api.delete("ServiceCIDR", "", "extra")
        await until(lambda: (Kind.SERVICE_CIDR, "", "extra") not in sink.state, what="deleted")
        assert sink.events[-1].type is EventType.DELETE and sink.events[-1].namespace == ""
        # deleted while the watch could not see it: the relist after a 410 says so
        api.create(service_cidr("gone", "10.101.0.0/24"))
        await until(lambda: (Kind.SERVICE_CIDR, "", "gone") in sink.state, what="added")
        api.stall()
        api.delete("ServiceCIDR", "", "gone")
        api.expire()
        api.resume()
        await until(lambda: (Kind.SERVICE_CIDR, "", "gone") not in sink.state, what="relisted")
        assert sink.versions() == server_versions(api)

    run(test, setup=setup)


@pytest.mark.parametrize("status", [404, 403])
def test_service_cidrs_not_served_or_not_allowed_count_as_none(status: int) -> None:
    """An API server without the kind (404) or a ClusterRole without it (403): the
    source syncs without ServiceCIDRs, stays healthy, says why once, and picks them up
    when they can be listed."""

    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.create(service_cidr("kubernetes", "10.96.0.0/16"))
        faults = api.faults.unserved if status == 404 else api.faults.forbidden
        faults.add("servicecidrs")

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        with capture_logs() as logs:
            await until(lambda: sink.synced_count == 1, what="synced without ServiceCIDRs")
            assert (Kind.SERVICE, "default", "web") in sink.state
            assert not any(k is Kind.SERVICE_CIDR for k, _, _ in sink.state)
            lists = kube.service_cidrs.lists
            failed = sum(1 for _, p, _ in api.stats.requests if p == kube.service_cidrs.path)
            await until(
                lambda: (
                    sum(1 for _, p, _ in api.stats.requests if p == kube.service_cidrs.path)
                    > failed + 1
                ),
                what="retried",
            )
            assert kube.service_cidrs.lists == lists == 0
            assert kube.service_cidrs.unavailable.startswith(f"HTTP {status}")
            api.faults.unserved.clear()
            api.faults.forbidden.clear()
            await until(
                lambda: (Kind.SERVICE_CIDR, "", "kubernetes") in sink.state, what="served now"
            )
        warned = [e for e in logs if e["event"] == "kube_kind_unavailable"]
        assert len(warned) == 1 and warned[0]["status"] == status  # once, not per retry
        assert warned[0]["kind"] == "ServiceCIDR"
        assert [e for e in logs if e["event"] == "kube_kind_available"]
        assert kube.service_cidrs.unavailable == ""
        assert sink.connections == []  # never reported unhealthy
        assert sink.synced_count == 1

    run(test, setup=setup)


def test_service_cidrs_no_longer_allowed_count_as_none_until_allowed_again() -> None:
    """Access revoked while watching (the next watch is refused with 403): the
    ServiceCIDRs known are deleted — none count — without the source turning unhealthy;
    granted again, they are listed back."""

    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.create(service_cidr("kubernetes", "10.96.0.0/16"))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        key = (Kind.SERVICE_CIDR, "", "kubernetes")
        await until(lambda: kube.service_cidrs.watches >= 1 and key in sink.state)
        api.faults.forbidden.add("servicecidrs")
        api.cut_streams()
        await until(lambda: key not in sink.state, what="counted as none")
        assert kube.service_cidrs.unavailable.startswith("HTTP 403")
        assert (Kind.SERVICE, "default", "web") in sink.state
        api.faults.forbidden.clear()
        await until(lambda: key in sink.state, what="listed back")
        assert sink.connections == []

    run(test, setup=setup)


def test_a_malformed_service_cidr_is_skipped_and_the_others_kept() -> None:
    from kpy.testing.apiserver import SERVICE_CIDRS

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        with capture_logs() as logs:
            await until(lambda: kube.service_cidrs.watches == 1)
            api.store._commit(SERVICE_CIDRS, "ADDED", {"metadata": {"name": 7}}, None)
            api.create(service_cidr("fine", "10.96.0.0/16"))
            await until(lambda: (Kind.SERVICE_CIDR, "", "fine") in sink.state)
        warned = [e for e in logs if e["event"] == "kube_object_malformed"]
        assert warned and warned[0]["kind"] == "ServiceCIDR"
        assert "metadata.name" in warned[0]["reason"]

    run(test, setup=basic)


# --------------------------------------------------------------------------- configuration


def make_ca(path: Path) -> Path:
    """A self-signed certificate, as the service account's ca.crt."""
    cert = path / "ca.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kpy-test-ca",
            "-keyout",
            str(path / "ca.key"),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert


def test_in_cluster_config_with_master_override(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    ca = make_ca(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    async def main() -> None:
        async with FakeApiServer(token="s3cret") as api:
            basic(api)
            target = load_target(
                master=api.url, environ=env, token_file=str(token), ca_file=str(ca)
            )
            assert target.url == api.url  # the override wins over the Service VIP
            kube = KubeSource(target, NODE, backoff=FAST)
            sink = RecordingSink()
            async with watching(kube, sink):
                await until(lambda: sink.synced_count == 1)
                posted = await kube.post(
                    "/api/v1/namespaces/default/events",
                    {"kind": "Event", "metadata": {"generateName": "node-a."}, "reason": "R"},
                )
                assert posted["metadata"]["name"].startswith("node-a.")

    asyncio.run(main())


def test_in_cluster_service_host_and_port_reach_the_fake_server_over_tls(tmp_path: Path) -> None:
    """KUBERNETES_SERVICE_HOST/PORT set to the API server itself (the DaemonSet override)."""
    tls = make_tls(tmp_path)
    token = tmp_path / "token"
    token.write_text("sa-token")

    async def main() -> None:
        async with FakeApiServer(token="sa-token", ssl_context=tls.server_context()) as api:
            basic(api)
            env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
            target = load_target(environ=env, token_file=str(token), ca_file=str(tls.ca))
            assert target.url == api.url and target.auth_may_block  # the token is re-read
            kube = KubeSource(target, NODE, backoff=FAST)
            sink = RecordingSink()
            async with watching(kube, sink):
                await until(lambda: sink.synced_count == 1, what="synced in-cluster over TLS")
                assert sink.versions() == server_versions(api)

    asyncio.run(main())


def test_in_cluster_config_without_override(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    ca = make_ca(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "192.168.1.10", "KUBERNETES_SERVICE_PORT": "6443"}
    target = load_target(environ=env, token_file=str(tmp_path / "token"), ca_file=str(ca))
    assert (target.scheme, target.host, target.port) == ("https", "192.168.1.10", 6443)
    assert target.auth()["Authorization"].lower() == "bearer t"
    assert target.ssl_context is not None and target.server_hostname is None


def test_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:6443"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
    )
    target = load_target(kubeconfig=str(kubeconfig), environ={})
    assert (target.scheme, target.host, target.port) == ("http", "127.0.0.1", 6443)
    assert target.auth() == {"Authorization": "Bearer abc"}
    overridden = load_target(kubeconfig=str(kubeconfig), master="10.0.0.1:6443", environ={})
    assert overridden.url == "https://10.0.0.1:6443"


def test_kubeconfig_with_tls_and_token_reaches_the_fake_server(tmp_path: Path) -> None:
    """The official client's loader reads CA data and a token; kpy's HTTP uses both."""
    tls = make_tls(tmp_path)
    ca_data = base64.b64encode(tls.ca.read_bytes()).decode()

    async def main() -> None:
        async with FakeApiServer(token="tok3n", ssl_context=tls.server_context()) as api:
            basic(api)
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(
                f"""
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{api.url}", certificate-authority-data: {ca_data}}}}}]
users: [{{name: u, user: {{token: tok3n}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
            )
            target = load_target(kubeconfig=str(kubeconfig), environ={})
            assert target.scheme == "https" and target.ssl_context is not None
            kube = KubeSource(target, NODE, backoff=FAST)
            sink = RecordingSink()
            async with watching(kube, sink):
                await until(lambda: sink.synced_count == 1, what="synced over TLS")
                assert sink.versions() == server_versions(api)
                assert all(healthy for healthy, _ in sink.connections)
            # A wrong token is refused by the server: the source reports it and retries.
            wrong = tmp_path / "wrong"
            wrong.write_text(kubeconfig.read_text().replace("token: tok3n", "token: nope"))
            kube = KubeSource(load_target(kubeconfig=str(wrong), environ={}), NODE, backoff=FAST)
            sink = RecordingSink()
            with capture_logs() as logs:
                async with watching(kube, sink):
                    await until(lambda: any(e.get("status") == 401 for e in logs), what="401")
                    assert sink.synced_count == 0 and not sink.events
                    # Refused credentials are a lost connection for health (no updates).
                    assert sink.connections and sink.connections[-1][0] is False
                    assert "refused access: HTTP 401" in sink.connections[-1][1]

    asyncio.run(main())


def test_a_peer_that_never_completes_the_handshake_is_abandoned(tmp_path: Path) -> None:
    """TCP accepted, TLS never answered: the connect timeout, not the 2-minute list one."""
    tls = make_tls(tmp_path)

    async def main() -> None:
        held: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accept and say nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = ApiTarget.from_configuration(_configuration(f"https://127.0.0.1:{port}", tls.ca))
        kube = KubeSource(target, NODE, backoff=FAST, timeouts=Timeouts(connect=0.2, list=120))
        sink = RecordingSink()
        async with server:
            with capture_logs() as logs:
                async with watching(kube, sink):
                    await until(lambda: bool(sink.connections), timeout=5, what="reported")
                    assert sink.connections[-1][0] is False
                    assert "no connection to 127.0.0.1" in sink.connections[-1][1]
                    await until(lambda: len(held) >= 6, timeout=5, what="retries")
                    assert any(e["event"] == "kube_unreachable" for e in logs)
                    for w in held:
                        w.transport.abort()

    asyncio.run(main())


def _configuration(host: str, ca: Path) -> Any:
    """A client Configuration as the kubeconfig loader would leave it."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = host
    configuration.ssl_ca_cert = str(ca)
    return configuration


# --------------------------------------------------------------------------- chunked lists


def test_lists_are_read_in_pages() -> None:
    setup = basic_and_services(*(f"s{i:02}" for i in range(25)))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        assert sink.versions() == server_versions(api)
        lists = [
            q for m, p, q in api.stats.requests if p == "/api/v1/services" and "watch" not in q
        ]
        assert [q.get("limit") for q in lists] == ["10"] * 3  # 26 Services: 10 + 10 + 6
        assert "continue" not in lists[0] and all(q["continue"] for q in lists[1:])

    run(test, setup=setup, source={"page_size": 10})


class _ChangeDuringList(RecordingSink):
    """Deletes a Service and compacts history while the first page is being handled."""

    def __init__(self, api: FakeApiServer) -> None:
        super().__init__()
        self.api = api
        self.done = False

    def event(self, event: Event) -> None:
        super().event(event)
        if not self.done and event.kind is Kind.SERVICE:
            self.done = True
            self.api.delete("Service", "default", event.name)  # already delivered
            self.api.expire(end_watches=False)  # the first page's snapshot is gone


def test_expired_continue_token_restarts_the_list_and_reconciles() -> None:
    async def main() -> None:
        async with FakeApiServer() as api:
            basic(api)
            for i in range(9):
                api.create(service(f"s{i}"))
            kube = KubeSource(ApiTarget.from_url(api.url), NODE, backoff=FAST, page_size=4)
            sink = _ChangeDuringList(api)
            async with watching(kube, sink):
                await until(lambda: sink.synced_count == 1, what="synced")
                await until(lambda: sink.versions() == server_versions(api), what="converged")
                deleted = [e.name for e in sink.events if e.type is EventType.DELETE]
                assert deleted == ["s0"]  # "s0" < "s1" < ... < "web": the first item listed
                continued = [
                    q
                    for _, p, q in api.stats.requests
                    if p == "/api/v1/services" and "continue" in q
                ]
                assert continued  # the 410 came on a continued page
                assert kube.services.lists == 1  # one complete list, after one restart

    asyncio.run(main())


@pytest.mark.parametrize("unpaged", [False, True], ids=["cache-pages", "cache-ignores-limit"])
def test_first_list_from_the_watch_cache_relist_after_410_consistent(unpaged: bool) -> None:
    setup = basic_and_services(*(f"s{i:02}" for i in range(25)))

    def service_lists(api: FakeApiServer) -> list[dict[str, str]]:
        return [q for m, p, q in api.stats.requests if p == "/api/v1/services" and "watch" not in q]

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        assert sink.versions() == server_versions(api)
        first = service_lists(api)
        # resourceVersion=0 on the first page only (the API server refuses it with continue).
        assert first[0].get("resourceVersion") == "0" and first[0]["limit"] == "10"
        assert all("resourceVersion" not in q and q["continue"] for q in first[1:])
        assert len(first) == (1 if unpaged else 3)
        for r in kube.reflectors:
            lists = [q for _, p, q in api.stats.requests if p == r.path and "watch" not in q]
            assert lists[0].get("resourceVersion") == "0", r.path

        api.delete("Service", "default", "s03")
        api.expire()  # 410: relist, and this time a consistent read
        await until(lambda: kube.services.lists == 2, what="relisted")
        await until(lambda: sink.versions() == server_versions(api), what="converged")
        relist = service_lists(api)[len(first) :]
        assert relist and all(q.get("resourceVersion", "") == "" for q in relist)
        assert len(relist) == 3  # a consistent read is paged: 25 Services in pages of 10

    run(
        test,
        setup=setup,
        server={"unpaged_cached_lists": unpaged},
        source={"page_size": 10},
    )


# --------------------------------------------------------------------------- connections


def _list_connections(api: FakeApiServer, path: str) -> list[int]:
    """The connection each list (not watch) request of ``path`` came on."""
    return [
        conn
        for (_, p, q), conn in zip(api.stats.requests, api.stats.request_connections, strict=True)
        if p == path and "watch" not in q
    ]


def test_paged_lists_reuse_one_kept_alive_connection() -> None:
    setup = basic_and_services(*(f"s{i:02}" for i in range(25)))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: all(r.watches >= 1 for r in kube.reflectors), what="watching")
        first = _list_connections(api, "/api/v1/services")
        assert len(first) == 3 and len(set(first)) == 1  # three pages, one connection
        # One connection per reflector for its lists, one per watch.
        assert api.stats.connections == 8
        api.expire()  # every resource relists: on the connections kept since
        await until(lambda: all(r.lists == 2 for r in kube.reflectors), what="relisted")
        relist = _list_connections(api, "/api/v1/services")[3:]
        assert len(relist) == 3 and set(relist) == set(first)
        assert kube.services.pool.opened == 1
        await until(lambda: sink.versions() == server_versions(api), what="converged")

    run(test, setup=setup, source={"page_size": 10})


def test_a_connection_the_server_closed_is_replaced() -> None:
    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: all(r.watches >= 1 for r in kube.reflectors), what="watching")
        before = _list_connections(api, "/api/v1/services")
        assert api.close_idle() == 4  # the reflectors' kept list connections
        api.create(service("new"))
        api.expire()
        await until(lambda: all(r.lists == 2 for r in kube.reflectors), what="relisted")
        after = _list_connections(api, "/api/v1/services")[len(before) :]
        assert after and not set(after) & set(before)  # a new connection
        assert kube.services.pool.opened == 2

        # Closed while the request was on its way (the server's idle timeout racing
        # it): sent once more on a new connection, and nobody hears of it.
        # (every reflector watching again first: one still listing would watch from
        # the newest resourceVersion, which the compaction keeps, and not relist)
        await until(lambda: all(r.watches >= 2 for r in kube.reflectors), what="watching")
        api.faults.drop_reused = 1
        api.expire()
        await until(lambda: all(r.lists == 3 for r in kube.reflectors), what="relisted again")
        assert api.stats.dropped == 1
        assert all(healthy for healthy, _ in sink.connections)
        await until(lambda: sink.versions() == server_versions(api), what="converged")

    with capture_logs() as logs:
        run(test, setup=basic)
    assert not [e for e in logs if e["event"] in ("kube_unreachable", "kube_request_failed")]


# --------------------------------------------------------------------------- selectors

PROXY_NAME = "service.kubernetes.io/service-proxy-name"
HEADLESS = "service.kubernetes.io/headless"


def test_other_proxies_services_and_headless_slices_are_left_out_by_the_server() -> None:
    def setup(api: FakeApiServer) -> None:
        basic(api)
        other = service("other")
        other["metadata"]["labels"] = {PROXY_NAME: "another-proxy"}
        api.create(other)
        api.create(service("db", ip="None"))
        headless = endpoint_slice("db-xyz", "db")
        headless["metadata"]["labels"][HEADLESS] = ""
        api.create(headless)

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        await until(
            lambda: kube.services.watches >= 1 and kube.endpoint_slices.watches >= 1,
            what="watching",
        )
        names = {(k, n) for k, _, n in sink.state}
        assert (Kind.SERVICE, "other") not in names and (Kind.SERVICE, "db") in names
        assert (Kind.ENDPOINT_SLICE, "db-xyz") not in names
        assert (Kind.ENDPOINT_SLICE, "web-abc") in names
        for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
            asked = [q for _, p, q in api.stats.requests if p == path]
            assert {"list", "watch"} <= {"watch" if "watch" in q else "list" for q in asked}
            assert all(q["labelSelector"] == f"!{HEADLESS},!{PROXY_NAME}" for q in asked), asked
        assert all("labelSelector" not in q for _, p, q in api.stats.requests if "nodes" in p)

        # Labelled for another proxy while watched: the watch says DELETED, and back.
        api.patch("Service", "default", "web", {"metadata": {"labels": {PROXY_NAME: "x"}}})
        await until(lambda: (Kind.SERVICE, "default", "web") not in sink.state, what="gone")
        assert sink.events[-1].type is EventType.DELETE and sink.events[-1].name == "web"
        api.patch("Service", "default", "web", {"metadata": {"labels": {PROXY_NAME: None}}})
        await until(lambda: (Kind.SERVICE, "default", "web") in sink.state, what="back")
        expected = {
            k: v for k, v in server_versions(api).items() if k[2] not in ("other", "db-xyz")
        }
        assert sink.versions() == expected

    run(test, setup=setup)


# --------------------------------------------------------------------------- metrics


class CountingMetrics:
    """A SourceMetrics that counts calls by resource."""

    def __init__(self) -> None:
        self.reconnects: dict[str, int] = {}
        self.relists: dict[str, int] = {}

    def watch_reconnected(self, resource: str) -> None:
        self.reconnects[resource] = self.reconnects.get(resource, 0) + 1

    def relisted(self, resource: str) -> None:
        self.relists[resource] = self.relists.get(resource, 0) + 1


def test_reconnects_and_relists_are_reported_to_metrics() -> None:
    metrics = CountingMetrics()

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        kube.set_metrics(metrics)
        await until(lambda: all(r.watches >= 1 for r in kube.reflectors), what="watching")
        once = {"services": 1, "endpointslices": 1, "nodes": 1, "servicecidrs": 1}
        assert metrics.relists == once
        assert metrics.reconnects == {}
        api.cut_streams()
        await until(lambda: len(metrics.reconnects) == 4, what="re-watched")
        assert metrics.relists == once
        api.create(service("more"))
        api.expire()  # ERROR 410 on every open watch: relist each
        await until(lambda: metrics.relists.get("services") == 2, what="relisted")
        await until(lambda: sink.versions() == server_versions(api))

    run(test, setup=basic)


MANIFESTS = """
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"""


def test_dev_command_serves_a_manifests_directory(tmp_path: Path) -> None:
    """`kpy testing apiserver --from DIR`: the real kube path can run against files."""
    (tmp_path / "cluster.yaml").write_text(MANIFESTS)

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kpy",
            "testing",
            "apiserver",
            "--from",
            str(tmp_path),
            "--port",
            "0",
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert proc.stderr is not None
        try:
            url = ""
            async with asyncio.timeout(20):
                while not url:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "the dev command exited"
                    if "fake Kubernetes API server on " in line:
                        url = line.split(" on ", 1)[1].split()[0]
            kube = KubeSource(ApiTarget.from_url(url), NODE, backoff=FAST)
            sink = RecordingSink()
            async with watching(kube, sink):
                await until(lambda: sink.synced_count == 1, what="synced from the dev server")
                assert (Kind.SERVICE, "default", "web") in sink.state
                assert (Kind.NODE, "", NODE) in sink.state
                # Edits to the directory are served as watch events.
                (tmp_path / "cluster.yaml").write_text(MANIFESTS.replace("10.96.0.10", "10.96.0.9"))
                await until(
                    lambda: (
                        sink.state[(Kind.SERVICE, "default", "web")]["spec"]["clusterIP"]
                        == "10.96.0.9"
                    ),
                    what="edit served",
                )
        finally:
            proc.terminate()
            await proc.wait()

    asyncio.run(main())


@pytest.mark.parametrize(
    "text",
    ["garbage: [", "apiVersion: v1\nkind: Config\n", None],
    ids=["not-yaml", "no-current-context", "missing-file"],
)
def test_unusable_kubeconfig_is_a_configuration_error(tmp_path: Path, text: str | None) -> None:
    from kpy.agent.config import ConfigError
    from kpy.sources.kube import KubeConfigError

    path = tmp_path / "kubeconfig"
    if text is not None:
        path.write_text(text)
    with pytest.raises(KubeConfigError, match=str(path)) as info:
        load_target(kubeconfig=str(path), environ={})
    assert isinstance(info.value, ConfigError)  # `kpy run` reports it as "error: ..."


def test_required_permissions_cover_what_the_source_uses() -> None:
    perms = {(g, r): set(v) for g, r, v in REQUIRED_PERMISSIONS}
    assert {"list", "watch"} <= perms[("", "services")]
    assert {"list", "watch"} <= perms[("discovery.k8s.io", "endpointslices")]
    assert {"list", "watch"} <= perms[("", "nodes")]
    assert {"list", "watch"} <= perms[("networking.k8s.io", "servicecidrs")]
    assert {"create", "patch"} <= perms[("", "events")]


def test_the_source_keeps_versions_not_bodies_and_a_relist_delete_names_the_object() -> None:
    """What a reflector keeps per object is its resourceVersion (the converted model is
    the agent's; at 100,000 Services the JSON bodies were 780 MB): a relist still skips
    what did not change, and its DELETE of what vanished names the object."""

    def setup(api: FakeApiServer) -> None:
        basic(api)
        api.create(service("s1"))

    async def test(api: FakeApiServer, kube: KubeSource, sink: RecordingSink) -> None:
        await until(lambda: sink.synced_count == 1)
        assert kube.services.known and all(
            isinstance(v, str) and v for v in kube.services.known.values()
        )
        version = kube.services.known[("default", "s1")]
        upserts = len([e for e in sink.events if e.type is EventType.UPSERT])
        await api.stop()
        api.delete("Service", "default", "s1")
        api.expire()
        await api.start()
        await until(lambda: sink.versions() == server_versions(api), what="convergence")
        deletes = [e for e in sink.events if e.type is EventType.DELETE]
        assert [(e.kind, e.namespace, e.name) for e in deletes] == [(Kind.SERVICE, "default", "s1")]
        assert deletes[0].obj == {
            "kind": "Service",
            "metadata": {"name": "s1", "namespace": "default", "resourceVersion": version},
        }
        assert len([e for e in sink.events if e.type is EventType.UPSERT]) == upserts

    run(test, setup=setup)
