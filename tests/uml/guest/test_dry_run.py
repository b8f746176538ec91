"""The IPVS backend's dry run in the guest's kernel: after a full apply the dry run of
the same plan has no operation left; after one endpoint is added it is that one real
server (plus its companion elements), and it sends nothing."""

from __future__ import annotations

import asyncio

from kpy_ipvs import IpvsBackend

from kpy.core.backend import BackendConfig
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states


def operations(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_dry_run_after_apply_is_empty_then_the_one_new_real_server() -> None:
    backend = IpvsBackend(BackendConfig(node_name="node-a"))
    states = conformance_states()
    plan = b.plan(states)
    try:
        asyncio.run(backend.apply(plan))
        text = asyncio.run(backend.dry_run(plan))
        assert not text.startswith("# ip_vs is not loaded")
        assert operations(text) == []

        web = b.state(
            b.service("web"),
            [
                b.endpoint("10.244.1.5"),
                b.endpoint("10.244.2.6", node="node-b"),
                b.endpoint("10.244.2.7", node="node-b"),
            ],
            b.node(),
        )
        changed = b.plan([web, *states[1:]])
        before = asyncio.run(backend.observe()).objects
        ops = operations(asyncio.run(backend.dry_run(changed)))
        ipvs = [line for line in ops if line.startswith("-")]
        assert ipvs == ["-a -t 10.96.0.10:80 -r 10.244.2.7:8080 -m -w 1"], ops
        others = [line for line in ops if not line.startswith("-")]
        assert all(line.startswith("ipset add ") and "10.244.2.7" in line for line in others)
        assert asyncio.run(backend.observe()).objects == before  # nothing was sent

        asyncio.run(backend.apply(changed))
        assert operations(asyncio.run(backend.dry_run(changed))) == []
    finally:
        try:
            asyncio.run(backend.cleanup())
        finally:
            backend.close()
