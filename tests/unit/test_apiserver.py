"""The fake API server against the Kubernetes API conventions, through a plain HTTP client.

The client here is the standard library's ``http.client`` (in a thread), not kpy's own
HTTP code, so the server's wire format is checked independently of the kube source.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kpy.testing import apiserver
from kpy.testing.apiserver import FakeApiServer, Requirement, make_tls, parse_label_selector


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, complete: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete  # False: the stream was cut (incomplete chunk)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


def _http(
    port: int, method: str, path: str, body: Any = None, ctype: str = "application/json"
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": ctype} if data else {})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return Reply(resp.status, headers, resp.read(), True)
        except http.client.IncompleteRead as exc:
            return Reply(resp.status, headers, exc.partial, False)
    finally:
        conn.close()


async def call(api: FakeApiServer, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
    return await asyncio.to_thread(_http, api.port, method, path, body, **kw)


def run(test: Callable[[FakeApiServer], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with FakeApiServer(**options) as api:
            await test(api)

    asyncio.run(main())


# --------------------------------------------------------------------------- lists


def test_list_is_in_the_wire_format() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a", "ns1"))
        api.create(svc("b", "ns2"))
        api.create(node("n1"))
        reply = await call(api, "GET", "/api/v1/services")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        body = reply.json()
        assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
        # One counter across resources, as etcd: the Node's write is the newest.
        assert body["metadata"]["resourceVersion"] == api.resource_version == "4"
        assert [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
        assert [i["metadata"]["resourceVersion"] for i in body["items"]] == ["2", "3"]
        assert all("kind" not in i and "apiVersion" not in i for i in body["items"])
        assert all(i["metadata"]["uid"] for i in body["items"])
        namespaced = (await call(api, "GET", "/api/v1/namespaces/ns2/services")).json()
        assert [i["metadata"]["name"] for i in namespaced["items"]] == ["b"]
        one = (await call(api, "GET", "/api/v1/namespaces/ns1/services/a")).json()
        assert one["kind"] == "Service" and one["metadata"]["resourceVersion"] == "2"
        slices = (await call(api, "GET", "/apis/discovery.k8s.io/v1/endpointslices")).json()
        assert slices["kind"] == "EndpointSliceList"
        assert slices["apiVersion"] == "discovery.k8s.io/v1"
        nodes = (await call(api, "GET", "/api/v1/nodes")).json()
        assert nodes["kind"] == "NodeList" and nodes["items"][0]["metadata"]["name"] == "n1"
        assert "namespace" not in nodes["items"][0]["metadata"]

    run(test)


def test_list_at_an_exact_resource_version_answers_from_history() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        at = api.resource_version
        api.create(svc("b"))
        api.delete("Service", "default", "a")
        exact = f"/api/v1/services?resourceVersion={at}&resourceVersionMatch=Exact"
        body = (await call(api, "GET", exact)).json()
        assert [i["metadata"]["name"] for i in body["items"]] == ["a"]
        assert body["metadata"]["resourceVersion"] == at
        api.expire()
        gone = await call(api, "GET", exact)
        assert gone.status == 410 and gone.json()["reason"] == "Expired"

    run(test)


def test_discovery_and_version() -> None:
    async def test(api: FakeApiServer) -> None:
        assert (await call(api, "GET", "/api")).json()["versions"] == ["v1"]
        groups = (await call(api, "GET", "/apis")).json()
        assert "discovery.k8s.io" in [g["name"] for g in groups["groups"]]
        resources = (await call(api, "GET", "/apis/discovery.k8s.io/v1")).json()
        assert [r["name"] for r in resources["resources"]] == ["endpointslices"]
        assert (await call(api, "GET", "/version")).json()["major"] == "1"
        missing = await call(api, "GET", "/apis/apps/v1/deployments")
        assert missing.status == 404 and missing.json()["kind"] == "Status"

    run(test)


# --------------------------------------------------------------------------- writes


def test_writes_follow_the_conventions() -> None:
    async def test(api: FakeApiServer) -> None:
        created = await call(api, "POST", "/api/v1/namespaces/x/services", svc("a", "x"))
        assert created.status == 201
        rv = created.json()["metadata"]["resourceVersion"]
        again = await call(api, "POST", "/api/v1/namespaces/x/services", svc("a", "x"))
        assert again.status == 409 and again.json()["reason"] == "AlreadyExists"
        missing = await call(api, "GET", "/api/v1/namespaces/x/services/nope")
        status = missing.json()
        assert missing.status == 404
        assert (status["kind"], status["status"], status["reason"], status["code"]) == (
            "Status",
            "Failure",
            "NotFound",
            404,
        )
        # PUT with a stale resourceVersion: 409 Conflict (optimistic concurrency).
        stale = created.json()
        stale["spec"]["clusterIP"] = "10.96.0.11"
        ok = await call(api, "PUT", "/api/v1/namespaces/x/services/a", stale)
        assert ok.status == 200 and ok.json()["metadata"]["resourceVersion"] != rv
        conflict = await call(api, "PUT", "/api/v1/namespaces/x/services/a", stale)
        assert conflict.status == 409 and conflict.json()["reason"] == "Conflict"
        # A no-op update writes nothing.
        before = api.resource_version
        current = api.get("Service", "x", "a")
        assert (await call(api, "PUT", "/api/v1/namespaces/x/services/a", current)).status == 200
        assert api.resource_version == before
        patched = await call(
            api,
            "PATCH",
            "/api/v1/namespaces/x/services/a",
            {"metadata": {"labels": {"app": "web"}}, "spec": {"clusterIP": None}},
            ctype="application/merge-patch+json",
        )
        assert patched.json()["metadata"]["labels"] == {"app": "web"}
        assert "clusterIP" not in patched.json()["spec"]
        json_patch = await call(
            api, "PATCH", "/api/v1/namespaces/x/services/a", [], ctype="application/json-patch+json"
        )
        assert json_patch.status in (400, 415)
        deleted = await call(api, "DELETE", "/api/v1/namespaces/x/services/a")
        assert deleted.status == 200 and deleted.json()["status"] == "Success"
        assert (await call(api, "DELETE", "/api/v1/namespaces/x/services/a")).status == 404

    run(test)


def test_generate_name_for_events() -> None:
    async def test(api: FakeApiServer) -> None:
        body = {"kind": "Event", "metadata": {"generateName": "node-a."}, "reason": "Starting"}
        reply = await call(api, "POST", "/api/v1/namespaces/default/events", body)
        assert reply.status == 201
        assert reply.json()["metadata"]["name"].startswith("node-a.")

    run(test)


# --------------------------------------------------------------------------- watch


def test_watch_from_a_resource_version_sends_only_later_changes() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("old"))
        start = api.resource_version
        api.create(svc("a"))
        api.patch("Service", "default", "a", {"metadata": {"labels": {"v": "2"}}})
        api.delete("Service", "default", "a")
        api.create(node("n1"))  # another resource: not in this watch
        reply = await call(api, "GET", f"/api/v1/services?watch=1&resourceVersion={start}")
        assert reply.headers.get("transfer-encoding") == "chunked"
        events = reply.events()
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "a"),
            ("MODIFIED", "a"),
            ("DELETED", "a"),
        ]
        rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert rvs == sorted(rvs) and rvs[0] > int(start)
        assert all(e["object"]["kind"] == "Service" for e in events)

    run(test, max_watch_seconds=0.3)


def test_watch_without_resource_version_starts_with_synthetic_added() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        api.create(svc("b"))
        reply = await call(api, "GET", "/api/v1/services?watch=true&timeoutSeconds=1")
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in reply.events()] == [
            ("ADDED", "a"),
            ("ADDED", "b"),
        ]

    run(test)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_watch_from_a_compacted_resource_version_is_gone(as_http: bool) -> None:
    async def test(api: FakeApiServer) -> None:
        for i in range(5):
            api.create(svc(f"s{i}"))  # history holds 3: the first writes fall out
        reply = await call(api, "GET", "/api/v1/services?watch=1&resourceVersion=2")
        status = reply.json() if as_http else reply.events()[0]["object"]
        if as_http:
            assert reply.status == 410
        else:
            assert reply.status == 200 and reply.events()[0]["type"] == "ERROR"
        assert status["kind"] == "Status" and status["apiVersion"] == "v1"
        assert (status["status"], status["reason"], status["code"]) == ("Failure", "Expired", 410)
        ok = await call(api, "GET", "/api/v1/services?watch=1&resourceVersion=4&timeoutSeconds=1")
        assert [e["object"]["metadata"]["name"] for e in ok.events()] == ["s3", "s4"]

    run(test, history_size=3, expired_watch_as_http_410=as_http)


def test_expire_ends_open_watches_with_an_error_event() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        path = f"/api/v1/services?watch=1&resourceVersion={api.resource_version}"
        pending = asyncio.create_task(call(api, "GET", path))
        await asyncio.sleep(0.2)
        api.expire()
        reply = await pending
        assert reply.complete and [e["type"] for e in reply.events()] == ["ERROR"]
        assert reply.events()[0]["object"]["code"] == 410

    run(test)


def test_timeout_seconds_closes_the_stream_with_a_final_bookmark() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        api.create(node("n1"))  # the global rv moves past the last Service
        rv = api.resource_version
        loop = asyncio.get_running_loop()
        started = loop.time()
        with_bookmarks = await call(
            api,
            "GET",
            f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"
            "&allowWatchBookmarks=true",
        )
        assert loop.time() - started >= 0.9
        assert with_bookmarks.complete  # a clean end: the chunked body is terminated
        events = with_bookmarks.events()
        assert [e["type"] for e in events] == ["BOOKMARK"]
        assert events[0]["object"]["metadata"]["resourceVersion"] == rv
        assert events[0]["object"]["kind"] == "Service"
        without = await call(
            api, "GET", f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"
        )
        assert without.complete and without.events() == []

    run(test)


def test_a_watch_ending_at_once_delivers_its_changes_before_the_final_bookmark() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        since = api.resource_version
        api.create(svc("b"))
        api.create(node("n1"))
        reply = await call(
            api,
            "GET",
            f"/api/v1/services?watch=1&resourceVersion={since}&allowWatchBookmarks=true",
        )
        events = reply.events()
        assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
            ("ADDED", "b"),
            ("BOOKMARK", None),
        ]
        assert events[1]["object"]["metadata"]["resourceVersion"] == api.resource_version

    run(test, max_watch_seconds=0)  # every watch ends at once (timeoutSeconds 0: default)


def test_periodic_bookmarks_only_when_allowed() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        path = f"/api/v1/services?watch=1&resourceVersion={api.resource_version}"
        allowed, plain = await asyncio.gather(
            call(api, "GET", path + "&allowWatchBookmarks=true&timeoutSeconds=1"),
            call(api, "GET", path + "&timeoutSeconds=1"),
        )
        assert [e["type"] for e in allowed.events()].count("BOOKMARK") >= 3
        assert plain.events() == []

    run(test, bookmark_interval=0.2)


def _raw_get(port: int, path: str) -> bytes:
    """Every byte the server sends for a GET, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_cut_stream_ends_inside_a_chunk() -> None:
    async def test(api: FakeApiServer) -> None:
        path = f"/api/v1/services?watch=1&resourceVersion={api.resource_version}"
        pending = asyncio.create_task(asyncio.to_thread(_raw_get, api.port, path))
        await asyncio.sleep(0.2)
        api.cut_streams(at_next_event=True)
        api.create(svc("a"))
        data = await pending
        body = data.split(b"\r\n\r\n", 1)[1]
        size, partial = body.split(b"\r\n", 1)
        assert partial.startswith(b'{"type":"ADDED"')
        assert int(size, 16) > len(partial)  # the announced chunk never arrived whole
        assert not body.endswith(b"0\r\n\r\n")

    run(test)


