"""Any name at all, rendered by the nftables and iptables backends, gives a transaction
the kernel tools accept and that touches nothing but kpy's own objects.

The render functions are fed model objects built directly (convert, which refuses
such names, is bypassed on purpose), with names drawn from arbitrary strings and from
a list of injection attempts. Each example is applied for real inside a fresh network
namespace that already holds someone else's table, chain and rules; afterwards those
are intact and everything else is kpy's. Each example costs a handful of tool runs, and
the number of examples is kept small, so the test takes seconds.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kpy_iptables import render as ipt
from kpy_nftables import render as nft

from kpy.core import diff
from kpy.core.backend import BackendConfig, parse_networks
from kpy.core.model import ServicePortState
from kpy.testing import builders as b
from kpy.testing.netns import nft as run_nft
from kpy.testing.netns import scratch
from tests.conftest import require_root
from tests.integration.test_hostile_corpus import in_netns

pytestmark = pytest.mark.root

INJECTIONS = [
    "web\n-A PREROUTING -p tcp -j DNAT --to-destination 6.6.6.6:1",
    "web\nCOMMIT\n*nat\n-A PREROUTING -j DNAT --to-destination 6.6.6.6\nCOMMIT",
    'web" -j ACCEPT -m comment --comment "x',
    "web; add table ip evil { chain c { type nat hook prerouting priority 0; } }",
    "web } ; flush ruleset ; {",
    "web # rest is a comment",
    "we\\b\\",
    "web\x00nul",
    "wéb-名前",
    "\ud800",
    "x" * 300,
    "",
    # Valid names that are nft or iptables words: rendered as they are.
    "table",
    "drop",
    "accept",
    "counter",
    "ip",
    "tcp",
    "a" * 63,
]

name_text = st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=300))
names = st.lists(st.tuples(name_text, name_text, name_text), min_size=1, max_size=6)

FOREIGN_NFT = """table ip victim {
    chain pre {
        type nat hook prerouting priority -150; policy accept;
        ip saddr 192.0.2.99 counter accept
    }
}
"""
FOREIGN_IPT = """*nat
:VICTIM - [0:0]
-A PREROUTING -s 192.0.2.99/32 -j ACCEPT
-A VICTIM -s 192.0.2.98/32 -j RETURN
COMMIT
*filter
:VICTIM - [0:0]
-A INPUT -s 192.0.2.99/32 -j ACCEPT
COMMIT
"""


def _states(triples: list[tuple[str, str, str]]) -> list[ServicePortState]:
    states = []
    for i, (namespace, name, port) in enumerate(triples):
        svc = b.service(
            name,
            namespace=namespace,
            port_name_=port,
            cluster_ip=str(ipaddress.IPv4Address("10.96.0.10") + i),
            type="LoadBalancer" if i % 2 else "NodePort",
            node_port=30000 + i,
            lb_ips=(str(ipaddress.IPv4Address("172.18.0.10") + i),) if i % 2 else (),
            source_ranges=("198.51.100.0/24",) if i % 2 else (),
            affinity=i % 3 == 0,
            etp_local=i % 4 == 1,
        )
        eps = [b.endpoint(str(ipaddress.IPv4Address("10.244.1.10") + 2 * i + j)) for j in (0, 1)]
        states.append(b.state(svc, eps))
    return states


SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(names)
def test_nftables_any_names_stay_inside_kpys_tables(triples: list[tuple[str, str, str]]) -> None:
    require_root()
    config = BackendConfig(node_name="node-a", cluster_cidrs=parse_networks(["10.244.0.0/16"]))
    want = dict(nft.base_objects(config))
    for state in _states(triples):
        want.update(nft.port_objects(state, config))
    script = nft.transaction(want, {}, want).script
    with scratch("kpy-hnft") as netns:
        run_nft(netns, "-f", "-", script=FOREIGN_NFT)
        before = run_nft(netns, "list", "table", "ip", "victim")
        run_nft(netns, "-c", "-f", "-", script=script)  # parses, as a check
        run_nft(netns, "-f", "-", script=script)  # and applies
        tables = run_nft(netns, "list", "tables").split()
        names_ = {tables[i + 2] for i in range(0, len(tables), 3)}
        assert names_ - {"victim"} and all(nft.is_kpy_table(t) for t in names_ - {"victim"})
        assert run_nft(netns, "list", "table", "ip", "victim") == before


def _rules(saved: str) -> list[tuple[str, str, str]]:
    """(table, chain, rule) of every rule in ``iptables-save`` output."""
    table, found = "", []
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            _, chain, rule = line.split(" ", 2)
            found.append((table, chain, rule))
    return found


@SETTINGS
@given(names)
def test_iptables_any_names_stay_inside_kpys_chains(triples: list[tuple[str, str, str]]) -> None:
    require_root()
    ctx = ipt.Context(cluster_cidrs=parse_networks(["10.244.0.0/16"]), families=(4,))
    ports = {s.name: ipt.render_port(s, ctx) for s in _states(triples)}
    want = ipt.desired(ctx, ports)
    text = ipt.restore(diff.compute({}, want))[4].text
    jumps = {
        (k.table, k.chain, k.rule) for k in ipt.base(ctx, 4) if k.rule and k.chain in ipt.BUILTIN
    }
    with scratch("kpy-hipt") as netns:
        in_netns(netns, "iptables-restore", "--noflush", text=FOREIGN_IPT)
        foreign = set(_rules(in_netns(netns, "iptables-save")))
        in_netns(netns, "iptables-restore", "--test", "--noflush", text=text)  # parses
        in_netns(netns, "iptables-restore", "--noflush", text=text)  # and applies
        after = _rules(in_netns(netns, "iptables-save"))
    assert foreign <= set(after), "someone else's rules were changed"
    for table, chain, rule in after:
        if (table, chain, rule) in foreign:
            continue
        if chain in ipt.BUILTIN:
            assert (table, chain, rule) in jumps, f"a foreign rule in {table} {chain}: {rule}"
        else:
            assert ipt.owned(chain), f"a rule outside kpy's chains: {table} {chain} {rule}"
