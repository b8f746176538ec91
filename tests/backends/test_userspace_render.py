"""The userspace render: which addresses, listeners and dispositions a service port needs."""

from __future__ import annotations

import ipaddress

import pytest
from kpy_userspace import render
from kpy_userspace.filters import filter_program

from kpy.core.backend import BackendConfig, desired_view
from kpy.testing import builders as b

NODE = b.node()


def keys(table: render.PortTable) -> dict[str, str]:
    return {str(fe.key): str(table.disposition(fe)) for fe in table.frontends}


def test_every_kind_of_frontend() -> None:
    state = b.state(
        b.service(
            "lb",
            cluster_ip="10.96.0.12",
            type="LoadBalancer",
            node_port=30081,
            lb_ips=["172.18.0.50"],
            external_ips=["192.0.2.10"],
            source_ranges=["203.0.113.0/24"],
        ),
        [b.endpoint("10.244.1.8")],
        NODE,
    )
    table = render.port_table(state)
    assert table is not None
    assert keys(table) == {
        "10.96.0.12:80/TCP/v4": "forward",
        "192.0.2.10:80/TCP/v4": "forward",
        "172.18.0.50:80/TCP/v4": "forward",
        "*:30081/TCP/v4": "forward",
    }
    lb = next(fe for fe in table.frontends if fe.key.address == "172.18.0.50")
    assert lb.source_ranges == (ipaddress.ip_network("203.0.113.0/24"),)
    assert table.addresses == {
        ipaddress.ip_address(a) for a in ("10.96.0.12", "172.18.0.50", "192.0.2.10")
    }
    assert table.view == desired_view(state)


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        pytest.param([], {"cluster": "reject", "nodeport": "reject"}, id="none-anywhere-reject"),
        pytest.param(
            [b.endpoint("10.244.2.11", node="node-b")],
            {"cluster": "forward", "nodeport": "drop"},
            id="etp-local-remote-only-drop",
        ),
        pytest.param(
            [b.endpoint("10.244.1.10")],
            {"cluster": "forward", "nodeport": "forward"},
            id="local-endpoint-forward",
        ),
    ],
)
def test_reject_versus_drop(endpoints: list, expected: dict[str, str]) -> None:  # type: ignore[type-arg]
    state = b.state(
        b.service(
            "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
        ),
        endpoints,
        NODE,
    )
    table = render.port_table(state)
    assert table is not None
    got = keys(table)
    assert got["10.96.0.13:80/TCP/v4"] == expected["cluster"]
    assert got["*:30082/TCP/v4"] == expected["nodeport"]
    # reject needs no socket: the kernel answers for an address nobody listens on
    assert {str(fe.key) for fe in table.listening()} == {k for k, v in got.items() if v != "reject"}


def test_nodeport_addresses_narrow_the_listeners() -> None:
    config = BackendConfig(
        node_ips=(ipaddress.ip_address("192.168.50.2"), ipaddress.ip_address("10.0.0.2")),
        nodeport_addresses=(ipaddress.ip_network("192.168.50.0/24"),),
    )
    state = b.state(
        b.service("np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080),
        [b.endpoint("10.244.1.7")],
        NODE,
    )
    table = render.port_table(state, nodeport_addresses=render.nodeport_addresses(config))
    assert table is not None
    assert "192.168.50.2:30080/TCP/v4" in keys(table)
    assert "10.0.0.2:30080/TCP/v4" not in keys(table)
    assert render.nodeport_addresses(BackendConfig()) is None


def test_no_table_without_a_vip() -> None:
    assert render.port_table(b.state(b.service("h", cluster_ip=None), [], NODE)) is None


def test_source_range_filter_program() -> None:
    insns = filter_program(4, (ipaddress.ip_network("192.168.50.0/24"),))
    # load source, mask, compare, accept; then drop
    assert len(insns) == 5
    assert insns[-1] == b"\x06\x00\x00\x00\x00\x00\x00\x00"
    assert len(filter_program(6, None)) == 1  # drop everything
