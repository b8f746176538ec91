"""The cluster's ServiceCIDR objects: converted and validated, tracked, carried in the
Plan, read from manifests, and rendered by the nftables backend only."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from kpy_nftables import render
from structlog.testing import capture_logs

from kpy.agent.agent import Agent
from kpy.agent.quarantine import subset
from kpy.core import convert
from kpy.core.backend import BackendConfig
from kpy.core.tracker import Tracker
from kpy.sources import Event, EventType, Kind
from kpy.sources.manifests import ManifestSource, read_file
from kpy.testing import builders as b
from kpy.testing.fake_backend import FakeBackend

V4 = ipaddress.ip_network("10.96.0.0/16")
V6 = ipaddress.ip_network("fd00:96::/108")
EXTRA = ipaddress.ip_network("10.100.0.0/24")


def cidr_obj(name: str = "kubernetes", *cidrs: Any, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": "1"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["finalizers"] = ["networking.k8s.io/service-cidr-finalizer"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": meta,
        "spec": {"cidrs": list(cidrs) if cidrs else ["10.96.0.0/16", "fd00:96::/108"]},
    }


# --------------------------------------------------------------------------- convert


def test_convert_dual_stack_and_single() -> None:
    assert convert.service_cidr(cidr_obj()) == ((V4, V6), ())
    assert convert.service_cidr(cidr_obj("extra", "10.100.0.0/24")) == ((EXTRA,), ())
    assert convert.service_cidr(cidr_obj("six", "fd00:96::/108")) == ((V6,), ())


def test_one_being_deleted_still_counts() -> None:
    """As upstream kube-proxy: the API server keeps it while Services hold addresses in
    it; what no Service holds in it is still no one's."""
    assert convert.service_cidr(cidr_obj("old", "10.100.0.0/24", deleting=True)) == ((EXTRA,), ())


BAD = [
    ({"spec": {"cidrs": []}}, "spec.cidrs is empty"),
    ({"spec": {}}, "spec.cidrs is empty"),
    ({"spec": None}, "spec.cidrs is empty"),
    ({"spec": {"cidrs": "10.96.0.0/16"}}, "spec.cidrs is str, not a list"),
    ({"spec": {"cidrs": ["10.96.0.0/16", "fd00::/64", "10.97.0.0/16"]}}, "more than 2"),
    ({"spec": {"cidrs": ["10.96.0.0/16", "10.97.0.0/16"]}}, "of one family"),
    ({"spec": {"cidrs": ["10.96.0.1/16"]}}, "'10.96.0.1/16' is not a CIDR with its network"),
    ({"spec": {"cidrs": ["nope"]}}, "spec.cidrs[0] 'nope' is not a CIDR"),
    ({"spec": {"cidrs": [None]}}, "spec.cidrs[0] None is not a string"),
    ({"spec": {"cidrs": ["10.96.0.0/16", 7]}}, "spec.cidrs[1] 7 is not a string"),
    ({"spec": {"cidrs": ["10.96.0.0/33"]}}, "is not a CIDR"),
    ({"spec": "x"}, "spec is str, not an object"),
    ({"metadata": {"name": "Bad_Name"}}, "metadata.name 'Bad_Name' is not a DNS-1123 subdomain"),
    ({"metadata": {}}, "metadata.name is missing"),
    ({"metadata": "x"}, "metadata is str, not an object"),
]


@pytest.mark.parametrize(("change", "reason"), BAD, ids=[r for _, r in BAD])
def test_invalid_service_cidrs_are_refused_with_a_reason(
    change: dict[str, Any], reason: str
) -> None:
    obj = cidr_obj("bad") | change
    cidrs, problems = convert.service_cidr(obj)
    assert cidrs is None
    assert len(problems) == 1
    problem = problems[0]
    assert problem.kind == "ServiceCIDR" and problem.namespace == ""
    assert reason in problem.reason, problem.reason
    if "metadata" not in change:
        assert problem.name == "bad"


def test_not_an_object() -> None:
    obj: Any
    for obj in (None, [], "ServiceCIDR", 7):
        cidrs, problems = convert.service_cidr(obj)
        assert cidrs is None and problems[0].name == "<unnamed>"


# --------------------------------------------------------------------------- tracker


def test_tracker_carries_the_union_and_marks_a_change_pending() -> None:
    t = Tracker("node-a")
    first = t.checkout()
    assert first.service_cidrs == () and not t.pending
    t.set_service_cidr("kubernetes", (V4, V6))
    assert t.pending
    plan = t.checkout()
    assert plan.service_cidrs == (V4, V6)
    assert not plan.full_sync and not plan.changed and not plan.removed
    assert not t.pending
    t.set_service_cidr("kubernetes", (V4, V6))  # the same again: nothing to do
    assert not t.pending
    t.set_service_cidr("extra", (EXTRA,))
    assert t.checkout().service_cidrs == (V4, EXTRA, V6)  # IPv4 first, sorted
    # two objects holding one CIDR: it counts until neither does
    t.set_service_cidr("again", (EXTRA,))
    assert not t.pending
    t.set_service_cidr("extra", None)
    assert not t.pending
    assert t.checkout().service_cidrs == (V4, EXTRA, V6)
    t.set_service_cidr("again", None)
    assert t.checkout().service_cidrs == (V4, V6)
    t.set_service_cidr("never-seen", None)
    assert not t.pending


