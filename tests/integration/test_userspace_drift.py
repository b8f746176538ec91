"""Drift of the userspace backend: a listener closed behind the agent's back (its
socket closed, its server stopped) is flagged by ``kpy dump`` and reopened by one full
sync; an address of kpy's removed from ``lo`` is added back. In a fresh network
namespace."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from kpy_userspace import UserspaceBackend
from kpy_userspace.render import ListenKey

from kpy.core.backend import BackendConfig
from kpy.core.model import Protocol
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states, run
from kpy.tools import dump

pytestmark = pytest.mark.root

WEB = ListenKey(protocol=Protocol.TCP, family=4, address="10.96.0.10", port=80)


def config(netns: str) -> BackendConfig:
    return BackendConfig(
        node_name="node-a", node_ips=(ipaddress.ip_address("192.168.50.2"),), netns=netns
    )


def listening(netns: str, key: ListenKey) -> bool:
    """Whether the kernel holds a listening TCP socket on ``key`` inside ``netns``."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Hltn", f"src {key.address}:{key.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return bool(out.strip())


def test_a_closed_listener_is_flagged_and_reopened_by_one_full_sync(netns: str) -> None:
    plan = b.plan(conformance_states())
    backend = UserspaceBackend(config(netns))
    try:
        run(backend.apply(plan))
        assert not [r for r in dump.rows(plan, run(backend.observe())) if r["drift"]]
        assert listening(netns, WEB)

        async def close_behind_its_back() -> None:
            backend._proxy.listeners[WEB].close()

        run(backend._proxy.call(close_behind_its_back))
        assert not listening(netns, WEB)
        rows = {r["service"]: r for r in dump.rows(plan, run(backend.observe())) if r["drift"]}
        assert list(rows) == ["default/web:http/TCP"]
        assert "not listening on" in rows["default/web:http/TCP"]["programmed"]["extra"]["drift"]

        result = run(backend.apply(b.plan(plan.services.values())))
        assert result.full_sync and result.detail["listeners_opened"] == 1
        assert not [r for r in dump.rows(plan, run(backend.observe())) if r["drift"]]
        assert listening(netns, WEB)
    finally:
        backend.close()


def test_an_address_removed_from_lo_is_added_back_by_one_full_sync(netns: str) -> None:
    plan = b.plan(conformance_states())
    backend = UserspaceBackend(config(netns))
    try:
        run(backend.apply(plan))
        subprocess.run(["ip", "-n", netns, "addr", "del", "10.96.0.10/32", "dev", "lo"], check=True)
        assert "ip/10.96.0.10" not in str(run(backend.observe()).objects)
        result = run(backend.apply(b.plan(plan.services.values())))
        assert result.detail["addresses_added"] == 1
        assert listening(netns, WEB)
    finally:
        backend.close()
