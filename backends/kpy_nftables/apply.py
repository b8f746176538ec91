"""Running ``nft``: one ``nft -f -`` per transaction, ``nft -j list`` to read back.

Inside ``netns`` (a named network namespace) when one is configured — every test, lab
and benchmark uses one; in a DaemonSet the agent runs in the node's own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kpy.kernel.proc import communicate


class NftError(Exception):
    """``nft`` failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Nft:
    netns: str | None = None
    binary: str = "nft"

    def command(self, *args: str) -> list[str]:
        cmd = [self.binary, *args]
        if self.netns is None:
            return cmd
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *cmd]

    async def _run(self, *args: str) -> str:
        try:
            status, out, err = await communicate(self.command(*args))
        except OSError as exc:
            raise NftError(f"cannot run nft: {exc}") from exc
        if status != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft exited {status}")
        return out.decode()

    async def run_script(self, script: str) -> None:
        """Apply ``script`` as one atomic transaction (all of it or nothing)."""
        await self.run_lines(script.splitlines())

    async def run_lines(self, lines: Iterable[str], chunk: int = 4096) -> int:
        """Apply ``lines`` as one atomic transaction, written to nft's input a chunk at a
        time (a cold sync of 10,000 Services is 15 MB of script: never joined whole, nor
        encoded whole). Returns the bytes written."""
        return await self.run_parallel([lines], chunk)

    async def run_parallel(self, streams: Sequence[Iterable[str]], chunk: int = 4096) -> int:
        """Apply each of ``streams`` as its own transaction, in as many ``nft`` processes
        at once (each atomic, together not: for parts that reference nothing in each
        other). Returns the bytes written; raises NftError naming every refusal.

        Cancelled (or failing) while the processes run, it kills and reaps every one of
        them before it returns: an ``nft`` still reading its input has sent nothing to
        the kernel, and one that has sent its batch has committed all of it or none."""
        procs = []
        try:
            for _ in streams:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *self.command("-f", "-"),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                )
        except BaseException as exc:
            await _kill(procs)
            if isinstance(exc, OSError):
                raise NftError(f"cannot run nft: {exc}") from exc
            raise
        written = 0

        async def feed(stdin: asyncio.StreamWriter, lines: Iterable[str]) -> None:
            nonlocal written
            try:
                source = iter(lines)
                while piece := list(itertools.islice(source, chunk)):
                    data = ("\n".join(piece) + "\n").encode()
                    written += len(data)
                    stdin.write(data)
                    await stdin.drain()
                stdin.close()
                await stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError):
                pass  # nft stopped reading: its exit status and stderr say why

        async def one(proc: asyncio.subprocess.Process, lines: Iterable[str]) -> str | None:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            _, _, err = await asyncio.gather(
                feed(proc.stdin, lines), proc.stdout.read(), proc.stderr.read()
            )
            if await proc.wait() != 0:
                return err.decode(errors="replace").strip() or f"nft exited {proc.returncode}"
            return None

        try:
            errors = await asyncio.gather(
                *(one(p, ls) for p, ls in zip(procs, streams, strict=True))
            )
        except BaseException:
            # cancelled (the agent stops) or failed while writing: no nft process is
            # left behind still reading a half-written script
            await _kill(procs)
            raise
        refused = [e for e in errors if e is not None]
        if refused:
            raise NftError("; ".join(refused))
        return written

    async def list_tables(self) -> Iterator[dict[str, Any]]:
        """JSON of the ruleset without its rules: every chain, every set and map with
        its elements (:mod:`kpy_nftables.observe` keeps kpy's tables).

        ``nft list table`` is not used: it makes nft load every rule (seconds at scale).
        The three lists run as three processes: ``nft -j -f`` on a pipe does not read
        nft syntax reliably (it tries JSON first).
        """
        outs = await asyncio.gather(
            *(self._run("-j", "list", what) for what in ("chains", "sets", "maps"))
        )

        def decoded() -> Iterator[dict[str, Any]]:
            # one document at a time, each text dropped once decoded: at 10,000
            # Services the sets and maps are tens of MB of JSON
            while outs:
                yield json.loads(outs.pop(0))

        return decoded()

    def probe(self) -> str | None:
        """Whether ``nft`` (and ``nsenter`` for a namespace) can be started: full syncs
        are written by ``nft -f``. Nothing is listed (at 10,000 Services ``nft list
        tables`` alone took seconds on a loaded node); the kernel side is probed over
        netlink (:func:`kpy_nftables.netlink_read.ping`)."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found on PATH (install the nftables package)"
        if self.netns is not None and shutil.which("nsenter") is None:
            return "nsenter not found on PATH (install util-linux)"
        return None


async def _kill(procs: Iterable[asyncio.subprocess.Process]) -> None:
    """SIGKILL every process still running and wait for each (no orphan, no zombie).
    Shielded: a second cancellation while waiting still leaves them killed."""
    running = [p for p in procs if p.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    if running:
        await asyncio.shield(asyncio.gather(*(p.wait() for p in running)))
