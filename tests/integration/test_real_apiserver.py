"""The kube source against a real kube-apiserver, etcd and kube-controller-manager.

The control plane (``kpy.tools.lab.control_plane``) runs in its own network namespace; the
source runs on a thread that entered it. EndpointSlices here come from the real
EndpointSlice controller, from Pods the test creates and marks ready as kubelet would.
The binaries come from ``scripts/build-upstream.sh``; without them the tests skip — a
failure under CI, whose setup builds them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

from kpy.kernel.netns import run_in_netns
from kpy.sources import EventType, Kind
from kpy.sources.kube import (
    IGNORED_LABEL_SELECTOR,
    REQUIRED_PERMISSIONS,
    BackoffPolicy,
    KubeSource,
    Timeouts,
    load_target,
)
from kpy.tools import check
from kpy.tools.lab import control_plane as realcluster
from kpy.tools.lab.api_client import ApiError, Client, kubeconfig
from kpy.tools.lab.cluster_objects import load_manifests, pod, running_status
from kpy.tools.lab.control_plane import ControlPlane, Partition
from tests.agents import kube_agent
from tests.conftest import require_root
from tests.integration.test_kube_source import RecordingSink

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
FAST = BackoffPolicy(initial=0.05, maximum=1.0)
NODE = "node-a"
NODE_IP = "192.168.0.2"
_names = itertools.count(1)


class Sink(RecordingSink):
    """Keeps the state the source's events describe."""

    def names(self, kind: Kind, namespace: str) -> set[str]:
        return {n for (k, ns, n) in self.state if k is kind and ns == namespace}

    def slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        return [
            obj
            for (k, ns, _), obj in self.state.items()
            if k is Kind.ENDPOINT_SLICE
            and ns == namespace
            and obj["metadata"].get("labels", {}).get("kubernetes.io/service-name") == service
        ]

    def endpoints(self, namespace: str, service: str) -> dict[str, dict[str, Any]]:
        """Pod name → the endpoint's conditions, over the Service's slices."""
        return {
            ep.get("targetRef", {}).get("name", ""): ep.get("conditions", {})
            for s in self.slices(namespace, service)
            for ep in s.get("endpoints") or []
        }


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    require_root()
    missing = realcluster.missing_binaries()
    if missing:
        pytest.skip(
            f"upstream binaries not built ({', '.join(missing)}): scripts/build-upstream.sh"
        )
    audit = Path(tempfile.mkdtemp(prefix="kpy-audit-"))
    (audit / "policy.yaml").write_text(AUDIT_POLICY)
    args = (
        f"--audit-policy-file={audit / 'policy.yaml'}",
        f"--audit-log-path={audit / 'audit.log'}",
        "--audit-log-mode=blocking",
    )
    try:
        with realcluster.control_plane(f"kpy-cp{os.getpid()}", extra_apiserver_args=args) as cp:
            cp.admin().create(node_object())
            yield cp
    finally:
        shutil.rmtree(audit, ignore_errors=True)


# The API server's own record of the lists and watches of the kinds kpy reads.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["list", "watch"]
  resources:
  - group: ""
    resources: ["services", "nodes"]
  - group: "discovery.k8s.io"
    resources: ["endpointslices"]
  - group: "networking.k8s.io"
    resources: ["servicecidrs"]
