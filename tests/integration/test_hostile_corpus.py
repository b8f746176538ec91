"""The hostile-input corpus (tests/hostile/corpus.py) through every way in: the
manifests source, the ``kpy`` offline commands, the fake API server and the kube
source, and every backend's render — beside good objects that must still be
programmed. Nothing may raise, nothing may be written outside kpy's own objects, no
good object may be lost, and ``-o json`` must stay JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from kpy_iptables import render as ipt
from kpy_ipvs import render as ipvs
from kpy_nftables import render as nft
from kpy_userspace import render as userspace

from kpy import cli
from kpy.core import convert, diff
from kpy.core.backend import BackendConfig, parse_networks
from kpy.core.model import Plan
from kpy.sources.kube import BackoffPolicy
from kpy.testing.apiserver import ApiError, FakeApiServer
from kpy.testing.netns import nft as run_nft
from kpy.testing.netns import scratch
from tests.agents import kube_agent
from tests.conftest import require_root
from tests.hostile import corpus

CASES = corpus.cases()
FILE_CASES = [c for c in CASES if c.data]
NODE, NODE_IP = corpus.NODE, corpus.NODE_IP


def _write(directory: Path, cases: list[corpus.Case]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "00-good.yaml").write_text(yaml.safe_dump_all(corpus.GOOD))
    for case in cases:
        if case.data:
            (directory / f"{case.name}{case.suffix}").write_bytes(case.data)
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("hostile"), FILE_CASES)


def _names_are_kubernetes_names(plan: Plan) -> None:
    for name in plan.services:
        assert convert.valid_name(name.namespace, "dns-1123-label"), name
        assert convert.valid_name(name.name, "dns-1035-label"), name
        assert convert.valid_name(name.port, "dns-1123-label"), name


def _offline(directory: Path) -> tuple[Plan, list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as logs:
        plan = cli._offline_plan((str(directory),), NODE, (NODE_IP,))
    return plan, logs


def _warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("log_level") in ("warning", "error")]


_RESULTS: dict[str, tuple[int, int, int]] = {}  # case → objects tried, handled, lost


def _manifests_case(
    case: corpus.Case, directory: Path
) -> tuple[Plan, list[MutableMapping[str, Any]]]:
    plan, logs = _offline(_write(directory, [case]))
    failed = [e for e in logs if e.get("event") == "event_failed"]
    handled = case.objects if (_warnings(logs) or not case.warns) and not failed else 0
    lost = len(corpus.GOOD_PORTS - {str(k) for k in plan.services})
    _RESULTS[case.name] = (case.objects, handled, lost)
    return plan, logs


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.name for c in FILE_CASES])
def test_manifests_each_case_is_warned_about_and_good_objects_stay(
    case: corpus.Case, tmp_path: Path
) -> None:
    plan, logs = _manifests_case(case, tmp_path)
    assert {str(k) for k in plan.services} >= corpus.GOOD_PORTS
    _names_are_kubernetes_names(plan)
    warnings = _warnings(logs)
    assert not [e for e in logs if e.get("event") == "event_failed"], logs
    if case.objects and case.warns:
        assert warnings, f"{case.name}: no warning"
        for entry in warnings:  # one line each, short, and printable
            text = json.dumps(entry)
            assert len(text) < 2_000, text


def figures() -> dict[str, dict[str, int]]:
    """Objects tried, handled (warned about, nothing raised, nothing injected) and lost
    (good objects not programmed), per way in; measured by the tests below."""
    return _FIGURES


_FIGURES: dict[str, dict[str, int]] = {}


def test_manifests_corpus_figures(tmp_path: Path) -> None:
    for case in FILE_CASES:  # the cases not run above (-k), measured now
        if case.name not in _RESULTS:
            _manifests_case(case, tmp_path / case.name)
    tried, handled, lost = (sum(r[i] for r in _RESULTS.values()) for i in range(3))
    _FIGURES["manifests"] = {"tried": tried, "handled": handled, "lost": lost}
    print(f"manifests: {_FIGURES['manifests']}")
    assert (handled, lost) == (tried, 0)


def _kpy(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kpy", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def offline_runs(corpus_dir: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    where = ["--manifests", str(corpus_dir), "--node", NODE, "--node-ip", NODE_IP]
    return {
        "dump": _kpy("dump", *where, "-o", "json"),
        "plan": _kpy("plan", *where, "-o", "json"),
        "explain": _kpy(
            "explain", *where, "--from", "10.244.1.50", "--to", "10.96.0.101:80", "-o", "json"
        ),
    }


@pytest.mark.parametrize("command", ["dump", "plan", "explain"])
def test_offline_commands_keep_stdout_json(
    command: str, offline_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    run = offline_runs[command]
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    data = json.loads(run.stdout)  # only the requested output on stdout
    assert "warning" in run.stderr  # the warnings went to stderr
    text = json.dumps(data)
    if command == "dump":
        assert all(f"default/good-{x}" in text for x in "abc")
    if command == "plan":
        assert set(data["changed"]) >= corpus.GOOD_PORTS
    if command == "explain":
        assert "10.244.1.11" in text  # good-a's endpoint


# --------------------------------------------------------------------------- backends


def _victims(netns: str) -> str:
    run_nft(
        netns,
        "-f",
        "-",
        script="table ip victim {\n chain pre {\n  type nat hook prerouting priority -150;\n"
        "  ip saddr 192.0.2.99 counter accept\n }\n}\n",
    )
    return run_nft(netns, "list", "table", "ip", "victim")


def in_netns(netns: str, *argv: str, text: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def corpus_plan(corpus_dir: Path) -> Plan:
    plan, _ = _offline(corpus_dir)
    return plan


@pytest.mark.root
def test_kpy_plan_nftables_transaction_stays_in_kpys_tables(corpus_dir: Path) -> None:
    require_root()
    with scratch("kpy-hcp") as observed, scratch("kpy-hca") as target:
        run = _kpy(
            "plan",
            *("--manifests", str(corpus_dir), "--node", NODE, "--node-ip", NODE_IP),
            *("--backend", "nftables", "--netns", observed, "-o", "json"),
        )
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        script = json.loads(run.stdout)["transaction"]
        assert all(f"default/good-{x}/tcp/http" in script for x in "abc")
        before = _victims(target)
        run_nft(target, "-f", "-", script=script)
        tables = run_nft(target, "list", "tables").split()
        names = {tables[i + 2] for i in range(0, len(tables), 3)} - {"victim"}
        assert names and all(nft.is_kpy_table(t) for t in names), names
        assert run_nft(target, "list", "table", "ip", "victim") == before


@pytest.mark.root
def test_iptables_render_of_the_corpus_stays_in_kpys_chains(corpus_plan: Plan) -> None:
    require_root()
    ctx = ipt.context(
        BackendConfig(node_name=NODE, cluster_cidrs=parse_networks(["10.244.0.0/16"])),
        corpus_plan.node,
    )
    ctx = ipt.Context(cluster_cidrs=ctx.cluster_cidrs, pod_cidrs=ctx.pod_cidrs, families=(4,))
    want = ipt.desired(ctx, ipt.render(corpus_plan, ctx))
    text = ipt.restore(diff.compute({}, want))[4].text
    assert all(f"default/good-{x}:http/TCP" in text for x in "abc")
    foreign = "*nat\n-A PREROUTING -s 192.0.2.99/32 -j ACCEPT\nCOMMIT\n"
    jumps = {(k.table, k.chain, k.rule) for k in want if k.rule and k.chain in ipt.BUILTIN}
    with scratch("kpy-hci") as netns:
        in_netns(netns, "iptables-restore", "--noflush", text=foreign)
        in_netns(netns, "iptables-restore", "--noflush", text=text)
        saved = in_netns(netns, "iptables-save")
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        if not line.startswith("-A "):
            continue
        _, chain, rule = line.split(" ", 2)
        if chain in ipt.BUILTIN:
            assert (table, chain, rule) in jumps or rule == "-s 192.0.2.99/32 -j ACCEPT", line
        else:
            assert ipt.owned(chain), line


def test_ipvs_and_userspace_render_the_corpus(corpus_plan: Plan) -> None:
    ctx = ipvs.context(BackendConfig(node_name=NODE), corpus_plan.node)
    rendered = ipvs.render(corpus_plan, ctx)
    assert rendered
    tables = [userspace.port_table(s) for s in corpus_plan.services.values()]
    assert {str(t.name) for t in tables if t is not None} >= corpus.GOOD_PORTS


# --------------------------------------------------------------------------- API server


def _api_objects() -> Iterator[tuple[corpus.Case, Any]]:
    for case in CASES:
        for obj in case.api:
            yield case, obj


def test_fake_api_server_corpus_through_the_kube_source() -> None:
    async def main() -> dict[str, int]:
        refused = 0
        async with FakeApiServer() as api:
            for obj in corpus.GOOD:
                api.create(obj)
            stored = []
            ignored = 0
            for case, obj in _api_objects():
                try:
                    api.create(obj)
                except (ApiError, ValueError):
                    refused += 1  # the fake refuses it too (no name, not an object)
                    continue
                if case.warns:
                    stored.append(obj)
                else:
                    ignored += 1
            with structlog.testing.capture_logs() as logs:
                backoff = BackoffPolicy(initial=0.02)
                async with kube_agent(api, NODE, backoff) as (_, backend, task):
                    deadline = time.monotonic() + 60
                    while not set(backend.programmed) >= corpus.GOOD_PORTS:
                        assert not task.done(), task
                        assert time.monotonic() < deadline, backend.programmed.keys()
                        await asyncio.sleep(0.02)
                    plan = backend.plans[-1]
                    assert not task.done()
        _names_are_kubernetes_names(plan)
        assert not [e for e in logs if e.get("event") == "event_failed"]
        warnings = _warnings(logs)
        named = {e.get("name") for e in warnings}
        # An object is handled when a warning names it; an object the decoder could
        # not take has no name to give (one warning each).
        handled = sum(convert.identify(obj)[1] in named for obj in stored)
        handled += sum(e.get("event") == "kube_object_undecodable" for e in warnings)
        lost = len(corpus.GOOD_PORTS - set(backend.programmed))
        return {
            "tried": len(stored),
            "handled": handled,
            "lost": lost,
            "refused_by_the_fake": refused,
            "ignored": ignored,
        }

    result = asyncio.run(main())
    _FIGURES["api"] = result
    print(f"fake API server: {result}")
    assert (result["handled"], result["lost"]) == (result["tried"], 0)