# --------------------------------------------------------------------------- selectors


LABELS = {"app": "web", "tier": "front"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("app=web", True),
        ("app==web", True),
        ("app!=web", False),
        ("app=db", False),
        ("missing!=x", True),
        ("app in (web, db)", True),
        ("app in (db)", False),
        ("app notin (db)", True),
        ("missing notin (db)", True),
        ("app notin (web)", False),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app=web,tier=front", True),
        ("app=web,tier in (back)", False),
        ("", True),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_label_selectors(selector: str, matches: bool) -> None:
    requirements = parse_label_selector(selector)
    assert all(r.matches(LABELS) for r in requirements) is matches


@pytest.mark.parametrize("bad", ["app=", "=web", "app in web", "a b", "app in (a", "!"])
def test_malformed_label_selectors_are_rejected(bad: str) -> None:
    if bad == "app=":
        # "app=" is valid: the empty value (label present with value "").
        assert parse_label_selector(bad) == (Requirement("app", "=", frozenset({""})),)
        return
    with pytest.raises(apiserver.ApiError) as err:
        parse_label_selector(bad)
    assert err.value.code == 400


def test_selectors_on_list_and_watch() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a", "ns1", {"app": "web"}))
        api.create(svc("b", "ns1", {"app": "db"}))
        api.create(svc("c", "ns2", {"app": "web"}))

        def names(reply: Reply) -> list[str]:
            return [i["metadata"]["name"] for i in reply.json()["items"]]

        assert names(await call(api, "GET", "/api/v1/services?labelSelector=app%3Dweb")) == [
            "a",
            "c",
        ]
        assert names(
            await call(api, "GET", "/api/v1/services?labelSelector=app+notin+%28web%29")
        ) == ["b"]
        by_field = "/api/v1/services?fieldSelector=metadata.namespace%3Dns1,metadata.name!%3Da"
        assert names(await call(api, "GET", by_field)) == ["b"]
        bad = await call(api, "GET", "/api/v1/services?fieldSelector=spec.type%3DNodePort")
        assert bad.status == 400 and bad.json()["reason"] == "BadRequest"
        # A watch with a selector: leaving the selection is DELETED, entering is ADDED.
        rv = api.resource_version
        api.patch("Service", "ns1", "a", {"metadata": {"labels": {"app": "db"}}})
        api.patch("Service", "ns1", "b", {"metadata": {"labels": {"app": "web"}}})
        api.patch("Service", "ns1", "b", {"spec": {"clusterIP": "10.96.0.99"}})
        reply = await call(
            api,
            "GET",
            f"/api/v1/services?watch=1&resourceVersion={rv}&labelSelector=app%3Dweb"
            "&timeoutSeconds=1",
        )
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in reply.events()] == [
            ("DELETED", "a"),
            ("ADDED", "b"),
            ("MODIFIED", "b"),
        ]
        nodes = "/api/v1/nodes?watch=1&fieldSelector=metadata.name%3Dn2&timeoutSeconds=1"
        pending = asyncio.create_task(call(api, "GET", nodes + f"&resourceVersion={rv}"))
        await asyncio.sleep(0.1)
        api.create(node("n1"))
        api.create(node("n2"))
        assert [e["object"]["metadata"]["name"] for e in (await pending).events()] == ["n2"]

    run(test)


