"""Kubernetes JSON → model: every Service type, slices merged, bad input never raises."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpy.core import convert
from kpy.core.model import Protocol, ServiceType, SessionAffinity, TrafficPolicy
from kpy.testing import objects


def svc(**spec: Any) -> dict[str, Any]:
    base = objects.service()
    base["metadata"]["resourceVersion"] = "1"
    base["spec"].update({"clusterIPs": ["10.96.0.10"], **spec})
    return base


def eps(name: str = "web-1", service: str = "web", **extra: Any) -> dict[str, Any]:
    return {**objects.endpoint_slice(name, service, ["10.244.1.5"]), **extra}


def test_clusterip_service() -> None:
    result, problems = convert.service(svc())
    assert problems == ()
    assert result is not None
    (port,) = result.ports
    assert str(port.name) == "default/web:http/TCP"
    assert port.cluster_ips == (ipaddress.ip_address("10.96.0.10"),)
    assert port.port == 80 and port.protocol is Protocol.TCP and port.has_vip


def test_loadbalancer_with_everything() -> None:
    obj = svc(
        type="LoadBalancer",
        externalIPs=["192.0.2.1"],
        externalTrafficPolicy="Local",
        healthCheckNodePort=32000,
        loadBalancerSourceRanges=["203.0.113.0/24"],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "172.18.0.5"},
                {"ip": "172.18.0.6", "ipMode": "Proxy"},
                {"hostname": "lb.example"},
            ]
        }
    }
    result, problems = convert.service(obj)
    assert problems == ()
    assert result is not None
    (p,) = result.ports
    assert p.type is ServiceType.LOAD_BALANCER
    assert p.node_port == 30080
    assert [str(i) for i in p.load_balancer_ips] == ["172.18.0.5"]
    assert [str(i) for i in p.external_ips] == ["192.0.2.1"]
    assert [str(r) for r in p.load_balancer_source_ranges] == ["203.0.113.0/24"]
    assert p.session_affinity is SessionAffinity.CLIENT_IP and p.affinity_timeout == 60
    assert p.external_traffic_policy is TrafficPolicy.LOCAL and p.health_check_node_port == 32000


def test_headless_and_external_name_have_no_vip() -> None:
    headless, _ = convert.service(svc(clusterIP="None", clusterIPs=["None"]))
    cname, _ = convert.service(
        svc(
            type="ExternalName",
            externalName="db.example.com",
            clusterIP=None,
            clusterIPs=None,
            ports=None,
        )
    )
    assert headless is not None and cname is not None
    assert headless.ports[0].headless and not headless.ports[0].has_vip
    assert cname.ports[0].external_name == "db.example.com" and not cname.ports[0].has_vip


def test_dual_stack() -> None:
    result, _ = convert.service(
        svc(clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"])
    )
    assert result is not None
    assert [ip.version for ip in result.ports[0].cluster_ips] == [4, 6]


def test_other_proxys_service_is_skipped_silently() -> None:
    obj = svc()
    obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    assert convert.service(obj) == (None, ())


BAD_SERVICES = [
    (
        "invalid-cluster-ip",
        svc(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]),
        None,
        "not an IP",
    ),
    ("unknown-type", svc(type="Magic"), None, "not a Service type"),
    ("ports-not-a-list", svc(ports="80"), None, "not a list"),
    (
        "absurd-port-count",
        svc(ports=[{"name": f"p{i}", "port": i + 1} for i in range(300)]),
        None,
        "more than",
    ),
    (
        "port-out-of-range",
        svc(ports=[{"name": "a", "port": 70000}, {"name": "b", "port": 81}]),
        1,
        "out of range",
    ),
    (
        "unknown-protocol",
        svc(ports=[{"name": "a", "port": 80, "protocol": "ICMP"}]),
        0,
        "not TCP, UDP or SCTP",
    ),
    (
        "duplicate-port-name",
        svc(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        1,
        "duplicates",
    ),
    ("port-wrong-type", svc(ports=[{"name": "a", "port": "80"}]), 0, "not an integer"),
    ("bad-external-ip-dropped", svc(externalIPs=["nope", "192.0.2.1"]), 1, "not an IP"),
    (
        "bad-affinity-timeout",
        svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
        None,
        "timeoutSeconds",
    ),
    ("bad-policy", svc(externalTrafficPolicy="Sometimes"), None, "not Cluster or Local"),
]


@pytest.mark.parametrize(
    ("obj", "ports", "reason"), [r[1:] for r in BAD_SERVICES], ids=[r[0] for r in BAD_SERVICES]
)
def test_bad_services_are_reported_with_name_and_reason(
    obj: Any, ports: int | None, reason: str
) -> None:
    result, problems = convert.service(obj)
    assert problems, "a problem must be reported"
    assert all(p.namespace == "default" and p.name == "web" for p in problems)
    assert any(reason in p.reason for p in problems)
    if ports is None:
        assert result is None
    else:
        assert result is not None and len(result.ports) == ports


def test_slices_merge_dedupe_and_match_ports_by_name() -> None:
    service, _ = convert.service(
        svc(ports=[{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}])
    )
    assert service is not None
    a, _ = convert.endpoint_slice(
        eps(
            "a",
            endpoints=[
                {"addresses": ["10.244.1.5"], "conditions": {"ready": False}, "nodeName": "node-a"},
                {"addresses": ["10.244.1.6"], "nodeName": "node-a"},
            ],
        )
    )
    b, _ = convert.endpoint_slice(
        eps(
            "b",
            endpoints=[
                {"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "node-a"}
            ],
        )
    )
    v6, problems = convert.endpoint_slice(
        eps(
            "c",
            addressType="IPv6",
            endpoints=[{"addresses": ["fd00::5"]}, {"addresses": ["10.244.1.9"]}],
        )
    )
    assert a and b and v6
    assert len(problems) == 1 and "is not IPv6" in problems[0].reason
    http = convert.endpoints_for(service.ports[0], [a, b, v6])
    assert [(str(e.ip), e.ready) for e in http] == [
        ("10.244.1.5", True),
        ("10.244.1.6", True),
        ("fd00::5", True),
    ]
    assert convert.endpoints_for(service.ports[1], [a, b]) == ()


def test_slice_conditions_default_and_fqdn_ignored() -> None:
    s, _ = convert.endpoint_slice(eps(endpoints=[{"addresses": ["10.1.1.1"], "conditions": {}}]))
    assert s is not None and s.endpoints[0][0].ready and s.endpoints[0][0].serving
    assert not s.endpoints[0][0].terminating
    assert convert.endpoint_slice(eps(addressType="FQDN")) == (None, ())


def test_node() -> None:
    node, problems = convert.node(
        {
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "ExternalIP", "address": "198.51.100.1"},
                    {"type": "InternalIP", "address": "192.168.50.2"},
                    {"type": "InternalIP", "address": "garbage"},
                ]
            },
        }
    )
    assert node is not None
    assert [str(a) for a in node.addresses] == ["192.168.50.2", "198.51.100.1"]
    assert node.zone == "z1" and len(node.pod_cidrs) == 2
    assert len(problems) == 1


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 70000)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "10.96.0.1",
            "None",
            "fd00::1",
            "TCP",
            "UDP",
            "Local",
            "ClientIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "IPv4",
            "IPv6",
            "FQDN",
            "http",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "metadata",
                    "spec",
                    "status",
                    "name",
                    "namespace",
                    "ports",
                    "port",
                    "protocol",
                    "clusterIP",
                    "clusterIPs",
                    "type",
                    "nodePort",
                    "externalIPs",
                    "labels",
                    "endpoints",
                    "addresses",
                    "conditions",
                    "ready",
                    "addressType",
                    "loadBalancer",
                    "ingress",
                    "ip",
                    "sessionAffinity",
                    "sessionAffinityConfig",
                    "clientIP",
                    "timeoutSeconds",
                    "hints",
                    "forZones",
                    "podCIDRs",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_no_exception_escapes_convert(value: Any) -> None:
    for fn in (convert.service, convert.endpoint_slice, convert.node):
        result, problems = fn(copy.deepcopy(value))
        assert result is not None or problems or isinstance(value, dict)


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "type",
                "clusterIP",
                "ports",
                "externalIPs",
                "sessionAffinity",
                "externalTrafficPolicy",
                "loadBalancerSourceRanges",
            ]
        ),
        json_values,
        max_size=4,
    )
)
def test_no_exception_escapes_for_mutated_specs(spec: dict[str, Any]) -> None:
    obj = svc(**spec)
    obj["metadata"]["labels"] = {}
    convert.service(obj)


# --------------------------------------------------------------------------- names

NASTY_NAMES = [
    "Web",  # uppercase
    "web\n-A PREROUTING -j DNAT --to-destination 1.2.3.4",
    'web" -j ACCEPT #',
    "web;flush ruleset",
    "web}",
    "web#comment",
    "we\\b",
    "web\x00",
    "wéb",
    "-web",
    "web-",
    "a" * 64,
    "web.example",  # a subdomain, not a label
    "1web",  # a DNS-1123 label but not DNS-1035 (Services)
]


def _meta_with(obj: dict[str, Any], **meta: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].update(meta)
    return obj


@pytest.mark.parametrize("bad", NASTY_NAMES)
def test_service_names_must_be_dns_1035_labels(bad: str) -> None:
    result, problems = convert.service(_meta_with(svc(), name=bad))
    assert result is None
    (problem,) = problems
    assert problem.kind == "Service" and "metadata.name" in problem.reason
    assert "DNS-1035" in problem.reason
    # The Problem names the object readably, never with raw control characters.
    assert problem.name.isprintable() and len(problem.name) < 200
    assert "\n" not in problem.reason and "\x00" not in problem.reason


@pytest.mark.parametrize("bad", [*NASTY_NAMES[:-2], "kube.system"])
def test_namespaces_must_be_dns_1123_labels(bad: str) -> None:
    for convert_fn, obj in ((convert.service, svc()), (convert.endpoint_slice, eps())):
        result, problems = convert_fn(_meta_with(obj, namespace=bad))
        assert result is None
        assert len(problems) == 1 and "metadata.namespace" in problems[0].reason


@pytest.mark.parametrize("bad", [n for n in NASTY_NAMES if n not in ("web.example", "1web")])
def test_port_names_must_be_dns_1123_labels(bad: str) -> None:
    ports = [{"name": bad, "port": 80}, {"name": "ok", "port": 81}]
    result, problems = convert.service(svc(ports=ports))
    assert result is not None and [p.name.port for p in result.ports] == ["ok"]
    assert len(problems) == 1 and "spec.ports[0].name" in problems[0].reason
    slice_ports = [{"name": bad, "port": 8080}, {"name": "ok", "port": 8081}]
    parsed, problems = convert.endpoint_slice(eps(ports=slice_ports))
    assert parsed is not None and [p.name for p in parsed.ports] == ["ok"]
    assert len(problems) == 1 and "ports[0].name" in problems[0].reason


def test_valid_names_pass() -> None:
    ok = _meta_with(svc(), name="a" * 63, namespace="kube-system-2")
    result, problems = convert.service(ok)
    assert problems == () and result is not None
    slice_ok = _meta_with(eps(service="a" * 63), name="web-1.abc" + ".x" * 100)
    parsed, problems = convert.endpoint_slice(slice_ok)
    assert problems == () and parsed is not None
    assert convert.node({"metadata": {"name": "node-1.example.com"}})[0] is not None


@pytest.mark.parametrize(
    ("name", "label"),
    [("Web-1", "web"), ("web-1", "Web"), ("web-1", "web\n"), ("a" * 254, "web")],
)
def test_slice_name_and_service_label_validated(name: str, label: str) -> None:
    result, problems = convert.endpoint_slice(eps(name=name, service=label))
    assert result is None and len(problems) == 1


@pytest.mark.parametrize("bad", ["Node-1", "node_1", "node\n1", "a" * 254, ""])
def test_node_names_must_be_dns_1123_subdomains(bad: str) -> None:
    result, problems = convert.node({"metadata": {"name": bad}})
    assert result is None and len(problems) == 1


def test_endpoint_node_name_and_hostname_validated() -> None:
    endpoints = [
        {"addresses": ["10.244.1.5"], "nodeName": "Node A"},
        {"addresses": ["10.244.1.6"], "hostname": "pod.with.dots"},
        {"addresses": ["10.244.1.7"], "nodeName": "node-a", "hostname": "pod-7"},
    ]
    result, problems = convert.endpoint_slice(eps(endpoints=endpoints))
    assert result is not None and [str(e.ip) for e in result.endpoints[0]] == ["10.244.1.7"]
    assert len(problems) == 2


def test_external_name_validated() -> None:
    cname = svc(type="ExternalName", externalName="db.example.com.")
    del cname["spec"]["clusterIP"], cname["spec"]["clusterIPs"]
    assert convert.service(cname)[0] is not None
    cname["spec"]["externalName"] = "db example\ncom"
    result, problems = convert.service(cname)
    assert result is None and "spec.externalName" in problems[0].reason


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("endpoints", [{"addresses": ["10.0.0.1"]}] * 1001, "more than 1000"),
        ("ports", [{"name": f"p{i}", "port": i + 1} for i in range(257)], "more than 256"),
    ],
)
def test_oversized_slices_rejected(field: str, value: Any, reason: str) -> None:
    result, problems = convert.endpoint_slice(eps(**{field: value}))
    assert result is None and reason in problems[0].reason


def test_endpoint_limits_as_the_api_validates_them() -> None:
    endpoints = [
        {"addresses": ["10.0.0.1"] * 101},
        {"addresses": ["10.0.0.2"], "hints": {"forZones": [{"name": f"z{i}"} for i in range(9)]}},
        {"addresses": ["10.0.0.3"]},
    ]
    result, problems = convert.endpoint_slice(eps(endpoints=endpoints))
    assert result is not None and [str(e.ip) for e in result.endpoints[0]] == ["10.0.0.3"]
    assert len(problems) == 2


def test_duplicate_slice_ports_rejected() -> None:
    ports = [{"name": "http", "port": 8080}, {"name": "http", "port": 8081}]
    result, problems = convert.endpoint_slice(eps(ports=ports))
    assert result is not None and [p.port for p in result.ports] == [8080]
    assert "duplicates" in problems[0].reason


def test_huge_values_are_shown_short() -> None:
    result, problems = convert.service(svc(ports=[{"name": "a", "port": "9" * 100_000}]))
    assert result is not None and len(problems[0].reason) < 300
    result, problems = convert.service(_meta_with(svc(), name="x" * 1_000_000))
    assert result is None and len(problems[0].name) < 300 and len(problems[0].reason) < 500


def test_annotations_over_the_api_limit_rejected() -> None:
    obj = _meta_with(svc(), annotations={"kpy.io/x": "y" * (256 * 1024 + 1)})
    result, problems = convert.service(obj)
    assert result is None and "annotations" in problems[0].reason


@pytest.mark.parametrize(
    "text",
    [
        "10.244.1.5",
        "0.0.0.0",
        "255.255.255.255",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3.04",
        "1.2.3",
        "1.2.3.4.5",
        "1..3.4",
        " 1.2.3.4",
        "1.2.3.4 ",
        "1.2.3.4\n",
        "1.2.3.4\x00",
        "\u0661.2.3.4",  # an Arabic-Indic digit
        "0x1.2.3.4",
        "1.2.3.4/32",
        "::ffff:1.2.3.4",
        "",
    ],
)
def test_ipv4_fast_path_agrees_with_the_stdlib(text: str) -> None:
    try:
        expected: Any = ipaddress.ip_address(text)
    except ValueError:
        expected = None
    fast = convert._ipv4_fast(text)
    if expected is not None and expected.version == 4:
        assert fast == expected
    else:
        assert fast is None  # left to the stdlib, which decides


@given(st.ip_addresses(v=4).map(str) | st.text(alphabet="0123456789.x ", max_size=16))
@settings(max_examples=300)
def test_ipv4_fast_path_agrees_with_the_stdlib_on_generated_text(text: str) -> None:
    try:
        expected: Any = ipaddress.IPv4Address(text)
    except ValueError:
        expected = None
    assert convert._ipv4_fast(text) == expected


def test_endpoint_node_names_validated_after_a_valid_one_was_remembered() -> None:
    good = {"addresses": ["10.244.1.5"], "nodeName": "node-remembered"}
    bad = {"addresses": ["10.244.1.6"], "nodeName": "Node Remembered"}
    for _ in range(2):  # the second time the valid name comes from the remembered set
        result, problems = convert.endpoint_slice(eps(endpoints=[good, bad]))
        assert result is not None
        assert [(str(e.ip), e.node_name) for e in result.endpoints[0]] == [
            ("10.244.1.5", "node-remembered")
        ]
        assert len(problems) == 1 and "nodeName" in problems[0].reason
        assert "endpoints[1]" in problems[0].reason


def test_endpoints_for_sorts_and_keeps_the_best_ranked_duplicate() -> None:
    service, _ = convert.service(svc(ports=[{"name": "http", "port": 80}]))
    assert service is not None
    endpoints: list[dict[str, Any]] = [
        {"addresses": ["10.244.1.20"]},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": False, "serving": True}},
        {"addresses": ["fd00::1"]},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": True}},
    ]
    v4, _ = convert.endpoint_slice(
        eps("a", endpoints=[e for e in endpoints if "." in e["addresses"][0]])
    )
    v6, _ = convert.endpoint_slice(eps("b", addressType="IPv6", endpoints=[endpoints[2]]))
    assert v4 is not None and v6 is not None
    merged = convert.endpoints_for(service.ports[0], [v6, v4])
    assert [(str(e.ip), e.ready) for e in merged] == [
        ("10.244.1.3", True),
        ("10.244.1.20", True),
        ("fd00::1", True),
    ]
