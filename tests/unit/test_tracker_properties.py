"""Property: the incremental tracker always ends where a fresh one fed the final objects ends.

Random sequences of Service and EndpointSlice upserts/deletes, with checkouts at random
points; after the last checkout, the state equals that of a brand-new tracker given
only the surviving objects, and applying every Plan's changes in order to an empty map
reproduces that state (what a backend programming only ``changed``/``removed`` holds).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kpy.core import convert
from kpy.core.model import ServiceName, ServicePortName, ServicePortState
from kpy.core.tracker import Tracker

NAMES = ["a", "b", "c"]


def service_obj(name: str, variant: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "clusterIP": f"10.96.0.{NAMES.index(name) + 1}",
            "ports": [{"name": "p", "port": 80 + variant, "protocol": ("TCP", "UDP")[variant % 2]}],
            "internalTrafficPolicy": ("Cluster", "Local")[variant // 2 % 2],
        },
    }


def slice_obj(name: str, owner: str, ips: list[int], ready: bool) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": owner},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "p", "port": 8080, "protocol": "TCP"},
            {"name": "p", "port": 8080, "protocol": "UDP"},
        ],
        "endpoints": [
            {
                "addresses": [f"10.244.0.{i}"],
                "nodeName": ("node-a", "node-b")[i % 2],
                "conditions": {"ready": ready},
            }
            for i in ips
        ],
    }


events = st.lists(
    st.one_of(
        st.tuples(st.just("svc"), st.sampled_from(NAMES), st.integers(0, 3)),
        st.tuples(st.just("del-svc"), st.sampled_from(NAMES)),
        st.tuples(
            st.just("slice"),
            st.sampled_from(["s1", "s2", "s3"]),
            st.sampled_from(NAMES),
            st.lists(st.integers(1, 6), max_size=3),
            st.booleans(),
        ),
        st.tuples(st.just("del-slice"), st.sampled_from(["s1", "s2", "s3"])),
        st.tuples(st.just("checkout")),
    ),
    max_size=40,
)


def feed(t: Tracker, event: tuple[Any, ...], live: dict[tuple[str, str], Any]) -> None:
    kind = event[0]
    if kind == "svc":
        svc, _ = convert.service(service_obj(event[1], event[2]))
        t.set_service(ServiceName(namespace="ns", name=event[1]), svc)
        live[("svc", event[1])] = svc
    elif kind == "del-svc":
        t.set_service(ServiceName(namespace="ns", name=event[1]), None)
        live.pop(("svc", event[1]), None)
    elif kind == "slice":
        eps, _ = convert.endpoint_slice(slice_obj(event[1], event[2], event[3], event[4]))
        t.set_slice("ns", event[1], eps)
        live[("slice", event[1])] = eps
    elif kind == "del-slice":
        t.set_slice("ns", event[1], None)
        live.pop(("slice", event[1]), None)


@settings(max_examples=300, deadline=None)
@given(events)
def test_incremental_equals_from_scratch(sequence: list[tuple[Any, ...]]) -> None:
    t = Tracker("node-a")
    live: dict[tuple[str, str], Any] = {}
    programmed: dict[ServicePortName, ServicePortState] = {}

    def checkout() -> None:
        plan = t.checkout()
        for key in plan.removed:
            programmed.pop(key, None)
        for key in plan.changed:
            programmed[key] = plan.services[key]
        assert dict(plan.services) == programmed

    for event in sequence:
        if event[0] == "checkout":
            checkout()
        else:
            feed(t, event, live)
    checkout()

    fresh = Tracker("node-a")
    for (kind, name), value in sorted(live.items()):
        if kind == "svc":
            fresh.set_service(ServiceName(namespace="ns", name=name), value)
        else:
            fresh.set_slice("ns", name, value)
    assert dict(fresh.checkout().services) == programmed
