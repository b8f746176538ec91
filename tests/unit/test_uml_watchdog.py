"""The UML guest watchdog: a guest is hung when its output stops growing, not when a
fixed time has passed (a loaded machine makes a guest slow, not silent)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kpy.testing.uml import _wait_guest


def _writer(out: Path, lines: int, then_sleep: float) -> subprocess.Popen[bytes]:
    script = f'for i in $(seq {lines}); do echo x >> "$0"; sleep 0.1; done; sleep {then_sleep}'
    return subprocess.Popen(["sh", "-c", script, str(out)])


def test_a_silent_guest_is_stopped_long_before_the_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "output.txt"
    proc = _writer(out, lines=3, then_sleep=600)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _wait_guest(proc, (tmp_path / "console.log", out), timeout=600, idle=0.5)
        assert proc.poll() is None  # still running: stopped for silence, not for the limit
    finally:
        proc.kill()
        proc.wait()


def test_a_guest_that_keeps_writing_runs_past_the_silence_limit(tmp_path: Path) -> None:
    out = tmp_path / "output.txt"
    proc = _writer(out, lines=20, then_sleep=0)  # ~2 s of output, never silent for 5 s
    _wait_guest(proc, (out,), timeout=600, idle=5.0)
    assert proc.returncode == 0
    assert out.read_text().count("x") == 20
