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
TIME_LIMIT = 3600.0  # an upper bound only; a hang is silence:
SILENCE_LIMIT = 300.0  # no console output for this long (each guest test prints as it ends)

pytestmark = pytest.mark.uml


def _selected(session: pytest.Session) -> list[str]:
    """The guest modules whose host test was selected (``-k``): the guest runs only
    those; every one when none is singled out."""
    chosen = {
        str(item.callspec.params["module"])
        for item in session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_guest_module"
        and hasattr(item, "callspec")
    }
    return sorted(chosen) if chosen else MODULES


@pytest.fixture(scope="module")
def guest_run(request: pytest.FixtureRequest) -> Iterator[uml.GuestRun]:
    reason = uml.unavailable()
    if reason is not None:
        pytest.skip(f"User-Mode Linux unavailable: {reason}")
    folder = GUEST.relative_to(uml.REPO_ROOT)
    modules = _selected(request.session)
    paths = [str(folder)] if modules == MODULES else [str(folder / f"{m}.py") for m in modules]
    # the host's import path (a checkout run with PYTHONPATH) holds in the guest too
    path = os.environ.get("PYTHONPATH")
    run = uml.run(
        [
            uml.python(),
            "-m",
            "pytest",
            *paths,
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={uml.GUEST_RESULT_DIR}/junit.xml",
        ],
        timeout=TIME_LIMIT,
        idle=SILENCE_LIMIT,
        # unbuffered: each test's progress reaches the output as it ends (the silence limit)
        env={"PYTHONUNBUFFERED": "1", **({"PYTHONPATH": path} if path else {})},
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
    assert not guest_run.timed_out, f"guest killed: silent {SILENCE_LIMIT} s or over {TIME_LIMIT} s"
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