- level: None
"""


def audit_events(plane: ControlPlane) -> list[dict[str, Any]]:
    """The audit log's ResponseComplete events of kpy's requests (by its User-Agent)."""
    flag = next(a for a in plane.extra_apiserver_args if a.startswith("--audit-log-path="))
    log = Path(flag.split("=", 1)[1])
    if not log.exists():
        return []
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [
        e
        for e in events
        if e.get("stage") == "ResponseComplete" and e.get("userAgent", "").startswith("kpy/")
    ]


def node_object(name: str = NODE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }


def namespace(plane: ControlPlane) -> str:
    name = f"t{os.getpid()}-{next(_names)}"
    plane.admin().create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods need the namespace's default ServiceAccount, which the controller creates.
    wait(lambda: _exists(plane, f"/api/v1/namespaces/{name}/serviceaccounts/default"))
    return name


def _exists(plane: ControlPlane, path: str) -> bool:
    try:
        plane.admin().get(path)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def wait(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout * realcluster.load_factor()
    delay = 0.02
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.3)


async def until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout * realcluster.load_factor()
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def service(name: str, ns: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def start_pod(plane: ControlPlane, name: str, ns: str, labels: dict[str, str], ip: str) -> None:
    """Create a Pod bound to NODE and report it running and ready, as kubelet would."""
    obj = pod(name, NODE, labels, [{"name": "http", "containerPort": 8080}], namespace=ns)
    plane.admin().create(obj)
    plane.admin().patch_status(obj, running_status([ip], NODE_IP))


Scenario = Callable[[KubeSource, Sink], Awaitable[None]]


def run(
    plane: ControlPlane,
    scenario: Scenario,
    *,
    config: Path | None = None,
    **options: Any,
) -> None:
    """Run the kube source (admin credentials unless ``config``) beside ``scenario``."""

    async def main() -> None:
        target = load_target(kubeconfig=str(config or plane.admin_kubeconfig))
        source = KubeSource(target, NODE, **{"backoff": FAST, "node_grace": 0.0, **options})
        sink = Sink()
        task = asyncio.create_task(source.run(sink))
        try:
            await scenario(source, sink)
        finally:
            task.cancel()
            done = await asyncio.gather(task, return_exceptions=True)
            assert isinstance(done[0], asyncio.CancelledError), done

    plane.run_async(main)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking API call without stopping the source's event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# --------------------------------------------------------------------------- slices


def test_slices_from_the_real_controller_follow_pods(plane: ControlPlane) -> None:
    ns = namespace(plane)
    api = plane.admin()
    api.create(service("web", ns, {"app": "web"}))
    start_pod(plane, "web-1", ns, {"app": "web"}, "10.244.0.11")
    start_pod(plane, "web-2", ns, {"app": "web"}, "10.244.0.12")

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        assert (Kind.NODE, "", NODE) in sink.state
        await until(
            lambda: (
                {n for n, c in sink.endpoints(ns, "web").items() if c.get("ready")}
                == {"web-1", "web-2"}
            ),
            what="both pods ready in the controller's slice",
        )
        (slice_,) = sink.slices(ns, "web")
        labels = slice_["metadata"]["labels"]
        assert labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert slice_["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
        assert {ep["nodeName"] for ep in slice_["endpoints"]} == {NODE}

        # kubelet reports web-2 unready: not ready, not serving, not terminating
        obj = pod("web-2", NODE, {"app": "web"}, namespace=ns)
        await call(api.patch_status, obj, running_status(["10.244.0.12"], NODE_IP, ready=False))
        await until(
            lambda: (
                sink.endpoints(ns, "web").get("web-2")
                == {"ready": False, "serving": False, "terminating": False}
            ),
            what="web-2 unready",
        )
        # web-1 deleted with a grace period: terminating, still serving while it drains
        await call(api.delete, pod("web-1", NODE, {}, namespace=ns), grace=30)
        await until(
            lambda: (
                sink.endpoints(ns, "web").get("web-1")
                == {"ready": False, "serving": True, "terminating": True}
            ),
            what="web-1 terminating and serving",
        )
        # ... and gone when kubelet confirms the containers stopped
        await call(api.delete, pod("web-1", NODE, {}, namespace=ns), grace=0)
        await until(lambda: "web-1" not in sink.endpoints(ns, "web"), what="web-1 removed")

    run(plane, scenario)


def test_more_than_100_endpoints_split_into_several_slices(plane: ControlPlane) -> None:
    ns = namespace(plane)
    plane.admin().create(service("big", ns, {"app": "big"}))
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda i: start_pod(plane, f"big-{i}", ns, {"app": "big"}, f"10.244.1.{i + 1}"),
                range(130),
            )
        )

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: len(sink.endpoints(ns, "big")) == 130, what="130 endpoints")
        sizes = sorted(len(s["endpoints"]) for s in sink.slices(ns, "big"))
        assert len(sizes) >= 2 and max(sizes) <= 100, sizes

    run(plane, scenario)


# --------------------------------------------------------------------------- ServiceCIDRs


def test_service_cidrs_default_and_created_reach_the_plan(plane: ControlPlane) -> None:
    """The API server's default ServiceCIDR ``kubernetes`` (from
    --service-cluster-ip-range) and one created while kpy runs: seen by the source,
    valid as converted, carried in the agent's Plans; deleted, gone from them."""
    from kpy.core import convert

    name = f"extra-{os.getpid()}-{next(_names)}"
    extra = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": ["10.200.0.0/24"]},
    }
    api = plane.admin()
    default = list(realcluster.SERVICE_CIDRS)
    with_extra = ["10.96.0.0/12", "10.200.0.0/24", "fd00:96::/108"]

    async def main() -> None:
        target = load_target(kubeconfig=str(plane.admin_kubeconfig))
        async with kube_agent(target, NODE, FAST, node_grace=0.0) as (agent, backend, task):
            source = agent.source
            assert isinstance(source, KubeSource)

            def planned() -> list[str]:
                assert not task.done(), task
                return [str(c) for c in backend.plans[-1].service_cidrs] if backend.plans else []

            await until(lambda: planned() == default, what="the default ServiceCIDR planned")
            (key,) = source.service_cidrs.known  # what the source knows: names and versions
            assert key == ("", "kubernetes")
            default_cidr = await call(api.get, "/apis/networking.k8s.io/v1/servicecidrs/kubernetes")
            assert convert.service_cidr(default_cidr)[1] == ()
            await call(api.create, extra)
            await until(lambda: planned() == with_extra, what="the new ServiceCIDR planned")
            assert not backend.plans[-1].full_sync
            assert agent.status.skipped_objects == 0
            # deleted: the controller lifts its finalizer (no Service holds an address in it)
            await call(api.delete, extra)
            await until(lambda: planned() == default, what="the deleted ServiceCIDR gone")

    try:
        plane.run_async(main)
    finally:
        api.delete(extra)