def test_service_cidrs_are_served_cluster_scoped_with_selectors() -> None:
    path = "/apis/networking.k8s.io/v1/servicecidrs"

    def cidr(name: str, cidrs: list[str], labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": name, "namespace": "ignored", "labels": labels},
            "spec": {"cidrs": cidrs},
        }

    async def test(api: FakeApiServer) -> None:
        groups = (await call(api, "GET", "/apis")).json()
        assert "networking.k8s.io" in [g["name"] for g in groups["groups"]]
        resources = (await call(api, "GET", "/apis/networking.k8s.io/v1")).json()
        assert resources["resources"][0]["name"] == "servicecidrs"
        assert resources["resources"][0]["namespaced"] is False
        created = (await call(api, "POST", path, cidr("kubernetes", ["10.96.0.0/16"], {}))).json()
        assert created["kind"] == "ServiceCIDR" and "namespace" not in created["metadata"]
        api.create(cidr("extra", ["10.100.0.0/24"], {"team": "a"}))
        listed = (await call(api, "GET", path)).json()
        assert listed["kind"] == "ServiceCIDRList"
        assert listed["apiVersion"] == "networking.k8s.io/v1"
        assert [i["metadata"]["name"] for i in listed["items"]] == ["extra", "kubernetes"]
        one = (await call(api, "GET", f"{path}?labelSelector=team%3Da")).json()
        assert [i["metadata"]["name"] for i in one["items"]] == ["extra"]
        named = (await call(api, "GET", f"{path}?fieldSelector=metadata.name%3Dkubernetes")).json()
        assert [i["metadata"]["name"] for i in named["items"]] == ["kubernetes"]
        rv = api.resource_version
        api.patch("ServiceCIDR", "", "kubernetes", {"metadata": {"labels": {"team": "a"}}})
        api.delete("ServiceCIDR", "", "extra")
        reply = await call(
            api,
            "GET",
            f"{path}?watch=1&resourceVersion={rv}&labelSelector=team%3Da&timeoutSeconds=1",
        )
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in reply.events()] == [
            ("ADDED", "kubernetes"),
            ("DELETED", "extra"),
        ]
        api.faults.unserved.add("servicecidrs")
        assert (await call(api, "GET", path)).status == 404
        api.faults.unserved.clear()
        api.faults.forbidden.add("servicecidrs")
        forbidden = await call(api, "GET", path)
        assert forbidden.status == 403 and forbidden.json()["reason"] == "Forbidden"
        assert (await call(api, "GET", "/api/v1/services")).status == 200

    run(test)


