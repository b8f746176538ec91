"""References between docs and code point at something that exists.

Docs, READMEs, docstrings and comments name files (``kpy/core/tracker.py``,
``docs/decisions/iptables.md``) and modules or attributes
(``kpy.core.backend.desired_view``). When code moves, a stale name misleads the next
reader; this test finds every such name and checks that the file exists or the module
imports and has the attribute.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = ("kpy", "backends", "docs", "tests", "bench", "scripts", "deploy", "vagrant", "examples")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP) + r")/[\w./-]*\w)")
DOTTED = re.compile(
    r"(?<![\w./-])((?:kpy|kpy_nftables|kpy_iptables|kpy_ipvs|kpy_userspace)(?:\.\w+)+)"
)
# Names that look like modules or repository paths but are not: the entry-point group,
# file names, label prefixes, kubectl resources, series names in plots, pages of
# kubernetes.io, files the Vagrant lab generates.
NOT_MODULES = frozenset({"kpy.backends", "kpy.yaml", "kpy.kubeconfig"})
NOT_PATHS = frozenset(
    {
        "kpy/iptables",
        "kpy/nftables",
        "deploy/coredns",
        "vagrant/.cluster",
        "vagrant/.cluster/join.sh",
        "docs/reference/using-api/api-concepts",
        "docs/concepts/overview/working-with-objects/labels",
    }
)


def _sources() -> list[Path]:
    files = [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("*/README.md")]
    files += REPO.glob("backends/*/README.md")
    for top in ("kpy", "backends", "tests", "bench"):
        files += REPO.glob(f"{top}/**/*.py")
    this = Path(__file__).resolve()
    return sorted(
        {f for f in files if ".venv" not in f.parts and "golden" not in f.parts and f != this}
    )


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _references(text: str) -> tuple[set[str], set[str]]:
    paths: set[str] = set()
    names: set[str] = set()
    for line in text.splitlines():
        if "get_logger(" in line:
            continue
        for m in PATH.finditer(line):
            if line[m.end() : m.end() + 1] not in ("*", "<", "{"):  # a glob or a pattern
                paths.add(m.group(1))
        for m in DOTTED.finditer(line):
            # kpy.io/... is an annotation domain; kpy.apply(...) a variable named kpy
            if line[m.end() : m.end() + 1] not in ("/", "("):
                names.add(m.group(1))
    return paths - NOT_PATHS, names - NOT_MODULES


def test_every_referenced_file_and_module_exists() -> None:
    broken: list[str] = []
    for source in _sources():
        paths, names = _references(source.read_text())
        where = source.relative_to(REPO)
        broken += [f"{where}: {p}" for p in sorted(paths) if not (REPO / p).exists()]
        broken += [f"{where}: {n}" for n in sorted(names) if not _resolves(n)]
    assert not broken, "stale references:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("see kpy/core/tracker.py", True),
        ("see kpy/tracker.py", False),
        ("``kpy.core.backend.desired_view``", True),
        ("``kpy.core.backend.no_such_thing``", False),
        ("kpy.select", False),
    ],
)
def test_the_checker_catches_a_stale_reference(text: str, ok: bool) -> None:
    paths, names = _references(text)
    assert paths or names
    result = all((REPO / p).exists() for p in paths) and all(_resolves(n) for n in names)
    assert result is ok
