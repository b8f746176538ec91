"""The IPVS backend's netlink pipeline against the host kernel (no IPVS needed): addresses
on ``lo`` and companion set elements in a throwaway namespace, sent in windows, each
failure attributed to its own message while every other message still lands."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from functools import partial

import pytest
from kpy_ipvs import render
from kpy_ipvs.apply import SET_TYPES, WINDOW_MESSAGES, Kernel, KernelError
from kpy_ipvs.render import Element

from kpy.core.backend import BackendConfig
from kpy.core.model import IPAddress
from kpy.testing import builders as b
from tests.conftest import require_root


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    require_root()
    name = f"kpy-pipe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    kernel = Kernel(name)
    try:
        yield kernel
    finally:
        kernel.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


def _bound(kernel: Kernel) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", str(kernel.netns), "-o", "addr", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def test_window_of_addresses_with_one_failure(kernel: Kernel) -> None:
    base = ipaddress.ip_address("10.77.0.1")
    wanted: list[IPAddress] = [base + i for i in range(WINDOW_MESSAGES * 2 + 7)]
    wanted.append(ipaddress.ip_address("fd00:77::1"))
    duplicate = wanted[WINDOW_MESSAGES + 3]
    queue = [*wanted[: WINDOW_MESSAGES + 10], duplicate, *wanted[WINDOW_MESSAGES + 10 :]]
    done: list[IPAddress] = []

    def run() -> None:
        for addr in queue:
            kernel.add_address(1, addr, partial(done.append, addr))
        kernel.flush()

    with pytest.raises(KernelError) as failed:
        kernel._executor.submit(run).result()
    assert str(failed.value) == f"add address {duplicate}: File exists"
    assert sorted(map(str, done)) == sorted(map(str, wanted))  # every other one, once
    assert kernel.sent == len(queue)
    assert {str(a) for a in wanted} <= _bound(kernel)

    def remove() -> None:
        for addr in wanted:
            kernel.del_address(1, addr)
        kernel.flush()

    kernel._executor.submit(remove).result()
    assert not {str(a) for a in wanted} & _bound(kernel)


def _saved(kernel: Kernel) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", str(kernel.netns), "ipset", "save"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in out.splitlines() if line.startswith("add ")}


def test_set_elements_over_netlink(kernel: Kernel) -> None:
    script = "".join(
        f"create {name} {typ} family {'inet6' if version == 6 else 'inet'} "
        f"{render.create_options(name)}\n"
        for name, typ, version in render.set_names()
    )
    subprocess.run(
        ["ip", "netns", "exec", str(kernel.netns), "ipset", "restore"],
        input=script,
        text=True,
        check=True,
    )
    elements = [
        Element(set="KPY-IPVS-MASQ", value="10.96.0.10,tcp:80"),
        Element(set="KPY-IPVS-DROP6", value="fd00::10,udp:53"),
        Element(set="KPY-IPVS-ALLOWED", value="203.0.113.7,tcp:443,198.51.100.0/24"),
        Element(set="KPY-IPVS-ALLOWED6", value="2001:db8::7,tcp:443,2001:db8:1::/48"),
        Element(set="KPY-IPVS-LOOPBACK", value="10.244.1.2,sctp:9000,10.244.1.2"),
        Element(set="KPY-IPVS-LOOPBACK6", value="fd00:244::2,tcp:8080,fd00:244::2"),
        Element(set="KPY-IPVS-SHORT", value="172.18.0.10,tcp:80 skbmark 0xe1600000/0xffff0000"),
        Element(set="KPY-IPVS-SHORT6", value="fd00:18::10,udp:53 skbmark 0x10000/0xffff0000"),
    ]
    done: list[Element] = []

    def add() -> None:
        kernel.change_elements([*elements, elements[0]], (), done.append)  # repeat: no error
        kernel.flush()

    kernel._executor.submit(add).result()
    assert sorted(done) == sorted([*elements, elements[0]])
    assert _saved(kernel) == {f"add {e.set} {e.value}" for e in elements}, "as ipset prints it"
    # read back over nfnetlink (adoption's read): the same elements, every set present
    present, read = kernel._executor.submit(kernel.dump_sets).result()
    assert present == {name for name, _, _ in render.set_names()}
    assert read == set(elements)

    missing = Element(set="KPY-IPVS-NOSUCH", value="10.96.0.10,tcp:80")
    SET_TYPES[missing.set] = "ip,port"
    try:

        def delete() -> None:
            kernel.change_elements((), [missing, *elements[:3]])
            kernel.flush()

        with pytest.raises(KernelError, match="ipset del KPY-IPVS-NOSUCH"):
            kernel._executor.submit(delete).result()
    finally:
        del SET_TYPES[missing.set]
    assert _saved(kernel) == {f"add {e.set} {e.value}" for e in elements[3:]}
    assert kernel._executor.submit(kernel.dump_sets).result()[1] == set(elements[3:])


def _ipset(kernel: Kernel, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", str(kernel.netns), "ipset", *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_companion_sets_are_made_again_with_room_past_ipsets_default(kernel: Kernel) -> None:
    """A set made with ipset's default ceiling (65,536 elements, as an earlier kpy made
    them) is replaced by one made with today's options — swapped in, so the rules that
    use it keep their reference — and then takes more elements than that ceiling (with
    it, a cluster of ~70,000 Service ports failed every full sync: "hash is full")."""
    _ipset(kernel, "create", "KPY-IPVS-CLUSTER", "hash:ip,port", "family", "inet")
    _ipset(kernel, "add", "KPY-IPVS-CLUSTER", "10.96.0.1,tcp:1")
    _ipset(kernel, "create", "KPY-IPVS-NEW", "hash:ip")  # left by an interrupted swap
    node = b.node(addresses=["192.168.50.1"])
    ctx = render.context(BackendConfig(node_name=node.name), node)
    wanted = [Element(set="KPY-IPVS-MASQ", value="10.96.0.10,tcp:80")]
    kernel._executor.submit(kernel.write_companion, ctx, wanted).result()
    header = _ipset(kernel, "list", "-t", "KPY-IPVS-CLUSTER")
    assert f"maxelem {render.MAXELEM}" in header
    assert "KPY-IPVS-NEW" not in _ipset(kernel, "list", "-n").split()
    assert _saved(kernel) == {"add KPY-IPVS-MASQ 10.96.0.10,tcp:80"}  # the old one gone

    count = 70_000
    many = [
        Element(set="KPY-IPVS-CLUSTER", value=f"{ipaddress.ip_address('10.96.0.0') + i},tcp:80")
        for i in range(count)
    ]

    def add() -> None:
        kernel.change_elements(many, ())
        kernel.flush()

    kernel._executor.submit(add).result()
    assert f"Number of entries: {count}" in _ipset(kernel, "list", "-t", "KPY-IPVS-CLUSTER")


def test_a_full_set_is_named_as_full(kernel: Kernel) -> None:
    """ipset's own error numbers come in words, not as strerror's "Unknown error 4352"."""
    _ipset(kernel, "create", "KPY-IPVS-TINY", "hash:ip,port", "maxelem", "1")
    SET_TYPES["KPY-IPVS-TINY"] = "ip,port"
    try:
        elements = [Element(set="KPY-IPVS-TINY", value=f"10.96.0.{i},tcp:80") for i in (1, 2)]

        def add() -> None:
            kernel.change_elements(elements, ())
            kernel.flush()

        with pytest.raises(KernelError, match=r"10\.96\.0\.2,tcp:80: set is full"):
            kernel._executor.submit(add).result()
    finally:
        del SET_TYPES["KPY-IPVS-TINY"]
