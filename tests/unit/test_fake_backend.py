"""The FakeBackend passes the conformance suite, which checks the suite itself."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kpy.core.backend import Backend
from kpy.testing.conformance import BackendConformance
from kpy.testing.fake_backend import FakeBackend


class TestFakeBackend(BackendConformance):
    @pytest.fixture
    def make_backend(self) -> Callable[[], Backend]:
        shared = FakeBackend()

        def make() -> Backend:
            # One "kernel" (the shared dict) seen by every instance, as after a restart.
            fresh = FakeBackend(programmed=shared.programmed)
            return fresh

        return make