# --------------------------------------------------------------------------- RBAC


def apply_rbac(plane: ControlPlane) -> None:
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for obj in load_manifests(DAEMONSET):
        if obj["kind"] in kinds:
            plane.admin().apply(obj)


def test_daemonset_manifest_passes_a_server_side_dry_run(plane: ControlPlane) -> None:
    objects = load_manifests(DAEMONSET)
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "ClusterRole", "DaemonSet"}
    for obj in objects:
        answer = plane.admin().apply(obj, dry_run=True)
        assert answer["kind"] == obj["kind"], answer


def test_the_daemonsets_service_account_is_allowed_what_kpy_needs(
    plane: ControlPlane, tmp_path: Path
) -> None:
    apply_rbac(plane)
    token = plane.service_account_token("kube-system", "kpy")
    agent = plane.token_client(token)
    for group, resource, verbs in REQUIRED_PERMISSIONS:
        for verb in verbs:
            review = agent.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": {"group": group, "resource": resource,
                                                    "verb": verb}},
                },
            )  # fmt: skip
            assert review["status"]["allowed"], (group, resource, verb, review["status"])
    agent.close()
    config = kubeconfig(tmp_path / "kpy.kubeconfig", plane.url, plane.pki.ca, token=token)

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced with the agent's token")
        assert (Kind.SERVICE, "default", "kubernetes") in sink.state
        assert all(healthy for healthy, _ in sink.connections)
        # the agent's Events about its Node (kpy.agent.events): create, then patch
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{NODE}.kpy-test", "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": NODE},
            "reason": "KpyTest",
            "message": "from the agent's service account",
            "type": "Normal",
            "count": 1,
        }
        await source.post("/api/v1/namespaces/default/events", event)
        await source.patch(f"/api/v1/namespaces/default/events/{NODE}.kpy-test", {"count": 2})

    run(plane, scenario, config=config)


def test_a_cluster_role_without_watch_is_refused_and_reported(
    plane: ControlPlane, tmp_path: Path
) -> None:
    api = plane.admin()
    api.apply({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "kpy-nowatch", "namespace": "kube-system"}})  # fmt: skip
    api.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kpy-nowatch"},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "nodes"], "verbs": ["list", "watch"]},
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list"],
                },
            ],
        }
    )
    api.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kpy-nowatch"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kpy-nowatch",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "kpy-nowatch", "namespace": "kube-system"}
            ],
        }
    )
    token = plane.service_account_token("kube-system", "kpy-nowatch")
    config = kubeconfig(tmp_path / "nowatch.kubeconfig", plane.url, plane.pki.ca, token=token)

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(
            lambda: any(not ok and "403" in why for ok, why in sink.connections),
            what="a 403 reported as a connection problem",
        )

    run(plane, scenario, config=config)


# --------------------------------------------------------------------------- history


