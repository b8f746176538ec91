"""Files the product finds relative to its own modules exist (a module moved to another
folder must not lose them)."""

from __future__ import annotations

from kpy.testing import uml
from kpy.tools.lab import control_plane, lab


def test_repository_files_found_from_modules() -> None:
    assert lab.DAEMONSET.is_file()
    assert control_plane.BUILD_SCRIPT.is_file()
    assert (uml.REPO_ROOT / "pyproject.toml").is_file()
    assert uml.XSTATE_SHIM_SOURCE.is_file()
