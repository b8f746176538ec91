"""The shared conformance suite against the IPVS backend, in the guest's kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from kpy_ipvs import IpvsBackend

from kpy.core.backend import Backend, BackendConfig
from kpy.testing.conformance import BackendConformance


class TestIpvsConformance(BackendConformance):
    @pytest.fixture
    def make_backend(self) -> Iterator[Callable[[], Backend]]:
        made: list[IpvsBackend] = []

        def make() -> Backend:
            backend = IpvsBackend(BackendConfig(node_name="node-a"))
            made.append(backend)
            return backend

        yield make
        try:
            asyncio.run(made[-1].cleanup()) if made else None
        finally:
            for backend in made:
                backend.close()