def test_an_add_and_delete_between_two_syncs_is_no_change() -> None:
    t = Tracker("node-a")
    t.set_service_cidr("kubernetes", (V4,))
    t.checkout()
    t.set_service_cidr("extra", (EXTRA,))
    t.set_service_cidr("extra", None)
    assert not t.pending


def test_quarantine_subsets_keep_the_service_cidrs() -> None:
    plan = b.plan([], service_cidrs=["10.96.0.0/16"])
    assert subset(plan, ()).service_cidrs == (V4,)


# --------------------------------------------------------------------------- the agent


def _event(obj: Any, type_: EventType = EventType.UPSERT) -> Event:
    name = obj["metadata"]["name"] if isinstance(obj.get("metadata"), dict) else "x"
    return Event(kind=Kind.SERVICE_CIDR, type=type_, namespace="", name=name, obj=obj)


def test_agent_events_a_bad_object_costs_only_itself() -> None:
    agent = Agent(node_name="node-a", source=ManifestSource([]), backend=FakeBackend())
    agent.event(_event(cidr_obj()))
    with capture_logs() as logs:
        agent.event(_event(cidr_obj("bad", "10.96.0.1/16", "10.97.0.0/16")))
    warned = [e for e in logs if e["event"] == "object_skipped"]
    assert len(warned) == 1
    assert warned[0]["kind"] == "ServiceCIDR" and warned[0]["name"] == "bad"
    assert "spec.cidrs[0] '10.96.0.1/16'" in warned[0]["reason"]
    assert agent.status.skipped_objects == 1
    assert list(agent.tracker.service_cidrs) == [V4, V6]
    # an invalid update keeps the last good version (as a Service's)
    agent.event(_event(cidr_obj("extra", "10.100.0.0/24")))
    agent.event(_event(cidr_obj("extra", "10.100.0.0/24", "10.101.0.0/24")))
    assert list(agent.tracker.service_cidrs) == [V4, EXTRA, V6]
    agent.event(_event(cidr_obj("extra", "10.100.0.0/24"), EventType.DELETE))
    assert list(agent.tracker.service_cidrs) == [V4, V6]


# --------------------------------------------------------------------------- manifests


def test_manifests_are_read_as_cluster_scoped(tmp_path: Path) -> None:
    (tmp_path / "cidrs.yaml").write_text(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\n"
        "metadata: {name: extra, namespace: ignored}\n"
        "spec: {cidrs: [10.100.0.0/24]}\n---\n"
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDRList\n"
        "items: [{metadata: {name: kubernetes}, spec: {cidrs: [10.96.0.0/16]}}]\n"
    )
    objects = read_file(tmp_path / "cidrs.yaml")
    assert set(objects) == {
        (Kind.SERVICE_CIDR, "", "extra"),
        (Kind.SERVICE_CIDR, "", "kubernetes"),
    }
    backend = FakeBackend()
    agent = Agent(node_name="node-a", source=ManifestSource([tmp_path]), backend=backend)
    ManifestSource([tmp_path]).scan(agent)
    assert agent.tracker.checkout().service_cidrs == (V4, EXTRA)


# --------------------------------------------------------------------------- rendering


def test_backend_config_merges_the_flag_and_the_objects() -> None:
    config = BackendConfig(service_cidrs=(V4,))
    plan = b.plan([], service_cidrs=["10.96.0.0/16", "10.100.0.0/24"])
    merged = config.for_plan(plan)
    assert merged.all_service_cidrs() == (V4, EXTRA)
    assert merged.for_plan(plan) is merged  # nothing new: the same configuration
    assert config.for_node(plan.node).all_service_cidrs() == (V4,)  # the other backends'


def test_nftables_renders_the_objects_cidrs_into_the_check_chain() -> None:
    config = BackendConfig().for_plan(b.plan([], service_cidrs=["10.100.0.0/24", "fd00:96::/108"]))
    base = render.base_objects(config)
    check = base["ip chain cluster-ips-check"]
    assert isinstance(check, render.Chain)
    assert check.rules == ("ip daddr @cluster-ips reject", "ip daddr 10.100.0.0/24 drop")
    config = BackendConfig(service_cidrs=(V4,)).for_plan(
        b.plan([], service_cidrs=["10.100.0.0/24"])
    )
    check = render.base_objects(config)["ip chain cluster-ips-check"]
    assert isinstance(check, render.Chain)
    assert check.rules[1:] == ("ip daddr 10.100.0.0/24 drop", "ip daddr 10.96.0.0/16 drop")
    # only the check chains differ from a base rendered with other service CIDRs
    plain = render.base_objects(BackendConfig(service_cidrs=(V4,)))
    differ = {k for k in base.keys() | plain.keys() if base[k].value != plain[k].value}
    chains = {k for k in differ if " chain " in k}
    assert chains == {"ip chain cluster-ips-check", "ip6 chain cluster-ips-check"}
    assert all(" element fingerprints " in k for k in differ - chains)  # theirs
    assert len(differ) == 4