# --------------------------------------------------------------------------- faults


def test_fail_next_with_retry_after() -> None:
    async def test(api: FakeApiServer) -> None:
        api.fail_next(2, 429, retry_after=3)
        first = await call(api, "GET", "/api/v1/services")
        assert first.status == 429 and first.headers["retry-after"] == "3"
        assert first.json()["reason"] == "TooManyRequests"
        assert (await call(api, "GET", "/api/v1/nodes")).status == 429
        assert (await call(api, "GET", "/api/v1/services")).status == 200
        api.fail_next(1, 500)
        failed = await call(api, "GET", "/api/v1/services")
        assert failed.status == 500 and failed.json()["reason"] == "InternalError"

    run(test)


def test_stall_holds_requests_until_resumed() -> None:
    async def test(api: FakeApiServer) -> None:
        api.stall()
        pending = asyncio.create_task(call(api, "GET", "/api/v1/services"))
        await asyncio.sleep(0.3)
        assert not pending.done()
        api.resume()
        assert (await pending).status == 200

    run(test)


def test_restart_jumps_resource_versions_and_forgets_history() -> None:
    async def test(api: FakeApiServer) -> None:
        api.create(svc("a"))
        before = int(api.resource_version)
        await api.restart(rv_jump=500)
        assert int(api.resource_version) == before + 500
        gone = await call(api, "GET", f"/api/v1/services?watch=1&resourceVersion={before}")
        assert gone.events()[0]["object"]["code"] == 410
        listed = (await call(api, "GET", "/api/v1/services")).json()
        assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]

    run(test)


