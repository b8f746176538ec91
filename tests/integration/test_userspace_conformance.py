"""The userspace backend against the shared conformance suite, in a fresh network
namespace per test (never the machine's own), plus what a restart really keeps."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Iterator

import pytest
from kpy_userspace import UserspaceBackend

from kpy.core.backend import Backend, BackendConfig, desired_view
from kpy.testing import builders as b
from kpy.testing.conformance import BackendConformance, MakeBackend, conformance_states, run

pytestmark = pytest.mark.root


def lo_addresses(netns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "addr", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()} - {"127.0.0.1", "::1"}


def config(netns: str) -> BackendConfig:
    return BackendConfig(
        node_name="node-a", node_ips=(ipaddress.ip_address("192.168.50.2"),), netns=netns
    )


class TestUserspaceConformance(BackendConformance):
    @pytest.fixture
    def make_backend(self, netns: str) -> Iterator[Callable[[], Backend]]:
        made: list[UserspaceBackend] = []

        def make() -> Backend:
            backend = UserspaceBackend(config(netns))
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()

    def test_restarted_backend_adopts_without_changes(self, make_backend: MakeBackend) -> None:
        """A proxy's listeners die with its process, so a restarted backend must open
        them again: its first sync cannot be free. What survives is the addresses on lo,
        and those it adopts without touching (the suite's ``ops == 0`` is about them)."""
        states = conformance_states()
        first = make_backend()
        run(first.apply(b.plan(states)))
        assert isinstance(first, UserspaceBackend)
        first.close()  # the old agent exits: sockets closed, addresses left
        restarted = make_backend()
        result = run(restarted.apply(b.plan(states)))
        assert result.detail["addresses_added"] == 0
        assert result.detail["addresses_removed"] == 0
        assert result.detail["listeners_opened"] > 0
        views = run(restarted.observe()).services
        for state in states:
            want = desired_view(state)
            if want.frontends:
                got = views[str(state.name)]
                assert (got.frontends, got.endpoints) == (want.frontends, want.endpoints)
        again = run(restarted.apply(b.plan(states)))
        assert again.ops == 0, "a second full sync over the same state changes nothing"


def test_cleanup_removes_only_its_own_addresses(netns: str) -> None:
    subprocess.run(
        ["ip", "-n", netns, "addr", "add", "10.96.0.10/32", "dev", "lo"], check=True
    )  # someone else's, and also the "web" Service's ClusterIP
    backend = UserspaceBackend(config(netns))
    try:
        run(backend.apply(b.plan(conformance_states())))
        held = lo_addresses(netns)
        assert {"10.96.0.10", "10.96.0.11", "172.18.0.50", "192.0.2.10", "fd00:96::18"} <= held
        run(backend.cleanup())
        assert lo_addresses(netns) == {"10.96.0.10"}
    finally:
        backend.close()


def test_partial_sync_removes_an_address_only_when_no_port_needs_it(netns: str) -> None:
    n = b.node()
    http = b.state(b.service("two", cluster_ip="10.96.1.1", port=80, port_name_="http"), [], n)
    https = b.state(b.service("two", cluster_ip="10.96.1.1", port=443, port_name_="https"), [], n)
    backend = UserspaceBackend(config(netns))
    try:
        run(backend.apply(b.plan([http, https])))
        assert "10.96.1.1" in lo_addresses(netns)
        run(backend.apply(b.plan([https], full_sync=False, removed=[http.name])))
        assert "10.96.1.1" in lo_addresses(netns)
        run(backend.apply(b.plan([], full_sync=False, removed=[https.name])))
        assert "10.96.1.1" not in lo_addresses(netns)
    finally:
        backend.close()
