"""The nftables backend's node configuration and programmed state, for the tests that
program a namespace and read it back (drift, lifecycle)."""

from __future__ import annotations

from kpy_nftables import NftablesBackend
from kpy_nftables.netlink_read import NetlinkReader

from kpy.core.backend import BackendConfig, parse_networks
from kpy.testing.conformance import run


def config(ns: str) -> BackendConfig:
    return BackendConfig(
        node_name="node-a",
        netns=ns,
        cluster_cidrs=parse_networks(["10.244.0.0/16", "fd00:244::/32"]),
    )


def snapshot(ns: str) -> tuple[dict[str, object], dict[tuple[str, str, str], tuple[int, bytes]]]:
    """Every keyed object as a fresh backend reads it, and every chain's rules (count
    and digest) as the kernel holds them."""
    objects = dict(run(NftablesBackend(config(ns)).observe()).objects)
    with NetlinkReader(ns) as reader:
        return objects, dict(reader.rules().chains)
