"""Frontend conflicts: the address the cluster allocated wins, whatever the names say.

The CVE-2020-8554 class: a Service in another namespace lists someone else's ClusterIP
in ``externalIPs``. Before, the claim went to whichever service port sorted first by
name, so an attacker picked a name that sorts early and took the traffic over.
"""

from __future__ import annotations

from typing import Any

from kpy.core import convert
from kpy.core.model import Plan, ServiceName, ServicePortName
from kpy.core.tracker import Tracker


def _svc(
    namespace: str,
    name: str,
    *,
    cluster_ip: str,
    external_ips: tuple[str, ...] = (),
    lb_ip: str | None = None,
    node_port: int | None = None,
    created: str | None = None,
    port: int = 80,
) -> convert.Service:
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    if created is not None:
        obj["metadata"]["creationTimestamp"] = created
    if node_port is not None:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = node_port
    if lb_ip is not None:
        spec["type"] = "LoadBalancer"
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    result, problems = convert.service(obj)
    assert result is not None and not problems, problems
    return result


def _port(namespace: str, name: str) -> ServicePortName:
    return ServicePortName(namespace=namespace, name=name, port="http", protocol="TCP")  # type: ignore[arg-type]


def _set(t: Tracker, svc: convert.Service) -> None:
    t.set_service(svc.name, svc)


def _frontends(plan: Plan, port: ServicePortName) -> set[str]:
    s = plan.services[port].service
    return {str(ip) for ip in (*s.cluster_ips, *s.external_ips, *s.load_balancer_ips)}


VICTIM = _port("prod", "web")
ATTACKER = _port("aaa", "aaa")  # sorts before the victim by every name


def test_external_ip_naming_another_services_cluster_ip_does_not_take_it_over() -> None:
    t = Tracker("node-a")
    _set(t, _svc("prod", "web", cluster_ip="10.96.0.10"))
    t.checkout()
    # Created later, in another namespace, with a name that sorts first.
    _set(t, _svc("aaa", "aaa", cluster_ip="10.96.0.99", external_ips=("10.96.0.10",)))
    plan = t.checkout()
    assert _frontends(plan, VICTIM) == {"10.96.0.10"}
    assert _frontends(plan, ATTACKER) == {"10.96.0.99"}  # served without the stolen address
    assert ATTACKER in plan.changed and VICTIM not in plan.changed
    (conflict,) = plan.conflicts[ATTACKER]
    assert conflict.frontend == "10.96.0.10:80/TCP"
    assert (conflict.claimed_as, conflict.held_by, conflict.held_as) == (
        "ExternalIP",
        VICTIM,
        "ClusterIP",
    )
    assert VICTIM not in plan.conflicts


def test_allocated_address_wins_even_when_the_external_ip_came_first() -> None:
    # The attacker's externalIP is there first; the victim's ClusterIP appears later (an
    # allocator reusing a freed address): the allocated address takes the frontend back.
    t = Tracker("node-a")
    _set(t, _svc("aaa", "aaa", cluster_ip="10.96.0.99", external_ips=("10.96.0.10",)))
    first = t.checkout()
    assert _frontends(first, ATTACKER) == {"10.96.0.99", "10.96.0.10"}
    _set(t, _svc("prod", "web", cluster_ip="10.96.0.10"))
    plan = t.checkout()
    assert plan.changed == {VICTIM, ATTACKER}  # the loser is re-programmed without it
    assert _frontends(plan, VICTIM) == {"10.96.0.10"}
    assert _frontends(plan, ATTACKER) == {"10.96.0.99"}
    # The victim goes away: the external IP is the attacker's to serve again.
    t.set_service(ServiceName(namespace="prod", name="web"), None)
    plan = t.checkout()
    assert plan.removed == {VICTIM} and plan.changed == {ATTACKER}
    assert _frontends(plan, ATTACKER) == {"10.96.0.99", "10.96.0.10"}
    assert not plan.conflicts


def test_load_balancer_ingress_beats_external_ip() -> None:
    t = Tracker("node-a")
    _set(t, _svc("aaa", "aaa", cluster_ip="10.96.0.99", external_ips=("203.0.113.7",)))
    _set(t, _svc("prod", "web", cluster_ip="10.96.0.10", lb_ip="203.0.113.7"))
    plan = t.checkout()
    assert _frontends(plan, VICTIM) == {"10.96.0.10", "203.0.113.7"}
    assert _frontends(plan, ATTACKER) == {"10.96.0.99"}
    assert plan.conflicts[ATTACKER][0].held_as == "LoadBalancer"


def test_same_kind_goes_to_the_older_service_then_the_name() -> None:
    t = Tracker("node-a")
    _set(
        t,
        _svc("zzz", "old", cluster_ip="10.96.0.1", node_port=30080, created="2026-01-01T00:00:00Z"),
    )
    _set(
        t,
        _svc("aaa", "new", cluster_ip="10.96.0.2", node_port=30080, created="2026-06-01T00:00:00Z"),
    )
    plan = t.checkout()
    old, new = _port("zzz", "old"), _port("aaa", "new")
    assert plan.services[old].service.node_port == 30080
    assert plan.services[new].service.node_port is None
    assert plan.conflicts[new][0].frontend == "*:30080/TCP"
    # Without creation times the name decides (a stable, documented order).
    t2 = Tracker("node-a")
    _set(t2, _svc("zzz", "old", cluster_ip="10.96.0.1", node_port=30080))
    _set(t2, _svc("aaa", "new", cluster_ip="10.96.0.2", node_port=30080))
    plan2 = t2.checkout()
    assert plan2.services[new].service.node_port == 30080
    assert plan2.services[old].service.node_port is None


def test_different_port_or_protocol_is_no_conflict() -> None:
    t = Tracker("node-a")
    _set(t, _svc("prod", "web", cluster_ip="10.96.0.10"))
    _set(t, _svc("aaa", "aaa", cluster_ip="10.96.0.99", external_ips=("10.96.0.10",), port=8443))
    plan = t.checkout()
    assert _frontends(plan, ATTACKER) == {"10.96.0.99", "10.96.0.10"}
    assert not plan.conflicts


def test_an_unrelated_change_does_not_recheck_every_port() -> None:
    t = Tracker("node-a")
    for i in range(200):
        _set(t, _svc("ns", f"s{i}", cluster_ip=f"10.96.1.{i}"))
    _set(t, _svc("aaa", "aaa", cluster_ip="10.96.0.99", external_ips=("10.96.1.7",)))
    t.checkout()
    _set(t, _svc("ns", "s42", cluster_ip="10.96.1.42", port=81))
    plan = t.checkout()
    assert plan.changed == {_port("ns", "s42")}
    assert set(plan.conflicts) == {ATTACKER}  # still reported, untouched
