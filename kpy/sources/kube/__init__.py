"""The Kubernetes API as a source: list + watch Services, EndpointSlices, this node's Node
and the cluster's ServiceCIDRs.

One reflector per resource, with the semantics a production node agent needs
(Kubernetes API concepts, "Efficient detection of changes"):

* list, then watch from the list's resourceVersion with ``allowWatchBookmarks=true``;
  the newest resourceVersion seen (event or BOOKMARK) is where a re-watch starts;
* ``410 Gone`` (an HTTP 410 or an ERROR event with code 410) means the history is gone:
  relist and reconcile — objects missing from the new list are emitted as DELETE, so
  Services deleted while disconnected disappear;
* connection errors, 5xx and 429 are retried with jittered exponential backoff
  (``Retry-After`` respected); a watch is renewed before the server closes it
  (``timeoutSeconds`` below the server's limit) and abandoned if it goes silent past
  its deadline;
* ``sink.synced()`` only after Services, EndpointSlices, ServiceCIDRs and the Node have
  each been listed once (and the Node exists, or ``node_grace`` has passed), so a
  partial view is never programmed (an API server without the ServiceCIDR kind, or a
  ClusterRole without it, counts as none: see :attr:`Reflector.optional`); losing the
  API server only reports ``sink.connection(False, ...)``
  — nothing is deleted because the API is gone;
* an object without usable metadata is skipped with a structured warning naming it;
* Services and EndpointSlices are selected as kube-proxy selects them
  (:data:`IGNORED_LABEL_SELECTOR`): another proxy's, and headless Services' slices, are
  left out by the API server, and one that gains such a label is DELETED by the watch.

Configuration is read as the official ``kubernetes`` client reads it (in-cluster service
account, a kubeconfig, or an explicit ``--master``: :mod:`kpy.sources.kubeconfig`, the
client itself only for exec plugins and auth providers); the HTTP is kpy's own, on asyncio
streams (lists on a kept-alive connection per reflector, each watch on its own), and
objects are decoded as raw JSON — see docs/decisions/kube-transport.md.

The package: :mod:`~kpy.sources.kube.api` (paths, selectors, permissions, limits, errors),
:mod:`~kpy.sources.kube.config` (where the API server is, how to authenticate),
:mod:`~kpy.sources.kube.http` (the HTTP/1.1 client), :mod:`~kpy.sources.kube.backoff`,
:mod:`~kpy.sources.kube.lists` (list pages split into items),
:mod:`~kpy.sources.kube.reflector` (one resource's list + watch) and
:mod:`~kpy.sources.kube.source` (:class:`KubeSource`); this module names the public parts.
"""

from __future__ import annotations

from kpy.sources.kube.api import (
    IGNORED_LABEL_SELECTOR,
    REQUIRED_PERMISSIONS,
    ApiStatusError,
    KubeConfigError,
    ProtocolError,
)
from kpy.sources.kube.backoff import BackoffPolicy
from kpy.sources.kube.config import ApiTarget, load_target
from kpy.sources.kube.lists import split_list
from kpy.sources.kube.reflector import Reflector, Timeouts
from kpy.sources.kube.source import KubeSource

__all__ = [
    "IGNORED_LABEL_SELECTOR",
    "REQUIRED_PERMISSIONS",
    "ApiStatusError",
    "ApiTarget",
    "BackoffPolicy",
    "KubeConfigError",
    "KubeSource",
    "ProtocolError",
    "Reflector",
    "Timeouts",
    "load_target",
    "split_list",
]
