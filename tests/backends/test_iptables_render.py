"""Golden and table tests of the iptables backend's pure render, and restore sizes.

The restore text is compared in full for a small case (golden); the semantics are
checked rule by rule for one Service per feature; and the size of the restore input
for a one-endpoint change is measured at 10 and 10,000 Services.
"""

from __future__ import annotations

import ipaddress

import pytest
from kpy_iptables import observe, render
from kpy_iptables.render import FILTER, NAT, Key, Objects

from kpy.core import diff
from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b

CTX = render.Context(cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),))

WEB_SVC = render.chain_name("SVC", "default/web:http/TCP")
WEB_SEP1 = render.chain_name("SEP", "default/web:http/TCP", "10.244.1.5:8080")
WEB_SEP2 = render.chain_name("SEP", "default/web:http/TCP", "10.244.2.6:8080")

GOLDEN_WEB = f"""\
*nat
:{WEB_SEP1} - [0:0]
:{WEB_SEP2} - [0:0]
:{WEB_SVC} - [0:0]
-A {WEB_SEP1} -s 10.244.1.5/32 -j KPY-MARK-MASQ
-A {WEB_SEP1} -p tcp -j DNAT --to-destination 10.244.1.5:8080
-A {WEB_SEP2} -s 10.244.2.6/32 -j KPY-MARK-MASQ
-A {WEB_SEP2} -p tcp -j DNAT --to-destination 10.244.2.6:8080
-A {WEB_SVC} ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http/TCP" -m tcp --dport 80 -j KPY-MARK-MASQ
-A {WEB_SVC} -m statistic --mode random --probability 0.50000000000 -j {WEB_SEP1}
-A {WEB_SVC} -j {WEB_SEP2}
-I KPY-SERVICES 1 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http/TCP" -m tcp --dport 80 -j {WEB_SVC}
COMMIT
"""  # noqa: E501


def web() -> ServicePortState:
    return b.state(
        b.service("web"), [b.endpoint("10.244.1.5"), b.endpoint("10.244.2.6", node="node-b")]
    )


def rules(objs: Objects, table: str, chain: str, family: int = 4) -> list[str]:
    """The rules of one chain, or the dispatch rules kept in it."""
    whole = objs.get(Key(family, table, chain))
    if whole:
        return list(whole)
    where = (family, table, chain)
    return sorted(k.rule for k in objs if k.rule and (k.family, k.table, k.chain) == where)


def chain(objs: Objects, kind: str) -> tuple[str, ...]:
    found = [v for k, v in objs.items() if k.chain.startswith(f"KPY-{kind}-") and not k.rule]
    assert len(found) == 1, f"expected one KPY-{kind}- chain, got {len(found)}"
    return found[0]


def test_golden_new_cluster_ip_service() -> None:
    objs = render.render_port(web(), CTX)
    assert render.restore(diff.compute({}, objs))[4].text == GOLDEN_WEB


def test_golden_removal_deletes_rule_before_chains() -> None:
    objs = render.render_port(web(), CTX)
    text = render.restore(diff.compute(objs, {}))[4].text
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    delete = next(i for i, line in enumerate(lines) if line.startswith("-D KPY-SERVICES "))
    drops = [i for i, line in enumerate(lines) if line.startswith("-X ")]
    assert sorted(line for line in lines if line.startswith("-X ")) == sorted(
        f"-X {c}" for c in (WEB_SVC, WEB_SEP1, WEB_SEP2)
    )
    assert all(delete < i for i in drops)


def test_rules_of_a_removed_dispatch_chain_are_not_deleted_one_by_one() -> None:
    have = render.base(CTX, 4)
    text = render.restore(diff.compute(have, {}))[4].text
    assert "-D KPY-SERVICES" not in text  # flushed with the chain
    assert '-D PREROUTING -m comment --comment "kpy service portals" -j KPY-SERVICES' in text
    assert "-X KPY-SERVICES" in text


def test_chain_names_are_stable_short_and_distinct() -> None:
    a = render.chain_name("SVC", "default/web:http/TCP")
    assert a == render.chain_name("SVC", "default/web:http/TCP")
    assert a != render.chain_name("SVC", "default/web:http/UDP")
    assert len(render.chain_name("SEP", "x" * 300, "[fd00::1]:65535")) <= 28


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.5, "0.50000000000"),
        (1 / 3, "0.33333333349"),
        (0.25, "0.25000000000"),
        (1 / 5, "0.20000000019"),
    ],
)
def test_probability_is_printed_as_iptables_save_prints_it(p: float, text: str) -> None:
    assert render.probability(p) == text


