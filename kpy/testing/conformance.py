"""The conformance suite every backend's tests subclass.

Same Plans in, same observable state out: after an apply, ``observe()`` must report
for every service port exactly the frontends and endpoints of
:func:`kpy.core.backend.desired_view`; partial syncs touch only what changed; a restarted
backend adopts what is programmed (its first full sync sends nothing when the kernel
already matches); ``cleanup()`` leaves nothing behind.

Usage::

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def make_backend(self) -> Iterator[Callable[[], Backend]]:
            ... set up a namespace ...
            yield lambda: MyBackend(config)
            ... tear it down ...

Packet-level behaviour is tested separately with real traffic (``kpy.testing.netns``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kpy.core.backend import Backend, Programmed, ServiceView, desired_view
from kpy.core.model import ServicePortState
from kpy.testing import builders as b

T = TypeVar("T")
MakeBackend = Callable[[], Backend]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def conformance_states() -> list[ServicePortState]:
    """One service port per semantic the backends must carry."""
    n = b.node()
    return [
        b.state(
            b.service("web"), [b.endpoint("10.244.1.5"), b.endpoint("10.244.2.6", node="node-b")], n
        ),
        b.state(
            b.service("np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080),
            [b.endpoint("10.244.1.7")],
            n,
        ),
        b.state(
            b.load_balancer(
                "lb", "10.96.0.12", 30081, "172.18.0.50", source_ranges=["203.0.113.0/24"]
            ),
            [b.endpoint("10.244.1.8"), b.endpoint("10.244.2.9", node="node-b")],
            n,
        ),
        b.state(
            b.service(
                "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
            ),
            [b.endpoint("10.244.1.10"), b.endpoint("10.244.2.11", node="node-b")],
            n,
        ),
        b.state(
            b.service("ext", cluster_ip="10.96.0.14", external_ips=["192.0.2.10"]),
            [b.endpoint("10.244.1.12")],
            n,
        ),
        b.state(
            b.service("sticky", cluster_ip="10.96.0.15", affinity=True, affinity_timeout=60),
            [b.endpoint("10.244.1.13")],
            n,
        ),
        b.state(b.service("empty", cluster_ip="10.96.0.16"), [], n),
        b.state(
            b.service(
                "dns",
                cluster_ip="10.96.0.17",
                port=53,
                protocol="UDP",
                port_name_="dns",
                target_port=5353,
            ),
            [b.endpoint("10.244.1.14", 5353)],
            n,
        ),
        b.state(b.service("v6", cluster_ip="fd00:96::18"), [b.endpoint("fd00:244:1::5")], n),
        b.state(
            b.service("gone", cluster_ip="10.96.0.19"),
            [b.endpoint("10.244.1.15", ready=False, serving=True, terminating=True)],
            n,
        ),
        b.state(b.service("headless", cluster_ip=None), [b.endpoint("10.244.1.16")], n),
        b.state(b.service("cname", cluster_ip=None, external_name="example.com"), [], n),
    ]


def _views(programmed: Programmed) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    return {
        key: (tuple(sorted(v.frontends)), tuple(sorted(v.endpoints)))
        for key, v in programmed.services.items()
        if v.frontends or v.endpoints
    }


def _expected(states: list[ServicePortState]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    result = {}
    for s in states:
        view: ServiceView = desired_view(s)
        if view.frontends or view.endpoints:
            result[str(s.name)] = (view.frontends, view.endpoints)
    return result


class BackendConformance:
    """Subclass, provide a ``make_backend`` fixture; every test below runs against it."""

    def test_probe_says_available(self, make_backend: MakeBackend) -> None:
        assert make_backend().probe() is None

    def test_full_sync_programs_every_service(self, make_backend: MakeBackend) -> None:
        states = conformance_states()
        backend = make_backend()
        run(backend.apply(b.plan(states)))
        assert _views(run(backend.observe())) == _expected(states)

    def test_partial_sync_changes_only_what_changed(self, make_backend: MakeBackend) -> None:
        states = conformance_states()
        backend = make_backend()
        run(backend.apply(b.plan(states)))
        web = states[0]
        new_web = b.state(web.service, [*web.endpoints, b.endpoint("10.244.1.99")])
        states[0] = new_web
        result = run(backend.apply(b.plan(states, full_sync=False, changed=[web.name])))
        assert result.ops > 0
        assert _views(run(backend.observe())) == _expected(states)
        nothing = run(backend.apply(b.plan(states, full_sync=False, changed=[])))
        assert nothing.ops == 0

    def test_removed_service_disappears(self, make_backend: MakeBackend) -> None:
        states = conformance_states()
        backend = make_backend()
        run(backend.apply(b.plan(states)))
        gone = states.pop(1)
        run(backend.apply(b.plan(states, full_sync=False, changed=[], removed=[gone.name])))
        views = _views(run(backend.observe()))
        assert str(gone.name) not in views
        assert views == _expected(states)

    def test_restarted_backend_adopts_without_changes(self, make_backend: MakeBackend) -> None:
        states = conformance_states()
        run(make_backend().apply(b.plan(states)))
        restarted = make_backend()
        result = run(restarted.apply(b.plan(states)))
        assert result.ops == 0, "a restart must not rewrite what is already programmed"
        assert _views(run(restarted.observe())) == _expected(states)

    def test_full_sync_repairs_and_removes_strays(self, make_backend: MakeBackend) -> None:
        states = conformance_states()
        backend = make_backend()
        run(backend.apply(b.plan(states)))
        fewer = states[:3]
        restarted = make_backend()
        run(restarted.apply(b.plan(fewer)))
        assert _views(run(restarted.observe())) == _expected(fewer)

    def test_cleanup_removes_everything(self, make_backend: MakeBackend) -> None:
        backend = make_backend()
        run(backend.apply(b.plan(conformance_states())))
        run(backend.cleanup())
        assert _views(run(make_backend().observe())) == {}

    @pytest.mark.parametrize("size", [10, 1000])
    def test_one_endpoint_change_costs_the_same_at_any_size(
        self, make_backend: MakeBackend, size: int
    ) -> None:
        states = b.synthetic_states(size)
        backend = make_backend()
        run(backend.apply(b.plan(states)))
        first = states[0]
        states[0] = b.state(first.service, first.endpoints[1:])
        result = run(backend.apply(b.plan(states, full_sync=False, changed=[first.name])))
        assert 0 < result.ops <= 20