def test_watch_resumes_across_an_apiserver_restart(plane: ControlPlane) -> None:
    ns = namespace(plane)
    api = plane.admin()
    api.create(service("before", ns))

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"before"}, what="first list")
        deleted = len([e for e in sink.events if e.type is EventType.DELETE])
        await call(plane.restart_apiserver)
        await call(api.create, service("after", ns))
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"before", "after"}, what="after")
        await until(lambda: bool(sink.connections) and sink.connections[-1][0], what="up again")
        assert any(not ok for ok, _ in sink.connections), "the restart was not noticed"
        assert len([e for e in sink.events if e.type is EventType.DELETE]) == deleted
        assert source.services.watches >= 2

    run(plane, scenario)


def test_410_after_compaction_relists_and_deletes_what_vanished(plane: ControlPlane) -> None:
    """Cut off from its API server, the agent misses a deletion; etcd compacts that
    history and the API server restarts (its watch cache now starts after the agent's
    resourceVersion). Back online, the watch gets 410 Gone, the source relists, and
    the Service deleted meanwhile disappears."""
    ns = namespace(plane)
    api = plane.admin()
    api.create(service("kept", ns))
    api.create(service("doomed", ns))
    link = Partition(plane.netns, 6444, ("127.0.0.1", 6443))
    config = plane.dir / "partition.kubeconfig"
    pki = plane.pki
    kubeconfig(
        config, "https://127.0.0.1:6444", pki.ca, cert=pki.cert("admin"), key=pki.key("admin")
    )

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"kept", "doomed"}, what="list")
        seen_rv = int(source.services.resource_version)
        link.cut()
        await until(lambda: bool(sink.connections) and not sink.connections[-1][0], what="cut")
        await call(api.delete, service("doomed", ns))
        await call(api.create, service("born", ns))
        revision = await call(plane.compact)
        assert revision > seen_rv
        await call(plane.restart_apiserver)
        link.heal()
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"kept", "born"}, what="relist")
        assert source.services.lists >= 2

    try:
        with capture_logs() as logs:
            run(plane, scenario, config=config)
    finally:
        link.close()
    expired = [e for e in logs if e["event"] == "kube_watch_expired" and e["kind"] == "Service"]
    assert expired, "no 410 was seen"


def test_bookmarks_advance_the_resource_version_without_changes(plane: ControlPlane) -> None:
    """The Node watch selects one Node by name; another Node's change reaches it only as
    a BOOKMARK, which the API server sends before the watch's timeout."""
    other = f"other-{os.getpid()}-{next(_names)}"

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        node_events = [e for e in sink.events if e.kind is Kind.NODE]
        created = await call(plane.admin().create, node_object(other))
        rv = int(created["metadata"]["resourceVersion"])
        await until(lambda: int(source.node.resource_version) >= rv, what="a bookmark")
        assert [e for e in sink.events if e.kind is Kind.NODE] == node_events
        assert (Kind.NODE, "", other) not in sink.state

    try:
        run(plane, scenario, timeouts=Timeouts(watch=5, watch_grace=10))
    finally:
        plane.admin().delete(node_object(other))


def test_paged_list_of_10000_services(plane: ControlPlane) -> None:
    ns = namespace(plane)
    count = 10_000

    def create(indexes: range) -> None:
        client = Client(plane.netns, "127.0.0.1", 6443, plane.context())
        try:
            for i in indexes:
                obj = service(f"s{i}", ns)
                obj["spec"]["clusterIP"] = "None"  # no address allocation: headless
                client.create(obj)
        finally:
            client.close()

    workers = 4
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, [range(w, count, workers) for w in range(workers)]))

    # Through a forwarder that counts the TCP connections the source opens: the pages
    # of a list come on one kept-alive connection (the real API server keeps it open),
    # not one connection per request.
    link = Partition(plane.netns, 6445, ("127.0.0.1", 6443))
    audited = len(audit_events(plane))
    config = plane.dir / "counted.kubeconfig"
    pki = plane.pki
    kubeconfig(
        config, "https://127.0.0.1:6445", pki.ca, cert=pki.cert("admin"), key=pki.key("admin")
    )

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.synced_count == 1, timeout=120, what="synced")
        assert len(sink.names(Kind.SERVICE, ns)) == count
        assert source.services.lists == 1
        await until(lambda: all(r.watches >= 1 for r in source.reflectors), what="watching")
        # one connection per reflector for its lists, one per watch
        assert link.accepted <= 2 * len(source.reflectors)
        opened = link.accepted
        # The first list (resourceVersion=0) came from the watch cache in one answer;
        # a relist after a 410 is a consistent read from etcd, in pages: all of them on
        # the connection kept since the first list.
        source.services.consistent_list = True
        await source.services.list()
        assert link.accepted == opened
        assert source.services.pool.opened == 1

    try:
        with capture_logs() as logs:
            run(plane, scenario, config=config, page_size=500)
        listed = [e for e in logs if e["event"] == "kube_listed" and e["kind"] == "Service"]
        assert listed and listed[0]["objects"] >= count
        pages = [
            e
            for e in audit_events(plane)[audited:]
            if e["verb"] == "list"
            and e["requestURI"].startswith("/api/v1/services?")
            and "continue=" in e["requestURI"]
        ]
        assert len(pages) >= count // 500 - 1, [e["requestURI"] for e in pages]
    finally:
        link.close()
        plane.admin().request(
            "DELETE", f"/api/v1/namespaces/{ns}", ok=(200, 202)
        )  # the namespace controller removes the rest


