"""Boot a User-Mode Linux guest, run ``tests/uml/guest`` in it, report each module's result.

The guest (a real 6.1 kernel with IPVS) runs pytest once for every guest module and
writes a JUnit report into the run's result directory — the only host path it can
write. Each host test below stands for one guest module and fails with the guest's
failure text; a guest that hangs is killed after its time limit.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpy.testing import uml

GUEST = Path(__file__).parent / "guest"
MODULES = sorted(p.stem for p in GUEST.glob("test_*.py"))
TIME_LIMIT = 480.0  # the guest needs 160-220 s on 2 busy cores; twice that before it counts as hung

pytestmark = pytest.mark.uml


@pytest.fixture(scope="module")
def guest_run() -> Iterator[uml.GuestRun]:
    reason = uml.unavailable()
    if reason is not None:
        pytest.skip(f"User-Mode Linux unavailable: {reason}")
    run = uml.run(
        [
            uml.python(),
            "-m",
            "pytest",
            str(GUEST.relative_to(uml.REPO_ROOT)),
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={uml.GUEST_RESULT_DIR}/junit.xml",
        ],
        timeout=TIME_LIMIT,
        # the guest imports the code this host process runs (a checkout's own PYTHONPATH)
        env={"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {},
    )
    try:
        yield run
    finally:
        uml.remove(run)


def _cases(run: uml.GuestRun) -> list[ET.Element]:
    report = run.result_dir / "junit.xml"
    if not report.exists():
        pytest.fail(
            f"the guest wrote no report (timed out: {run.timed_out}, {run.seconds:.0f} s)\n"
            f"--- output ---\n{run.output[-3000:]}\n--- console ---\n{run.console[-3000:]}"
        )
    return list(ET.parse(report).getroot().iter("testcase"))


def test_guest_finished(guest_run: uml.GuestRun) -> None:
    assert not guest_run.timed_out, f"guest killed after {TIME_LIMIT} s"
    assert guest_run.exit_status is not None, guest_run.console[-3000:]


@pytest.mark.parametrize("module", MODULES)
def test_guest_module(guest_run: uml.GuestRun, module: str) -> None:
    cases = [
        c
        for c in _cases(guest_run)
        if c.get("classname", "").split(".")[-2:][0] == module
        or c.get("classname", "").endswith(f".{module}")
        or f".{module}." in c.get("classname", "")
    ]
    assert cases, f"no guest results for {module}:\n{guest_run.output[-3000:]}"
    failures = []
    for case in cases:
        for tag in ("failure", "error", "skipped"):
            for found in case.iter(tag):
                text = found.text or found.get("message", "")
                failures.append(f"{case.get('classname')}::{case.get('name')} {tag}:\n{text}")
    assert not failures, "\n\n".join(failures)
