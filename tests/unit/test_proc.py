"""kpy.kernel.proc: a child's status and output, a signal named, and no orphan on cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from kpy.kernel import proc


def test_status_output_and_stdin() -> None:
    status, out, err = asyncio.run(
        proc.communicate(["sh", "-c", "cat; echo oops >&2; exit 3"], b"hi")
    )
    assert (status, out, err) == (3, b"hi", b"oops\n")
    assert proc.failure("tool", status, err) == "tool exited 3: oops"


def test_a_signal_is_named() -> None:
    status, _, err = asyncio.run(proc.communicate(["sh", "-c", "kill -SEGV $$"]))
    assert status == -signal.SIGSEGV
    assert proc.failure("iptables-nft-save", status, err).startswith(
        "iptables-nft-save killed by signal 11"
    )


def test_cancellation_kills_and_reaps_the_child() -> None:
    async def main() -> int:
        task = asyncio.create_task(proc.communicate(["sh", "-c", "echo $$; exec sleep 600"]))
        # The child's pid: the one process whose parent is this one.
        for _ in range(200):
            await asyncio.sleep(0.01)
            pids = _children()
            if pids:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return pids[0]

    pid = asyncio.run(main())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped: no zombie either


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(entry))
    return found


def test_in_netns_wraps_only_when_a_namespace_is_named() -> None:
    assert proc.in_netns(None, ["nft", "-f", "-"]) == ["nft", "-f", "-"]
    assert proc.in_netns("kpy-n1", ["nft"]) == ["nsenter", "--net=/run/netns/kpy-n1", "--", "nft"]
