"""Run a child process for a coroutine: its output, and no orphan if the coroutine is
cancelled (the child is killed and reaped before the cancellation goes on)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


async def communicate(argv: Sequence[str], stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of ``argv`` fed ``stdin``; a negative status is a signal."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate(stdin)
    except BaseException:  # cancelled (SIGTERM, SIGINT), or anything else: no orphan
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Reaped even if cancelled again meanwhile.
        await asyncio.shield(proc.wait())
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def failure(tool: str, status: int, err: bytes, lines: int = 3) -> str:
    """``tool`` exited or was killed: the status (or signal) and the first lines of stderr."""
    how = f"killed by signal {-status}" if status < 0 else f"exited {status}"
    detail = err.decode(errors="replace").strip().splitlines()
    return f"{tool} {how}: {' / '.join(detail[:lines])[:500]}"


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run in the named network namespace ``netns`` (with ``nsenter``), if one is set."""
    if netns:
        return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    return list(argv)


def start_detached(
    argv: Sequence[str],
    log: Path,
    label: str = "kpy-detached",
    error: Callable[[str], Exception] = RuntimeError,
) -> int:
    """Start ``argv`` in its own session so that it outlives this process; its pid.
    Its stdout and stderr go to ``log`` (appended); ``label`` names the short-lived shell
    that reports the pid (seen in ``ps``); ``error(message)`` is raised when it could not
    be started."""
    with log.open("ab") as out:
        child = subprocess.Popen(
            ["setsid", "-f", "sh", "-c", 'echo $$; exec "$@" >&2', label, *argv],
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
        assert child.stdout is not None
        with child.stdout:
            line = child.stdout.readline().decode().strip()
        child.wait()
    if not line.isdigit():
        raise error(f"could not start: {' '.join(argv)}")
    return int(line)
