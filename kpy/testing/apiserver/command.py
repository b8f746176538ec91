"""``kpy testing apiserver``: the fake API server serving a directory of manifests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import structlog

from kpy.testing.apiserver.objects import ApiError
from kpy.testing.apiserver.server import FakeApiServer

log = structlog.get_logger("kpy.testing.apiserver")


class ServerSink:
    """Applies a manifests source's events to the fake server (for ``--from DIR``)."""

    def __init__(self, server: FakeApiServer) -> None:
        self.server = server

    def event(self, event: Any) -> None:
        try:
            if event.type == "DELETE":
                self.server.delete(str(event.kind), event.namespace, event.name)
            else:
                # Only what JSON can carry (a YAML timestamp or binary value cannot be
                # served, and would break every list of its kind).
                self.server.apply(json.loads(json.dumps(event.obj, allow_nan=False)))
        except ApiError as exc:
            log.warning("manifest_not_served", name=event.name, reason=exc.message)
        except (TypeError, ValueError) as exc:
            log.warning("manifest_not_served", name=event.name, reason=str(exc)[:200])

    def synced(self) -> None:
        log.info("manifests_served", url=self.server.url)

    def connection(self, healthy: bool, reason: str = "") -> None:
        return None


async def serve(
    paths: Iterable[Path],
    host: str,
    port: int,
    *,
    bookmark_interval: float = 60.0,
    ready: Callable[[FakeApiServer], None] | None = None,
) -> None:
    """Serve the manifests in ``paths`` (following their edits) until cancelled."""
    from kpy.sources.manifests import ManifestSource  # only the dev command needs it

    server = FakeApiServer(host=host, port=port, bookmark_interval=bookmark_interval)
    async with server:
        if ready is not None:
            ready(server)
        await ManifestSource(list(paths)).run(ServerSink(server))


@click.command("apiserver")
@click.option(
    "--from",
    "from_",
    multiple=True,
    type=click.Path(path_type=Path, exists=True),
    help="Manifests directory or file to serve (repeatable; followed for edits).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=6443, show_default=True, help="Port (0: any free port).")
@click.option(
    "--bookmark-interval", default=60.0, show_default=True, help="Seconds between BOOKMARKs."
)
def apiserver(from_: tuple[Path, ...], host: str, port: int, bookmark_interval: float) -> None:
    """Serve manifests as a fake Kubernetes API server (plain HTTP, for development).

    Then: kpy run --source kube --master http://HOST:PORT --node NODE
    """

    def ready(server: FakeApiServer) -> None:
        click.echo(f"fake Kubernetes API server on {server.url} (Ctrl-C stops it)", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(from_, host, port, bookmark_interval=bookmark_interval, ready=ready))