def test_build_script_pins_the_release_this_module_expects() -> None:
    text = (REPO / "scripts" / "build-upstream.sh").read_text(encoding="utf-8")
    assert f"KUBE_VERSION=${{KPY_KUBE_VERSION:-{realcluster.KUBE_VERSION}}}" in text
    assert f"ETCD_VERSION=${{KPY_ETCD_VERSION:-{realcluster.ETCD_VERSION}}}" in text


# --------------------------------------------------------------------------- kpy check --kubeconfig


def test_kpy_check_kubeconfig_lists_and_judges_from_the_real_api(plane: ControlPlane) -> None:
    """`kpy check --kubeconfig` lists through the `kubernetes` client and builds the
    cluster catalog from what the real API server has. Its netshoot pod cannot start
    here — no kubelet runs it — so the commands are judged from a stand-in shell, and
    the pod is shown to stay Pending and to be deleted again."""
    ns = namespace(plane)
    api = plane.admin()
    api.create(service("web", ns, {"app": "web"}))
    api.create(service("empty", ns, {"app": "nobody"}))
    start_pod(plane, "web-1", ns, {"app": "web"}, "10.244.0.21")
    wait(
        lambda: any(
            ep.get("conditions", {}).get("ready")
            for s in api.get(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices")["items"]
            for ep in s.get("endpoints") or []
        ),
        what="the controller's slice",
    )

    def listing() -> list[dict[str, Any]]:
        client = check.kube_client(str(plane.admin_kubeconfig))
        try:
            return check.list_objects(client)
        finally:
            client.close()

    objects = run_in_netns(plane.netns, listing)
    ips = {
        o["metadata"]["name"]: o["spec"]["clusterIP"]
        for o in objects
        if o["kind"] == "Service" and o["metadata"].get("namespace") == ns
    }
    netshoot = check.PodInfo("kpy-netshoot", NODE, (ipaddress.ip_address("10.244.0.99"),))
    commands: list[str] = []

    def shell(source: str, command: str, timeout: float) -> tuple[int, str]:
        commands.append(command)
        if f"//{ips['web']}:" in command:
            return 0, json.dumps({"pod": "web-1", "client": "10.244.0.99"})
        return 7, ""  # curl: connection refused

    checks = [c for c in check.cluster_catalog(objects, netshoot, shell) if f"{ns}/" in c.service]
    results = check.run_checks(checks, check.ShellExecutor(shell))
    assert {(r.service.split(":")[0], r.check, r.status) for r in results} == {
        (f"{ns}/web", "cluster-ip", "pass"),
        (f"{ns}/empty", "no-endpoints", "pass"),
    }
    assert any(ips["empty"] in c for c in commands)

    def netshoot_pod() -> str:
        client = check.kube_client(str(plane.admin_kubeconfig))
        try:
            with check.Netshoot(client, namespace=ns, timeout=2):
                return "running"
        except RuntimeError as exc:
            return str(exc)
        finally:
            client.close()

    assert run_in_netns(plane.netns, netshoot_pod) == "pod kpy-netshoot is Pending, not Running"
    wait(
        lambda: not _exists(plane, f"/api/v1/namespaces/{ns}/pods/kpy-netshoot"),
        what="netshoot deleted",
    )


# --------------------------------------------------------------------------- selectors


def test_server_side_selectors_leave_out_other_proxies_and_headless_slices(
    plane: ControlPlane,
) -> None:
    """kube-proxy's label selector, evaluated by the real API server: another proxy's
    Service and the slices the real controller labels headless never arrive; a Service
    that gains the proxy-name label is DELETED by the watch, and comes back without it."""
    ns = namespace(plane)
    api = plane.admin()
    proxy_name = "service.kubernetes.io/service-proxy-name"
    api.create(service("web", ns, {"app": "web"}))
    other = service("other", ns)
    other["metadata"]["labels"] = {proxy_name: "another-proxy"}
    api.create(other)
    headless = service("db", ns, {"app": "db"})
    headless["spec"]["clusterIP"] = "None"
    api.create(headless)
    start_pod(plane, "web-1", ns, {"app": "web"}, "10.244.0.31")
    start_pod(plane, "db-1", ns, {"app": "db"}, "10.244.0.32")
    slices = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"

    def db_slices() -> list[Any]:
        items: list[Any] = api.get(f"{slices}?labelSelector=kubernetes.io/service-name=db")["items"]
        return items

    wait(lambda: any(s.get("endpoints") for s in db_slices()), what="the db slice")
    assert all("service.kubernetes.io/headless" in s["metadata"]["labels"] for s in db_slices())

    async def scenario(source: KubeSource, sink: Sink) -> None:
        # every reflector has listed (Services and slices arrive on separate watches)
        await until(lambda: sink.synced_count == 1, what="synced")
        await until(lambda: "web-1" in sink.endpoints(ns, "web"), what="web's endpoints")
        assert sink.names(Kind.SERVICE, ns) == {"web", "db"}
        assert sink.slices(ns, "db") == []
        await call(
            api.request,
            "PATCH",
            f"/api/v1/namespaces/{ns}/services/web",
            {"metadata": {"labels": {proxy_name: "another-proxy"}}},
            content_type="application/merge-patch+json",
        )
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"db"}, what="web deleted")
        await call(
            api.request,
            "PATCH",
            f"/api/v1/namespaces/{ns}/services/web",
            {"metadata": {"labels": {proxy_name: None}}},
            content_type="application/merge-patch+json",
        )
        await until(lambda: sink.names(Kind.SERVICE, ns) == {"web", "db"}, what="web back")

    run(plane, scenario)


