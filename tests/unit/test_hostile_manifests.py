"""The manifests source against files that cannot be read: each is one warning, the
file is skipped, and the running agent keeps serving (it used to exit on a file nested
100,000 deep)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog
import yaml

from kpy.core import convert
from kpy.sources import manifests
from kpy.testing.fake_backend import FakeBackend
from tests.agents import quick_agent, running, until, write

UNREADABLE = {
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
    "deep.yaml": b"a: " + b"[" * 100_000 + b"]" * 100_000,
    "deep-below-libyaml.yaml": b"a: " + b"[" * 900 + b"]" * 900,
    "bomb.yaml": (
        b"a: &a [x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n".encode()
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
    ),
    "loop.yaml": b"a: &x [1, *x]\n",
    "bad-utf8.yaml": b"kind: Service\nmetadata: {name: \xff}\n",
    "tag.yaml": b"kind: !!python/object/apply:os.system [true]\n",
    "syntax.json": b'{"kind": ',
    "huge-int.json": b'{"port": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_files_are_one_error_each(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(UNREADABLE[name])
    objects, errors = manifests.load([tmp_path])
    assert objects == {} and len(errors) == 1 and errors[0].path.endswith(name)
    assert "\n" not in errors[0].reason and len(errors[0].reason) < 700


def test_a_file_over_the_size_limit_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_bytes(b"#" * (manifests.MAX_FILE_BYTES + 1))
    _, errors = manifests.load([tmp_path])
    assert "larger than" in errors[0].reason


def test_shape_limits() -> None:
    manifests.check_shape([[[]]])
    nested: list[object] = []
    for _ in range(manifests.MAX_DEPTH + 1):
        nested = [nested]
    with pytest.raises(manifests.ManifestError, match="deeper"):
        manifests.check_shape(nested)
    shared = ["x"] * 100
    with pytest.raises(manifests.ManifestError, match="aliases"):
        manifests.check_shape([[shared] * 100] * 300)  # 3,000,000 values, 400 distinct
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(manifests.ManifestError, match="itself"):
        manifests.check_shape(loop)


def test_non_objects_and_nameless_objects_are_noted(tmp_path: Path) -> None:
    (tmp_path / "odd.yaml").write_text(
        "--- 42\n--- [a]\n--- {kind: Service, metadata: {namespace: x}}\n"
        "--- {kind: ServiceList, items: [1]}\n--- {metadata: {name: x}}\n"
    )
    notes: list[str] = []
    assert manifests.read_file(tmp_path / "odd.yaml", notes) == {}
    assert len(notes) == 5, notes


def test_the_running_agent_survives_unreadable_files(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5"])
    backend = FakeBackend()

    async def main() -> None:
        async with running(quick_agent(tmp_path, backend)) as task:
            await until(lambda: "default/web:http/TCP" in backend.programmed)
            with structlog.testing.capture_logs() as logs:
                for name, data in UNREADABLE.items():
                    (tmp_path / name).write_bytes(data)
                # An edit after the bad files still arrives: the source is alive.
                write(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.244.1.5", "10.244.1.6"])
                await until(
                    lambda: len(backend.programmed["default/web:http/TCP"].endpoints) == 2,
                    timeout=30,
                )
                write(tmp_path / "api.yaml", "api", "10.96.0.11", ["10.244.1.7"])
                await until(lambda: "default/api:http/TCP" in backend.programmed, timeout=30)
            assert not task.done()
            unreadable = [e for e in logs if e["event"] == "manifest_unreadable"]
            assert sorted(Path(e["path"]).name for e in unreadable) == sorted(UNREADABLE)

    asyncio.run(main())


def test_yaml_documents_still_load(tmp_path: Path) -> None:
    docs = [{"kind": "Service", "metadata": {"name": f"s{i}", "namespace": "a"}} for i in range(3)]
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "list.json").write_text(
        '{"kind": "ServiceList", "items": [{"metadata": {"name": "t"}}]}'
    )
    objects, errors = manifests.load([tmp_path])
    assert errors == [] and len(objects) == 4


def test_oversized_lists_are_counted_not_built(tmp_path: Path) -> None:
    endpoints = "".join(f"- addresses: [10.0.{i // 250}.{i % 250}]\n" for i in range(1500))
    (tmp_path / "big.yaml").write_text(
        "kind: EndpointSlice\n"
        "metadata: {name: big, namespace: default, labels: {kubernetes.io/service-name: web}}\n"
        f"addressType: IPv4\nendpoints:\n{endpoints}ports:\n- {{name: http, port: 80}}\n"
    )
    notes: list[str] = []
    objects = manifests.read_file(tmp_path / "big.yaml", notes)
    (obj,) = objects.values()
    assert notes == ["endpoints has 1500 entries, more than 1000: not read"]
    assert obj["endpoints"] == "1500 entries, more than 1000: not read"
    assert obj["ports"] == [{"name": "http", "port": 80}]  # the rest is read as it was
    result, problems = convert.endpoint_slice(obj)
    assert result is None and "more than 1000" in problems[0].reason


@pytest.mark.parametrize(
    "text",
    [
        "spec:\n  externalIPs:\n" + "  - 192.0.2.1\n" * 257 + "  clusterIP: 10.96.0.1\n",
        "spec: {ports: [" + ", ".join(["{port: 1}"] * 257) + "], clusterIP: 10.96.0.1}\n",
        "a:\n- b:\n    addresses:\n" + "    - 1.1.1.1\n" * 101 + "    next: 1\n- c: 2\n",
    ],
    ids=["block", "flow", "nested"],
)
def test_what_follows_a_cut_list_is_kept(text: str, tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(text)
    notes: list[str] = []
    docs = manifests._documents(tmp_path / "x.yaml", notes)
    assert len(notes) == 1
    dumped = yaml.safe_dump(docs)
    assert "not read" in dumped and ("10.96.0.1" in dumped or "next: 1" in dumped)
