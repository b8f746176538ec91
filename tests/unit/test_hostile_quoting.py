"""Object names reach rule text only through functions that are safe on any string.

kpy.core.convert refuses names Kubernetes would refuse, but the render functions must not
depend on it: these are the functions every name-derived piece of nft script and
iptables-restore input goes through, fed the strings an attacker would write.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kpy_iptables import render as ipt
from kpy_ipvs import render as ipvs
from kpy_nftables import render as nft

from kpy.core import diff
from kpy.core.backend import BackendConfig
from kpy.core.model import Protocol, ServicePortName, ServicePortState
from kpy.testing import builders as b

NASTY = [
    "",
    "web\n-A PREROUTING -p tcp -j DNAT --to-destination 6.6.6.6:1",
    "web\r\nCOMMIT\n*nat",
    'web" -j ACCEPT -m comment --comment "x',
    "web' ; flush ruleset ; '",
    "web}; add table ip evil {",
    "web # comment",
    "we\\b\\",
    "web\x00tail",
    "web\t\x0b\x0c",
    "wéb-ünïcødé-名前",
    "\ud800lone-surrogate",
    "a" * 300,
    "-A PREROUTING -j DNAT --to-destination 1.2.3.4",
    "$(reboot)",
    "../../etc",
    "__",
    "~",
    "web/other:port",
]

VALID = ["web", "kube-system", "http", "a" * 63, "x1", "", "dns-tcp"]


@pytest.mark.parametrize("text", NASTY)
def test_nftables_label_part_is_plain(text: str) -> None:
    part = nft.label_part(text)
    assert re.fullmatch(r"[a-z0-9._-]{0,63}", part), part
    assert part == nft.label_part(text)  # stable: the same chain name after a restart
    if text:
        assert part.startswith("_")  # never mistaken for a real name


@pytest.mark.parametrize("text", VALID)
def test_valid_names_are_kept_readable(text: str) -> None:
    assert nft.label_part(text) == text
    name = ServicePortName(namespace="default", name="web", port=text, protocol=Protocol.TCP)
    assert ipt.port_text(name) == str(name)


def test_distinct_nasty_names_stay_distinct() -> None:
    assert len({nft.label_part(t) for t in NASTY}) == len(NASTY)
    names = [ServicePortName(namespace=t, name=t, port=t, protocol=Protocol.UDP) for t in NASTY]
    assert len({ipt.port_text(n) for n in names}) == len(NASTY)


@pytest.mark.parametrize("text", NASTY)
def test_nftables_quote_cannot_end_the_string(text: str) -> None:
    quoted = nft._quote(text)
    inner = quoted[1:-1]
    assert quoted[0] == quoted[-1] == '"'
    assert re.fullmatch(r"[A-Za-z0-9 _.:/~=+,-]*", inner), inner
    assert len(inner) <= nft.COMMENT_MAX


@pytest.mark.parametrize("text", NASTY)
def test_iptables_comment_cannot_end_the_rule(text: str) -> None:
    match = ipt.comment(text)
    head, _, rest = match.partition('--comment "')
    assert head == "-m comment " and rest.endswith('"')
    inner = rest[:-1]
    assert re.fullmatch(r"[A-Za-z0-9 _.:/=+,-]*", inner), inner
    assert len(inner) <= ipt.COMMENT_MAX


@given(st.text())
def test_quoting_is_plain_for_any_string(text: str) -> None:
    assert re.fullmatch(r"[a-z0-9._-]{0,63}", nft.label_part(text))
    assert "\n" not in nft._quote(text) and '"' not in nft._quote(text)[1:-1]
    match = ipt.comment(text)
    assert "\n" not in match and '"' not in match.partition('"')[2][:-1]


def _states(text: str) -> list[ServicePortState]:
    return [
        b.state(
            b.service(
                text,
                namespace=text,
                port_name_=text,
                type="NodePort",
                node_port=30080,
                affinity=True,
            ),
            [b.endpoint("10.244.1.5")],
        )
    ]


@pytest.mark.parametrize("text", NASTY)
def test_nftables_objects_hold_no_name_text(text: str) -> None:
    (state,) = _states(text)
    config = BackendConfig(node_name="node-a")
    objs = nft.port_objects(state, config)
    script = nft.transaction(objs, {}, objs).script
    assert objs and script
    for line in script.splitlines():
        assert re.fullmatch(r"[ -~]*", line), line  # printable ASCII, one command a line
        assert line.count('"') % 2 == 0
    assert len(text) < 4 or text not in script or nft.label_part(text) == text


@pytest.mark.parametrize("text", NASTY)
def test_iptables_restore_holds_no_name_text(text: str) -> None:
    (state,) = _states(text)
    objs = ipt.render_port(state, ipt.Context())
    restores = ipt.restore(diff.compute({}, objs))
    assert restores
    for family_restore in restores.values():
        for line in family_restore.text.splitlines():
            assert re.fullmatch(r"[ -~]*", line), line
            assert line.startswith((":KPY-", "-A KPY-", "-I KPY-", "*", "COMMIT")), line
            assert line.count('"') % 2 == 0


@pytest.mark.parametrize("text", NASTY)
def test_ipvs_objects_hold_no_name_text(text: str) -> None:
    (state,) = _states(text)
    ctx = ipvs.context(BackendConfig(node_name="node-a"), b.node())
    objs = ipvs.render_port(state, ctx)
    assert len(text) < 4 or text not in repr(objs)
