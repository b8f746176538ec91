"""Hostile and broken input: what a manifest directory or an API server could hand kpy.

Each :class:`Case` is one file for the manifests source (``data``) and, where the API
could carry it, the objects for the fake API server (``api``). Every case sits beside
:data:`GOOD` — Services, EndpointSlices and the Node that must still be programmed —
and ``objects`` counts the hostile objects in it (a file that cannot be read is one).

The classes: bad names (injection attempts, wrong case, lengths, NUL, unicode, lone
surrogates, non-strings), bad IPs and CIDRs, ports out of range or of the wrong type,
duplicate ports, wrong types anywhere, huge lists, huge strings, deep nesting, invalid
UTF-8 and other encodings, YAML bombs, recursive aliases, merge-key bombs, unsafe
tags, unhashable keys, non-mapping documents, malformed Lists and JSON edge cases.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from kpy.testing.apiserver import RawJSON

NODE = "node-1"
NODE_IP = "192.168.100.11"

INJECT_IPT = "web\n-A PREROUTING -p tcp -j DNAT --to-destination 6.6.6.6:80"
INJECT_RESTORE = "web\nCOMMIT\n*nat\n-A PREROUTING -j DNAT --to-destination 6.6.6.6\nCOMMIT\n"
INJECT_NFT = "web; add table ip evil { chain c { type nat hook prerouting priority 0; } }"


def service(
    name: Any, ip: str, *, namespace: Any = "default", ports: Any = None, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": ip,
        "clusterIPs": [ip],
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    status = spec.pop("status", None)
    body.update(spec)
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }
    if status is not None:
        obj["status"] = status
    return obj


def endpoint_slice(
    name: Any,
    service_name: Any,
    *ips: str,
    namespace: Any = "default",
    ports: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips
        ],
    }
    obj.update(extra)
    return obj


def node() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "spec": {"podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


GOOD: list[dict[str, Any]] = [
    node(),
    service("good-a", "10.96.0.101"),
    endpoint_slice("good-a-1", "good-a", "10.244.1.11"),
    service(
        "good-b",
        "10.96.0.102",
        type="NodePort",
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30102}],
    ),
    endpoint_slice("good-b-1", "good-b", "10.244.1.12"),
    service(
        "good-c",
        "10.96.0.103",
        type="LoadBalancer",
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30103}],
        status={"loadBalancer": {"ingress": [{"ip": "172.18.0.103"}]}},
    ),
    endpoint_slice("good-c-1", "good-c", "10.244.1.13"),
]
# The service ports that must be programmed whatever sits beside them.
GOOD_PORTS = frozenset(f"default/good-{x}:http/TCP" for x in "abc")


@dataclass(frozen=True)
class Case:
    name: str
    cls: str  # the class of hostility
    data: bytes  # the manifest file
    suffix: str = ".yaml"
    objects: int = 1  # hostile objects tried (an unreadable file: 1)
    api: list[Any] = field(default_factory=list)  # for the fake API server
    warns: bool = True  # False: ignored by design (another node's Node object)


def _yaml(*objs: Any) -> bytes:
    return yaml.safe_dump_all(list(objs), allow_unicode=False).encode()


def _obj(name: str, cls: str, *objs: Any, fmt: str = "yaml") -> Case:
    data = (
        json.dumps({"kind": "List", "items": list(objs)}).encode()
        if fmt == "json"
        else _yaml(*objs)
    )
    suffix = ".json" if fmt == "json" else ".yaml"
    return Case(name, cls, data, suffix, len(objs), [copy.deepcopy(o) for o in objs])


def _file(name: str, cls: str, data: bytes, suffix: str = ".yaml", objects: int = 1) -> Case:
    return Case(name, cls, data, suffix, objects)


# Huge lists as JSON: YAML takes seconds to parse them (the YAML case of this class
# is slice-10000-endpoints), and the point is what convert does with them.
_AS_JSON = frozenset(("slice-30000-ports", "slice-hints-huge", "too-many-external-ips"))


def _format(name: str) -> str:
    return "json" if name in _AS_JSON else "yaml"


def _ip(i: int) -> str:
    return f"10.96.100.{i}"


def _names() -> list[Case]:
    bad = [
        ("svc-name-ipt-injection", INJECT_IPT),
        ("svc-name-restore-injection", INJECT_RESTORE),
        ("svc-name-nft-injection", INJECT_NFT),
        ("svc-name-quotes", 'web" -j ACCEPT -m comment --comment "x'),
        ("svc-name-brace-hash", "web } # flush ruleset"),
        ("svc-name-backslash", "we\\b\\"),
        ("svc-name-uppercase", "Web"),
        ("svc-name-starts-with-digit", "1web"),
        ("svc-name-64", "w" * 64),
        ("svc-name-300", "w" * 300),
        ("svc-name-unicode", "wéb-名前"),
        ("svc-name-spaces", "web server"),
        ("svc-name-dots", "web.example"),
    ]
    cases = [_obj(n, "name", service(v, _ip(i + 1))) for i, (n, v) in enumerate(bad)]
    cases += [
        _obj("svc-name-nul", "name", service("web\x00evil", _ip(20)), fmt="json"),
        _obj("svc-name-surrogate", "name", service("web\ud800", _ip(21)), fmt="json"),
        _obj("svc-name-int", "name", service(12345, _ip(22))),
        _obj("svc-name-list", "name", service(["a", "b"], _ip(23))),
        _obj("svc-name-map", "name", service({"a": 1}, _ip(24))),
        _obj("svc-name-empty", "name", service("", _ip(25))),
        _obj("ns-injection", "name", service("ns-bad", _ip(26), namespace=INJECT_IPT)),
        _obj("ns-dotted", "name", service("ns-bad2", _ip(27), namespace="kube.system")),
        _obj("ns-list", "name", service("ns-bad3", _ip(28), namespace=["x"])),
        _obj(
            "port-name-injection",
            "name",
            service("pn-bad", _ip(29), ports=[{"name": INJECT_IPT, "port": 80}]),
        ),
        _obj(
            "port-name-nft-injection",
            "name",
            service("pn-bad2", _ip(30), ports=[{"name": INJECT_NFT, "port": 80}]),
        ),
        _obj(
            "port-name-long",
            "name",
            service("pn-bad3", _ip(31), ports=[{"name": "p" * 64, "port": 80}]),
        ),
        _obj(
            "port-name-int",
            "name",
            service("pn-bad4", _ip(32), ports=[{"name": 80, "port": 80}]),
        ),
        _obj("slice-name-injection", "name", endpoint_slice(INJECT_NFT, "good-a", "10.244.1.91")),
        _obj("slice-label-injection", "name", endpoint_slice("sl-bad", INJECT_IPT, "10.244.1.92")),
        _obj(
            "slice-port-name-injection",
            "name",
            endpoint_slice(
                "sl-bad2", "good-a", "10.244.1.93", ports=[{"name": INJECT_IPT, "port": 8080}]
            ),
        ),
        _obj(
            "slice-node-name-injection",
            "name",
            endpoint_slice(
                "sl-bad3",
                "good-a",
                endpoints=[{"addresses": ["10.244.1.94"], "nodeName": INJECT_IPT}],
            ),
        ),
        Case(
            "node-name-injection",
            "name",
            _yaml({"kind": "Node", "metadata": {"name": INJECT_NFT}, "status": {}}),
            api=[{"kind": "Node", "metadata": {"name": INJECT_NFT}, "status": {}}],
            warns=False,
        ),
    ]
    return cases


def _values() -> list[Case]:
    def svc(i: int, **spec: Any) -> dict[str, Any]:
        return service(f"bad-{i}", _ip(100 + i), **spec)

    c = [
        ("cluster-ip-out-of-range", "ip", svc(1, clusterIP="10.96.0.300", clusterIPs=None)),
        ("cluster-ip-injection", "ip", svc(2, clusterIPs=["10.96.100.102 -j ACCEPT"])),
        ("cluster-ips-same-family", "ip", svc(3, clusterIPs=["10.96.100.103", "10.96.100.113"])),
        ("cluster-ip-int", "type", svc(4, clusterIPs=[167772160])),
        ("external-ip-injection", "ip", svc(5, externalIPs=["192.0.2.1\n-A INPUT -j ACCEPT"])),
        (
            "lb-ingress-injection",
            "ip",
            svc(
                6,
                type="LoadBalancer",
                status={"loadBalancer": {"ingress": [{"ip": "192.0.2.9; drop"}]}},
            ),
        ),
        (
            "source-range-injection",
            "ip",
            svc(7, type="LoadBalancer", loadBalancerSourceRanges=["0.0.0.0/0 } accept"]),
        ),
        ("port-zero", "port", svc(8, ports=[{"name": "a", "port": 0}])),
        ("port-65536", "port", svc(9, ports=[{"name": "a", "port": 65536}])),
        ("port-negative", "port", svc(10, ports=[{"name": "a", "port": -1}])),
        ("port-string", "port", svc(11, ports=[{"name": "a", "port": "80; drop"}])),
        ("port-float", "port", svc(12, ports=[{"name": "a", "port": 80.5}])),
        ("port-bool", "port", svc(13, ports=[{"name": "a", "port": True}])),
        ("port-huge-int", "port", svc(14, ports=[{"name": "a", "port": 10**30}])),
        (
            "node-port-out-of-range",
            "port",
            svc(15, type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 99999}]),
        ),
        (
            "duplicate-port-names",
            "duplicate",
            svc(16, ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        ),
        (
            "duplicate-port-numbers",
            "duplicate",
            svc(17, ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
        ),
        ("protocol-icmp", "type", svc(18, ports=[{"name": "a", "port": 80, "protocol": "ICMP"}])),
        ("spec-list", "type", svc(19) | {"spec": [1, 2]}),
        ("metadata-string", "type", svc(20) | {"metadata": "default/bad-20"}),
        ("ports-map", "type", svc(21, ports={"name": "a", "port": 80})),
        ("type-magic", "type", svc(22, type="Magic")),
        ("type-list", "type", svc(23, type=["ClusterIP"])),
        ("affinity-weird", "type", svc(24, sessionAffinity="Always")),
        (
            "affinity-timeout-string",
            "type",
            svc(
                25,
                sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": "10800"}},
            ),
        ),
        ("policy-weird", "type", svc(26, externalTrafficPolicy="Sometimes")),
        (
            "too-many-ports",
            "size",
            svc(27, ports=[{"name": f"p{i}", "port": i + 1} for i in range(300)]),
        ),
        (
            "too-many-external-ips",
            "size",
            svc(28, externalIPs=[f"192.0.2.{i % 250}" for i in range(10_000)]),
        ),
        (
            "annotations-huge",
            "size",
            svc(29)
            | {
                "metadata": {
                    "name": "bad-29",
                    "namespace": "default",
                    "annotations": {"a": "x" * 300_000},
                }
            },
        ),
        (
            "external-name-injection",
            "name",
            svc(30, type="ExternalName", externalName=INJECT_IPT, clusterIP=None, clusterIPs=None),
        ),
    ]
    cases = [_obj(n, cls, o, fmt=_format(n)) for n, cls, o in c]
    s = [
        (
            "slice-address-injection",
            "ip",
            endpoint_slice("es-1", "good-a", "10.244.1.5\n-A INPUT -j ACCEPT"),
        ),
        ("slice-address-v6-in-v4", "ip", endpoint_slice("es-2", "good-a", "fd00::5")),
        (
            "slice-address-type",
            "type",
            endpoint_slice("es-3", "good-a", "10.244.1.95", addressType="IPv7"),
        ),
        (
            "slice-endpoints-string",
            "type",
            endpoint_slice("es-4", "good-a", endpoints="10.244.1.96"),
        ),
        (
            "slice-conditions-string",
            "type",
            endpoint_slice(
                "es-5",
                "good-a",
                endpoints=[{"addresses": ["10.244.1.97"], "conditions": {"ready": "yes"}}],
            ),
        ),
        (
            "slice-port-out-of-range",
            "port",
            endpoint_slice(
                "es-6", "good-a", "10.244.1.98", ports=[{"name": "http", "port": 70000}]
            ),
        ),
        (
            "slice-duplicate-ports",
            "duplicate",
            endpoint_slice(
                "es-7",
                "good-a",
                "10.244.1.99",
                ports=[{"name": "http", "port": 8080}, {"name": "http", "port": 8081}],
            ),
        ),
        (
            "slice-10000-endpoints",
            "size",
            endpoint_slice(
                "es-8", "good-a", *(f"10.245.{i // 250}.{i % 250 + 1}" for i in range(10_000))
            ),
        ),
        (
            "slice-1000-addresses",
            "size",
            endpoint_slice("es-9", "good-a", endpoints=[{"addresses": ["10.244.1.100"] * 1000}]),
        ),
        (
            "slice-30000-ports",
            "size",
            endpoint_slice(
                "es-10",
                "good-a",
                "10.244.1.101",
                ports=[{"name": f"p{i}", "port": i % 65535 + 1} for i in range(30_000)],
            ),
        ),
        (
            "slice-hints-huge",
            "size",
            endpoint_slice(
                "es-11",
                "good-a",
                endpoints=[
                    {"addresses": ["10.244.1.102"], "hints": {"forZones": [{"name": "z"}] * 10_000}}
                ],
            ),
        ),
        (
            "node-addresses-garbage",
            "ip",
            {
                "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": "999.1.1.1"}] * 10},
            },
        ),
    ]
    cases += [_obj(n, cls, o, fmt=_format(n)) for n, cls, o in s]

    def cidr(name: Any, cidrs: Any) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": name},
            "spec": {"cidrs": cidrs},
        }

    cidrs = [
        ("servicecidr-rule-injection", "ip", cidr("bad-cidr-1", ["10.96.0.0/12 } accept"])),
        ("servicecidr-nft-injection", "ip", cidr("bad-cidr-2", ["0.0.0.0/0; flush ruleset"])),
        ("servicecidr-host-bits", "ip", cidr("bad-cidr-3", ["10.96.0.1/12"])),
        ("servicecidr-same-family", "ip", cidr("bad-cidr-4", ["10.96.0.0/12", "10.200.0.0/24"])),
        ("servicecidr-too-many", "type",
         cidr("bad-cidr-5", ["10.1.0.0/16", "fd00::/64", "10.2.0.0/16"])),
        ("servicecidr-not-a-list", "type", cidr("bad-cidr-6", {"cidr": "10.96.0.0/12"})),
        ("servicecidr-int", "type", cidr("bad-cidr-7", [167772160])),
        ("servicecidr-empty", "type", cidr("bad-cidr-8", [])),
        ("servicecidr-name-injection", "name", cidr(INJECT_NFT, ["10.96.0.0/12"])),
    ]  # fmt: skip
    cases += [_obj(n, cls, o) for n, cls, o in cidrs]
    return cases


def _files() -> list[Case]:
    deep = 100_000
    bomb = ["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    for i, (prev, cur) in enumerate(zip("abcdefgh", "bcdefghi", strict=True)):
        bomb.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
        del i
    merge = ["m0: &m0 {k0: v, k1: v}"]
    for i in range(1, 40):
        merge.append(f"m{i}: &m{i} {{<<: [*m{i - 1}], x{i}: *m{i - 1}, y{i}: *m{i - 1}}}")
    return [
        _file("deep-json", "depth", b"[" * deep + b"]" * deep, ".json"),
        _file(
            "deep-json-object",
            "depth",
            b'{"kind":"Service","spec":' + b'{"a":' * deep + b"1" + b"}" * deep + b"}",
            ".json",
        ),
        _file("deep-yaml-flow", "depth", b"a: " + b"[" * deep + b"]" * deep),
        _file(
            "deep-yaml-block",
            "depth",
            "".join("  " * i + f"k{i}:\n" for i in range(2_000)).encode() + b"  " * 2000 + b"x\n",
        ),
        _file("deep-yaml-900", "depth", b"kind: Service\nspec: " + b"[" * 900 + b"]" * 900 + b"\n"),
        _file("yaml-billion-laughs", "yaml", "\n".join(bomb).encode() + b"\n"),
        _file("yaml-merge-bomb", "yaml", "\n".join(merge).encode() + b"\n"),
        _file(
            "yaml-recursive-alias", "yaml", b"kind: Service\nmetadata: &m {name: loop, self: *m}\n"
        ),
        _file(
            "yaml-python-tag",
            "yaml",
            b"kind: Service\nmetadata: !!python/object/apply:os.system ['true']\n",
        ),
        _file("yaml-unhashable-key", "yaml", b"kind: Service\n? [a, b]\n: c\n"),
        _file("yaml-syntax-error", "yaml", b"kind: Service\nmetadata: {name: [unclosed\n"),
        _file("yaml-tabs", "yaml", b"kind: Service\nmetadata:\n\tname: tab\n"),
        _file(
            "yaml-binary-name",
            "yaml",
            b"kind: Service\nmetadata: {name: !!binary aGVsbG8=, namespace: default}\n",
        ),
        _file(
            "yaml-timestamp-name",
            "yaml",
            b"kind: Service\nmetadata: {name: 2024-01-01, namespace: default}\n",
        ),
        _file(
            "yaml-non-mapping-documents",
            "document",
            b"--- 42\n--- [1, 2]\n--- just text\n--- null\n",
            objects=3,
        ),
        _file(
            "yaml-list-bad-items",
            "document",
            b"kind: ServiceList\nitems: [1, two, [3]]\n",
            objects=1,
        ),
        _file("yaml-list-items-map", "document", b"kind: ServiceList\nitems: {a: b}\n"),
        _file("yaml-kind-map", "document", b"kind: {a: b}\nmetadata: {name: x}\n"),
        _file("yaml-many-documents", "document", b"---\n" * 50_000, objects=0),
        _file(
            "invalid-utf8",
            "encoding",
            b"kind: Service\nmetadata: {name: \xff\xfe\xfd, namespace: default}\n",
        ),
        _file("utf16-bom", "encoding", "kind: Service\nmetadata: {name: utf16}\n".encode("utf-16")),
        _file("binary-garbage", "encoding", bytes(range(256)) * 64),
        _file("empty-file", "document", b"", objects=0),
        _file("file-5-mib", "size", b"# " + b"x" * (5 << 20) + b"\n"),
        _file("json-trailing-garbage", "json", b'{"kind": "Service"} trailing', ".json"),
        _file(
            "json-nan-port",
            "json",
            json.dumps(
                service("nan-port", _ip(200), ports=[{"name": "a", "port": float("nan")}])
            ).encode(),
            ".json",
        ),
        _file(
            "json-5000-digit-port",
            "json",
            b'{"kind":"Service","metadata":{"name":"big-int","namespace":"default"},"spec":{"clusterIP":"10.96.100.201","ports":[{"port":'
            + b"9" * 5000
            + b"}]}}",
            ".json",
        ),
        _file(
            "json-duplicate-keys",
            "json",
            b'{"kind":"Service","metadata":{"name":"dup","name":"Dup!","namespace":"default"},"spec":{"clusterIP":"10.96.100.202","ports":[{"port":80}]}}',
            ".json",
        ),
    ]


def _api_only() -> list[Case]:
    deep = "[" * 100_000 + "]" * 100_000
    return [
        Case(
            "api-deep-spec",
            "depth",
            b"",
            objects=1,
            api=[service("deep-spec", _ip(210)) | {"spec": RawJSON(deep)}],
        ),
        Case(
            "api-deep-annotation",
            "depth",
            b"",
            objects=1,
            api=[
                endpoint_slice("deep-slice", "good-a", "10.244.1.103")
                | {"endpoints": RawJSON(deep)}
            ],
        ),
    ]


def cases() -> list[Case]:
    return [*_names(), *_values(), *_files(), *_api_only()]