def test_stopped_server_refuses_connections() -> None:
    async def test(api: FakeApiServer) -> None:
        await api.stop()
        with pytest.raises(ConnectionRefusedError):
            await call(api, "GET", "/api/v1/services")
        await api.start()
        assert (await call(api, "GET", "/api/v1/services")).status == 200

    run(test)


def test_token_is_required_when_configured() -> None:
    async def test(api: FakeApiServer) -> None:
        reply = await call(api, "GET", "/api/v1/services")
        assert reply.status == 401 and reply.json()["reason"] == "Unauthorized"

    run(test, token="s3cret")


# --------------------------------------------------------------------------- chunked lists


def _names(body: dict[str, Any]) -> list[str]:
    return [i["metadata"]["name"] for i in body["items"]]


def test_list_in_pages_with_limit_and_continue() -> None:
    async def test(api: FakeApiServer) -> None:
        for i in range(7):
            api.create(svc(f"s{i}", labels={"tier": "web" if i % 2 else "db"}))
        at = api.resource_version
        first = (await call(api, "GET", "/api/v1/services?limit=3")).json()
        assert _names(first) == ["s0", "s1", "s2"]
        assert first["metadata"]["resourceVersion"] == at
        assert first["metadata"]["remainingItemCount"] == 4
        token = first["metadata"]["continue"]
        # Changes between pages do not show: every page is from the first page's rv.
        api.delete("Service", "default", "s4")
        api.create(svc("s3a"))
        second = (await call(api, "GET", f"/api/v1/services?limit=3&continue={token}")).json()
        assert _names(second) == ["s3", "s4", "s5"]
        assert second["metadata"]["resourceVersion"] == at
        token = second["metadata"]["continue"]
        last = (await call(api, "GET", f"/api/v1/services?limit=3&continue={token}")).json()
        assert _names(last) == ["s6"]
        assert "continue" not in last["metadata"] and "remainingItemCount" not in last["metadata"]
        # With a selector, limit counts matching objects; how many remain is not said
        # (as the API server: unknown without reading the rest).
        web = (await call(api, "GET", "/api/v1/services?limit=2&labelSelector=tier%3Dweb")).json()
        assert _names(web) == ["s1", "s3"] and "continue" in web["metadata"]
        assert "remainingItemCount" not in web["metadata"]
        # limit=0 and no limit: everything at once.
        everything = (await call(api, "GET", "/api/v1/services?limit=0")).json()
        assert _names(everything) == ["s0", "s1", "s2", "s3", "s3a", "s5", "s6"]
        assert "continue" not in everything["metadata"]

    run(test)


