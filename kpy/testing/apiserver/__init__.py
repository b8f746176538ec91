"""A fake Kubernetes API server over real HTTP, so the ``kube`` source is tested on the wire.

No Kubernetes API server can be installed where kpy is tested; this one speaks the
same protocol on a loopback socket, as far as a node agent can tell. It follows the
Kubernetes API documents, which are the specification here:

* API conventions (kubernetes/community, ``contributors/devel/sig-architecture/
  api-conventions.md``): "Lists and Simple kinds" (``kind: ServiceList``,
  ``apiVersion``, ``metadata.resourceVersion``; list items carry no kind/apiVersion),
  "Concurrency Control and Consistency" (one resourceVersion per write, opaque to
  clients; a PUT with a stale resourceVersion is a 409 Conflict), "Response Status
  Kind" (every error is a ``Status`` with ``reason`` and ``code``: NotFound 404,
  AlreadyExists 409, Conflict 409, Expired/Gone 410, TooManyRequests 429 with
  ``Retry-After``, InternalError 500), and "Events" / "Selecting fields".
* API concepts (kubernetes.io ``docs/reference/using-api/api-concepts``):
  "Efficient detection of changes" (``?watch=1`` streams newline-delimited
  ``{"type": ADDED|MODIFIED|DELETED|ERROR, "object": ...}``; a resourceVersion older
  than the bounded history gives ``410 Gone``), "Watch bookmarks" (``BOOKMARK`` events
  carrying only ``metadata.resourceVersion``, sent only when the client asked with
  ``allowWatchBookmarks=true``; one is also sent as a watch ends on its timeout),
  "Resource versions" (watch with resourceVersion unset or ``"0"``: synthetic ADDED
  events for the current state first; a list with ``resourceVersionMatch=Exact``
  answers from history), and ``timeoutSeconds`` (the server ends the stream cleanly).
* Labels and selectors (``docs/concepts/overview/working-with-objects/labels``):
  equality (``=``, ``==``, ``!=``) and set-based (``in``, ``notin``, ``key``,
  ``!key``) label selectors; field selectors (``metadata.name``,
  ``metadata.namespace``). A watch with a selector sees an object that stops matching
  as DELETED and one that starts matching as ADDED, as the watch cache does.

* "Retrieving large results sets in chunks" (API concepts): ``limit`` cuts a list into
  pages; ``metadata.continue`` is an opaque token and ``metadata.remainingItemCount``
  counts what is left (not sent for a list with a selector, as the API server does
  not); every page is served from the first page's resourceVersion (a
  consistent snapshot); a token whose resourceVersion has left the history is a
  ``410 Expired`` ("The provided continue parameter is too old ..."), after which a
  client starts the list again.

Like etcd, one resourceVersion counter spans all resources. Deliberate simplifications:
strategic-merge patches are applied as JSON merge patches, namespaces need not exist,
no admission, defaulting or IP allocation. HTTPS when given an ``ssl_context``
(``url`` then says ``https``); plain HTTP otherwise.

Objects a real API server would refuse are stored as given (no validation), and a
value wrapped in :class:`RawJSON` is served as its text verbatim — JSON nested deeper
than any decoder recurses, say — so the ``kube`` source's defences can be tested.

Faults for tests: :meth:`FakeApiServer.cut_streams` (mid-event), :meth:`stall` /
:meth:`resume`, :meth:`fail_next` (500/429 with ``Retry-After``), :meth:`expire`
(compact history), :meth:`restart` (connections dropped, new history, new
resourceVersion base), :meth:`stop` / :meth:`start` (connection refused meanwhile),
``faults.unserved`` / ``faults.forbidden`` (a resource answered 404 or 403).

It doubles as a development tool: ``kpy testing apiserver --from DIR`` serves a
manifests directory (and follows its edits), so ``kpy run --source kube --master
http://127.0.0.1:PORT`` can be run by hand.

The package: :mod:`~kpy.testing.apiserver.objects` (resources, JSON, Status errors),
:mod:`~kpy.testing.apiserver.selectors`, :mod:`~kpy.testing.apiserver.store`
(resourceVersions, watch history, continue tokens), :mod:`~kpy.testing.apiserver.server`
(HTTP, faults), :mod:`~kpy.testing.apiserver.tls` and
:mod:`~kpy.testing.apiserver.command` (``kpy testing apiserver``).
"""

from __future__ import annotations

from kpy.testing.apiserver.command import apiserver, serve
from kpy.testing.apiserver.objects import (
    ENDPOINT_SLICES,
    EVENTS,
    NODES,
    SERVICE_CIDRS,
    SERVICES,
    ApiError,
    RawJSON,
    Resource,
)
from kpy.testing.apiserver.selectors import Requirement, Selector, parse_label_selector
from kpy.testing.apiserver.server import FakeApiServer, Faults, Stats
from kpy.testing.apiserver.store import Store
from kpy.testing.apiserver.tls import TlsFiles, make_tls

__all__ = [
    "ENDPOINT_SLICES",
    "EVENTS",
    "NODES",
    "SERVICES",
    "SERVICE_CIDRS",
    "ApiError",
    "FakeApiServer",
    "Faults",
    "RawJSON",
    "Requirement",
    "Resource",
    "Selector",
    "Stats",
    "Store",
    "TlsFiles",
    "apiserver",
    "make_tls",
    "parse_label_selector",
    "serve",
]
