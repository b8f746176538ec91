"""Suite-wide rules: privileged tests skip outside root, but under CI a skip is a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kpy.testing.netns import scratch

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    expected_failure = hasattr(report, "wasxfail")  # xfail is a result, not a skip
    if IN_CI and report.skipped and not expected_failure and report.when in {"setup", "call"}:
        # Under CI every privileged test must run: turn the skip into a failure.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI=true), which counts as a failure: {reason}"


def require_root() -> None:
    """Skip (or, under CI, fail) a test that needs root and network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh network namespace for one test (root), named after the test's module."""
    require_root()
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with scratch(f"kpy-{module[:6]}") as name:
        yield name
