"""kpy check without a lab: the catalog derived from examples/, the verdicts, the output.

The catalog comes from the same per-node Plans the agents compute; these tests pin
which checks the examples imply (so a Service type or policy that loses its check is
noticed) and how replies turn into pass/fail with a reason.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kpy.core.model import IPAddress
from kpy.tools import check
from kpy.tools.check import Expect, Probe, Reply

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


VIEW = check.ClusterView(
    nodes={
        "node-1": (ip("192.168.100.11"), ip("fd00:100::11")),
        "node-2": (ip("192.168.100.12"), ip("fd00:100::12")),
    },
    pods=tuple(
        check.PodInfo(f"pod-{i}{x}", f"node-{i}", (ip(f"10.244.{i}.{k}"), ip(f"fd00:244:{i}::{k}")))
        for i in (1, 2)
        for x, k in (("a", 2), ("b", 3))
    ),
    client_ips=(ip("192.168.100.100"), ip("fd00:100::100")),
    outside_ip=ip("203.0.113.100"),
)


@pytest.fixture(scope="module")
def checks() -> list[check.Check]:
    return check.catalog(check.plans([EXAMPLES], VIEW), VIEW, observed=lambda node, key: False)


def find(checks: list[check.Check], service: str, kind: str) -> list[check.Check]:
    names = (f"default/{service}:", f"default/{service}/")
    return [c for c in checks if c.service.startswith(names) and c.check == kind]


def test_every_semantic_of_the_examples_has_a_check(checks: list[check.Check]) -> None:
    assert Counter(c.check for c in checks) == {
        # 8 TCP Services with a VIP (dual-stack twice), from a pod on each node and each node
        "cluster-ip": 36,
        "udp": 4,
        "no-endpoints": 4,
        "load-spread": 6,
        "session-affinity": 1,
        "node-port": 6,  # three NodePort/LB Services x two nodes
        "source-ip-kept": 1,
        "load-balancer": 1,
        "source-ranges": 1,
        "external-ip": 1,
        "headless": 1,
        "external-name": 1,
    }


def test_internal_policy_local_expects_only_the_node_s_own_pod(checks: list[check.Check]) -> None:
    by_source = {c.source: c.expect for c in find(checks, "local-internal", "cluster-ip")}
    assert by_source["pod-1a (node-1)"] == Expect("answer", pods=frozenset({"pod-1a"}))
    assert by_source["pod-2a (node-2)"] == Expect("answer", pods=frozenset({"pod-2a"}))
    assert by_source["node-2"] == Expect("answer", pods=frozenset({"pod-2a"}))  # from the node too


def test_external_policy_local_drops_on_the_node_without_endpoints(
    checks: list[check.Check],
) -> None:
    ports = {c.source: c for c in find(checks, "local-external", "node-port")}
    assert ports["client → node-2"].expect == Expect("dropped")
    assert ports["client → node-2"].command == "curl -s -m 1 http://192.168.100.12:30082/"
    assert ports["client → node-1"].expect == Expect("answer", pods=frozenset({"pod-1a", "pod-1b"}))
    [kept] = find(checks, "local-external", "source-ip-kept")
    assert kept.expect is not None and kept.expect.client == "192.168.100.100"


def test_source_ranges_and_commands(checks: list[check.Check]) -> None:
    [blocked] = find(checks, "web-lb", "source-ranges")
    assert blocked.command == "curl -s -m 1 --interface 203.0.113.100 http://172.18.0.50:80/"
    assert blocked.expect == Expect("dropped")
    [dns] = [c for c in find(checks, "dns", "udp") if c.source == "pod-1a (node-1)"]
    assert dns.command == "echo hi | nc -u -W1 -w1 10.96.0.53 53"
    v6 = [c.command for c in find(checks, "web-dual", "cluster-ip")]
    assert "curl -s -m 2 http://[fd00:96::20]:80/" in v6
    [name] = find(checks, "external-name", "external-name")
    assert name.command == "dig +short CNAME external-name.default.svc.cluster.local"
    assert name.verify is not None and name.verify() == (
        True,
        "CNAME example.com; no virtual IP programmed on any node",
    )


def test_a_programmed_headless_service_fails() -> None:
    checks = check.catalog(check.plans([EXAMPLES], VIEW), VIEW, observed=lambda n, k: n == "node-2")
    [headless] = [c for c in checks if c.check == "headless"]
    assert headless.verify is not None
    assert headless.verify() == (False, "a virtual IP is programmed on node-2")


A, AB = frozenset({"a"}), frozenset({"a", "b"})
TIMEOUT = "no answer within 2s"


def answers(*pods: str, client: str = "10.244.1.2") -> list[Reply]:
    return [Reply("answer", pod, client) for pod in pods]


@pytest.mark.parametrize(
    ("expect", "replies", "ok", "reason"),
    [
        (Expect("answer", pods=AB), answers("a"), True, "answered by a"),
        (Expect("answer", pods=A), answers("b"), False, "answered by b, expected only a"),
        (Expect("answer"), [Reply("timeout")], False, f"expected an answer, got {TIMEOUT}"),
        (Expect("answer"), [Reply("refused")], False, "expected an answer, got refused"),
        (Expect("refused"), [Reply("refused", seconds=0.002)], True, "refused in 2 ms"),
        (Expect("refused"), [Reply("timeout", seconds=2)], False,
         f"expected a fast refusal, got {TIMEOUT}"),
        (Expect("dropped"), [Reply("timeout")], True, "no answer within 2s (dropped)"),
        (Expect("dropped"), answers("a"), False, "expected no answer (dropped), got answer from a"),
        (Expect("answer", pods=AB, every_pod=True), answers("a", "a", "a"), False,
         "3 connections never reached b (a 3)"),
        (Expect("answer", pods=AB, every_pod=True), answers("a", "b", "a"), True,
         "3 connections spread: a 2, b 1"),
        (Expect("answer", one_pod=True), answers("a", "b"), False, "not sticky: a 1, b 1"),
        (Expect("answer", one_pod=True), answers("b", "b"), True, "all 2 connections to b"),
        (Expect("answer", client="192.168.100.100"), answers("a", client="192.168.100.11"), False,
         "pod saw client 192.168.100.11, expected 192.168.100.100"),
        (Expect("answer"), [Reply("answer", "a"), Reply("timeout")], False,
         "expected an answer, got 1x answer from a, 1x no answer within 2s"),
    ],
    ids=[
        "answer-allowed", "answer-wrong-pod", "answer-timeout", "answer-refused", "refused-fast",
        "refused-slow", "dropped", "dropped-but-answered", "spread-missing", "spread-ok",
        "not-sticky", "sticky", "client-rewritten", "partial",
    ],
)  # fmt: skip
def test_evaluate(expect: Expect, replies: list[Reply], ok: bool, reason: str) -> None:
    assert check.evaluate(expect, replies, 2.0) == (ok, reason)


def test_probe_commands() -> None:
    assert Probe("p", "http", "10.96.0.10", 80).command() == "curl -s -m 2 http://10.96.0.10:80/"
    assert (
        Probe("p", "udp", "fd00:96::53", 53, count=3).command()
        == "for i in $(seq 3); do echo hi | nc -u -W1 -w1 fd00:96::53 53; done"
    )


class Scripted:
    """An executor answering from a script (the lab's is tested in tests/integration)."""

    def __init__(self, replies: dict[str, list[Reply]]) -> None:
        self.replies = replies

    def run(self, probe: Probe) -> list[Reply]:
        return self.replies[probe.host]


def test_results_render_as_a_matrix_and_as_json() -> None:
    checks = [
        check.Check("default/a:http/TCP", "cluster-ip", "pod-1a (node-1)", "curl x",
                    probe=Probe("pod-1a", "http", "10.96.0.1", 80), expect=Expect("answer")),
        check.Check("default/b:http/TCP", "no-endpoints", "pod-1a (node-1)", "curl y",
                    probe=Probe("pod-1a", "http", "10.96.0.2", 80), expect=Expect("refused")),
    ]  # fmt: skip
    executor = Scripted({"10.96.0.1": answers("pod-2a"), "10.96.0.2": [Reply("timeout")]})
    results = check.run_checks(checks, executor)
    assert [r.status for r in results] == ["pass", "fail"]
    text = check.table(results)
    assert "default/b:http/TCP  no-endpoints  pod-1a (node-1)  FAIL" in text
    assert "$ curl y" in text and text.endswith("1/2 checks passed, 1 FAILED")
    data = json.loads(check.to_json(results))
    assert data == {
        "results": [
            {"service": "default/a:http/TCP", "check": "cluster-ip", "source": "pod-1a (node-1)",
             "status": "pass", "reason": "answered by pod-2a"},
            {"service": "default/b:http/TCP", "check": "no-endpoints", "source": "pod-1a (node-1)",
             "status": "fail", "reason": "expected a fast refusal, got no answer within 2s"},
        ]
    }  # fmt: skip


HTTP = Probe("pod-1a", "http", "10.96.0.10", 80)
UDP = Probe("pod-1a", "udp", "10.96.0.53", 53)
ECHO = '{"pod": "pod-2a", "client": "10.244.1.2"}\n'


@pytest.mark.parametrize(
    ("probe", "rc", "out", "expected"),
    [
        (HTTP, 0, ECHO, Reply("answer", "pod-2a", "10.244.1.2")),
        (HTTP, 0, "<html>hello</html>", Reply("answer")),
        (HTTP, 7, "", Reply("refused")),
        (HTTP, 28, "", Reply("timeout")),
        (HTTP, 6, "", Reply("error", detail="curl exit status 6")),
        (UDP, 0, "pod-1b 10.244.1.2", Reply("answer", "pod-1b", "10.244.1.2")),
        (UDP, 0, "", Reply("timeout")),
        (UDP, 1, "", Reply("refused")),
    ],
    ids=["curl-echo", "curl-other-server", "curl-7", "curl-28", "curl-6", "nc-reply", "nc-silent",
         "nc-refused"],
)  # fmt: skip
def test_command_output_is_parsed(probe: Probe, rc: int, out: str, expected: Reply) -> None:
    assert check.parse_output(probe, rc, out, 0.0) == expected


def test_the_shell_executor_runs_the_single_command_count_times() -> None:
    calls: list[tuple[str, str]] = []

    def shell(source: str, command: str, timeout: float) -> tuple[int, str]:
        calls.append((source, command))
        return 0, '{"pod": "a", "client": "c"}'

    replies = check.ShellExecutor(shell).run(Probe("pod-1a", "http", "10.96.0.1", 80, count=3))
    assert [r.pod for r in replies] == ["a", "a", "a"]
    assert calls == [("pod-1a", "curl -s -m 2 http://10.96.0.1:80/")] * 3


def test_the_netshoot_pod_is_the_one_in_deploy() -> None:
    manifest = yaml.safe_load((EXAMPLES.parent / "deploy" / "netshoot.yaml").read_text())
    assert manifest == check.NETSHOOT_POD


def cluster_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return objects


NETSHOOT = check.PodInfo("kpy-netshoot", "node-2", (ip("10.244.2.9"),))


def scripted_dns(answers: dict[str, str]) -> check.Shell:
    def shell(source: str, command: str, timeout: float) -> tuple[int, str]:
        assert source == "kpy-netshoot"
        return 0, answers.get(command, "")

    return shell


def test_cluster_catalog_checks_what_one_pod_can_see() -> None:
    checks = check.cluster_catalog(cluster_objects(), NETSHOOT, scripted_dns({}))
    assert {c.check for c in checks} == {"cluster-ip", "udp", "no-endpoints", "headless",
                                         "external-name"}  # fmt: skip
    assert {c.source for c in checks} == {"kpy-netshoot"}
    # a real backend does not say who it is: any answer will do, except where there is none
    by = {(c.service.split(":")[0], c.command): c.expect for c in checks}
    assert by[("default/web", "curl -s -m 2 http://10.96.0.10:80/")] == Expect("answer")
    # internalTrafficPolicy Local from node-2: pod-2a is local, so it answers
    assert by[("default/local-internal", "curl -s -m 2 http://10.96.0.16:80/")] == Expect("answer")
    assert by[("default/no-endpoints", "curl -s -m 2 http://10.96.0.17:80/")] == Expect("refused")


def test_cluster_dns_checks_compare_dig_with_the_endpoints_and_the_cname() -> None:
    good = {
        "dig +short headless.default.svc.cluster.local": "10.244.2.2\n10.244.1.2\n",
        "dig +short CNAME external-name.default.svc.cluster.local": "example.com.\n",
    }
    checks = check.cluster_catalog(cluster_objects(), NETSHOOT, scripted_dns(good))
    dns = {c.check: c for c in checks if c.verify is not None}
    assert set(dns) == {"headless", "external-name"}
    assert dns["headless"].verify is not None and dns["external-name"].verify is not None
    assert dns["headless"].verify() == (True, "DNS answered 10.244.1.2, 10.244.2.2")
    assert dns["external-name"].verify() == (True, "DNS answered example.com")
    bad = check.cluster_catalog(cluster_objects(), NETSHOOT, scripted_dns({}))
    [headless] = [c for c in bad if c.check == "headless"]
    assert headless.verify is not None
    assert headless.verify() == (False, "DNS answered nothing, expected 10.244.1.2, 10.244.2.2")