def test_expired_continue_token_is_gone_and_a_bad_one_is_rejected() -> None:
    async def test(api: FakeApiServer) -> None:
        for i in range(4):
            api.create(svc(f"s{i}"))
        first = (await call(api, "GET", "/api/v1/services?limit=2")).json()
        token = first["metadata"]["continue"]
        api.create(svc("later"))
        api.expire(end_watches=False)  # the first page's rv is compacted away
        gone = await call(api, "GET", f"/api/v1/services?limit=2&continue={token}")
        assert gone.status == 410
        assert gone.json()["reason"] == "Expired" and "continue" in gone.json()["message"]
        bad = await call(api, "GET", "/api/v1/services?limit=2&continue=notatoken")
        assert bad.status == 400 and bad.json()["reason"] == "BadRequest"
        both = await call(api, "GET", f"/api/v1/services?continue={token}&resourceVersion=3")
        assert both.status == 400

    run(test)


def test_https_with_a_certificate_from_a_test_ca(tmp_path: Path) -> None:
    files = make_tls(tmp_path)

    def get(port: int, cafile: Path | None) -> int:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.request("GET", "/api/v1/nodes")
            return conn.getresponse().status
        finally:
            conn.close()

    async def test(api: FakeApiServer) -> None:
        assert api.url.startswith("https://127.0.0.1:")
        assert await asyncio.to_thread(get, api.port, files.ca) == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(get, api.port, None)  # not trusted without the CA

    run(test, ssl_context=files.server_context())