# --------------------------------------------------------------------------- as the server saw it


def test_the_api_server_sees_cached_first_lists_and_kube_proxys_selectors(
    plane: ControlPlane,
) -> None:
    """From the real API server's audit log: each kind's first list asks for
    resourceVersion=0 (served from the watch cache, as client-go's reflector does), the
    Services and EndpointSlices lists and watches carry kube-proxy's label selector, the
    Node is asked for by name, and the ServiceCIDRs with no selector (as upstream's
    informer asks for them)."""
    before = len(audit_events(plane))

    async def scenario(source: KubeSource, sink: Sink) -> None:
        await until(lambda: sink.synced_count == 1, what="synced")
        # a watch is audited when it ends; the lists are there as soon as they answered
        await until(
            lambda: (
                {e["objectRef"]["resource"] for e in audit_events(plane)[before:]}
                >= {"services", "endpointslices", "nodes", "servicecidrs"}
            ),
            what="the four lists in the audit log",
        )

    run(plane, scenario)
    events = audit_events(plane)[before:]
    lists = [e for e in events if e["verb"] == "list"]
    first: dict[str, str] = {}
    for e in lists:
        first.setdefault(e["objectRef"]["resource"], e["requestURI"])
    assert set(first) == {"services", "endpointslices", "nodes", "servicecidrs"}, events
    for resource, uri in first.items():
        query = parse_qs(urlsplit(uri).query)
        assert query.get("resourceVersion") == ["0"], uri
        if resource == "nodes":
            assert query.get("fieldSelector") == [f"metadata.name={NODE}"], uri
        elif resource == "servicecidrs":
            assert "labelSelector" not in query and "fieldSelector" not in query, uri
        else:
            assert query.get("labelSelector") == [IGNORED_LABEL_SELECTOR], uri
    for e in events:  # every request kpy made for these kinds, lists and ended watches
        if e["objectRef"]["resource"] not in ("nodes", "servicecidrs"):
            query = parse_qs(urlsplit(e["requestURI"]).query)
            assert query.get("labelSelector") == [IGNORED_LABEL_SELECTOR], e["requestURI"]