def test_no_endpoints_rejects_every_frontend_in_filter() -> None:
    svc = b.service(
        "np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080, external_ips=["192.0.2.9"]
    )
    objs = render.render_port(b.state(svc, []), CTX)
    assert not [k for k in objs if k.table == NAT]
    assert rules(objs, FILTER, "KPY-SERVICES") == sorted(
        [
            '-d 10.96.0.11/32 -p tcp -m comment --comment "default/np:http/TCP" -m tcp --dport 80'
            " -j REJECT --reject-with tcp-reset",
            '-d 192.0.2.9/32 -p tcp -m comment --comment "default/np:http/TCP" -m tcp --dport 80'
            " -j REJECT --reject-with tcp-reset",
            '-p tcp -m comment --comment "default/np:http/TCP" -m addrtype --dst-type LOCAL'
            " -m tcp --dport 30080 -j REJECT --reject-with tcp-reset",
        ]
    )


def test_nodeport_cluster_policy_masquerades_and_jumps_to_the_service_chain() -> None:
    svc = b.service("np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080)
    objs = render.render_port(b.state(svc, [b.endpoint("10.244.1.7")]), CTX)
    ext = render.chain_name("EXT", "default/np:http/TCP")
    svc_chain = render.chain_name("SVC", "default/np:http/TCP")
    assert rules(objs, NAT, "KPY-NODEPORTS") == [
        f'-p tcp -m comment --comment "default/np:http/TCP" -m tcp --dport 30080 -j {ext}'
    ]
    assert chain(objs, "EXT") == ("-j KPY-MARK-MASQ", f"-j {svc_chain}")
    assert not rules(objs, FILTER, "KPY-SERVICES")


def test_external_policy_local_short_circuits_pods_and_drops_without_local_endpoints() -> None:
    svc = b.service(
        "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
    )
    remote_only = b.state(svc, [b.endpoint("10.244.2.11", node="node-b")])
    objs = render.render_port(remote_only, CTX)
    svc_chain = render.chain_name("SVC", "default/local:http/TCP")
    assert chain(objs, "EXT") == (
        f"-s 10.244.0.0/16 -j {svc_chain}",
        "-m addrtype --src-type LOCAL -j KPY-MARK-MASQ",
        f"-m addrtype --src-type LOCAL -j {svc_chain}",
    )
    assert rules(objs, FILTER, "KPY-SERVICES") == [
        '-p tcp -m comment --comment "default/local:http/TCP" -m addrtype --dst-type LOCAL'
        " -m tcp --dport 30082 -j DROP"
    ]
    both = b.state(svc, [b.endpoint("10.244.1.10"), b.endpoint("10.244.2.11", node="node-b")])
    objs = render.render_port(both, CTX)
    svl = render.chain_name("SVL", "default/local:http/TCP")
    assert chain(objs, "EXT")[-1] == f"-j {svl}"
    local_sep = render.chain_name("SEP", "default/local:http/TCP", "10.244.1.10:8080")
    assert chain(objs, "SVL") == (f"-j {local_sep}",)
    assert len(chain(objs, "SVC")) == 3  # masquerade + two endpoints
    assert not rules(objs, FILTER, "KPY-SERVICES")


def test_load_balancer_source_ranges_go_through_a_firewall_chain() -> None:
    svc = b.service(
        "lb",
        cluster_ip="10.96.0.12",
        type="LoadBalancer",
        node_port=30081,
        lb_ips=["172.18.0.50"],
        source_ranges=["203.0.113.0/24", "198.51.100.0/24"],
    )
    objs = render.render_port(b.state(svc, [b.endpoint("10.244.1.8")]), CTX)
    name = "default/lb:http/TCP"
    fw, ext = render.chain_name("FW", name), render.chain_name("EXT", name)
    assert chain(objs, "FW") == (f"-s 203.0.113.0/24 -j {ext}", f"-s 198.51.100.0/24 -j {ext}")
    lb = f'-d 172.18.0.50/32 -p tcp -m comment --comment "{name}" -m tcp --dport 80'
    assert f"{lb} -j {fw}" in rules(objs, NAT, "KPY-SERVICES")
    assert rules(objs, FILTER, "KPY-SERVICES") == [f"{lb} -j DROP"]


def test_session_affinity_uses_recent_lists_named_after_endpoint_chains() -> None:
    svc = b.service("sticky", cluster_ip="10.96.0.15", affinity=True, affinity_timeout=60)
    objs = render.render_port(b.state(svc, [b.endpoint("10.244.1.13")]), CTX)
    sep = render.chain_name("SEP", "default/sticky:http/TCP", "10.244.1.13:8080")
    assert chain(objs, "SVC")[1:] == (
        f"-m recent --rcheck --seconds 60 --reap --name {sep} --mask 255.255.255.255 --rsource"
        f" -j {sep}",
        f"-j {sep}",
    )
    assert chain(objs, "SEP")[1] == (
        f"-p tcp -m recent --set --name {sep} --mask 255.255.255.255 --rsource"
        " -j DNAT --to-destination 10.244.1.13:8080"
    )


def test_spread_gives_every_endpoint_an_equal_share() -> None:
    eps = [b.endpoint(f"10.244.1.{i}") for i in range(10, 15)]
    objs = render.render_port(b.state(b.service("five"), eps), render.Context())
    jumps = [(r, 0) for r in chain(objs, "SVC")]
    shares = [share for _, share in observe.shares(jumps)]
    assert len(shares) == 5
    assert all(abs(s - 0.2) < 1e-6 for s in shares)


def test_ipv6_service_uses_ip6tables_forms() -> None:
    svc = b.service("v6", cluster_ip="fd00:96::18")
    objs = render.render_port(b.state(svc, [b.endpoint("fd00:244:1::5")]), CTX)
    assert {k.family for k in objs} == {6}
    assert rules(objs, NAT, "KPY-SERVICES", 6) == [
        '-d fd00:96::18/128 -p tcp -m comment --comment "default/v6:http/TCP" -m tcp --dport 80'
        f" -j {render.chain_name('SVC', 'default/v6:http/TCP')}"
    ]
    assert chain(objs, "SEP") == (
        "-s fd00:244:1::5/128 -j KPY-MARK-MASQ",
        "-p tcp -j DNAT --to-destination [fd00:244:1::5]:8080",
    )
    empty = render.render_port(b.state(b.service("e6", cluster_ip="fd00:96::19"), []), CTX)
    # TCP is reset (ICMP errors are rate-limited per client; IPv6 answered a SYN late)
    assert rules(empty, FILTER, "KPY-SERVICES", 6)[0].endswith("-j REJECT --reject-with tcp-reset")
    udp = b.service("u6", cluster_ip="fd00:96::1a", protocol="UDP")
    empty_udp = render.render_port(b.state(udp, []), CTX)
    assert rules(empty_udp, FILTER, "KPY-SERVICES", 6)[0].endswith("icmp6-port-unreachable")
    empty4 = render.render_port(b.state(b.service("e4", cluster_ip="10.96.0.19"), []), CTX)
    assert rules(empty4, FILTER, "KPY-SERVICES", 4)[0].endswith("-j REJECT --reject-with tcp-reset")
    udp4 = b.service("u4", cluster_ip="10.96.0.26", protocol="UDP")
    empty_udp4 = render.render_port(b.state(udp4, []), CTX)
    assert rules(empty_udp4, FILTER, "KPY-SERVICES", 4)[0].endswith("icmp-port-unreachable")


def test_masquerade_all_marks_every_cluster_ip_packet() -> None:
    ctx = render.Context(masquerade_all=True)
    objs = render.render_port(web(), ctx)
    assert chain(objs, "SVC")[0] == (
        '-d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http/TCP" -m tcp --dport 80'
        " -j KPY-MARK-MASQ"
    )


def test_nodeport_addresses_limit_the_nodeport_dispatch() -> None:
    ctx = render.Context(nodeport_addresses=(ipaddress.ip_network("192.168.50.0/24"),))
    ctx_base = render.base(ctx, 4)
    assert rules(ctx_base, NAT, "KPY-SERVICES") == [
        "-d 192.168.50.0/24 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    ]
    # no IPv6 CIDR: IPv6 NodePorts answer on every address, as upstream
    assert rules(render.base(ctx, 6), NAT, "KPY-SERVICES", 6) == [
        "! -d ::1/128 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    ]
    assert rules(render.base(render.Context(), 4), NAT, "KPY-SERVICES") == [
        "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    ]
    localhost = render.Context(localhost_nodeports=True)
    assert rules(render.base(localhost, 4), NAT, "KPY-SERVICES") == [
        "-m addrtype --dst-type LOCAL -j KPY-NODEPORTS"
    ]
    text = render.restore(diff.compute({}, ctx_base))[4].text
    assert "-A KPY-SERVICES -d 192.168.50.0/24" in text  # appended: stays behind VIP rules


def test_headless_and_external_name_render_nothing() -> None:
    headless = b.state(b.service("h", cluster_ip=None), [b.endpoint("10.244.1.16")])
    cname = b.state(b.service("c", cluster_ip=None, external_name="example.com"), [])
    assert render.render_port(headless, CTX) == {}
    assert render.render_port(cname, CTX) == {}


def test_terminating_fallback_keeps_serving() -> None:
    gone = b.state(
        b.service("gone", cluster_ip="10.96.0.19"),
        [b.endpoint("10.244.1.15", ready=False, serving=True, terminating=True)],
    )
    objs = render.render_port(gone, CTX)
    assert chain(objs, "SEP")[-1] == "-p tcp -j DNAT --to-destination 10.244.1.15:8080"


def _one_change_restore(count: int) -> render.Restore:
    """Render ``count`` Services, then drop one endpoint of the first: the restore input."""
    states = b.synthetic_states(count)
    plan = b.plan(states)
    ports = render.render(plan, CTX)
    have = render.desired(CTX, ports)
    first = states[0]
    changed = b.state(first.service, first.endpoints[1:])
    new = render.render_port(changed, CTX)
    want = dict(have)
    for key in ports[first.name]:
        del want[key]
    want.update(new)
    change = diff.compute_keys(have, want, set(ports[first.name]) | set(new))
    inputs = render.restore(change)
    assert set(inputs) == {4}
    return inputs[4]


def test_one_endpoint_change_in_10000_services_is_a_few_dozen_lines() -> None:
    small, large = _one_change_restore(10), _one_change_restore(10_000)
    assert large.lines <= 50
    assert large.text == small.text  # the same change costs the same at any size
    assert "KPY-SERVICES" not in large.text  # dispatch chains are not rewritten


def test_full_render_round_trips_through_the_save_parser() -> None:
    states = b.synthetic_states(30)
    want = render.desired(CTX, render.render(b.plan(states), CTX))
    saved = "\n".join(_as_save(want, 4)) + "\n"
    parsed = observe.parse(saved, 4)
    assert parsed.objects == {k: v for k, v in want.items() if k.family == 4}
    views = observe.services([parsed])
    first = states[1]  # a NodePort Service with five endpoints
    view = views[str(first.name)]
    assert "*:30000/TCP" in view.frontends
    assert set(view.endpoints) == {str(ep) for ep in first.internal} | {
        str(ep) for ep in first.external
    }


def _as_save(objs: Objects, family: int) -> list[str]:
    """What ``iptables-save -c`` prints for these objects (chains, then rules)."""
    out: list[str] = []
    for table in (FILTER, NAT):
        keys = [k for k in objs if k.family == family and k.table == table]
        out.append(f"*{table}")
        out += [":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
        out += sorted(f":{k.chain} - [0:0]" for k in keys if not k.rule)
        for key in sorted(keys):
            if key.rule:
                out.append(f"[3:180] -A {key.chain} {key.rule}")
            else:
                out += [f"[0:0] -A {key.chain} {rule}" for rule in objs[key]]
        out.append("COMMIT")
    return out


def test_a_large_change_is_split_so_every_transaction_leaves_the_kernel_consistent() -> None:
    states = b.synthetic_states(30)
    want = render.desired(CTX, render.render(b.plan(states), CTX))
    single = render.restores(diff.compute({}, want))
    assert len(single[4]) == 1
    split = render.restores(diff.compute({}, want), limit=100)
    assert len(split[4]) > 5
    declared: set[str] = set()
    for transaction in split[4]:
        lines = transaction.text.splitlines()
        declared |= {line[1:].split()[0] for line in lines if line.startswith(":")}
        for line in lines:
            if " -j KPY-" in line:
                target = line.rsplit(" -j ", 1)[1].split()[0]
                assert target in declared, f"{line!r} jumps to a chain not created yet"
    joined = sorted(line for t in split[4] for line in t.text.splitlines() if line[0] in ":-")
    assert joined == sorted(line for line in single[4][0].text.splitlines() if line[0] in ":-")


def test_a_chain_longer_than_a_transaction_is_created_once_and_appended_to() -> None:
    """A cold sync writes each dispatch chain whole; at 100,000 Services that is 100,000
    jumps, which iptables-nft-restore handles in quadratic time in one transaction."""
    states = b.synthetic_states(30)
    want = render.desired(CTX, render.render(b.plan(states), CTX))
    dispatch: dict[Key, list[str]] = {}
    for key in want:
        if key.rule and key.chain in render.DISPATCH:
            dispatch.setdefault(Key(key.family, key.table, key.chain), []).append(key.rule)
    added = tuple(
        (key, tuple(dispatch.get(key, ())) if key.chain in render.DISPATCH else rules)
        for key, rules in want.items()
        if not key.rule
    )
    services = Key(4, NAT, "KPY-SERVICES")
    assert len(dict(added)[services]) > 30  # one per cluster IP, LB IP, the NodePort jump
    limit = 8
    absent = frozenset(key for key, _ in added)
    split = render.restores(diff.Diff(added=added), limit=limit, absent=absent)[4]
    declared: list[tuple[str, str]] = []
    filled: dict[tuple[str, str], list[str]] = {}
    for transaction in split:
        lines = transaction.text.splitlines()
        assert len([line for line in lines if line[0] in ":-"]) <= limit
        table = ""
        for line in lines:
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                declared.append((table, line[1:].split()[0]))
            elif line.startswith("-A "):
                chain, rule = line[3:].split(" ", 1)
                assert (table, chain) in declared, f"{line!r} before its chain is created"
                if " -j KPY-" in f" {rule}":
                    assert (table, rule.rsplit("-j ", 1)[1].split()[0]) in declared
                filled.setdefault((table, chain), []).append(rule)
    assert sorted(declared) == sorted(set(declared))  # declared (so flushed) once each
    for key, rules in added:
        if key.family == 4:
            assert tuple(filled.get((key.table, key.chain), ())) == rules, key  # all, in order
    long = [key.chain for key, rules in added if key.family == 4 and 1 + len(rules) > limit]
    assert "KPY-SERVICES" in long
    assert len(split) > len(long)
    # a chain that may exist is flushed by its declaration: refilled in the same transaction
    whole = render.restores(diff.Diff(added=added), limit=limit, absent=absent - {services})
    nat = [t.text.split("*nat\n", 1)[1] for t in whole[4] if "*nat\n" in t.text]
    (holding,) = [text for text in nat if ":KPY-SERVICES " in text]
    assert holding.count("-A KPY-SERVICES ") == len(dict(added)[services])


def test_a_large_removal_is_split_so_no_chain_is_deleted_while_referenced() -> None:
    states = b.synthetic_states(30)
    have = render.desired(CTX, render.render(b.plan(states), CTX))
    split = render.restores(diff.compute(have, {}), limit=100)[4]
    assert len(split) > 5
    # what still jumps to each chain, as the transactions run one after another
    references: dict[str, set[str]] = {}
    for key, rules in have.items():
        if key.family != 4:
            continue
        for rule in (key.rule,) if key.rule else rules:
            if " -j KPY-" in f" {rule}":
                target = rule.rsplit("-j ", 1)[1].split()[0]
                references.setdefault(target, set()).add(f"{key.chain} {rule}")
    for transaction in split:
        lines = transaction.text.splitlines()
        for line in lines:
            if line.startswith(":"):  # flushed
                chain = line[1:].split()[0]
                for refs in references.values():
                    refs -= {r for r in refs if r.startswith(f"{chain} ")}
            elif line.startswith("-D "):
                chain, rule = line[3:].split(" ", 1)
                for refs in references.values():
                    refs.discard(f"{chain} {rule}")
        for line in lines:
            if line.startswith("-X "):
                chain = line[3:]
                assert not references.get(chain), f"{chain} deleted while {references[chain]}"
    assert all(not refs for refs in references.values())


def test_source_ranges_without_endpoints_drop_outside_then_reject() -> None:
    svc = b.service(
        "lb", cluster_ip="10.96.0.12", type="LoadBalancer", node_port=30081,
        lb_ips=["172.18.0.50"], source_ranges=["203.0.113.0/24", "198.51.100.0/24"],
    )  # fmt: skip
    name = "default/lb:http/TCP"
    fw = render.chain_name("FW", name)
    objs = render.render_port(b.state(svc, []), CTX)
    reject = "REJECT --reject-with tcp-reset"
    lb = f'-d 172.18.0.50/32 -p tcp -m comment --comment "{name}" -m tcp --dport 80'
    targets = sorted(rule.rsplit(" -j ", 1)[1] for rule in rules(objs, FILTER, "KPY-SERVICES"))
    assert targets == [fw, reject, reject]  # the LoadBalancer IP, the cluster IP, the NodePort
    assert f"{lb} -j {fw}" in rules(objs, FILTER, "KPY-SERVICES")
    assert objs[Key(4, FILTER, fw)] == (  # the reset needs the rule to match TCP itself
        f"-s 203.0.113.0/24 -p tcp -j {reject}",
        f"-s 198.51.100.0/24 -p tcp -j {reject}",
        "-j DROP",
    )
    assert Key(4, NAT, fw) not in objs
    # endpoints elsewhere only, policy Local: drop inside the ranges too
    local = b.service(
        "lb", cluster_ip="10.96.0.12", type="LoadBalancer", node_port=30081, etp_local=True,
        lb_ips=["172.18.0.50"], source_ranges=["203.0.113.0/24"],
    )  # fmt: skip
    objs = render.render_port(b.state(local, [b.endpoint("10.244.2.6", node="node-b")]), CTX)
    assert objs[Key(4, FILTER, fw)] == ("-s 203.0.113.0/24 -j DROP", "-j DROP")


def test_pods_are_told_by_the_detect_local_mode() -> None:
    svc = b.service(
        "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
    )
    state = b.state(svc, [b.endpoint("10.244.1.10")])
    svc_chain = render.chain_name("SVC", "default/local:http/TCP")
    mark = render.MARK_MASQ
    node = b.node(pod_cidrs=("10.244.1.0/24", "fd00:244:1::/64"))
    note = '-m comment --comment "default/local:http/TCP" -m tcp --dport 80'
    match = f"-d 10.96.0.13/32 -p tcp {note}"

    def rendered(**config: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
        ctx = render.context(BackendConfig(**config), node)  # type: ignore[arg-type]
        objs = render.render_port(state, ctx)
        return chain(objs, "EXT"), chain(objs, "SVC")

    # ClusterCIDR (the default): the cluster CIDR
    ext, svc_rules = rendered(cluster_cidrs=CTX.cluster_cidrs)
    assert [r for r in ext if r.startswith("-s ")] == [f"-s 10.244.0.0/16 -j {svc_chain}"]
    assert svc_rules[0] == f"! -s 10.244.0.0/16 {match} -j {mark}"
    # ClusterCIDR without a cluster CIDR: upstream's no-op detector — no pod is told
    # apart (only the node itself), and cluster-IP traffic is not masqueraded
    ext, svc_rules = rendered()
    assert not [r for r in ext if r.startswith(("-s ", "-i "))]
    assert not [r for r in svc_rules if mark in r]
    # NodeCIDR: the Node's pod CIDR
    ext, svc_rules = rendered(cluster_cidrs=CTX.cluster_cidrs, detect_local_mode="NodeCIDR")
    assert ext[0] == f"-s 10.244.1.0/24 -j {svc_chain}"
    assert svc_rules[0] == f"! -s 10.244.1.0/24 {match} -j {mark}"
    # BridgeInterface, InterfaceNamePrefix: the input interface (iptables-save's order)
    ext, svc_rules = rendered(detect_local_mode="BridgeInterface", pod_bridge_interface="cni0")
    assert ext[0] == f"-i cni0 -j {svc_chain}"
    assert svc_rules[0] == f"-d 10.96.0.13/32 ! -i cni0 -p tcp {note} -j {mark}"
    ext, svc_rules = rendered(
        detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="cali"
    )
    assert ext[0] == f"-i cali+ -j {svc_chain}"
    assert "! -i cali+ -p tcp" in svc_rules[0]


def test_a_host_without_ip6tables_gets_ipv4_objects_only() -> None:
    ctx = render.Context(families=(4,))
    v6 = b.state(b.service("v6", cluster_ip="fd00:96::18"), [b.endpoint("fd00:244:1::5")])
    dual = b.state(
        b.service("dual", cluster_ip=["10.96.0.30", "fd00:96::30"]),
        [b.endpoint("10.244.1.5"), b.endpoint("fd00:244:1::5")],
    )
    assert render.render_port(v6, ctx) == {}
    assert {k.family for k in render.render_port(dual, ctx)} == {4}
    assert {k.family for k in render.render_port(dual, CTX)} == {4, 6}
    assert {k.family for k in render.desired(ctx, {})} == {4}
