"""Which endpoints this node sends a service port's traffic to.

One pure function, :func:`categorize`, the counterpart of upstream kube-proxy's
``CategorizeEndpoints``:

* internal traffic (ClusterIP, from pods and the node) goes to the cluster-wide usable
  endpoints, or only to this node's under internalTrafficPolicy Local;
* external traffic (NodePort, LoadBalancer, externalIPs) goes to the cluster-wide set,
  or only to this node's under externalTrafficPolicy Local;
* "usable" means ready; when no endpoint is ready, serving-and-terminating endpoints
  are used instead (graceful termination), separately for the cluster-wide and the
  local set;
* topology: when the Service opts in (trafficDistribution, or the topology-mode
  annotation) and every usable endpoint carries zone hints and one of them names this
  node's zone, cluster-wide traffic keeps to the endpoints hinted for this zone.
"""

from __future__ import annotations

from kpy.core.model import Endpoint, NodeInfo, ServicePort, ServicePortState

TOPOLOGY_DISTRIBUTIONS = frozenset({"PreferClose", "PreferSameZone", "PreferSameNode"})
TOPOLOGY_MODES = frozenset({"auto", "Auto"})


def _usable(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """Ready endpoints, else the serving-and-terminating ones."""
    ready = tuple(ep for ep in endpoints if ep.ready)
    if ready:
        return ready
    return tuple(ep for ep in endpoints if ep.serving and ep.terminating)


def wants_topology(service: ServicePort) -> bool:
    return (
        service.traffic_distribution in TOPOLOGY_DISTRIBUTIONS
        or service.topology_mode in TOPOLOGY_MODES
    )


def _topology_filter(
    usable: tuple[Endpoint, ...], service: ServicePort, node: NodeInfo
) -> tuple[Endpoint, ...]:
    if not usable or not wants_topology(service):
        return usable
    if service.traffic_distribution == "PreferSameNode" and all(ep.node_hints for ep in usable):
        same_node = tuple(ep for ep in usable if node.name in ep.node_hints)
        if same_node:
            return same_node
    if node.zone is None:
        return usable
    if not all(ep.hints for ep in usable):
        return usable  # hints are all-or-nothing, as upstream
    same_zone = tuple(ep for ep in usable if node.zone in ep.hints)
    return same_zone or usable


def categorize(
    service: ServicePort,
    endpoints: tuple[Endpoint, ...],
    node: NodeInfo,
    *,
    presorted: bool = False,
) -> ServicePortState:
    """The node-local state of one service port. ``presorted``: ``endpoints`` are in
    :meth:`Endpoint.sort_key` order already (as :func:`kpy.core.convert.endpoints_for`
    returns them), so they are not sorted again."""
    if not presorted:
        endpoints = tuple(sorted(endpoints, key=Endpoint.sort_key))
    if not service.has_vip:
        return ServicePortState(service=service, endpoints=endpoints)
    cluster = _topology_filter(_usable(endpoints), service, node)
    name = node.name
    local = _usable(tuple(ep for ep in endpoints if ep.node_name == name))
    internal = local if service.internal_policy_local else cluster
    external = local if service.external_policy_local else cluster
    if not service.externally_accessible:
        external = ()
    return ServicePortState(
        service=service, endpoints=endpoints, internal=internal, external=external, local=local
    )
