"""Endpoint selection, one row per rule (upstream's CategorizeEndpoints table)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kpy.core import endpoints as select
from kpy.core.model import Endpoint, ServicePort
from kpy.testing import builders as b

LOCAL = "node-a"


def ep(
    ip: str,
    *,
    node: str = LOCAL,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    hints: tuple[str, ...] = (),
) -> Endpoint:
    return b.endpoint(
        ip, node=node, ready=ready, serving=serving, terminating=terminating, hints=hints
    )


@dataclass(frozen=True)
class Row:
    id: str
    service: ServicePort
    endpoints: tuple[Endpoint, ...]
    internal: set[str]
    external: set[str]
    zone: str | None = None


def np_service(*, etp_local: bool = False, itp_local: bool = False) -> ServicePort:
    return b.service(type="NodePort", node_port=30080, etp_local=etp_local, itp_local=itp_local)


ROWS = [
    Row(
        "cluster-all-ready",
        b.service(),
        (ep("10.0.0.1"), ep("10.0.0.2", node="node-b")),
        {"10.0.0.1", "10.0.0.2"},
        set(),
    ),
    Row(
        "not-ready-excluded",
        b.service(),
        (ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False)),
        {"10.0.0.1"},
        set(),
    ),
    Row(
        "terminating-fallback-when-nothing-ready",
        b.service(),
        (
            ep("10.0.0.1", ready=False, serving=True, terminating=True),
            ep("10.0.0.2", ready=False, serving=False, terminating=True),
        ),
        {"10.0.0.1"},
        set(),
    ),
    Row(
        "terminating-ignored-when-something-ready",
        b.service(),
        (ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=True, terminating=True)),
        {"10.0.0.1"},
        set(),
    ),
    Row("no-endpoints-means-reject", b.service(), (), set(), set()),
    Row(
        "etp-cluster-external-uses-all",
        np_service(),
        (ep("10.0.0.1"), ep("10.0.0.2", node="node-b")),
        {"10.0.0.1", "10.0.0.2"},
        {"10.0.0.1", "10.0.0.2"},
    ),
    Row(
        "etp-local-external-uses-local-only",
        np_service(etp_local=True),
        (ep("10.0.0.1"), ep("10.0.0.2", node="node-b")),
        {"10.0.0.1", "10.0.0.2"},
        {"10.0.0.1"},
    ),
    Row(
        "etp-local-without-local-endpoint-drops",
        np_service(etp_local=True),
        (ep("10.0.0.2", node="node-b"),),
        {"10.0.0.2"},
        set(),
    ),
    Row(
        "etp-local-terminating-local-fallback",
        np_service(etp_local=True),
        (
            ep("10.0.0.1", ready=False, serving=True, terminating=True),
            ep("10.0.0.2", node="node-b"),
        ),
        {"10.0.0.2"},
        {"10.0.0.1"},
    ),
    Row(
        "etp-local-ignored-for-clusterip-only",
        b.service(etp_local=True),
        (ep("10.0.0.2", node="node-b"),),
        {"10.0.0.2"},
        set(),
    ),
    Row(
        "itp-local-internal-uses-local-only",
        b.service(itp_local=True),
        (ep("10.0.0.1"), ep("10.0.0.2", node="node-b")),
        {"10.0.0.1"},
        set(),
    ),
    Row(
        "itp-local-without-local-endpoint-rejects",
        b.service(itp_local=True),
        (ep("10.0.0.2", node="node-b"),),
        set(),
        set(),
    ),
    Row(
        "itp-local-etp-cluster-external-uses-all",
        np_service(itp_local=True),
        (ep("10.0.0.1"), ep("10.0.0.2", node="node-b")),
        {"10.0.0.1"},
        {"10.0.0.1", "10.0.0.2"},
    ),
    Row(
        "topology-same-zone",
        b.service(traffic_distribution="PreferClose"),
        (ep("10.0.0.1", hints=("z1",)), ep("10.0.0.2", hints=("z2",))),
        {"10.0.0.1"},
        set(),
        "z1",
    ),
    Row(
        "topology-ignored-without-opt-in",
        b.service(),
        (ep("10.0.0.1", hints=("z1",)), ep("10.0.0.2", hints=("z2",))),
        {"10.0.0.1", "10.0.0.2"},
        set(),
        "z1",
    ),
    Row(
        "topology-all-when-some-lack-hints",
        b.service(traffic_distribution="PreferClose"),
        (ep("10.0.0.1", hints=("z1",)), ep("10.0.0.2")),
        {"10.0.0.1", "10.0.0.2"},
        set(),
        "z1",
    ),
    Row(
        "topology-all-when-no-hint-for-zone",
        b.service(traffic_distribution="PreferClose"),
        (ep("10.0.0.1", hints=("z2",)), ep("10.0.0.2", hints=("z2",))),
        {"10.0.0.1", "10.0.0.2"},
        set(),
        "z1",
    ),
    Row(
        "headless-has-no-traffic-sets", b.service(cluster_ip=None), (ep("10.0.0.1"),), set(), set()
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_categorize(row: Row) -> None:
    node = b.node(LOCAL, zone=row.zone)
    state = select.categorize(row.service, row.endpoints, node)
    assert {str(e.ip) for e in state.internal} == row.internal
    assert {str(e.ip) for e in state.external} == row.external
    assert len(state.endpoints) == len(row.endpoints)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_categorize_presorted_is_categorize_of_sorted_endpoints(row: Row) -> None:
    node = b.node(LOCAL, zone=row.zone)
    shuffled = tuple(reversed(row.endpoints))
    in_order = tuple(sorted(row.endpoints, key=Endpoint.sort_key))
    expected = select.categorize(row.service, shuffled, node)
    assert select.categorize(row.service, in_order, node, presorted=True) == expected
    assert expected.endpoints == in_order
