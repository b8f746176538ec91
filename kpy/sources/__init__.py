"""Where Kubernetes objects come from: the API server (``kube``) or a directory (``manifests``).

Every source emits the same :class:`Event` values into a :class:`Sink`; the agent turns
them into tracker updates. Objects are raw Kubernetes JSON (dicts as the API returns
them) — conversion to kpy's model happens in :mod:`kpy.core.convert`, never here.

A source calls ``sink.synced()`` once every resource kind has been listed completely;
until then nothing is programmed, so a partial view never removes a working Service.
After a relist, the source emits DELETED events for objects that vanished meanwhile.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class Kind(enum.StrEnum):
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NODE = "Node"
    SERVICE_CIDR = "ServiceCIDR"


# Kinds without a namespace: their events carry namespace "".
CLUSTER_SCOPED = frozenset({Kind.NODE, Kind.SERVICE_CIDR})


class EventType(enum.StrEnum):
    UPSERT = "UPSERT"  # ADDED or MODIFIED
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    kind: Kind
    type: EventType
    namespace: str  # "" for cluster-scoped objects (Node, ServiceCIDR)
    name: str
    obj: dict[str, Any]  # the object as the API returns it (for DELETE: its last state)


class Sink(Protocol):
    """Receives events; handlers only record them and mark work pending."""

    def event(self, event: Event) -> None: ...

    def synced(self) -> None:
        """Every kind has been listed at least once: the state is complete."""
        ...

    def connection(self, healthy: bool, reason: str = "") -> None:
        """The source lost or regained its upstream (for health and logs)."""
        ...


class Source(Protocol):
    async def run(self, sink: Sink) -> None:
        """Feed the sink until cancelled. Never returns on its own in normal operation."""
        ...


class SourceMetrics(Protocol):
    """What a source reports about its connection to the API server.

    ``resource`` is the plural resource name (``services``, ``endpointslices``,
    ``nodes``, ``servicecidrs``).
    """

    def watch_reconnected(self, resource: str) -> None:
        """A watch ended (timeout, error, closed) and was started again."""
        ...

    def relisted(self, resource: str) -> None:
        """The resource was listed again from scratch (first list, 410 Gone, error)."""
        ...
