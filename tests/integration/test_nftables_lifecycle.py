"""The nftables backend's start and stop, in fresh network namespaces: a first sync
cut short (cancelled mid-write, or only half of it committed) is completed by the next
full sync and leaves no ``nft`` process behind; the probe lists nothing; cleanup
deletes kpy's tables over netlink and says when it could not."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kpy_nftables import NftablesBackend, render

from kpy.cli import main
from kpy.core.backend import BackendError
from kpy.core.model import Plan
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states, run
from kpy.testing.netns import nft, scratch
from tests.nftables_state import config, snapshot


@pytest.fixture
def reference() -> Iterator[Any]:
    """The ruleset a clean first sync of a plan gives, in a namespace of its own."""
    with scratch("kpy-ref") as ns:

        def of(plan: Plan) -> Any:
            nft(ns, "flush", "ruleset")
            run(NftablesBackend(config(ns)).apply(plan))
            return snapshot(ns)

        yield of


def processes_in(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns``."""
    inode = os.stat(f"/run/netns/{ns}").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino == inode:
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def test_a_cancelled_first_sync_kills_its_nft_processes(
    netns: str, monkeypatch: pytest.MonkeyPatch, reference: Any
) -> None:
    """The agent stopping (its task cancelled) while ``nft`` reads a first sync: every
    ``nft`` child is killed and reaped before the cancellation completes, so nothing
    goes on writing after the agent exited; a restarted agent's full sync completes
    the ruleset."""
    plan = b.plan(b.synthetic_states(3000))
    started: list[asyncio.subprocess.Process] = []
    both: list[asyncio.Event] = []
    spawn = asyncio.create_subprocess_exec

    async def recorded(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await spawn(*args, **kwargs)
        started.append(proc)
        if len(started) == 2:
            both[0].set()
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recorded)

    async def cancel_mid_write() -> None:
        both.append(asyncio.Event())
        task = asyncio.create_task(NftablesBackend(config(netns)).apply(plan))
        await both[0].wait()  # both halves' nft processes are reading the script
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_mid_write())
    assert len(started) == 2
    assert all(p.returncode is not None for p in started), "every nft child reaped"
    assert processes_in(netns) == [], "no process left in the node's namespace"
    monkeypatch.undo()
    restarted = NftablesBackend(config(netns))
    assert run(restarted.apply(plan)).full_sync
    assert snapshot(netns) == reference(plan)


@pytest.mark.parametrize("half", [0, 1])
def test_a_half_committed_first_sync_is_completed_by_one_full_sync(
    netns: str, half: int, reference: Any
) -> None:
    """The first sync's two ``nft`` processes commit separately (each atomic, together
    not). Only one committed — ``half`` 0: the base table and the first shards; 1: the
    other shards without any base table (a kill -9 between the two commits) — then a restarted
    agent's first full sync completes it: the kernel then holds exactly what a clean
    first sync writes."""
    plan = b.plan(conformance_states() + b.synthetic_states(200))
    backend = NftablesBackend(config(netns))

    async def commit_one_half() -> None:
        work = await backend._full(plan)
        fresh = backend._transaction(work, True)
        assert isinstance(fresh, render.Fresh)
        await backend._nft.run_lines(fresh.halves()[half])

    run(commit_one_half())
    tables = nft(netns, "list", "tables")
    assert ("table ip kpy\n" in tables) == (half == 0)
    restarted = NftablesBackend(config(netns))
    result = run(restarted.apply(plan))
    assert result.full_sync and result.ops > 0
    assert snapshot(netns) == reference(plan)
    assert run(restarted.apply(plan)).ops == 0


def test_the_probe_asks_the_kernel_and_lists_nothing(netns: str) -> None:
    assert NftablesBackend(config(netns)).probe() is None
    missing = NftablesBackend(config("kpy-no-such-namespace"))
    reason = missing.probe()
    assert reason is not None and "kpy-no-such-namespace" in reason


def test_cleanup_deletes_every_kpy_table_and_nothing_else(netns: str) -> None:
    backend = NftablesBackend(config(netns))
    run(backend.apply(b.plan(conformance_states())))
    nft(netns, "add", "table", "ip", "kpy-40")  # a shard of a larger count, left over
    nft(netns, "add", "table", "inet", "kpy")  # someone else's
    nft(netns, "add", "table", "ip", "filter")
    run(backend.cleanup())
    assert sorted(nft(netns, "list", "tables").split()) == sorted(
        ["table", "ip", "filter", "table", "inet", "kpy"]
    )
    run(backend.cleanup())  # nothing of kpy's left: nothing to do, no error


def test_cleanup_that_cannot_reach_the_kernel_raises() -> None:
    with pytest.raises(BackendError, match="kpy-no-such-namespace"):
        run(NftablesBackend(config("kpy-no-such-namespace")).cleanup())


def test_kpy_cleanup_exits_0_only_when_it_cleaned(netns: str) -> None:
    run(NftablesBackend(config(netns)).apply(b.plan(conformance_states())))
    done = CliRunner().invoke(main, ["cleanup", "--backend", "nftables", "--netns", netns])
    assert done.exit_code == 0, done.output
    assert "nftables: cleaned up" in done.stdout
    assert nft(netns, "list", "tables") == ""
    # every installed backend, in a namespace holding nothing of kpy's: nothing to do
    done = CliRunner().invoke(main, ["cleanup", "--netns", netns])
    assert done.exit_code == 0, done.output


def test_kpy_cleanup_that_could_not_clean_exits_1_and_says_why() -> None:
    done = CliRunner().invoke(
        main, ["cleanup", "--backend", "nftables", "--netns", "kpy-no-such-namespace"]
    )
    assert done.exit_code == 1
    assert "nftables: cleanup failed" in done.stderr
    assert "not cleaned up: nftables" in done.stderr
    assert "cleaned up" not in done.stdout


@pytest.mark.parametrize("before", [4, 200])
def test_a_node_programmed_with_another_shard_count_is_moved_by_one_full_sync(
    netns: str, before: int, monkeypatch: pytest.MonkeyPatch, reference: Any
) -> None:
    """An agent of another shard count (fewer, or more) programmed the node; a restarted
    agent's first full sync moves every port to its shard and leaves exactly what a clean
    first sync writes (shard tables of the old count emptied of kpy's objects)."""
    plan = b.plan(conformance_states() + b.synthetic_states(200))
    shards = render.SHARDS
    with monkeypatch.context() as patch:
        patch.setattr(render, "SHARDS", before)
        patch.setattr(render, "SHARDS_WITH_BASE", before // 4)
        run(NftablesBackend(config(netns)).apply(plan))
        assert f"table ip kpy-{before - 1}\n" in nft(netns, "list", "tables")
    assert shards == render.SHARDS
    restarted = NftablesBackend(config(netns))
    result = run(restarted.apply(plan))
    assert result.full_sync and result.ops > 0
    objects, rules = snapshot(netns)
    want_objects, want_rules = reference(plan)
    assert objects == want_objects
    # an emptied table of the old count holds no rule of kpy's
    assert {k: v for k, v in rules.items() if k in want_rules} == want_rules
    assert all(v[0] == 0 for k, v in rules.items() if k not in want_rules)
    assert run(restarted.apply(plan)).ops == 0
