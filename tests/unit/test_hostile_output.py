"""``-o json`` is JSON: every warning kpy or Python emits while an offline command runs
goes to stderr, and stdout carries only the requested output (a crafted manifest used
to put warnings on stdout and make the output unparsable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import corpus

# Every kpy command as a real process (structlog's configuration is per process), with
# a Python warning raised first, as a library might.
RUN = (
    "import sys, warnings; warnings.warn('a library warns', UserWarning); "
    "from kpy.cli import main; sys.argv[0] = 'kpy'; main()"
)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifests that warn a lot: bad names, values and documents beside good ones."""
    directory = tmp_path_factory.mktemp("crafted")
    import yaml

    (directory / "good.yaml").write_text(yaml.safe_dump_all(corpus.GOOD))
    small = [c for c in corpus.cases() if c.data and len(c.data) < 100_000]
    for case in small:
        (directory / f"{case.name}{case.suffix}").write_bytes(case.data)
    return directory


def kpy(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["dump", "-o", "json"],
        ["dump", "-o", "yaml"],
        ["plan", "-o", "json"],
        ["explain", "--from", "10.244.1.50", "--to", "10.96.0.101:80", "-o", "json"],
    ],
    ids=["dump-json", "dump-yaml", "plan-json", "explain-json"],
)
def test_stdout_is_only_the_output(argv: list[str], crafted: Path) -> None:
    done = kpy(
        *argv, "--manifests", str(crafted), "--node", corpus.NODE, "--node-ip", corpus.NODE_IP
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if "yaml" in argv:
        import yaml

        data = yaml.safe_load(done.stdout)
    else:
        data = json.loads(done.stdout)
    assert data
    assert "a library warns" in done.stderr
    assert "object_skipped" in done.stderr and "manifest_unreadable" in done.stderr
    assert "Traceback" not in done.stderr
