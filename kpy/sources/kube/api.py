"""What kpy asks the Kubernetes API for (paths, selectors, permissions, limits) and how
it fails (errors with the API's status)."""

from __future__ import annotations

import json
from typing import Any

from kpy import __version__
from kpy.core.model import ConfigError

JSON = dict[str, Any]

# What the agent needs from RBAC: (apiGroup, resource, verbs). The deploy manifests'
# ClusterRole is checked against this.
REQUIRED_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "services", ("list", "watch")),
    ("discovery.k8s.io", "endpointslices", ("list", "watch")),
    ("", "nodes", ("list", "watch")),
    ("networking.k8s.io", "servicecidrs", ("list", "watch")),
    ("", "events", ("create", "patch")),
)

SERVICES_PATH = "/api/v1/services"
ENDPOINT_SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
NODES_PATH = "/api/v1/nodes"
SERVICE_CIDRS_PATH = "/apis/networking.k8s.io/v1/servicecidrs"
USER_AGENT = f"kpy/{__version__}"
# What kube-proxy asks the API server to leave out of its Services and EndpointSlices
# (cmd/kube-proxy/app/server.go): another proxy's objects, and the EndpointSlices of
# headless Services. The selector is evaluated server-side, on lists and watches alike; an
# object that gains one of these labels arrives as DELETED. kpy.core.convert still checks the
# proxy name itself.
IGNORED_LABEL_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

# Size guards. The API server stores objects up to ~1.5 MiB (etcd's request limit) and
# lists in pages (``page_size`` objects): anything far beyond is not a Kubernetes answer.
MAX_EVENT_BYTES = 16 << 20  # one watch event; a longer one is skipped with a warning
MAX_LIST_BYTES = 1 << 30  # one list page


class KubeConfigError(ConfigError):
    """No usable API server configuration; the message says what was tried or what failed."""


class ApiStatusError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: bytes, retry_after: float | None) -> None:
        self.status = status
        self.retry_after = retry_after
        self.reason, self.message = _status_reason(body)
        super().__init__(f"HTTP {status} {self.reason}: {self.message}")


class ProtocolError(Exception):
    """The response was not valid HTTP/1.1 or not the JSON expected."""


def _status_reason(body: bytes) -> tuple[str, str]:
    try:
        status = json.loads(body)
        return str(status.get("reason", "")), str(status.get("message", ""))
    except (ValueError, AttributeError):
        return "", body[:200].decode("utf-8", "replace")
