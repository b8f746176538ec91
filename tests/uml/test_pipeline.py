"""The IPVS backend's netlink pipeline against the host kernel (rtnetlink, no IPVS needed):
addresses on ``lo`` of a throwaway namespace, sent in windows, each failure attributed to
its own message while every other message still lands."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from functools import partial

import pytest
from kpy_ipvs.apply import WINDOW_MESSAGES, Kernel, KernelError

from kpy.model import IPAddress
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
