"""The fake API server's resources, JSON encoding and API errors (Status objects)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


class RawJSON:
    """A value served as ``text``, verbatim, wherever it sits in an object (tests only:
    ``text`` need not be JSON a client can decode)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __deepcopy__(self, memo: dict[int, Any]) -> RawJSON:
        return self


def dumps(value: Any) -> bytes:
    """Compact JSON, with every :class:`RawJSON` written as its text."""
    raws: list[str] = []

    def default(o: Any) -> str:
        if isinstance(o, RawJSON):
            raws.append(o.text)
            return f"\0raw{len(raws) - 1}\0"
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    text = json.dumps(value, separators=(",", ":"), default=default)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\0raw{i}\0"), raw, 1)
    return text.encode()


@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource type the server serves."""

    group: str  # "" is the core group
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


SERVICES = Resource("", "v1", "services", "Service", True)
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)
NODES = Resource("", "v1", "nodes", "Node", False)
EVENTS = Resource("", "v1", "events", "Event", True)
SERVICE_CIDRS = Resource("networking.k8s.io", "v1", "servicecidrs", "ServiceCIDR", False)
RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES, EVENTS, SERVICE_CIDRS)
BY_KIND = {r.kind: r for r in RESOURCES}

VERSION_INFO = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kpy-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class ApiError(Exception):
    """An error answered as a ``Status`` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: JSON | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> JSON:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    """A failure ``Status`` as the API server writes it (api-conventions "Response Status Kind")."""
    out: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


def _not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{resource.plural} "{name}" not found',
        details={"name": name, "group": resource.group, "kind": resource.plural},
    )


def _expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
